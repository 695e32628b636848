"""A client's round, away from Flower: train.client_update on this node's data, with the model,
tokenizer and data partition loaded once per process and reused for every later round of the
same run and aggregator.

client_app.py calls train_round in its own process in a simulation (Ray keeps that process,
and so the model, between rounds) and through a warm worker (worker.py) in a deployment, where
Flower 1.42 starts a fresh ClientApp process for every message. Arrays come and go as numpy
float32 under wire.py's keys ("A/<layer>", "B/<layer>", "head/<parameter>", "W/<layer>").
evaluate_round scores the global model on the node's own evaluation data (my_eval_data) for
federated evaluation.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch

import flora_na as fl
import train
from harness import federation, models
from harness.tasks import TaskData

from flora_na_app import wire

_loaded: dict = {}    # the model and data this process loaded last


def identity(node_config: dict) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config; ValueError if missing or bad."""
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ValueError(f"node config {dict(node_config)} needs partition-id and "
                         f"num-partitions (flower-supernode --node-config "
                         f"\"partition-id=0 num-partitions=2\")")
    u, n = node_config["partition-id"], node_config["num-partitions"]
    if not (isinstance(u, int) and isinstance(n, int) and 0 <= u < n):
        raise ValueError(f"need integers 0 <= partition-id < num-partitions, got {u} and {n}")
    return u, n


def partition(labels: list, n: int, args: train.Args) -> list[list[int]]:
    """train.py's partition of the examples among n clients, or a ValueError that says which
    options fix a Dirichlet split that leaves a client empty."""
    try:
        return federation.partition(labels, n, args.dirichlet_alpha or None, args.seed,
                                    min_size=1)
    except ValueError as err:
        raise ValueError(f"{err} ({n} clients, {len(labels)} training examples): raise "
                         f"dirichlet-alpha (e.g. dirichlet-alpha=5), set dirichlet-alpha=0 "
                         f"for an i.i.d. split, raise max-train-examples, or run fewer "
                         f"clients") from err


def setup(run_config: dict, node_config: dict, run_id: int, name: str) -> dict:
    """This node's run: its train.Args, data, model and batcher, loaded once per run
    and aggregator (the model's frozen weights then change only as the server says)."""
    data_dir = node_config.get("data-dir", None)
    override = {} if data_dir in (None, "") else {"data_dir": str(data_dir)}
    args = wire.args_from(run_config, **override)
    key = (run_id, name, args.data_dir)
    if _loaded.get("key") != key:
        _loaded.clear()                         # one model in memory at a time
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        task, data = train.load_data(args)
        model, tokenizer = train.model_loader(args, train.resolve_device(args.device))()
        ranks = train.client_ranks(dataclasses.replace(args, clients=identity(node_config)[1]))
        _loaded.update(key=key, args=args, task=task, data=data, model=model,
                       tokenizer=tokenizer, ranks=ranks,
                       scales=train.rank_scales(model, ranks),
                       make_batch=task.batcher(tokenizer, data.train, args.max_length))
    return _loaded


def my_examples(node_config: dict, run: dict) -> list[int]:
    """Indices of this node's training examples: all of them with own-data, else its part of
    train.py's partition (a simulation's nodes share one process, and so `run`)."""
    u, n = identity(node_config)
    if node_config.get("own-data", False):
        return list(range(len(run["data"].train)))
    return partition(run["data"].labels, n, run["args"])[u]


def my_eval_data(node_config: dict, run: dict) -> TaskData:
    """This node's evaluation sets for federated evaluation: with own-data, the evaluation
    sets of its own data-dir, whole (its own held-out data); else its share of the shared
    evaluation sets, examples u, u + U, u + 2U, ... of each (every example scored by exactly
    one client of the U). ValueError if a share is empty."""
    u, n = identity(node_config)
    evals = run["data"].evals
    if not node_config.get("own-data", False):
        evals = {split: examples[u::n] for split, examples in evals.items()}
    empty = [split for split, examples in evals.items() if not examples]
    if empty:
        raise ValueError(f"client {u} of {n} has no evaluation examples in {empty}: raise "
                         f"max-eval-examples to at least {n}, or set fraction-evaluate=0")
    return TaskData(train=[], labels=[], evals=evals)


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, torch.Tensor]]:
    """wire.from_record's split of numpy arrays into A, B, head, W and C (core) tensors."""
    out: dict[str, dict[str, torch.Tensor]] = {"A": {}, "B": {}, "head": {}, "W": {}, "C": {}}
    for key, array in arrays.items():
        kind, name = key.split("/", 1)
        if kind not in out:
            raise ValueError(f"unexpected array {key!r}: expected A/, B/, head/, W/ or C/ keys")
        out[kind][name] = torch.from_numpy(array)
    return out


def _arrays(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """float32 numpy arrays, as wire.to_record sends them."""
    return {k: v.detach().float().cpu().contiguous().numpy() for k, v in tensors.items()}


def train_round(run_config: dict, node_config: dict, run_id: int, config: dict,
                arrays: dict[str, np.ndarray], kept: dict[str, dict[str, np.ndarray]]
                ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], dict]:
    """One round of client u: train.client_update from the global model in `arrays`.
    `kept` is what the node keeps between rounds (context.state: "private-B/<name>",
    "private-head/<name>"); returns the upload, the updated `kept` entries and the metrics."""
    name, round_ = str(config["aggregator"]), int(config["round"])
    entry = fl.AGGREGATORS[name]
    t0 = time.perf_counter()
    run = setup(run_config, node_config, run_id, name)
    args, model = run["args"], run["model"]
    idx = my_examples(node_config, run)
    u, _ = identity(node_config)
    got = _tensors(arrays)
    if got["W"]:                                  # frozen weights the aggregator changed
        layers = fl.lora_layers(model)
        with torch.no_grad():
            for layer, W in got["W"].items():
                layers[layer].get_base_layer().weight.copy_(W)
    private = f"private-B/{name}"
    B = got["B"]
    if not B:                                     # the server left this node its own B
        if not entry.private_B or private not in kept:
            raise ValueError(f"round {round_ + 1}: the message has no B and this node holds "
                             f"no private B for {name} (was the SuperNode restarted?)")
        B = {k: torch.from_numpy(v) for k, v in kept[private].items()}
    factors = {layer: (A, B[layer]) for layer, A in got["A"].items()}
    private_head, head = f"private-head/{name}", got["head"]
    if not head and fl.head_state(model):         # the server left this node its own head
        if private_head not in kept:
            raise ValueError(f"round {round_ + 1}: the message has no head and this node "
                             f"holds no private head for {name} (was the SuperNode restarted?)")
        head = {k: torch.from_numpy(v) for k, v in kept[private_head].items()}
    r_u = run["ranks"][u]                         # its share, at its own rank (as train.py)
    models.set_rank(model, r_u)
    factors = federation.to_client(factors, r_u, run["scales"][r_u])
    t1 = time.perf_counter()
    upload, head, loss = train.client_update(
        model, run["make_batch"], idx, factors=factors, head=head, lr=args.lr,
        optimizer=args.optimizer, trains=train.trained(entry, round_),
        local_steps=args.local_steps, batch_size=args.batch_size, seed=args.seed, round_=round_,
        u=u, core=got["C"] or None)
    keep = {}
    if entry.private_B:
        keep[private] = _arrays({layer: B for layer, (_, B) in upload.items()})
    if train.keeps_own_head(args, name):
        keep[private_head] = _arrays(head)
    sent = wire.to_arrays(upload, head)           # the reply's arrays, exactly as wire sends
    metrics = {"num-examples": len(idx), "train-loss": loss, "partition-id": u,
               "load-seconds": t1 - t0, "train-seconds": time.perf_counter() - t1}
    return sent, keep, metrics


def evaluate_round(run_config: dict, node_config: dict, run_id: int, config: dict,
                   arrays: dict[str, np.ndarray], kept: dict | None = None) -> dict:
    """Federated evaluation by client u: the global model in `arrays` (the global factors at
    the global rank, the global head, changed frozen weights; never the node's own B or
    head) scored by train.evaluate on my_eval_data. Returns train.evaluate's metrics (each
    evaluation set's n_eval among them) and num-examples, the examples scored."""
    name = str(config["aggregator"])
    run = setup(run_config, node_config, run_id, name)
    args, model = run["args"], run["model"]
    got = _tensors(arrays)
    if not got["B"] or (fl.head_state(model) and not got["head"]):
        raise ValueError("an evaluate message must carry the global B and head")
    if got["W"]:
        layers = fl.lora_layers(model)
        with torch.no_grad():
            for layer, W in got["W"].items():
                layers[layer].get_base_layer().weight.copy_(W)
    models.set_rank(model, args.rank)             # the global model's rank
    fl.write_factors(model, {layer: (A, got["B"][layer]) for layer, A in got["A"].items()})
    fl.load_head(model, got["head"])
    data = my_eval_data(node_config, run)
    metrics = train.evaluate(run["task"], model, run["tokenizer"], data,
                             **train.eval_options(args))
    return {**metrics, "num-examples": sum(len(x) for x in data.evals.values())}
