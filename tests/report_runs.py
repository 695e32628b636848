"""Run directories written by hand to the train.py contract, for the report's tests
(tests/test_report*.py, tests/test_mixed_ranks.py).

Each run directory holds config.json (the CLI args plus the run's "facts": task display name
and main metric, majority-class baseline, head size, every registered aggregator's display name
in registry order), metrics.jsonl (one row per aggregator per round) and provenance.jsonl. The
numbers below are chosen so that every expected table cell can be worked out by hand; the
report must print them without knowing any aggregator by name. No model, no torch training:
each test file runs in seconds.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from evidence import report


HERE = Path(__file__).resolve().parent.parent   # the repository root
MiB = 2**20

# a registry as train.py writes it into facts: every registered aggregator, in registry order


REGISTRY = {"fedit": {"display_name": "FedIT", "personalised": False},
            "fedsa": {"display_name": "FedSA-LoRA", "personalised": True},
            "toy": {"display_name": "Toy", "personalised": False},
            "flora_na": {"display_name": "FLoRA-NA", "personalised": False}}
SST2 = {"display_name": "SST-2", "main_metric": "accuracy"}


HEAD = {"modules": ["classifier", "pooler"], "bytes": 597000}      # 0.57 MiB


def config(task="sst2", facts_task=SST2, majority=0.5, registry=REGISTRY, aggregator="all",
           **kw) -> dict:
    """config.json: the flat CLI args plus the run's facts."""
    return {"task": task, "model": "minilm", "clients": 3, "rounds": 4, "local_steps": 6,
            "batch_size": 16, "optimizer": "adamw", "lr": 0.002, "rank": 8, "lora_alpha": 16.0,
            "max_length": 64, "max_train_examples": 3000, "max_eval_examples": 400,
            "eval_every": 2, "seed": 0, "dirichlet_alpha": 0.5, "aggregator": aggregator, **kw,
            "facts": {"task": facts_task, "majority_baseline": majority, "head": HEAD,
                      "aggregators": registry}}


def divergence(naive: float, aggregate: float, bound: float, solvers=None) -> dict:
    """divergence as train.py logs it: per layer and the mean over layers (two layers,
    given as (layer 0, layer 1) pairs when `solvers` is set, else one value for both)."""
    per_layer = {"layer.0": {"naive": naive, "aggregate": aggregate, "bound": bound},
                 "layer.1": {"naive": naive, "aggregate": aggregate, "bound": bound}}
    for key, (v0, v1) in (solvers or {}).items():
        per_layer["layer.0"][key], per_layer["layer.1"][key] = v0, v1
    mean = {k: (per_layer["layer.0"][k] + per_layer["layer.1"][k]) / 2 for k in per_layer["layer.0"]}
    return {"relative_mean": mean, "relative_per_layer": per_layer}


def tracked_div(naive, bound, solver_als=None) -> dict:
    """divergence as train.py --track-solvers logs it, for two layers: each argument a value for
    both layers or a (layer 0, layer 1) pair. FLoRA-NA's variants, relative to FedIT's naive
    divergence n: per-layer ALS 0.75 n (unless given), AdamW 0.8 n, tied 0.9 n, uniform target
    1.5 n, tied uniform 1.6 n."""
    pair = lambda v: v if isinstance(v, tuple) else (v, v)               # noqa: E731
    n, b = pair(naive), pair(bound)
    als = pair(solver_als) if solver_als is not None else tuple(0.75 * x for x in n)
    per_layer = {f"layer.{i}": {"naive": n[i], "aggregate": n[i], "bound": b[i],
                                "solver_als": als[i], "solver_adamw": 0.8 * n[i],
                                "solver_als_tied": 0.9 * n[i], "solver_als_uniform": 1.5 * n[i],
                                "solver_als_tied_uniform": 1.6 * n[i]} for i in (0, 1)}
    mean = {k: (per_layer["layer.0"][k] + per_layer["layer.1"][k]) / 2 for k in per_layer["layer.0"]}
    return {"relative_mean": mean, "relative_per_layer": per_layer}


def rows(agg: str, values: dict[int, float], rounds: int = 4, metric: str = "accuracy",
         mb_up: float = 1.0, personal: dict[int, float] | None = None, div=None,
         n_eval: int = 400) -> list[dict]:
    """One metrics row per round; `values` maps the evaluated rounds to the main metric;
    bytes are cumulative, mb_up MiB up and 1 MiB down per round."""
    out = []
    for rnd in range(1, rounds + 1):
        row = {"aggregator": agg, "round": rnd, "clients": [0, 1, 2],
               "train_loss": 0.7 - 0.1 * rnd, "divergence": div or divergence(0.1, 0.1, 0.05),
               "bytes_up": int(mb_up * MiB * rnd), "bytes_down": MiB * rnd,
               "client_seconds": 1.0, "server_seconds": 0.01,
               "metrics": {metric: values[rnd], "n_eval": n_eval} if rnd in values else None}
        if personal is not None:
            row["personal_metrics"] = {metric: personal[rnd]} if rnd in personal else None
        out.append(row)
    return out


def write_run(results: Path, stage: str, name: str, cfg: dict, metrics: list[dict],
              commit: str = "abc1234") -> Path:
    run = results / "runs" / stage / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (run / "provenance.jsonl").write_text(json.dumps(
        {"git_commit": commit, "git_dirty": False, "device_name": "Test CPU", "cpu_count": 2}) + "\n")
    for agg in {r["aggregator"] for r in metrics}:
        (run / agg / "adapter").mkdir(parents=True)
    return run


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A results folder with every stage: the GLUE numbers are
    best over rounds (seed 0, seed 1): FedIT 0.80, 0.60; FedSA-LoRA 0.70, 0.66 (personalised
    0.60, 0.58); Toy 0.90, 0.72; FLoRA-NA 0.75, 0.85; centralised (seed 0 only) 0.95."""
    res = tmp_path_factory.mktemp("results")
    (res / "pipeline.json").write_text(json.dumps(
        {"mode": "QUICK", "tiny": False, "started": "2026-01-01 00:00:00", "jobs": 2,
         "threads": 1}))
    (res / "stage_times.tsv").write_text("3\tglue\tok\t600\t2026-01-01 00:10:00\n")
    for seed, values in ((0, {"fedit": (0.60, 0.80), "fedsa": (0.70, 0.65), "toy": (0.50, 0.90),
                              "flora_na": (0.75, 0.70)}),
                         (1, {"fedit": (0.60, 0.60), "fedsa": (0.66, 0.66), "toy": (0.72, 0.70),
                              "flora_na": (0.65, 0.85)})):
        personal = {0: {2: 0.55, 4: 0.60}, 1: {2: 0.50, 4: 0.58}}[seed]
        metrics = [r for agg, (v2, v4) in values.items()
                   for r in rows(agg, {2: v2, 4: v4}, mb_up=0.5 if agg == "toy" else 1.0,
                                 personal=personal if agg == "fedsa" else None)]
        write_run(res, "glue", f"sst2_seed{seed}",
                  config(seed=seed, majority=[0.51, 0.53][seed]), metrics)
    write_run(res, "glue", "sst2_centralised_seed0",
              config(clients=1, dirichlet_alpha=0, local_steps=18, aggregator="fedit"),
              rows("fedit", {2: 0.90, 4: 0.95}))
    # regime study: FedIT trained with FLoRA-NA's variants tracked (two layers, two rounds) at
    # the base, 50 local steps and IID; the accuracy runs at 50 local steps (seed 0: FLoRA-NA
    # alone, its FedIT is the tracked run; seed 1: both)
    regime = dict(aggregator="fedit", track_solvers=True, rounds=2, clients=4, local_steps=10,
                  lr=0.002, dirichlet_alpha=0.5, rank=8, lora_alpha=16.0)
    write_run(res, "regime", "base", config(**regime),
              rows("fedit", {1: 0.60, 2: 0.70}, rounds=2, div=tracked_div(0.2, 0.1)))
    write_run(res, "regime", "steps50", config(**{**regime, "local_steps": 50}),
              rows("fedit", {1: 0.70, 2: 0.80}, rounds=2,
                   div=tracked_div((0.4, 0.6), (0.2, 0.2), solver_als=(0.3, 0.5))))
    write_run(res, "regime", "iid", config(**{**regime, "dirichlet_alpha": 0}),
              rows("fedit", {1: 0.65, 2: 0.75}, rounds=2, div=tracked_div(0.1, 0.08)))
    acc = {**regime, "local_steps": 50, "track_solvers": False}
    write_run(res, "regime", "steps50_seed0", config(**{**acc, "aggregator": "flora_na"}),
              rows("flora_na", {1: 0.72, 2: 0.84}, rounds=2))
    write_run(res, "regime", "steps50_seed1",
              config(**{**acc, "aggregator": "fedit,flora_na", "seed": 1}),
              rows("fedit", {1: 0.70, 2: 0.76}, rounds=2) + rows("flora_na", {1: 0.70, 2: 0.80}, rounds=2))
    # generation: no majority baseline, 30 problems
    gsm = {"display_name": "GSM8K", "main_metric": "accuracy"}
    write_run(res, "generation", "gsm8k_flora_na",
              config("gsm8k", gsm, None, aggregator="flora_na", rounds=2, max_new_tokens=192),
              rows("flora_na", {2: 0.1}, rounds=2, n_eval=30))
    # solver benchmark, in bench_solver.py's JSON layout
    bench = res / "runs" / "bench" / "bench_solver.json"
    bench.parent.mkdir(parents=True)
    bench.write_text(json.dumps({
        "args": {"layers": 3, "d": 24, "k": 20, "rank": 2, "clients": 4, "steps": 300,
                 "lr": 0.01, "dense_layers": 2},
        "machine": {"device_name": "Test CPU", "device": "cpu", "torch_threads": 1,
                    "torch": "2.13.0", "git_commit": "abc1234", "git_dirty": False,
                    "cpu_count": 2},
        "rows": [{"method": m, "layers_timed": n, "s_per_layer": s, "cpu_s_per_layer": s,
                  "speedup": 0.5 / s, "rel_div": [0.03, 0.03, 0.03], "rel_div_dense_fp64": [0.03, 0.03],
                  "rel_naive": [0.1, 0.1, 0.1], "rel_bound": [0.02] * 3, "peak_extra_MiB": 1.0}
                 for m, n, s in (("dense AdamW (baseline)", 2, 0.5), ("Gram ALS", 3, 0.001))],
        "speedup_target_met": True, "total_runtime_s": 4.0,
        "load_average_1_5_15min": {"start": [1.0, 1.0, 1.0], "end": [1.1, 1.0, 1.0]},
        "failures": []}))
    return res


@pytest.fixture(scope="module")
def built(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    return (report.build_report(str(results), str(out), method="flora_na", baseline="fedit"), out,
            results)


def unwrap(markdown: str) -> str:
    """README's headline with its prose wraps undone (report.wrap), for matching whole sentences."""
    return re.sub(r"\n(?:  )?(?![\n|]|- )", " ", markdown)


def line(md: str, start: str) -> list[str]:
    """The table rows (or lines) of md that start with `start`."""
    return [l for l in md.splitlines() if l.startswith(start)]


def page_with(*keys: str, between: str = "hand-written\n") -> str:
    """A results page holding a stale block for each section key, `between` after each."""
    blocks = "".join(f"<!-- results:{k}:start -->\nSTALE {k}\n<!-- results:{k}:end -->\n{between}"
                     for k in keys)
    return "# Results\nkept\n" + blocks
