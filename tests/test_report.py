"""Tests for evidence/report.py on run directories written by hand to the train.py contract.

Each run directory holds config.json (the CLI args plus the run's "facts": task display name
and main metric, majority-class baseline, head size, every registered aggregator's display name
in registry order), metrics.jsonl (one row per aggregator per round) and provenance.jsonl. The
numbers below are chosen so that every expected table cell can be worked out by hand; the
report must print them without knowing any aggregator by name. No model, no torch training:
the whole file runs in seconds.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
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


def line(md: str, start: str) -> list[str]:
    """The table rows (or lines) of md that start with `start`."""
    return [l for l in md.splitlines() if l.startswith(start)]


def test_glue_rows_come_from_the_facts_in_registry_order(built):
    md = built[0].body
    best = md[md.index("**Best dev metric"):md.index("**Final-round")]
    labels = [l.split(" | ")[0].removeprefix("| ") for l in best.splitlines() if l.startswith("| ")][1:]
    assert labels == ["FedIT", "FedSA-LoRA (global)", "FedSA-LoRA (personalised)", "Toy",
                      "**FLoRA-NA**", "centralised (1 client, IID)",
                      "majority class (constant prediction)"]
    # mean ± sample std over the two seeds, task average (one task), MB / round (up + down)
    assert line(best, "| FedIT |") == ["| FedIT | 0.700 ± 0.141 | 0.700 | 2.00 |"]
    assert line(best, "| FedSA-LoRA (personalised) |") == [
        "| FedSA-LoRA (personalised) | 0.590 ± 0.014 | 0.590 | — |"]
    assert line(best, "| Toy |") == ["| Toy | **0.810 ± 0.127** | 0.810 | 1.50 |"]   # the best
    assert line(best, "| **FLoRA-NA** |") == ["| **FLoRA-NA** | 0.800 ± 0.071 | 0.800 | 2.00 |"]
    assert line(best, "| centralised") == [
        "| centralised (1 client, IID) | 0.950 (n=1) | 0.950 | — |"]
    assert line(best, "| majority class") == [
        "| majority class (constant prediction) | 0.520 ± 0.014 | — | — |"]
    final = md[md.index("**Final-round"):]
    assert line(final, "| Toy |") == ["| Toy | **0.800 ± 0.141** | 0.800 | 1.50 |"]
    assert "SST-2 (accuracy)" in best


def test_head_size_and_verdicts(built):
    md = built[0].body
    assert "(classifier and pooler, 0.57 MB per client each way)" in md
    assert ("- **FLoRA-NA vs FedIT** (best over rounds, difference of means over seeds): ahead "
            "by more than one std on 0 task(s) (—), behind by more than one std on 0 (—), "
            "within one std on 1 (SST-2 +0.1000).") in md
    assert ("- FLoRA-NA's rank among the federated global models (best over rounds, mean over "
            "seeds): SST-2 2/4.") in md
    assert "Centralised reference vs the best federated global model (best over rounds): " \
           "SST-2 0.950 vs 0.810." in md


OLD_PROTOCOL = ("(personalised): each client's own model (the shared factors with its private "
                "ones, the averaged head) on the shared dev set, unweighted mean over clients, "
                "not a single global model")


def test_the_personalised_rows_name_how_they_were_scored(built, tmp_path):
    """Every personalised number says which protocol produced it (train.py's --personal-eval,
    --personal-weighting, --head-sharing, read from each run's config and facts; runs from
    before these were recorded: as train.py scored them then), naming the runs where they
    differ; the MB note says whose clients keep their head."""
    assert OLD_PROTOCOL in built[0].body and f"- {OLD_PROTOCOL}." in built[0].headline
    kept = {**REGISTRY, "fedsa": {**REGISTRY["fedsa"], "private_head": True}}
    metrics = rows("fedit", {4: 0.6}) + rows("fedsa", {4: 0.7}, personal={4: 0.65})
    write_run(tmp_path, "glue", "sst2_seed0", config(registry=kept, personal_eval="clients",
                                                     personal_weighting="data"), metrics)
    write_run(tmp_path, "glue", "sst2_seed1", config(seed=1, personal_eval="clients",
                                                     personal_weighting="uniform"), metrics)
    write_run(tmp_path, "glue", "sst2_seed2", config(seed=2, registry=kept,
                                                     personal_eval="global"),
              rows("fedit", {4: 0.6}) + rows("fedsa", {4: 0.7}))
    runs = report.load_runs(str(tmp_path), "glue")
    text = ("(personalised): in sst2_seed0, each client's own model (the shared factors with its "
            "private ones, its own head) on the shared dev set, mean weighted by the clients' "
            "training examples, not a single global model; in sst2_seed1, "
            + OLD_PROTOCOL.removeprefix("(personalised): ")
            + "; in sst2_seed2, no row, only the global model is scored (--personal-eval global)")
    assert report.personal_text(runs) == text
    assert report.personal_text(runs[2:]) == ("(personalised): no row, only the global model is "
                                              "scored (--personal-eval global)")
    md = report.build_report(str(tmp_path), str(tmp_path)).body
    assert text in md
    assert ("(classifier and pooler, 0.57 MB per client each way), averaged by every method but "
            "FedSA-LoRA, whose clients keep their own, is not counted") in md
    assert "averaged alike by every method" in report.head_text(runs[1:2])


def test_regime_study_table_verdict_and_accuracy(built):
    """Per setting: FedIT's mean (max) relative divergence, the bound, and each variant's share
    of FedIT's summed divergence removed; the base first, then each factor's sweep; the
    accuracy table joins the tracked FedIT run (seed 0) with the untracked seeds."""
    md = built[0].body
    assert "| factor | value | FedIT rel. div. mean (max) | rank-r bound | bound removes | " \
           "per-layer | per-layer, AdamW | tied | uniform target | tied, uniform target | " \
           "gap closed (per-layer) | FedIT final dev accuracy |" in md
    # base: naive 0.2, bound 0.1, ALS 0.15, AdamW 0.16, tied 0.18, uniform 0.3, tied uniform 0.32
    assert line(md, "| base |") == ["| base | — | 0.200 (0.200) | 0.100 | 50% | 25.0% | 20.0% | "
                                    "10.0% | -50.0% | -60.0% | 50% | 0.700 |"]
    # 50 steps: naive (0.4, 0.6), ALS (0.3, 0.5): removes 1 - 0.8 / 1.0; gap 0.2 / 0.6
    assert line(md, "| local steps | 50 |") == ["| local steps | 50 | 0.500 (0.600) | 0.200 | 60% | "
                                               "20.0% | 20.0% | 10.0% | -50.0% | -60.0% | 33% | "
                                               "0.800 |"]
    assert line(md, "| Dirichlet alpha | IID |")
    assert md.index("| base |") < md.index("| local steps | 50 |") < md.index("| Dirichlet alpha | IID |")
    assert "(LoRA alpha = 2 r)" not in md and "local steps 10, 50; Dirichlet alpha 0.5, IID; " \
        "LoRA alpha = 2 r)" in md
    assert ("FedIT's relative divergence is largest at local steps 50 (0.500) and the base "
            "setting (0.200), smallest at Dirichlet alpha IID (0.100). FLoRA-NA (per-layer) "
            "removes 20.0% to 25.0% of it across settings, where the rank-r bound would allow "
            "20% to 60%; fitted to the uniform mean it removes -50% to -50% (negative: worse than "
            "FedIT); its AdamW solver (defaults) removes 80.0% to 100.0% of what the per-layer ALS "
            "optimum removes.") in md
    # accuracy at 50 local steps: FedIT seeds (0.80 tracked, 0.76), FLoRA-NA (0.84, 0.80)
    assert line(md, "| local steps 50 |") == [
        "| local steps 50 | 0.500 | 0.780 ± 0.028 | 0.780 ± 0.028 | 0.820 ± 0.028 | "
        "0.820 ± 0.028 |"]
    assert "FLoRA-NA - FedIT: local steps 50: +0.040 best-over-rounds (beyond one std, 0.028)." in md
    assert report.largest_error(str(built[2]), 2) == ["steps50", "base"]


def test_generation_bench_and_provenance(built):
    md = built[0].body
    assert line(md, "| **FLoRA-NA** | GSM8K (accuracy) |") == [
        "| **FLoRA-NA** | GSM8K (accuracy) | 0.100 (3/30) | 2 | 0.600 → 0.500 |"]
    assert line(md, "| Gram ALS | 3 |")
    # which code and machine produced each stage, from provenance.jsonl and the bench JSON
    assert line(md, "| 3 glue | ok | 10.0 min | 2026-01-01 00:10:00 | `abc1234` | Test CPU (2 cores) |")
    assert line(md, "| 5 bench | — | — | — | `abc1234` | Test CPU (2 cores) |")
    assert line(md, "| 2 regime | — | — | — | `abc1234` | Test CPU (2 cores) |")
    for png in ("regime", "glue_metric_vs_round", "glue_metric_vs_bytes"):
        assert (built[1] / f"{png}.png").stat().st_size > 1000


def test_regime_runs_that_change_two_factors_are_refused(tmp_path):
    regime = dict(aggregator="fedit", track_solvers=True, rounds=2, clients=4, local_steps=10)
    for name, kw in (("a", {}), ("b", {}), ("c", {"local_steps": 5, "rank": 4})):
        write_run(tmp_path, "regime", name, config(**{**regime, **kw}),
                  rows("fedit", {2: 0.7}, rounds=2, div=tracked_div(0.2, 0.1)))
    with pytest.raises(ValueError, match="c changes local_steps, rank from the base setting"):
        report.regime_settings(str(tmp_path))


def test_headline_names_the_commit_and_the_comparison(built):
    head = built[0].headline
    assert head.startswith("From `bash reproduce.sh` in QUICK mode (a CPU-sized stand-in for the "
                           "paper's experiments, not comparable with its numbers), code of commit "
                           "`abc1234`; all tables, figures, calibration and limits in "
                           "[RESULTS.md](RESULTS.md).")
    assert line(head, "| **FLoRA-NA** |") == ["| **FLoRA-NA** | 0.800 ± 0.071 | 0.800 | 2.00 |"]
    assert "- **FLoRA-NA vs FedIT**" in head
    assert "- Aggregation error (stage 2, code of commit `abc1234`): FedIT's relative " \
           "divergence is largest at local steps 50 (0.500)" in head
    assert "**Final-round" not in head and "Regime study" not in head


def test_without_method_and_baseline_the_comparisons_say_what_they_need(results, tmp_path):
    md = report.build_report(str(results), str(tmp_path)).body
    assert md.count("_Not shown: this section compares two aggregators; pass ") == 1
    assert "- No comparison lines: pass --method and --baseline" in md
    assert line(md, "| FLoRA-NA |")                        # tables still there, nobody bold
    assert "**FLoRA-NA**" not in md


def test_unknown_method_is_refused_with_the_known_names(results, tmp_path):
    with pytest.raises(ValueError, match="--method 'flora' is not an aggregator these runs "
                                         "know; choose from fedit, fedsa, toy, flora_na"):
        report.build_report(str(results), str(tmp_path), method="flora", baseline="fedit")


def test_a_newly_registered_aggregator_appears_with_its_display_name_and_place(tmp_path):
    """A name the report has never heard of, registered first: its row comes first, under its
    display name, in the first colour of the palette; the method is black."""
    registry = {"zeta_lora": {"display_name": "ZetaLoRA", "personalised": False}, **REGISTRY}
    write_run(tmp_path, "glue", "sst2_seed0", config(registry=registry),
              rows("zeta_lora", {4: 0.61}) + rows("flora_na", {4: 0.62}))
    md = report.build_report(str(tmp_path), str(tmp_path), method="flora_na").body
    assert line(md, "| ZetaLoRA |") == ["| ZetaLoRA | 0.610 | 0.610 | 2.00 |"] * 2
    assert md.index("| ZetaLoRA |") < md.index("| **FLoRA-NA** |")
    names = report.Names.of(report.load_runs(str(tmp_path), "glue"), "flora_na", None)
    assert names.style("zeta_lora")["color"] == report.PALETTE[0]
    assert names.style("toy")["color"] == report.PALETTE[3]
    assert names.style("flora_na")["color"] == "black"


def test_runs_that_say_all_are_checked_against_the_registry(tmp_path):
    write_run(tmp_path, "glue", "sst2_seed0", config(aggregator="all"), rows("fedit", {4: 0.6}))
    run, = report.load_runs(str(tmp_path), "glue")
    assert run.unfinished() == ["fedsa", "toy", "flora_na"]


def test_a_run_without_facts_is_named(tmp_path):
    cfg = config()
    del cfg["facts"]
    write_run(tmp_path, "glue", "sst2_seed0", cfg, rows("fedit", {4: 0.6}))
    with pytest.raises(ValueError, match="sst2_seed0/config.json has no 'facts'"):
        report.load_runs(str(tmp_path), "glue")


def test_a_regression_task_and_a_headless_model(tmp_path):
    stsb = {"display_name": "STS-B", "main_metric": "pearson"}
    cfg = config("stsb", stsb, 0.0)
    cfg["facts"]["head"] = {"modules": [], "bytes": 0}
    write_run(tmp_path, "glue", "stsb_seed0", cfg, rows("fedit", {4: 0.3}, metric="pearson"))
    md = report.build_report(str(tmp_path), str(tmp_path)).body
    assert "| aggregator | STS-B (pearson) |" in md
    assert line(md, "| majority class") == ["| majority class (constant prediction) | 0.000 | — | — |"] * 2
    assert "(no parameter outside LoRA is trained)" in md


def page_with(*keys: str, between: str = "hand-written\n") -> str:
    """A results page holding a stale block for each section key, `between` after each."""
    blocks = "".join(f"<!-- results:{k}:start -->\nSTALE {k}\n<!-- results:{k}:end -->\n{between}"
                     for k in keys)
    return "# Results\nkept\n" + blocks


def test_command_line_rewrites_only_the_sections_with_results_and_the_headline(tmp_path):
    """The CLI as reproduce.sh calls it, in a subprocess, on a folder with GLUE runs only:
    REPORT.md in the results folder; on the page, the GLUE block is replaced (with its
    provenance line and figure, copied beside the page) and the regime and generation
    blocks stay as they were; README's headline is replaced; text outside the markers is
    untouched."""
    results = tmp_path / "results"
    write_run(results, "glue", "sst2_seed0", config(),
              rows("fedit", {4: 0.6}) + rows("flora_na", {4: 0.7}))
    (results / "stage_times.tsv").write_text(
        "3\tglue\tok\t90\t2026-01-02 03:04:05\tQUICK\t2\t1\tbash reproduce.sh --only 3\n")
    (tmp_path / "RESULTS.md").write_text(page_with("regime", "glue", "generation"))
    (tmp_path / "README.md").write_text("pitch\n<!-- headline:start -->\nSTALE\n"
                                        "<!-- headline:end -->\nrest\n")
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    out = subprocess.run([sys.executable, "-m", "evidence.report", "results", "--method",
                          "flora_na", "--baseline", "fedit", "--page", "RESULTS.md", "--readme",
                          "README.md"], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert "RESULTS.md: left as they are (no results for their stage here): regime, bench, " \
           "generation" in out
    assert (results / "REPORT.md").read_text().startswith("# FLoRA-NA reproduction report")
    page = (tmp_path / "RESULTS.md").read_text()
    stale = page_with("regime", "glue", "generation")
    glue_start, glue_end = page.index("<!-- results:glue:start -->"), page.index("<!-- results:glue:end -->")
    assert page[:glue_start] == stale[:stale.index("<!-- results:glue:start -->")]
    assert page[glue_end:] == stale[stale.index("<!-- results:glue:end -->"):]
    glue = page[glue_start:glue_end]
    assert "STALE" not in glue and glue.startswith(
        "<!-- results:glue:start -->\n### GLUE: every aggregator, mean ± std over seeds\n\n"
        "_Stage 3 (glue) of `bash reproduce.sh --only 3`, QUICK mode, 2 parallel run(s) x 1 "
        "torch thread(s): code of commit `abc1234` on Test CPU (2 cores); finished "
        "2026-01-02 03:04:05 after 1.5 min._\n")
    assert "![dev metric vs round](figures/glue_metric_vs_round.png)" in glue
    assert (tmp_path / "figures" / "glue_metric_vs_round.png").stat().st_size > 1000
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("pitch\n<!-- headline:start -->\nFrom `bash reproduce.sh`")
    assert readme.endswith("<!-- headline:end -->\nrest\n") and "STALE" not in readme
    assert line(readme, "| **FLoRA-NA** | **0.700** | 0.700 | 2.00 |")


def test_without_glue_runs_the_headline_is_left_alone(tmp_path, capsys):
    results = tmp_path / "results"
    gsm = {"display_name": "GSM8K", "main_metric": "accuracy"}
    write_run(results, "generation", "gsm8k_fedit",
              config("gsm8k", gsm, None, aggregator="fedit", rounds=2), rows("fedit", {2: 0.1}, 2))
    (tmp_path / "README.md").write_text("<!-- headline:start -->\nOLD\n<!-- headline:end -->\n")
    report.main(report.Args(str(results), readme=str(tmp_path / "README.md")))
    assert (tmp_path / "README.md").read_text() == "<!-- headline:start -->\nOLD\n<!-- headline:end -->\n"
    assert "headline left as it is (no GLUE runs here)" in capsys.readouterr().out


def test_a_section_without_markers_is_added_beside_its_neighbours(tmp_path):
    """The page lacks the bench markers: the block goes right after the nearest earlier
    section (glue) in SECTIONS order, or before the nearest later one; a page with no section
    markers at all is left unchanged with a message naming the markers to add; a broken pair
    is refused."""
    page = tmp_path / "RESULTS.md"
    page.write_text(page_with("regime", "glue", "generation"))
    assert report.write_sections(str(page), {"bench": "## Bench\nnew"}) == [
        "added section 'bench' after section 'glue'"]
    text = page.read_text()
    assert text.replace("\n\n<!-- results:bench:start -->\n## Bench\nnew\n"
                        "<!-- results:bench:end -->", "") == page_with(
        "regime", "glue", "generation")
    assert text.index("results:glue:end") < text.index("results:bench:start") \
        < text.index("results:generation:start")
    page.write_text(page_with("generation"))
    assert report.write_sections(str(page), {"regime": "## R"}) == [
        "added section 'regime' before section 'generation'"]
    assert page.read_text().startswith("# Results\nkept\n<!-- results:regime:start -->\n## R\n"
                                       "<!-- results:regime:end -->\n\n<!-- results:generation:start -->")
    page.write_text("# Results\nno markers\n")
    message, = report.write_sections(str(page), {"glue": "## G"})
    assert message.startswith("section 'glue' NOT written") and "<!-- results:glue:start -->" in message
    assert page.read_text() == "# Results\nno markers\n"
    page.write_text("<!-- results:glue:start -->\nno end\n")
    message, = report.write_sections(str(page), {"glue": "## G"})
    assert "has 1 <!-- results:glue:start --> and 0 <!-- results:glue:end -->" in message
    assert page.read_text() == "<!-- results:glue:start -->\nno end\n"


def test_every_section_has_a_stage_folder_and_distinct_markers():
    keys = [s.key for s in report.SECTIONS]
    assert len(set(keys)) == len(keys) and len({s.stage for s in report.SECTIONS}) == len(keys)
    assert all(callable(s.write) for s in report.SECTIONS)


def test_report_imports_no_training_code_and_names_no_aggregator():
    """The report reads run files only: importing it loads neither train.py, flora_na.py nor
    the harness's tasks, and no registered aggregator's name is a string in its code (the
    usage lines of its docstring may quote a command)."""
    code = ("import sys; from evidence import report; "
            "print(sorted(m for m in ('train', 'flora_na', 'harness.tasks') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert out.strip() == "[]"
    import flora_na
    source = (HERE / "evidence" / "report.py").read_text()
    strings = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)}
    assert not set(flora_na.AGGREGATORS) & strings


def test_regime_study_before_its_base_run_has_finished(tmp_path):
    """The base run comes last in the stage: until it writes, the section says so, and each
    run is still placed against the most common value of every factor."""
    regime = dict(aggregator="fedit", track_solvers=True, rounds=2, clients=4, local_steps=10,
                  dirichlet_alpha=0.5)
    for name, kw in (("steps50", {"local_steps": 50}), ("iid", {"dirichlet_alpha": 0}),
                     ("clients10", {"clients": 10})):
        write_run(tmp_path, "regime", name, config(**{**regime, **kw}),
                  rows("fedit", {2: 0.7}, rounds=2, div=tracked_div(0.2, 0.1)))
    md = report.build_report(str(tmp_path), str(tmp_path), "flora_na", "fedit").body
    assert "(the base run itself has not written results yet;" in md
    assert not line(md, "| base |") and line(md, "| local steps | 50 |") and line(md, "| clients | 10 |")
