"""Local Flower federations for the tests and the overhead measurement: a SuperLink and
SuperNodes as separate processes on free localhost ports, `flwr run` of flower_app/, and
every process stopped by its pid, with the processes it started, also when something fails.
A run's outcome is the SuperLink's record of it (RunOutcome: `flwr run` itself exits 0 even
when the ServerApp fails).

It drives Flower's command-line tools (flower-superlink, flower-supernode, flwr) found next
to this Python, never imports flwr, and sets what Flower needs to run with no network
beyond localhost (OFFLINE_ENV). Each process gets its own FLWR_HOME under `workdir`, where
Flower unpacks the app bundle. The app imports the project (flora_na, train, harness): where it
is installed (pip install -e .) the processes find it there; in a plain clone that is not
installed, and only then, PYTHONPATH gives them the repository.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]          # the repository
APP = ROOT / "flower_app"

# Flower would otherwise `uv sync` the app's dependencies (fails offline, exit code 608),
# check PyPI for updates and send telemetry; the Hub libraries would look for updates.
OFFLINE_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               # how often a SuperNode's superexec looks for a message to run (Flower: 1 s)
               "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def installed() -> bool:
    """True where the project is installed (pip install -e . or a wheel), not merely a clone."""
    try:
        importlib.metadata.distribution("flora-na")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    """A Flower command installed next to this Python (a virtual environment's bin/)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pip install -r requirements-flower.txt")
    return str(path)


def run_config(values: dict) -> str:
    """`flwr run --run-config` text: key=value pairs, strings double-quoted (TOML)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v) if isinstance(v, str) else repr(v)
    return " ".join(f"{k}={value(v)}" for k, v in values.items())


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first seen through /proc), deepest last."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _session(pid: int) -> list[int]:
    """Every process in the session that `pid` leads (what it started, also orphans such as
    the app's warm workers, unless they left the session)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != pid:
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[4]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"     # a zombie has exited
    except OSError:
        return False


@dataclasses.dataclass
class RunOutcome:
    """How a `flwr run` went: the command's exit code (0 also when the ServerApp failed: Flower
    1.42's `flwr run` reports only that the run was submitted), its output, and the run's
    final status as the SuperLink records it (`flwr ls --run-id N --format json`)."""
    returncode: int
    stdout: str
    run_id: int | None
    status: str | None          # "finished:completed", "finished:failed", "finished:stopped"
    details: str | None         # e.g. "ServerApp failed with exception: ..."

    @property
    def ok(self) -> bool:
        """True when the run finished and its ServerApp completed."""
        return self.status == "finished:completed"


def started_run_id(output: str) -> int | None:
    """The run id in `flwr run`'s "Successfully started run N", or None."""
    found = re.search(r"Successfully started run (\d+)", output)
    return int(found.group(1)) if found else None


class LocalFederation:
    """One SuperLink and its SuperNodes on this machine; use as a context manager so that
    every process is stopped when the block ends, however it ends."""

    def __init__(self, workdir: Path, env: dict | None = None):
        self.workdir = Path(workdir)
        self.extra_env = dict(env or {})          # e.g. {"FLWR_LOG_LEVEL": "DEBUG"}: timestamps
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.address: str | None = None
        self.superlink: subprocess.Popen | None = None

    def env(self, home: str) -> dict:
        """This machine's environment plus Flower's offline settings, the `env` given to the
        constructor, its own FLWR_HOME,
        Flower's tools on PATH and, in a clone where the project is not installed, the
        repository on PYTHONPATH."""
        env = {**os.environ, **OFFLINE_ENV, **self.extra_env,
               "FLWR_HOME": str(self.workdir / home)}
        if not installed():
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [
                os.environ.get("PYTHONPATH")] if p])
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
        return env

    def _start(self, argv: list[str], name: str, home: str) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(home),
                                cwd=self.workdir, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_superlink(self, simulation: bool = False, timeout: float = 120,
                        port: int | None = None) -> str:
        """A SuperLink (with --simulation: one that runs `flwr run` as a simulation) on a
        free port, or `port`, keeping its state in workdir/superlink.db (so it survives a
        restart); returns its address once it accepts connections."""
        port = port or free_port()
        argv = [tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                str(port), "--disable-runtime-dependency-installation",
                "--database", str(self.workdir / "superlink.db")]
        proc = self._start(argv + (["--simulation"] if simulation else []), "superlink", "link")
        self.superlink = proc
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flower-superlink did not start (exit code {proc.poll()}): "
                                   f"{(self.workdir / 'superlink.log').read_text()[-2000:]}")
            time.sleep(0.2)
        self.address = f"127.0.0.1:{port}"
        home = self.workdir / "cli"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local-test"\n\n[superlink.local-test]\n'
            f'address = "{self.address}"\ninsecure = true\n')
        return self.address

    def start_supernode(self, partition_id: int, num_partitions: int, **node_config
                        ) -> subprocess.Popen:
        """A SuperNode for client `partition_id` of `num_partitions` (other node config keys,
        e.g. data_dir="...", as keyword arguments with _ for -)."""
        config = {"partition-id": partition_id, "num-partitions": num_partitions,
                  **{k.replace("_", "-"): v for k, v in node_config.items()}}
        argv = [tool("flower-supernode"), "--insecure", "--superlink", self.address,
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", run_config(config)]
        return self._start(argv, f"supernode{partition_id}-{len(self.procs)}",
                           f"node{partition_id}")

    def restart_superlink(self, timeout: float = 30) -> str:
        """SIGTERM to the SuperLink, wait for it and its children, start it again on the same
        port with the same database."""
        old, port = self.superlink, int(self.address.rsplit(":", 1)[1])
        family = [old.pid] + _descendants(old.pid) + _session(old.pid)
        old.terminate()
        old.wait(timeout)
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.procs.remove(old)
        return self.start_superlink(port=port)

    def submit(self, config: dict, federation_config: dict | None = None, name: str = "flwr-run"
               ) -> subprocess.Popen:
        """`flwr run flower_app local-test --run-config ... --stream`, started; its output
        (the ServerApp's log) goes to workdir/<name>.log."""
        argv = [tool("flwr"), "run", str(APP), "local-test", "--run-config", run_config(config),
                "--stream"]
        if federation_config:
            argv += ["--federation-config", run_config(federation_config)]
        return self._start(argv, name, "cli")

    def run(self, config: dict, federation_config: dict | None = None, timeout: float = 600,
            name: str = "flwr-run") -> RunOutcome:
        """submit, waited for, and its outcome (the ServerApp's log in .stdout)."""
        proc = self.submit(config, federation_config, name)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return self.outcome(name, proc.returncode)

    def run_status(self, run_id: int, timeout: float = 60) -> tuple[str, str]:
        """(status, details) of run `run_id` as the SuperLink records it, from `flwr ls
        local-test --run-id N --format json`, once the run has finished (or `timeout` s)."""
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run([tool("flwr"), "ls", "local-test", "--run-id", str(run_id),
                                   "--format", "json"], env=self.env("cli"), cwd=self.workdir,
                                  capture_output=True, text=True, timeout=timeout)
            try:
                run = json.loads(done.stdout)["runs"][0]
            except (ValueError, KeyError, IndexError) as err:
                raise RuntimeError(f"flwr ls gave no run {run_id} (exit code {done.returncode})"
                                   f": {done.stdout[-1000:]} {done.stderr[-1000:]}") from err
            if run["status"].startswith("finished") or time.monotonic() > deadline:
                return run["status"], run["status-details"]
            time.sleep(0.5)

    def outcome(self, name: str, returncode: int) -> RunOutcome:
        """The outcome of the `flwr run` submitted as `name` (which exited with returncode):
        its run id from its output, then the run's final status from the SuperLink."""
        output = (self.workdir / f"{name}.log").read_text()
        run_id = started_run_id(output)
        status, details = self.run_status(run_id) if run_id is not None else (None, None)
        return RunOutcome(returncode, output, run_id, status, details)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to every process started here, newest first, then SIGKILL to any of them
        or their descendants (Flower's superexec and app processes) still alive."""
        family = []
        for proc in reversed(self.procs):
            family += [proc.pid] + _descendants(proc.pid) + _session(proc.pid)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in family) and time.monotonic() < deadline:
            for proc in self.procs:
                proc.poll()                        # reap our own children
            time.sleep(0.2)
        for pid in family:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):   # it may exit meanwhile
                    os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait()
        deadline = time.monotonic() + timeout      # SIGKILL is not instant for grandchildren
        while any(_alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.procs = []

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
