"""The ClientApp: one client of train.py's loop, on a SuperNode.

Its node config says which client it is and where its data lies:
  partition-id   its client index u (seeds its batches and dropout as in train.py)
  num-partitions the number of clients U in the federation
  data-dir       its data folder (default: the run config's data-dir)
  own-data       true: data-dir holds this node's own training data, used whole; false
                 (default): data-dir holds the whole data set, and the node takes partition u
                 of U exactly as train.py splits it (--dirichlet-alpha, --seed)
A Flower simulation sets partition-id and num-partitions itself.

Each message carries the server's code version (version.py), which the node checks before
anything else. A train message carries the aggregator's name, the round, and the global LoRA
factors, head and changed frozen weights (wire.py); the node trains with train.client_update,
exactly what train.py does for client u (client_work.py), and replies with its factors (with
an upload codec: the codec's payload, and top-k's residuals, which it also keeps in
context.state), head, loss and num-examples. An evaluate message (federated evaluation, run config
fraction-evaluate) carries the global model; the node scores it on its own evaluation data
(client_work.my_eval_data) and replies with the metrics and num-examples. An aggregator whose
clients keep a private B (the registry's private_B) or head (train.keeps_own_head) finds them
in the node's context.state: the server sends them only to a node it has not heard from yet.
Arrays travel packed into two (packing.py).

Where the work runs: in this process in a simulation (Ray keeps it, with the model, between
rounds); in a deployment, where Flower starts a fresh `flwr-clientapp` process for every
message, in the node's warm worker (worker.py), which keeps the model loaded. This module
imports no torch, so a deployment's per-message process costs only Python and flwr.
"""
from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flora_na_app import packing, version, worker



def refuse_flower_dp_mods(client_app: ClientApp) -> None:
    """ValueError if the ClientApp carries one of Flower's DP mods (fixedclipping_mod,
    adaptiveclipping_mod, LocalDpMod): they clip and noise one FedAvg-style ArrayRecord, which
    this app's messages are not (the identity query has none), and account nothing for it.
    The run config's dp (train.py's --dp) does client-level DP in this app."""
    flower_dp = [getattr(m, "__name__", type(m).__name__) for m in client_app._mods
                 if getattr(m, "__module__", type(m).__module__).endswith(
                     ("centraldp_mods", "localdp_mod"))]
    if flower_dp:
        raise ValueError(f"Flower's DP mods {flower_dp} do not work with this app (they expect "
                         f"one FedAvg ArrayRecord per message); remove them and set the run "
                         f"config's dp = \"central\" or \"local\" with dp-clip")


app = ClientApp()
refuse_flower_dp_mods(app)     # Flower's DP mods added above would fail obscurely: refuse them
WORKER_START_SECONDS = 60      # a worker binds its socket before importing torch: seconds


def identity(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config; ValueError if missing or bad."""
    config = context.node_config
    if "partition-id" not in config or "num-partitions" not in config:
        raise ValueError(f"node config {dict(config)} needs partition-id and num-partitions "
                         f"(flower-supernode --node-config \"partition-id=0 num-partitions=2\")")
    u, n = config["partition-id"], config["num-partitions"]
    if not (isinstance(u, int) and isinstance(n, int) and 0 <= u < n):
        raise ValueError(f"need integers 0 <= partition-id < num-partitions, got {u} and {n}")
    return u, n


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this node is: the server maps partition ids to node ids before the first round."""
    version.check(str(msg.content["config"]["code-version"]))
    u, n = identity(context)
    return Message(RecordDict({"node": ConfigRecord({"partition-id": u, "num-partitions": n})}),
                   reply_to=msg)


def one_message_per_process() -> bool:
    """True in a deployment: Flower runs each message in a fresh flwr-clientapp process."""
    return Path(sys.argv[0]).name == "flwr-clientapp"


def _supernode_pid() -> int:
    """The SuperNode above this process (flower-supernode -> flower-superexec ->
    flwr-clientapp), else the parent."""
    pid = os.getppid()
    while pid > 1:
        try:
            if b"flower-supernode" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return os.getppid()


def _connect(node_id: int) -> socket.socket:
    """A connection to this node's warm worker, started first if none is running."""
    folder = Path(tempfile.gettempdir()) / f"flora-na-workers-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_mode & 0o077:
        raise PermissionError(f"{folder} must be private (mode 0700): it holds worker sockets")
    path = str(folder / f"node-{node_id}.sock")

    def attempt():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            return None

    if (s := attempt()) is not None:
        return s
    with open(path + ".lock", "w") as lock:        # one starter per node
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (s := attempt()) is not None:
            return s
        with open(folder / f"node-{node_id}.log", "a") as log:
            proc = subprocess.Popen([sys.executable, worker.__file__, path,
                                     str(_supernode_pid())], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, close_fds=True)
        deadline = time.monotonic() + WORKER_START_SECONDS
        while (s := attempt()) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the warm worker did not start (exit code {proc.poll()}); "
                                   f"see {folder / f'node-{node_id}.log'}")
            time.sleep(0.05)
        return s


def _in_worker(node_id: int, kind: str, request: dict):
    """client_work.train_round(**request) ("train") or evaluate_round ("evaluate") in the
    node's warm worker."""
    with _connect(node_id) as s:
        worker.send(s, (kind, request))
        answer = worker.receive(s)
    if answer[0] == "error":
        raise RuntimeError(f"{answer[1]}\n(in the node's warm worker)\n{answer[2]}")
    return answer[1]


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    """One round of client u: train.client_update from the global model in the message."""
    config = msg.content["config"]
    version.check(str(config["code-version"]))
    identity(context)
    kept = {key: {k: a.numpy() for k, a in record.items()}
            for key, record in context.state.array_records.items()}
    request = dict(run_config=dict(context.run_config), node_config=dict(context.node_config),
                   run_id=context.run_id, config=dict(config),
                   arrays=packing.unpack(msg.content["arrays"]), kept=kept)
    if one_message_per_process():
        upload, keep, metrics = _in_worker(context.node_id, "train", request)
    else:
        from flora_na_app import client_work   # noqa: PLC0415 (torch: only where it runs)
        upload, keep, metrics = client_work.train_round(**request)
    for key, arrays in keep.items():
        context.state[key] = ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items()))
    return Message(RecordDict({"arrays": packing.pack(upload), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation (run config fraction-evaluate > 0): the global model in the
    message scored on this node's evaluation data (client_work.my_eval_data)."""
    config = msg.content["config"]
    version.check(str(config["code-version"]))
    identity(context)
    request = dict(run_config=dict(context.run_config), node_config=dict(context.node_config),
                   run_id=context.run_id, config=dict(config),
                   arrays=packing.unpack(msg.content["arrays"]))
    if one_message_per_process():
        metrics = _in_worker(context.node_id, "evaluate", request)
    else:
        from flora_na_app import client_work   # noqa: PLC0415 (torch: only where it runs)
        metrics = client_work.evaluate_round(**request)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
