"""Client-level DP's price on SST-2: accuracy against epsilon, central DP (FedIT, FFA-LoRA) and
local DP (FedIT, FFA-LoRA, FLoRA-NA), against the same runs without DP and with clipping alone.

    python -m evidence.dp_tradeoff --data-dir ../shared/data --out results/dp

Runs `python train.py` (MiniLM, offline) once per (DP setting, seed), each with every aggregator
the setting admits, --resume'd so a killed sweep continues; then reads the run folders'
metrics.jsonl only and prints a markdown table: the final dev accuracy (mean ± std over seeds),
the epsilon the accountant reports after the last round (at --delta), the noise multiplier
train.py calibrated (config.json's facts), the clients' median change norm before clipping, and
the MB per round. Settings: "none" (no DP), "clip" (clipping to C, no noise: the price of
clipping alone), then central and local at each target epsilon. Two runs at a time, one thread
each (the QUICK budget of reproduce.sh).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import tyro


@dataclass
class Args:
    """Accuracy against epsilon for client-level DP (train.py --dp)."""
    data_dir: str | None = field(default_factory=lambda: os.environ.get("FLORA_DATA"))
    """folder with the GLUE data; default $FLORA_DATA (else train.py's own search)"""
    out: str = "results/dp"
    """folder for the runs (one subfolder per setting and seed)"""
    seeds: str = "0"
    """comma-separated seeds"""
    epsilons: str = "1,3,8"
    """comma-separated target epsilons (train.py --dp-target-epsilon over --rounds)"""
    central: str = "fedit,ffa"
    """aggregators run with central DP (their registry entries must be linear)"""
    local: str = "fedit,ffa,flora_na"
    """aggregators run with local DP (and without DP, and with clipping alone)"""
    clip: float = 0.5
    """clipping norm C of each client's round change (LoRA factors that travel and head)"""
    delta: float = 1e-5
    """delta of the reported epsilon"""
    clients: int = 10
    """clients U (all take part every round: sampling rate 1)"""
    rounds: int = 4
    local_steps: int = 3
    batch_size: int = 16
    lr: float = 2e-3
    max_train_examples: int = 3000
    max_eval_examples: int = 400
    max_length: int = 64
    jobs: int = 2
    """runs side by side"""
    run: bool = True
    """False: only read the runs already in --out"""


def settings(a: Args) -> list[tuple[str, str, list[str]]]:
    """(setting name, aggregators, train.py's DP options) for every setting of the sweep."""
    out = [("none", a.local, []), ("clip", a.local, ["--dp", "local", "--dp-noise", "0"])]
    for eps in a.epsilons.split(","):
        for mode in ("central", "local"):
            out.append((f"{mode}_eps{eps}", getattr(a, mode),
                        ["--dp", mode, "--dp-target-epsilon", eps]))
    return [(name, aggs, opts + (["--dp-clip", str(a.clip), "--dp-delta", str(a.delta)]
                                 if opts else [])) for name, aggs, opts in out]


def command(a: Args, aggs: str, opts: list[str], seed: str, out: str) -> list[str]:
    return [sys.executable, "train.py", "--task", "sst2", "--model", "minilm",
            "--aggregator", aggs, "--clients", str(a.clients), "--dirichlet-alpha", "0.5",
            "--rounds", str(a.rounds), "--local-steps", str(a.local_steps),
            "--batch-size", str(a.batch_size), "--lr", str(a.lr),
            "--max-train-examples", str(a.max_train_examples),
            "--max-eval-examples", str(a.max_eval_examples), "--max-length", str(a.max_length),
            "--eval-every", str(a.rounds), "--seed", seed, "--threads", "1", "--resume",
            *(["--data-dir", a.data_dir] if a.data_dir else []), *opts, "--out", out]


def table(a: Args) -> str:
    """The markdown table of the runs in a.out."""
    lines = ["| setting | aggregator | accuracy | epsilon | sigma | median norm | MB / round |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, aggs, _ in settings(a):
        for agg in aggs.split(","):
            acc, eps, norms, mb, sigma = [], [], [], [], None
            for seed in a.seeds.split(","):
                folder = os.path.join(a.out, f"{name}_seed{seed}")
                path = os.path.join(folder, "metrics.jsonl")
                rows = [json.loads(x) for x in open(path)] if os.path.exists(path) else []
                rows = [r for r in rows if r["aggregator"] == agg]
                if not rows or rows[-1]["round"] != a.rounds:
                    continue
                last = rows[-1]
                acc.append(last["metrics"]["accuracy"])
                eps.append(last.get("epsilon"))
                norms += [n for r in rows for n in r.get("dp_norms", [])]
                mb.append((last["bytes_up"] + last["bytes_down"]) / a.rounds / 2**20)
                facts = json.load(open(os.path.join(folder, "config.json")))["facts"]
                sigma = facts.get("dp", {}).get("noise_multiplier")
            if not acc:
                lines.append(f"| {name} | {agg} | not run | | | | |")
                continue
            sd = f" ± {statistics.stdev(acc):.3f}" if len(acc) > 1 else ""
            e = "—" if eps[0] is None else f"{eps[0]:.2f}"
            lines.append(f"| {name} | {agg} | {statistics.mean(acc):.3f}{sd} | {e} | "
                         f"{'—' if sigma is None else f'{sigma:.2f}'} | "
                         f"{f'{statistics.median(norms):.2f}' if norms else '—'} | "
                         f"{statistics.mean(mb):.2f} |")
    return "\n".join(lines)


def main(a: Args) -> None:
    if a.run:
        jobs = [(name, command(a, aggs, opts, seed, os.path.join(a.out, f"{name}_seed{seed}")))
                for seed in a.seeds.split(",") for name, aggs, opts in settings(a)]
        os.makedirs(a.out, exist_ok=True)

        def one(job):
            name, cmd = job
            with open(cmd[-1] + ".log", "a") as log:
                return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode, cmd

        with ThreadPoolExecutor(a.jobs) as pool:
            for rc, cmd in pool.map(one, jobs):
                print(f"{'ok' if rc == 0 else f'FAILED ({rc})'}: {cmd[-1]}", flush=True)
    print(table(a))


if __name__ == "__main__":
    main(tyro.cli(Args))
