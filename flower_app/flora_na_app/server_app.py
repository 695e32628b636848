"""The ServerApp: train.py's federated loop with Flower carrying the clients' rounds.

It asks every SuperNode which client it is (partition-id, num-partitions), then runs each
aggregator named in the run config with RegistryStrategy, a Flower Strategy whose

  start            runs rounds state["round"] + 1 .. rounds (so Flower's "[ROUND t/T]" is
                   the app's round t also after a resume), sending each round's messages and
                   collecting the replies by message id (send_and_receive below);
  configure_train  picks train.py's participants of the round (federation.participants, by
                   partition id) and sends each its message, built from the global model that
                   Flower hands it (the ArrayRecord aggregate_train returned last round): the
                   global factors, head and changed frozen weights, but a B and a head only to
                   a node that does not keep its own (the registry's private_B,
                   train.keeps_own_head) or has not answered yet;
  aggregate_train  leaves out every client that failed (its ClientApp raised, its node was
                   lost: Flower's error reply then comes from the SuperLink, or no reply within
                   round-timeout), logged with client, node and reason, renormalises p over the
                   clients that answered (the round fails if fewer than min-clients did), and
                   calls train.py's own server_update (the registry's aggregator through
                   federation.server_step, the head averaged by p) and end_round (evaluation on
                   the server's data, metrics.jsonl, state.pt and the peft adapter, every
                   round). Clients' scores are weighted (--personal-weighting data) by train.py's
                   partition of the server's data, or by the num-examples a node has reported
                   since the ServerApp started (own-data nodes). The round's row waits
                   for federated evaluation, then finish_round writes it;
  configure_evaluate, aggregate_evaluate
                   federated evaluation, off unless the run config's fraction-evaluate > 0:
                   after every evaluate-every-th round (and the last) a seeded fraction of the
                   clients score the global model on their own evaluation data
                   (client_work.my_eval_data); their metrics, weighted by examples
                   (weighted_metrics), go into the row as federated_eval_metrics, with
                   federated_eval_clients and federated_eval_failed.

Every message carries the server's code version (version.py); a client of another version
refuses it. The run directory (run config `out`, on the server's machine) has train.py's
layout and schema, so evidence/report.py reads a Flower run as any other, and `resume=true`
continues it from its last saved round. Rows gain "failed" (client, node, error) and, per
client in "clients", "client_load_seconds" and "client_train_seconds" (loading data and model
in the ClientApp, zero once warm, and train.client_update); "client_seconds" spans sending
the round to holding every reply.
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
from flwr.serverapp.strategy import Result, Strategy

import flora_na as fl
import train
from harness import federation, models, provenance, run_folder

from flora_na_app import client_work, version, wire

app = ServerApp()
POLL_SECONDS = 0.1      # how often the server asks the SuperLink for replies (Flower's: 3 s)


def send_and_receive(grid: Grid, messages: list[Message], timeout: float
                     ) -> tuple[dict[str, Message], list[str | None]]:
    """Push `messages`, then pull replies until each has one or `timeout` seconds passed:
    ({message id: reply}, the message ids in the order of `messages`, None where the
    SuperLink refused one). A reply belongs to the message it answers (reply_to_message_id),
    whoever sent it: Flower's own error replies for a lost node come from the SuperLink."""
    ids = list(grid.push_messages(messages)) if messages else []
    waiting, replies = {i for i in ids if i is not None}, {}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(waiting)):
            replies[reply.metadata.reply_to_message_id] = reply
            waiting.discard(reply.metadata.reply_to_message_id)
        if waiting:
            time.sleep(POLL_SECONDS)
    return replies, ids


def find_clients(grid: Grid, timeout: float) -> dict[int, int]:
    """{partition-id: node id} once every client of the federation has said who it is: all
    nodes must report the same num-partitions U and distinct partition ids 0..U-1. Waits up
    to `timeout` seconds for late SuperNodes. A node that cannot say (no node config, another
    code version, lost) is left out with a warning; ValueError for a duplicate identity."""
    deadline = time.monotonic() + timeout
    who: dict[int, tuple[int, int]] = {}            # node id -> (partition-id, num-partitions)
    left_out: dict[int, str] = {}                   # node id -> why
    code = ConfigRecord({"code-version": version.code_version()})
    while True:
        new = [node for node in grid.get_node_ids() if node not in who and node not in left_out]
        asks = [Message(RecordDict({"config": code}), dst_node_id=node,
                        message_type=MessageType.QUERY) for node in new]
        replies, ids = send_and_receive(grid, asks, max(deadline - time.monotonic(), 1))
        for node, msg_id in zip(new, ids):
            reply = replies.get(msg_id)
            if reply is None or reply.has_error():
                why = reply.error.reason.strip() if reply is not None else "no reply"
                left_out[node] = why.splitlines()[-1] if why else "?"
                log(WARNING, "node %d cannot say which client it is and is left out: %s",
                    node, why)
                continue
            ident = reply.content["node"]
            who[node] = (int(ident["partition-id"]), int(ident["num-partitions"]))
        sizes = {n for _, n in who.values()}
        if len(sizes) > 1:
            raise ValueError(f"the SuperNodes disagree on num-partitions: {who} "
                             f"(node id: (partition-id, num-partitions))")
        ids_u = sorted(u for u, _ in who.values())
        if len(set(ids_u)) < len(ids_u):
            raise ValueError(f"two SuperNodes have the same partition-id: {who}")
        if sizes and len(ids_u) == next(iter(sizes)):
            return {u: node for node, (u, _) in who.items()}
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids_u)} client(s) {ids_u} of {sizes or '?'} connected "
                               f"within node-timeout={timeout} s; left out: {left_out}")
        time.sleep(1.0)


def weighted_metrics(results: list[dict]) -> dict:
    """The clients' evaluation metrics (train.evaluate's dicts, with "num-examples") merged as
    Flower's FedAvg merges them, weighted by examples: a metric of an evaluation set by that
    set's size (its "<split>_n_eval", or "n_eval" for a task's only set; the longest prefix
    that matches), the sizes and num-examples summed. A metric that is not a mean over
    examples (F1, MCC, Pearson) is merged the same way: the clients' mean, not the pooled
    score."""
    sizes = [k for k in results[0] if k.endswith("n_eval")]
    out = {}
    for key in results[0]:
        if key in sizes or key == "num-examples":
            out[key] = sum(r[key] for r in results)
            continue
        prefixes = [k[:-len("n_eval")] for k in sizes if key.startswith(k[:-len("n_eval")])]
        weight = max(prefixes, key=len) + "n_eval" if prefixes else "num-examples"
        out[key] = sum(r[weight] * r[key] for r in results) / sum(r[weight] for r in results)
    return out


class RegistryStrategy(Strategy):
    """One aggregator of flora_na's registry over Flower's clients, with train.py's server
    state; Flower's Strategy interface, driven by its own start (rounds by their number)."""

    def __init__(self, name: str, *, state: dict, model, tokenizer, task, data,
                 args: train.Args, clients: dict[int, int], log_rows: list[dict],
                 device: torch.device, min_clients: int, fraction_evaluate: float = 0.0,
                 evaluate_every: int = 1):
        self.name, self.entry = name, fl.AGGREGATORS[name]
        self.state, self.model, self.tokenizer = state, model, tokenizer
        self.task, self.data, self.args = task, data, args
        self.clients = clients                      # partition-id -> node id
        self.log_rows, self.device = log_rows, device
        self.min_clients = min_clients
        self.fraction_evaluate, self.evaluate_every = fraction_evaluate, evaluate_every
        self.private_head = train.keeps_own_head(args, name)
        self.has_own: set[int] = set()              # clients keeping their B, head (this process)
        self.n_examples = [len(ix) for ix in client_work.partition(   # train.py's n_u
            data.labels, len(clients), args)]
        self.ranks = train.client_ranks(args)       # each client's LoRA rank, as train.py's
        self.scales = train.rank_scales(model, self.ranks)
        self.code = version.code_version()
        self.sent: dict[str, int] = {}              # message id -> client u, this round
        self.row: dict | None = None                # this round's metrics row, until written
        self.chosen: list[int] = []
        self.sent_eval: dict[str, int] = {}         # the same for federated evaluation
        self.chosen_eval: list[int] = []
        self.t_sent = 0.0

    def summary(self) -> None:
        """What this strategy does, for Flower's log."""
        a = self.args
        log(INFO, "\t├──> Aggregator: %s (flora_na.AGGREGATORS), one message per client",
            self.name)
        log(INFO, "\t├──> Clients: %d (partition-id: node id %s), participation %.2f "
            "(train.py's participants)", len(self.clients), self.clients, a.participation)
        log(INFO, "\t├──> Weighted by: train.py's p_u = num-examples of the clients that "
            "answered; a failed client is left out, the round needs %d", self.min_clients)
        log(INFO, "\t├──> Evaluation: on the server's data every %d rounds", a.eval_every)
        if self.fraction_evaluate > 0:
            log(INFO, "\t└──> Federated evaluation: the global model on a fraction %.2f of "
                "the clients' own evaluation data every %d rounds, weighted by num-examples",
                self.fraction_evaluate, self.evaluate_every)
        else:
            log(INFO, "\t└──> Federated evaluation: off (fraction-evaluate=0)")

    def global_record(self) -> ArrayRecord:
        """The global model as it travels: factors, head, changed frozen weights."""
        s = self.state
        return wire.to_record(s["factors"], s["head"], s["base"], core=s.get("core"))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """train.py's participants of this round, each with its own message built from
        `arrays` (the global model) and `config` (sent with the aggregator and round)."""
        s, rnd = self.state, server_round - 1
        assert rnd == s["round"], (server_round, s["round"])
        glob = wire.from_record(arrays)
        factors = {layer: (A, glob["B"][layer]) for layer, A in glob["A"].items()}
        self.chosen = federation.participants(len(self.clients), self.args.participation,
                                              rnd, self.args.seed)
        messages = []
        for u in self.chosen:
            # private parts (B, head): train.py's for client u, sent once; then it keeps them
            mine, head, own = factors, glob["head"], u in self.has_own
            if s["client_B"] is not None:
                mine = {n: (A, s["client_B"][u][n]) for n, (A, _) in factors.items()}
            if s["client_head"] is not None:
                head = {} if own else s["client_head"][u]
            record = wire.to_record(mine, head, glob["W"],
                                    without_B=own and s["client_B"] is not None, core=glob["C"])
            content = RecordDict({"arrays": record, "config": ConfigRecord(
                {**dict(config), "aggregator": self.name, "round": rnd,
                 "code-version": self.code})})
            messages.append(Message(content, dst_node_id=self.clients[u],
                                    message_type=MessageType.TRAIN))
        return messages

    def _failures(self, sent: dict[str, int], got: dict[str, Message], what: str
                  ) -> tuple[dict[int, RecordDict], list[dict]]:
        """({client u: reply content} of the clients that answered `sent` (message id ->
        u), [{client, node, error}] of the others, each logged)."""
        answers, failed = {}, []
        for msg_id, u in sent.items():
            node, reply = self.clients[u], got.get(msg_id)
            if reply is None:
                why = "no reply within round-timeout" if msg_id else "the SuperLink refused it"
            elif reply.has_error():
                why = reply.error.reason.strip() or f"error code {reply.error.code}"
            elif reply.metadata.src_node_id != node:
                why = f"the reply came from node {reply.metadata.src_node_id}"
            else:
                answers[u] = reply.content
                continue
            failed.append({"client": u, "node": node, "error": why.splitlines()[-1]})
            log(WARNING, "round %d: client %d (node %d) failed and is left out of the %s: "
                "%s", self.state["round"] + 1, u, node, what, why)
        return answers, failed

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Leave out failed clients, aggregate the others with the registry and keep the
        round's row for finish_round. `replies` answer the messages recorded in self.sent
        (by message id)."""
        t1 = time.perf_counter()
        rnd = self.state["round"]
        got = {reply.metadata.reply_to_message_id: reply for reply in replies}
        answers, failed = self._failures(self.sent, got, "round")
        if len(answers) < self.min_clients:
            raise RuntimeError(f"round {rnd + 1}: {len(answers)} client(s) answered, fewer "
                               f"than min-clients={self.min_clients}: failed {failed}")
        ids = sorted(answers)                       # train.py's order: by client index
        uploads, heads, losses, n_u, spent = [], [], [], [], {"load": [], "train": []}
        for u in ids:
            got_u, metrics = wire.from_record(answers[u]["arrays"]), answers[u]["metrics"]
            uploads.append({layer: (A, got_u["B"][layer]) for layer, A in got_u["A"].items()})
            heads.append(got_u["head"])
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
        self.row = row
        return self.global_record(), MetricRecord({"train-loss": row["train_loss"],
                                                   "clients": len(ids),
                                                   "failed": len(failed)})

    def finish_round(self) -> None:
        """train.end_round on the round's row: evaluation on the server's data when due,
        metrics.jsonl, state.pt and the adapter."""
        a, row, self.row = self.args, self.row, None
        train.end_round(row, self.state, self.model, self.tokenizer, task=self.task,
                        data=self.data, rounds=a.rounds, eval_every=a.eval_every,
                        eval_options=train.eval_options(a), out=a.out, log=self.log_rows,
                        personal_weights=train.personal_score_weights(a, self.n_examples),
                        base_name=models.hub_id(a.model))

    def evaluate_due(self, server_round: int) -> bool:
        """Federated evaluation after this round: fraction-evaluate > 0, and the round a
        multiple of evaluate-every or the last."""
        return self.fraction_evaluate > 0 and (server_round % self.evaluate_every == 0
                                               or server_round == self.args.rounds)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Federated evaluation of the global model `arrays` (factors, head, changed frozen
        weights, as aggregate_train returned it) by a seeded fraction-evaluate of the clients
        (chosen as train.py chooses a round's participants), when due; else none."""
        self.sent_eval = {}
        if not self.evaluate_due(server_round):
            return []
        self.chosen_eval = federation.participants(len(self.clients), self.fraction_evaluate,
                                                   server_round - 1, self.args.seed)
        content = {"arrays": arrays, "config": ConfigRecord(
            {**dict(config), "aggregator": self.name, "round": server_round - 1,
             "code-version": self.code})}
        return [Message(RecordDict(content), dst_node_id=self.clients[u],
                        message_type=MessageType.EVALUATE) for u in self.chosen_eval]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """The clients' metrics, each weighted by the examples it scored (a metric of one
        evaluation set by that set's n_eval; the n_eval themselves summed), into the round's
        row as federated_eval_metrics, with federated_eval_clients and federated_eval_failed
        (a client that fails is left out; none answering gives metrics None)."""
        got = {reply.metadata.reply_to_message_id: reply for reply in replies}
        answers, failed = self._failures(self.sent_eval, got, "federated evaluation")
        ids = sorted(answers)
        results = [dict(answers[u]["metrics"]) for u in ids]
        merged = weighted_metrics(results) if results else None
        if merged is None:
            log(WARNING, "round %d: no client answered the federated evaluation",
                server_round)
        self.row.update(federated_eval_metrics=merged, federated_eval_clients=ids,
                        federated_eval_failed=failed)
        return None if merged is None else MetricRecord(merged)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:
        """Rounds state["round"] + 1 .. state["round"] + num_rounds, each numbered as the
        app numbers it; the arrays aggregate_train returns are the next round's."""
        first, last = self.state["round"] + 1, self.state["round"] + num_rounds
        log(INFO, "Starting %s strategy, rounds %d to %d:", type(self).__name__, first, last)
        self.summary()
        result, arrays = Result(), initial_arrays
        config = ConfigRecord() if train_config is None else train_config
        for t in range(first, last + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", t, self.args.rounds)
            messages = list(self.configure_train(t, arrays, config, grid))
            self.t_sent = time.perf_counter()
            replies, ids = send_and_receive(grid, messages, timeout)
            self.sent = {msg_id or f"refused-{u}": u for msg_id, u in zip(ids, self.chosen)}
            arrays, metrics = self.aggregate_train(t, list(replies.values()))
            result.arrays = arrays
            result.train_metrics_clientapp[t] = metrics
            log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
            if messages := list(self.configure_evaluate(t, arrays, config, grid)):
                replies, ids = send_and_receive(grid, messages, timeout)
                self.sent_eval = {msg_id or f"refused-{u}": u
                                  for msg_id, u in zip(ids, self.chosen_eval)}
                metrics = self.aggregate_evaluate(t, list(replies.values()))
                if metrics is not None:
                    result.evaluate_metrics_clientapp[t] = metrics
                log(INFO, "\t└──> Federated evaluation: %s", metrics)
            self.finish_round()
        return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    """train.main's steps with Flower's clients: check, find the clients, write config.json,
    then every aggregator in turn."""
    config = context.run_config
    args = wire.args_from(config)
    run_folder.check_out(args.out)              # before anything is written
    run_folder.check_seed(args.seed)
    names = train.check_args(args)
    min_clients = int(config.get("min-clients", 1))
    if min_clients < 1:
        raise ValueError(f"min-clients must be at least 1, got {min_clients}")
    fraction_evaluate = float(config.get("fraction-evaluate", 0.0))
    evaluate_every = int(config.get("evaluate-every", 1))
    if not 0 <= fraction_evaluate <= 1:
        raise ValueError(f"fraction-evaluate must be in [0, 1], got {fraction_evaluate}")
    if evaluate_every < 1:
        raise ValueError(f"evaluate-every must be at least 1, got {evaluate_every}")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = train.resolve_device(args.device)
    log(INFO, "code version %s", version.code_version())
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
    # every file resume=true reuses is verified before anything is written (train.main's)
    log_rows = run_folder.check_resumable(args.out, names) if args.resume else []
    change = train._check_config(args, train.run_facts(args, task, data, meta_model),
                                 run_folder.numerics(torch.get_num_threads(), device))
    record = {**provenance.record(device), "engine": f"flwr {flwr.__version__}",
              "run_id": context.run_id, "code_version": version.code_version()}
    if change:
        record["numerics_change"] = change
    with open(os.path.join(args.out, "provenance.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if log_rows:        # resumed: metrics.jsonl as verified (or rebuilt from the states)
        train._write_metrics(args.out, log_rows)
    for name in names:
        run_dir = os.path.join(args.out, name)
        os.makedirs(run_dir, exist_ok=True)
        model, tokenizer = load()
        state = train.start_state(model, run_dir, args.resume)
        train.init_core(fl.AGGREGATORS[name], state, model,     # Fed-SB's frozen factors
                        task.batcher(tokenizer, data.train, args.max_length),
                        client_work.partition(data.labels, args.clients, args), lr=args.lr,
                        seed=args.seed, options=train.aggregator_options(args, name))
        if state["round"] >= args.rounds:
            continue
        strategy = RegistryStrategy(name, state=state, model=model, tokenizer=tokenizer,
                                    task=task, data=data, args=args, clients=clients,
                                    log_rows=log_rows, device=device, min_clients=min_clients,
                                    fraction_evaluate=fraction_evaluate,
                                    evaluate_every=evaluate_every)
        strategy.start(grid=grid, initial_arrays=strategy.global_record(),
                       num_rounds=args.rounds - state["round"],
                       timeout=float(config["round-timeout"]))
