"""The ServerApp: train.py's federated loop with Flower carrying the clients' rounds.

It asks every SuperNode which client it is (partition-id, num-partitions), then runs each
aggregator named in the run config with a FedAvg subclass whose

  configure_train  picks train.py's participants of the round (federation.participants, by
                   partition id) and sends each its message: the global factors, head and
                   changed frozen weights, but a B and a head only to a node that does not
                   keep its own (the registry's private_B, train.keeps_own_head) or has not
                   answered yet;
  aggregate_train  drops replies with errors (logged: which client, which node, why),
                   renormalises p over the clients that answered, and calls train.py's own
                   server_update (the registry's aggregator through federation.server_step,
                   the head averaged by p) and end_round (evaluation on the server's data,
                   metrics.jsonl, state.pt and the peft adapter, every round). Clients'
                   scores are weighted (--personal-weighting data) by train.py's partition
                   of the server's data, or by the num-examples a node has reported since
                   the ServerApp started (own-data nodes).

The run directory (run config `out`, on the server's machine) therefore has train.py's layout
and schema, so evidence/report.py reads a Flower run as any other, and `resume=true` continues
it from its last saved round. Rows gain "failed" (client, node, error) and, per client in
"clients", "client_load_seconds" and "client_train_seconds" (loading data and model in the
ClientApp's process, and train.client_update); "client_seconds" spans sending the round to
holding every reply.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from logging import INFO, WARNING

import flwr
import torch
from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

import flora_na as fl
import train
from harness import federation, models, provenance

from flora_na_app import wire

app = ServerApp()


def find_clients(grid: Grid, timeout: float) -> dict[int, int]:
    """{partition-id: node id} once every client of the federation has said who it is: all
    nodes must report the same num-partitions U and distinct partition ids 0..U-1. Waits up
    to `timeout` seconds for late SuperNodes; ValueError for a duplicate or bad identity."""
    deadline = time.monotonic() + timeout
    who: dict[int, tuple[int, int]] = {}            # node id -> (partition-id, num-partitions)
    while True:
        new = [node for node in grid.get_node_ids() if node not in who]
        asks = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                        message_type=MessageType.QUERY) for node in new]
        replies = grid.send_and_receive(asks, timeout=max(deadline - time.monotonic(), 1)
                                        ) if asks else []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise ValueError(f"node {node} cannot say which client it is: "
                                 f"{reply.error.reason}")
            ident = reply.content["node"]
            who[node] = (int(ident["partition-id"]), int(ident["num-partitions"]))
        sizes = {n for _, n in who.values()}
        if len(sizes) > 1:
            raise ValueError(f"the SuperNodes disagree on num-partitions: {who} "
                             f"(node id: (partition-id, num-partitions))")
        ids = sorted(u for u, _ in who.values())
        if len(set(ids)) < len(ids):
            raise ValueError(f"two SuperNodes have the same partition-id: {who}")
        if sizes and len(ids) == next(iter(sizes)):
            return {u: node for node, (u, _) in who.items()}
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids)} client(s) {ids} of {sizes or '?'} connected "
                               f"within node-timeout={timeout} s")
        time.sleep(1.0)


class RegistryStrategy(FedAvg):
    """FedAvg's round driver (Strategy.start) with the aggregation of flora_na's registry and
    train.py's server state; one instance runs one aggregator."""

    def __init__(self, name: str, *, state: dict, model, tokenizer, task, data,
                 args: train.Args, clients: dict[int, int], log_rows: list[dict],
                 device: torch.device):
        super().__init__(fraction_evaluate=0.0, min_available_nodes=len(clients))
        self.name, self.entry = name, fl.AGGREGATORS[name]
        self.state, self.model, self.tokenizer = state, model, tokenizer
        self.task, self.data, self.args = task, data, args
        self.clients = clients                      # partition-id -> node id
        self.log_rows, self.device = log_rows, device
        self.private_head = train.keeps_own_head(args, name)
        self.has_own: set[int] = set()              # clients keeping their B, head (this process)
        self.n_examples = [len(ix) for ix in federation.partition(   # train.py's n_u
            data.labels, len(clients), args.dirichlet_alpha or None, args.seed, min_size=1)]
        self.ranks = train.client_ranks(args)       # each client's LoRA rank, as train.py's
        self.scales = train.rank_scales(model, self.ranks)
        self.chosen: list[int] = []
        self.t_sent = 0.0

    def global_record(self) -> ArrayRecord:
        """The global model as it travels: factors, head, changed frozen weights."""
        s = self.state
        return wire.to_record(s["factors"], s["head"], s["base"])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """train.py's participants of this round, each with its own message."""
        s, rnd = self.state, self.state["round"]
        self.chosen = federation.participants(len(self.clients), self.args.participation,
                                              rnd, self.args.seed)
        messages = []
        for u in self.chosen:
            # private parts (B, head): train.py's for client u, sent once; then it keeps them
            factors, head, own = s["factors"], s["head"], u in self.has_own
            if s["client_B"] is not None:
                factors = {n: (A, s["client_B"][u][n]) for n, (A, _) in factors.items()}
            if s["client_head"] is not None:
                head = {} if own else s["client_head"][u]
            record = wire.to_record(factors, head, s["base"],
                                    without_B=own and s["client_B"] is not None)
            content = RecordDict({"arrays": record, "config": ConfigRecord(
                {"aggregator": self.name, "round": rnd})})
            messages.append(Message(content, dst_node_id=self.clients[u],
                                    message_type=MessageType.TRAIN))
        self.t_sent = time.perf_counter()
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop failed clients, aggregate the others with the registry, finish the round."""
        t1 = time.perf_counter()
        replies = list(replies)
        rnd, node_to_u = self.state["round"], {node: u for u, node in self.clients.items()}
        answers, failed = {}, []
        for reply in replies:
            u = node_to_u[reply.metadata.src_node_id]
            if reply.has_error():
                reason = reply.error.reason.strip()
                failed.append({"client": u, "node": reply.metadata.src_node_id,
                               "error": reason.splitlines()[-1] if reason else ""})
                log(WARNING, "round %d: client %d (node %d) failed and is left out of the "
                    "round: %s", rnd + 1, u, reply.metadata.src_node_id, reason)
            else:
                answers[u] = reply.content
        for u in sorted(set(self.chosen) - set(answers) - {f["client"] for f in failed}):
            failed.append({"client": u, "node": self.clients[u], "error": "no reply in time"})
            log(WARNING, "round %d: client %d (node %d) did not reply within round-timeout",
                rnd + 1, u, self.clients[u])
        if not answers:
            raise RuntimeError(f"round {rnd + 1}: no client answered: {failed}")
        ids = sorted(answers)                       # train.py's order: by client index
        uploads, heads, losses, n_u, spent = [], [], [], [], {"load": [], "train": []}
        for u in ids:
            got, metrics = wire.from_record(answers[u]["arrays"]), answers[u]["metrics"]
            uploads.append({layer: (A, got["B"][layer]) for layer, A in got["A"].items()})
            heads.append(got["head"])
            losses.append(float(metrics["train-loss"]))
            n_u.append(int(metrics["num-examples"]))
            for kind in spent:
                spent[kind].append(float(metrics[f"{kind}-seconds"]))
        n = torch.tensor(n_u, dtype=torch.float64)
        p = n / n.sum()                             # renormalised over who answered
        if failed:
            log(INFO, "round %d: p renormalised over clients %s: %s", rnd + 1, ids,
                [round(x, 4) for x in p.tolist()])
        a, t2 = self.args, time.perf_counter()
        divergence = train.server_update(
            self.name, self.state, self.model, uploads, heads, p, ids, n_clients=len(self.clients),
            options=train.aggregator_options(a, self.name), track_solvers=a.track_solvers,
            device=self.device, seed=a.seed, round_=rnd, private_head=self.private_head,
            scales=[self.scales[self.ranks[u]] for u in ids], rank=a.rank)
        t3 = time.perf_counter()
        if self.entry.private_B or self.private_head:
            self.has_own.update(ids)
        for u, n_examples in zip(ids, n_u):
            self.n_examples[u] = n_examples
        row = {"aggregator": self.name, "round": rnd + 1, "clients": ids,
               "train_loss": sum(losses) / len(losses), "divergence": divergence,
               "bytes_up": self.state["bytes_up"], "bytes_down": self.state["bytes_down"],
               "client_seconds": t1 - self.t_sent, "server_seconds": t3 - t2, "metrics": None,
               "failed": failed, "client_load_seconds": spent["load"],
               "client_train_seconds": spent["train"]}
        train.end_round(row, self.state, self.model, self.tokenizer, task=self.task,
                        data=self.data, rounds=a.rounds, eval_every=a.eval_every,
                        eval_options=train.eval_options(a), out=a.out, log=self.log_rows,
                        personal_weights=train.personal_score_weights(a, self.n_examples),
                        base_name=models.hub_id(a.model))
        return self.global_record(), MetricRecord({"train-loss": row["train_loss"]})


@app.main()
def main(grid: Grid, context: Context) -> None:
    """train.main's steps with Flower's clients: check, find the clients, write config.json,
    then every aggregator in turn."""
    config = context.run_config
    args = wire.args_from(config)
    names = train.check_args(args)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = train.resolve_device(args.device)
    clients = find_clients(grid, float(config["node-timeout"]))
    args.clients = len(clients)
    names = train.check_args(args)              # again: rank profiles depend on the count
    log(INFO, "clients (partition-id: node id): %s", clients)
    task, data = train.load_data(args)
    if args.clients > len(data.train):
        raise ValueError(f"{args.clients} clients but only {len(data.train)} training examples")
    load = train.model_loader(args, device)
    meta_model, _ = load(weights=False)
    train.check_models(args, names, meta_model)
    train._check_config(args, train.run_facts(args, task, data, meta_model))
    with open(os.path.join(args.out, "provenance.jsonl"), "a") as f:
        f.write(json.dumps({**provenance.record(device), "engine": f"flwr {flwr.__version__}",
                            "run_id": context.run_id}) + "\n")
    log_rows: list[dict] = []
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if args.resume and os.path.exists(metrics_path):
        log_rows = [json.loads(line) for line in open(metrics_path)]
    for name in names:
        run_dir = os.path.join(args.out, name)
        os.makedirs(run_dir, exist_ok=True)
        model, tokenizer = load()
        state = train.start_state(model, run_dir, args.resume)
        if state["round"] >= args.rounds:
            continue
        strategy = RegistryStrategy(name, state=state, model=model, tokenizer=tokenizer,
                                    task=task, data=data, args=args, clients=clients,
                                    log_rows=log_rows, device=device)
        strategy.start(grid=grid, initial_arrays=strategy.global_record(),
                       num_rounds=args.rounds - state["round"],
                       timeout=float(config["round-timeout"]))
