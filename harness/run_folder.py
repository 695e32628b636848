"""A run folder (train.py --out) that no invocation damages: what train.py checks before it writes
anything, and what --resume verifies before it reuses a file.

- `--out` must be empty, new, or a run of this project (it holds config.json); a folder of
  other files is refused before anything is written.
- Each aggregator's folder holds checksums.json: the sha256 of state.pt (the previous and the
  new one while a new one is being written, so a kill in between still resumes) and of the saved
  adapter's files. On --resume a state.pt that does not match, or does not load, is refused
  with the file named; an adapter that does not match, or is missing, is rebuilt from the state
  (it is derived from it); metrics.jsonl, missing or unreadable, is rebuilt from the states
  (each holds its aggregator's rows). All of this happens before a line is appended anywhere.
- What changes the numbers a run computes besides its config (torch threads, the versions of
  torch, transformers and peft, the CPU vendor, the device) is recorded in config.json under
  "numerics"; --resume under different numerics is refused unless --allow-numerics-change,
  which provenance.jsonl then records. A run from before this record (no "numerics") resumes:
  its earlier numerics are unknown, not known to differ (runs of earlier versions must go on);
  provenance.jsonl records them as "unknown" -> today's, and config.json records today's.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile

from harness import provenance

CHECKSUMS = "checksums.json"


# --- reads that name the file and say what to do -----------------------------------------------

def read_json(path: str, what_to_do: str):
    """json.load of path, or ValueError naming the file, what is wrong and what_to_do."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the file is damaged; "
                         f"{what_to_do}") from None


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file; ValueError naming the file and the line when one is bad."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number} is not valid JSON ({e})") from None
    return rows


def load_state(path: str, expected: list[str] | None):
    """torch.load of a run's state.pt after checking its sha256 against `expected` (None: the
    run predates checksums); ValueError naming the file and what to do otherwise."""
    import torch
    fix = (f"delete {os.path.dirname(path)} to run that aggregator again from round 0, or "
           f"restore the file from a backup")
    if expected is not None and sha256(path) not in expected:
        raise ValueError(f"{path} does not match its checksum in {CHECKSUMS}: the file is "
                         f"damaged; {fix}")
    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); {fix}") from None


# --- checksums -----------------------------------------------------------------------------

def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_checksums(run_dir: str, sums: dict) -> None:
    tmp = os.path.join(run_dir, CHECKSUMS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(sums, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(run_dir, CHECKSUMS))


def read_checksums(run_dir: str) -> dict | None:
    """The folder's checksums.json, or None for a run saved before checksums existed."""
    path = os.path.join(run_dir, CHECKSUMS)
    if not os.path.exists(path):
        return None
    return read_json(path, f"delete {run_dir} to run that aggregator again from round 0")


def save_state(run_dir: str, state: dict) -> None:
    """Write state.pt atomically, its checksum first: during the write both the old and the new
    state match, so a kill at any moment leaves a state that --resume accepts."""
    import torch
    path = os.path.join(run_dir, "state.pt")
    tmp = path + ".tmp"
    torch.save(state, tmp)
    sums = read_checksums(run_dir) or {}
    old = [s for s in sums.get("state.pt", []) if os.path.exists(path)]
    _write_checksums(run_dir, {**sums, "state.pt": old[-1:] + [sha256(tmp)]})
    os.replace(tmp, path)


def _adapter_files(run_dir: str) -> dict[str, str]:
    """{name: path} of the saved global model's files (the adapter link followed)."""
    files = {}
    adapter = os.path.join(run_dir, "adapter")
    if os.path.isdir(adapter):
        for name in sorted(os.listdir(adapter)):
            files[f"adapter/{name}"] = os.path.join(adapter, name)
    base = os.path.join(run_dir, "base_layers.safetensors")
    if os.path.exists(base):
        files["base_layers.safetensors"] = base
    return files


def record_saved(run_dir: str) -> None:
    """After a round's state and adapter are saved: the checksums of exactly those files."""
    path = os.path.join(run_dir, "state.pt")
    _write_checksums(run_dir, {"state.pt": [sha256(path)],
                               **{n: sha256(p) for n, p in _adapter_files(run_dir).items()}})


def adapter_problem(run_dir: str, has_base: bool) -> str | None:
    """None if the saved global model matches its checksums, else what is wrong with it."""
    sums = read_checksums(run_dir)
    files = _adapter_files(run_dir)
    if not any(n.startswith("adapter/") for n in files):
        return f"{os.path.join(run_dir, 'adapter')} is missing"
    if has_base and "base_layers.safetensors" not in files:
        return f"{os.path.join(run_dir, 'base_layers.safetensors')} is missing"
    if sums is None:
        return None  # saved before checksums: nothing to check against
    recorded = {n for n in sums if n != "state.pt"}
    if recorded != set(files):
        return f"{run_dir}: saved files {sorted(files)} differ from {CHECKSUMS}'s {sorted(recorded)}"
    for name, path in files.items():
        if sha256(path) != sums[name]:
            return f"{path} does not match its checksum in {CHECKSUMS}"
    return None


# --- before anything is written ------------------------------------------------------------

def check_out(out: str) -> None:
    """ValueError unless --out names a folder that is new, empty or a run of this project."""
    if not out or not out.strip():
        raise ValueError("--out is empty: give the folder the run is written to, e.g. "
                         "--out runs/mine")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(
            os.path.join(out, "config.json")):
        raise ValueError(f"--out {out!r} holds files but is not a run of train.py (it has no "
                         f"config.json); nothing was written: choose a new or empty folder")


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"--seed must be an integer in [0, 2**63), got {seed}")


def check_resumable(out: str, names: list[str]) -> list[dict]:
    """Verify, before anything is appended, every file --resume will reuse: each aggregator's
    state.pt against its checksum (refused with the file named when damaged), and metrics.jsonl
    (rebuilt from the states when missing or unreadable). Returns the metrics rows to continue."""
    states = {}
    for name in names:
        run_dir = os.path.join(out, name)
        path = os.path.join(run_dir, "state.pt")
        if os.path.exists(path):
            sums = read_checksums(run_dir)
            states[name] = load_state(path, None if sums is None else sums.get("state.pt"))
    mpath = os.path.join(out, "metrics.jsonl")
    try:
        log = read_jsonl(mpath)
    except (OSError, ValueError) as e:
        if not states:  # nothing saved yet: a fresh start
            return []
        print(f"note: {mpath} is missing or damaged ({e}); rebuilt from the saved states")
        log = []
    # each aggregator's rows come from its verified state, the others' from metrics.jsonl
    return ([r for r in log if r.get("aggregator") not in states]
            + [row for state in states.values() for row in state["metrics"]])


# --- numerics ------------------------------------------------------------------------------

def numerics(threads: int, device) -> dict:
    """What changes a run's numbers besides its config: torch threads, library versions, the
    CPU vendor (torch draws dropout masks through MKL on Intel only), the device type."""
    version = provenance.package_version
    return {"threads": threads, "torch": version("torch"),
            "transformers": version("transformers"), "peft": version("peft"),
            "cpu_vendor": provenance.cpu_info("vendor_id"),
            "device": getattr(device, "type", str(device))}


def numerics_change(old_config: dict, now: dict) -> dict | None:
    """{fact: (then, now)} where a resumed run's numerics differ (all facts if never recorded),
    None where they are the same."""
    then = old_config.get("numerics")
    if then is None:
        return {k: ("unknown", v) for k, v in now.items()}
    diff = {k: (then.get(k), v) for k, v in now.items() if then.get(k) != v}
    return diff or None
