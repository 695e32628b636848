"""What Flower costs per round: the same small run through train.py's in-process loop, Flower's
simulation and a local Flower deployment, timed round by round.

    python -m evidence.flower_overhead --data-dir ../shared/data --out results/flower_overhead

Runs train.py's default aggregator (FLoRA-NA) with the offline MiniLM on a capped SST-2 three
ways on this machine: in process (`python train.py`), as a Flower simulation (`flwr run` on a
SuperLink started with --simulation, N simulated SuperNodes) and as a local deployment (one
SuperLink and N SuperNodes, each a separate process on localhost, logging at DEBUG level so
that flower_breakdown can time Flower's steps of each round). From each run's
metrics.jsonl it reads, per round, `client_seconds` (from sending the round to holding every
reply: the clients' training and, through Flower, the messages, the SuperNodes' 3 s polls and
a fresh ClientApp process per message in a deployment) and `server_seconds` (the registry's
aggregation, the head average and the state update: the same code in all three); and it
times each whole command, start-up included. The three runs must give identical results
(evidence.same_results), so the times compare the same work. Writes overhead.json in --out
and prints a table. Needs requirements-flower.txt.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro

import train
from evidence import same_results
from harness import provenance
from harness.flower_local import LocalFederation


@dataclass
class Args:
    """Time one small run in process, in Flower's simulation and in a local deployment."""
    data_dir: str | None = field(default_factory=lambda: os.environ.get("FLORA_DATA"))
    """folder with the GLUE data (glue_data/SST-2 or glue/SST-2); default $FLORA_DATA"""
    out: str = "results/flower_overhead"
    """folder for the three runs and overhead.json (must not hold an earlier measurement)"""
    clients: int = 2
    """clients U: simulated SuperNodes, or SuperNode processes"""
    rounds: int = 5
    """communication rounds (round 1 includes loading the model on the clients)"""
    local_steps: int = 4
    """local steps per client per round"""
    batch_size: int = 8
    """client batch size"""
    max_train_examples: int = 256
    """training examples (split among the clients)"""
    max_eval_examples: int = 128
    """evaluation examples (evaluated once, after the last round)"""
    max_length: int = 64
    """tokens per example"""
    threads: int = 1
    """torch threads of each process (the server, every client)"""


def train_args(args: Args, out: Path) -> train.Args:
    """The measured run as train.py's options: MiniLM, SST-2, train.py's default aggregator."""
    data_dir = os.path.abspath(args.data_dir) if args.data_dir else None   # Flower's cwd differs
    return train.Args(task="sst2", data_dir=data_dir, clients=args.clients,
                      rounds=args.rounds, local_steps=args.local_steps,
                      batch_size=args.batch_size, max_train_examples=args.max_train_examples,
                      max_eval_examples=args.max_eval_examples, max_length=args.max_length,
                      eval_every=args.rounds, threads=args.threads, device="cpu", out=str(out))


def run_config(args: train.Args) -> dict:
    """The Flower run config of train.py's options (None as "", no --clients)."""
    config = {f.name.replace("_", "-"): getattr(args, f.name)
              for f in dataclasses.fields(train.Args) if f.name != "clients"}
    return {**{k: "" if v is None else v for k, v in config.items()},
            "node-timeout": 300, "round-timeout": 1800}


def in_process(args: train.Args) -> None:
    train.main(args)


def simulation(args: train.Args, workdir: Path) -> None:
    with LocalFederation(workdir) as fed:
        fed.start_superlink(simulation=True)
        done = fed.run(run_config(args), {"num-supernodes": args.clients}, timeout=3600)
    if not done.ok:
        raise RuntimeError(f"the simulation ended {done.status} ({done.details}): "
                           f"{done.stdout[-3000:]}")


def deployment(args: train.Args, workdir: Path) -> None:
    """The local deployment, every Flower process logging at DEBUG (timestamped lines, which
    flower_breakdown reads)."""
    with LocalFederation(workdir, env={"FLWR_LOG_LEVEL": "DEBUG"}) as fed:
        fed.start_superlink()
        own = {"data_dir": args.data_dir} if args.data_dir else {}
        for u in range(args.clients):
            fed.start_supernode(u, args.clients, **own)
        done = fed.run(run_config(args), timeout=3600)
    if not done.ok:
        raise RuntimeError(f"the deployment ended {done.status} ({done.details}): "
                           f"{done.stdout[-3000:]}")


STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\S*\s*:\s+(.*)")
EVENTS = {                          # what a DEBUG line of Flower 1.42 marks
    "push": "[ROUND ",                              # the ServerApp sends the round (app's log)
    "receiving": "Receiving: train message",        # the SuperNode's poll finds it
    "process": "Start `flwr-clientapp` process",    # the new flwr-clientapp has imported flwr
    "loading": "Start `ClientApp` Loading.",        # it pulled the message and the FAB
    "sending": "Sending: train message",            # the ClientApp's reply reached the SuperNode
    "sent": "Sent successfully",                    # and the SuperNode uploaded it
}


def _events(log: Path) -> list[tuple[float, str]]:
    """(unix time, event) of every EVENTS line of a Flower log written at DEBUG level."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if (m := STAMP.search(line)):
            for event, text in EVENTS.items():
                if text in m.group(2):
                    when = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
                    out.append((when.timestamp(), event))
    return out


def flower_breakdown(workdir: Path, run: Path) -> dict:
    """Where a deployment's later rounds spend their time, per SuperNode and round, from the
    timestamped DEBUG logs (seconds, mean over rounds 2.. and SuperNodes): waiting for the
    SuperNode's poll (Flower's 3 s sleep after an empty poll), the fresh flwr-clientapp
    process (start, Python and flwr imports), its pulling the message and installing the FAB,
    the ClientApp running (the app's code, the warm worker's training among it, and the
    SuperNode noticing the reply: it looks every 0.5 s), the SuperNode uploading the reply,
    and what is left of the round (the server pulling the replies, a slower node)."""
    pushes = [t for t, e in _events(workdir / "flwr-run.log") if e == "push"]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    nodes = [_events(log) for log in sorted(workdir.glob("supernode*.log"))]
    parts = {k: [] for k in ("wait_for_supernode_poll", "clientapp_process_start",
                             "clientapp_pull_message_and_fab", "clientapp_running_app",
                             "reply_upload", "rest_of_round")}
    train_seconds = []
    for i in range(1, min(len(pushes), len(rows))):
        end = pushes[i] + rows[i]["client_seconds"]
        for events in nodes:
            mark, after = {}, pushes[i]
            for name in ("receiving", "process", "loading", "sending", "sent"):
                mark[name] = next((t for t, e in events if e == name and t >= after), None)
                if mark[name] is None:
                    break
                after = mark[name]
            if None in mark.values():
                continue
            spans = [mark["receiving"] - pushes[i], mark["process"] - mark["receiving"],
                     mark["loading"] - mark["process"], mark["sending"] - mark["loading"],
                     mark["sent"] - mark["sending"], end - mark["sent"]]
            for key, span in zip(parts, spans):
                parts[key].append(span)
        train_seconds += rows[i].get("client_train_seconds", [])
    out = {k: statistics.mean(v) for k, v in parts.items() if v}
    out["samples"] = len(parts["wait_for_supernode_poll"])
    out["client_train_seconds"] = statistics.mean(train_seconds) if train_seconds else None
    return out


def summary(run: Path, wall: float) -> dict:
    """Round times (seconds) of a run, from its metrics.jsonl, and its command's wall time."""
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    client = [r["client_seconds"] for r in rows]
    server = [r["server_seconds"] for r in rows]
    later = [c + s for c, s in zip(client[1:], server[1:])]
    slowest = {kind: [max(r[f"client_{kind}_seconds"]) for r in rows[1:]]
               for kind in ("load", "train") if f"client_{kind}_seconds" in rows[0]}
    return {"wall_seconds": wall, "round1_seconds": client[0] + server[0],
            **{f"later_rounds_slowest_client_{kind}_seconds": statistics.mean(v) if v else None
               for kind, v in slowest.items()},
            "later_round_seconds": statistics.mean(later) if later else None,
            "server_seconds_mean": statistics.mean(server),
            "client_seconds": client, "server_seconds": server,
            "outside_rounds_seconds": wall - sum(client) - sum(server)}


def main(args: Args) -> dict:
    out = Path(args.out)
    if (out / "overhead.json").exists():
        raise FileExistsError(f"{out} already holds a measurement; choose another --out")
    engines = {"in-process": lambda a: in_process(a),
               "simulation": lambda a: simulation(a, out / "simulation-federation"),
               "deployment": lambda a: deployment(a, out / "deployment-federation")}
    results, load_before = {}, os.getloadavg()
    for engine, run in engines.items():
        targs = train_args(args, out / engine)
        t0 = time.perf_counter()
        run(targs)
        results[engine] = summary(out / engine, time.perf_counter() - t0)
        if engine == "deployment":
            results[engine]["flower_breakdown"] = flower_breakdown(
                out / "deployment-federation", out / engine)
        print(f"{engine}: {results[engine]['wall_seconds']:.1f} s", flush=True)
    diffs = {e: same_results.compare(str(out / "in-process"), str(out / e))
             for e in ("simulation", "deployment")}
    base = results["in-process"]["later_round_seconds"]
    for engine, r in results.items():
        r["overhead_per_round_seconds"] = (r["later_round_seconds"] - base
                                           if r["later_round_seconds"] is not None else None)
    report = {"args": dataclasses.asdict(args), "machine": provenance.record(),
              "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
              "identical_results": {e: not d for e, d in diffs.items()},
              "differences": diffs, "engines": results,
              "command": " ".join(["python -m evidence.flower_overhead"] + sys.argv[1:])}
    (out / "overhead.json").write_text(json.dumps(report, indent=2))
    print(f"\n{args.clients} clients, {args.rounds} rounds of {args.local_steps} steps "
          f"(batch {args.batch_size}, {args.max_length} tokens), MiniLM, one thread each; "
          f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print("| engine | whole command s | round 1 s | later rounds s (mean) | overhead per round s "
          "| of which: slowest client loading s | slowest client training s "
          "| server aggregation s (mean) |")
    print("|---|---|---|---|---|---|---|---|")
    for engine, r in results.items():
        cells = [f"{r['wall_seconds']:.1f}", f"{r['round1_seconds']:.2f}",
                 f"{r['later_round_seconds']:.2f}", f"{r['overhead_per_round_seconds']:+.2f}"]
        cells += [f"{r[key]:.2f}" if key in r else "-" for key in (
            "later_rounds_slowest_client_load_seconds",
            "later_rounds_slowest_client_train_seconds")]
        print(f"| {engine} | " + " | ".join(cells) + f" | {r['server_seconds_mean']:.3f} |")
    print("identical results:", report["identical_results"])
    print("deployment, later rounds, per SuperNode (s):",
          {k: round(v, 2) if isinstance(v, float) else v
           for k, v in results["deployment"]["flower_breakdown"].items()})
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
