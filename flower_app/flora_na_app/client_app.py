"""The ClientApp: one client of train.py's loop, on a SuperNode.

Its node config says which client it is and where its data lies:
  partition-id   its client index u (seeds its batches and dropout as in train.py)
  num-partitions the number of clients U in the federation
  data-dir       its data folder (default: the run config's data-dir)
  own-data       true: data-dir holds this node's own training data, used whole; false
                 (default): data-dir holds the whole data set, and the node takes partition u
                 of U exactly as train.py splits it (--dirichlet-alpha, --seed)
A Flower simulation sets partition-id and num-partitions itself.

Each train message carries the aggregator's name, the round, and the global LoRA factors,
head and changed frozen weights (wire.py); the node trains with train.client_update, exactly
what train.py does for client u, and replies with its factors, head, loss and num-examples.
An aggregator whose clients keep a private B (the registry's private_B) or head
(train.keeps_own_head) finds them in the node's context.state: the server sends them only to a
node it has not heard from yet.
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import flora_na as fl
import train
from harness import federation, models

from flora_na_app import wire

app = ClientApp()

_loaded: dict = {}    # the model and data this process loaded last (simulation reuses them)


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


def setup(context: Context, name: str) -> dict:
    """This node's run: its train.Args, data, model and batcher, loaded once per run
    and aggregator (the model's frozen weights then change only as the server says)."""
    data_dir = context.node_config.get("data-dir", None)
    override = {} if data_dir in (None, "") else {"data_dir": str(data_dir)}
    args = wire.args_from(context.run_config, **override)
    key = (context.run_id, name, args.data_dir)
    if _loaded.get("key") != key:
        _loaded.clear()                         # one model in memory at a time
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        task, data = train.load_data(args)
        model, tokenizer = train.model_loader(args, train.resolve_device(args.device))()
        ranks = train.client_ranks(dataclasses.replace(args, clients=identity(context)[1]))
        _loaded.update(key=key, args=args, data=data, model=model, ranks=ranks,
                       scales=train.rank_scales(model, ranks),
                       make_batch=task.batcher(tokenizer, data.train, args.max_length))
    return _loaded


def my_examples(context: Context, run: dict) -> list[int]:
    """Indices of this node's training examples: all of them with own-data, else its part of
    train.py's partition."""
    u, n = identity(context)
    data, args = run["data"], run["args"]
    if context.node_config.get("own-data", False):
        return list(range(len(data.train)))
    parts = federation.partition(data.labels, n, args.dirichlet_alpha or None, args.seed,
                                 min_size=1)
    return parts[u]


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this node is: the server maps partition ids to node ids before the first round."""
    u, n = identity(context)
    return Message(RecordDict({"node": ConfigRecord({"partition-id": u, "num-partitions": n})}),
                   reply_to=msg)


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    """One round of client u: train.client_update from the global model in the message."""
    config = msg.content["config"]
    name, round_ = str(config["aggregator"]), int(config["round"])
    entry = fl.AGGREGATORS[name]
    t0 = time.perf_counter()
    run = setup(context, name)
    args, model = run["args"], run["model"]
    u, _ = identity(context)
    idx = my_examples(context, run)
    got = wire.from_record(msg.content["arrays"])
    if got["W"]:                                  # frozen weights the aggregator changed
        layers = fl.lora_layers(model)
        with torch.no_grad():
            for layer, W in got["W"].items():
                layers[layer].get_base_layer().weight.copy_(W)
    private = f"private-B/{name}"
    B = got["B"]
    if not B:                                     # the server left this node its own B
        if not entry.private_B or private not in context.state:
            raise ValueError(f"round {round_ + 1}: the message has no B and this node holds "
                             f"no private B for {name} (was the SuperNode restarted?)")
        B = context.state[private].to_torch_state_dict()
    factors = {layer: (A, B[layer]) for layer, A in got["A"].items()}
    private_head, head = f"private-head/{name}", got["head"]
    if not head and fl.head_state(model):         # the server left this node its own head
        if private_head not in context.state:
            raise ValueError(f"round {round_ + 1}: the message has no head and this node "
                             f"holds no private head for {name} (was the SuperNode restarted?)")
        head = context.state[private_head].to_torch_state_dict()
    r_u = run["ranks"][u]                         # its share, at its own rank (as train.py)
    models.set_rank(model, r_u)
    factors = federation.to_client(factors, r_u, run["scales"][r_u])
    t1 = time.perf_counter()
    upload, head, loss = train.client_update(
        model, run["make_batch"], idx, factors=factors, head=head, lr=args.lr,
        optimizer=args.optimizer, train_A=entry.train_A, local_steps=args.local_steps,
        batch_size=args.batch_size, seed=args.seed, round_=round_, u=u)
    if entry.private_B:
        context.state[private] = ArrayRecord({layer: B for layer, (_, B) in upload.items()})
    if train.keeps_own_head(args, name):
        context.state[private_head] = ArrayRecord(head)
    metrics = MetricRecord({"num-examples": len(idx), "train-loss": loss, "partition-id": u,
                            "load-seconds": t1 - t0, "train-seconds": time.perf_counter() - t1})
    return Message(RecordDict({"arrays": wire.to_record(upload, head), "metrics": metrics}),
                   reply_to=msg)
