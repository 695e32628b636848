"""The privacy section (evidence/report_privacy.py) on run folders written by hand."""
from __future__ import annotations

import json

import pytest

from evidence import report
from evidence.report_common import Names
from evidence.report_privacy import privacy_section
from report_runs import REGISTRY, built, config, line, results, rows, write_run  # noqa: F401

# Toy keeps its head on the clients: its DP vector is its factors alone. The others' head has
# 24,464 values, so with 0.75 MiB up per round from 3 clients (65,536 float32 values each)
# d = 65,536 + 24,464 = 300^2 and, for Toy, d = 65,536 = 256^2.
PRIVATE = {**REGISTRY, "toy": {**REGISTRY["toy"], "private_head": True}}
HEAD = {"modules": ["classifier"], "bytes": 4 * 24464}


def dp_run(res, name: str, seed: int, finals: dict, mode: str = "none", sigma: float = 0.0,
           target: float | None = None, clip: float = 0.5, evals=None, **kw):
    """One run of stage 10: every aggregator in `finals` over 2 rounds (final metric at round 2;
    `evals` adds round 1's), 0.75 MiB up per round; with DP the facts' dp record, epsilon per
    round (target / 2, then target; None without noise) and change norms 1-3 then 4-6."""
    cfg = config(seed=seed, rounds=2, eval_every=2, registry=PRIVATE, aggregator=",".join(finals),
                 dp=mode, **({"dp_clip": clip, "dp_noise": None if target else sigma,
                             "dp_target_epsilon": target, "dp_delta": 1e-5} if mode != "none"
                            else {}), **kw)
    cfg["facts"]["head"] = HEAD
    if mode != "none":
        cfg["facts"]["dp"] = {"mode": mode, "clip": clip, "noise_multiplier": sigma,
                              "delta": 1e-5, "weights": "uniform 1/m",
                              "accountant": "dp-accounting RDP"}
    metrics = []
    for agg, final in finals.items():
        for r in rows(agg, {**(evals or {}).get(agg, {}), 2: final}, rounds=2, mb_up=0.75):
            if mode != "none":
                r["epsilon"] = None if sigma == 0 else target * r["round"] / 2
                r["delta"] = 1e-5
                r["dp_norms"] = [1.0, 2.0, 3.0] if r["round"] == 1 else [4.0, 5.0, 6.0]
            metrics.append(r)
    write_run(res, "privacy", name, cfg, metrics)


@pytest.fixture(scope="module")
def privacy(tmp_path_factory):
    """No DP and clipping alone (C 0.5) for FedIT, Toy and FLoRA-NA at seeds 0 and 1; central
    DP (sigma 4 at target 1, 1.5 at target 8) for FedIT and Toy at both seeds; local DP (sigma
    2, target 8) for all three at seed 0 only; a centralised reference (1 client) at both
    seeds at its own lr. Majority class 0.5."""
    res = tmp_path_factory.mktemp("results")
    (res / "pipeline.json").write_text(json.dumps({"mode": "QUICK", "tiny": False}))
    (res / "stage_times.tsv").write_text(
        "9\tcompression\tok\t60\t2026-01-01 00:01:00\tQUICK\t2\t1\tbash reproduce.sh --only 9\n"
        "10\tprivacy\tok\t600\t2026-01-01 00:11:00\tQUICK\t2\t1\tbash reproduce.sh --only 10\n")
    for s in (0, 1):
        dp_run(res, f"none_seed{s}", s, {"fedit": 0.80 + 0.02 * s, "toy": 0.78 + 0.02 * s,
                                         "flora_na": 0.81 + 0.02 * s},
               evals={"fedit": {1: 0.85}} if s == 0 else None)
        dp_run(res, f"clip_seed{s}", s, {"fedit": 0.70 + 0.02 * s, "toy": 0.71,
                                         "flora_na": 0.52 + 0.01 * s}, mode="local")
        dp_run(res, f"central_eps1_seed{s}", s, {"fedit": 0.60 + 0.02 * s, "toy": 0.70 + 0.02 * s},
               mode="central", sigma=4.0, target=1.0)
        dp_run(res, f"central_eps8_seed{s}", s, {"fedit": 0.60 + 0.04 * s, "toy": 0.61 + 0.04 * s},
               mode="central", sigma=1.5, target=8.0)
    dp_run(res, "local_eps8_seed0", 0, {"fedit": 0.55, "toy": 0.56, "flora_na": 0.57},
           mode="local", sigma=2.0, target=8.0)
    for s in (0, 1):    # the centralised reference: one client, no DP
        dp_run(res, f"centralised_seed{s}", s, {"fedit": 0.90 + 0.02 * s}, clients=1, lr=5e-4)
    out = tmp_path_factory.mktemp("figures")
    return report.build_report(str(res), str(out), "flora_na", "fedit"), out


def test_privacy_table_cells_worked_out_by_hand(privacy):
    """Rows in registry order, then no DP, clip only, central and local by target epsilon;
    final and best (mean ± std over seeds), epsilon of the last row, sigma, C, the median of
    every change norm (1..6 twice: 3.5), noise / signal sigma sqrt(d) / m central and
    sigma sqrt(d) / sqrt(m) local (d = 300^2, Toy's 256^2 without its private head; m = 3),
    MB per round up + down (0.75 + 1)."""
    md = privacy[0].body
    assert ("| aggregator | DP | target ε | final accuracy | best accuracy | ε after last round | "
            "σ | C | median change norm | noise / signal | MB / round |") in md
    assert line(md, "| FedIT |") == [
        "| FedIT | no DP | — | 0.810 ± 0.014 | 0.835 ± 0.021 | — | — | — | — | — | 1.750 |",
        "| FedIT | clip only | — | 0.710 ± 0.014 | 0.710 ± 0.014 | ∞ | 0 | 0.5 | 3.5 | 0 "
        "| 1.750 |",
        "| FedIT | central | 1 | 0.610 ± 0.014 | 0.610 ± 0.014 | 1.00 | 4 | 0.5 | 3.5 | 400 "
        "| 1.750 |",
        "| FedIT | central | 8 | 0.620 ± 0.028 | 0.620 ± 0.028 | 8.00 | 1.5 | 0.5 | 3.5 | 150 "
        "| 1.750 |",
        "| FedIT | local | 8 | 0.550 (n=1) | 0.550 (n=1) | 8.00 | 2 | 0.5 | 3.5 | 346 | 1.750 |"]
    assert line(md, "| Toy | central | 1 |") == [
        "| Toy | central | 1 | 0.710 ± 0.014 | 0.710 ± 0.014 | 1.00 | 4 | 0.5 | 3.5 | 341 "
        "| 1.750 |"]
    assert line(md, "| **FLoRA-NA** | local |") == [
        "| **FLoRA-NA** | local | 8 | 0.570 (n=1) | 0.570 (n=1) | 8.00 | 2 | 0.5 | 3.5 | 346 "
        "| 1.750 |"]
    assert line(md, "| centralised (1 client, IID) |") == [
        "| centralised (1 client, IID) | no DP | — | 0.910 ± 0.014 | 0.910 ± 0.014 | — | — | — "
        "| — | — | — |"]                        # a row of its own, last, not FedIT's
    assert md.index("| FedIT | local") < md.index("| Toy | no DP") < md.index(
        "| **FLoRA-NA** | no DP") < md.index("| centralised")
    assert (privacy[1] / "privacy.png").stat().st_size > 0
    block = privacy[0].blocks["privacy"]
    assert block.startswith("## Privacy: client-level DP, accuracy against epsilon\n\n_Stage 10 "
                            "(privacy) of `bash reproduce.sh --only 10`, QUICK mode")
    assert "![privacy]({FIG}privacy.png)" in block and "<!-- " not in block
    assert md.index("| 9 compression |") < md.index("| 10 privacy |")   # stages in number order


def test_privacy_reading_follows_its_rules(privacy):
    """The centralised reference's final metric first; no DP: all learned (the reference is no
    aggregator); clipping alone: FLoRA-NA within 0.05 of the majority; central DP, the
    other aggregator against the baseline at each epsilon: ahead where the difference of the
    means exceeds the larger std over seeds, within it otherwise."""
    md = privacy[0].body
    assert ("The centralised reference (one client, the same examples, lr 0.0005) ends at 0.910. "
            "Without DP, every aggregator learned: final accuracy at least 0.05 above the "
            "majority class. With clipping alone, FLoRA-NA stayed within 0.05 of the majority "
            "class: clipping already erases what they learn here, so their noised rows cannot "
            "show more. Under central DP, where arXiv 2403.12313 claims that the aggregator that "
            "freezes A keeps more accuracy (the noise enters its update linearly): Toy against "
            "FedIT (final accuracy): at ε 1: 0.710 vs 0.610, ahead by 0.100, more than the std "
            "over seeds (0.014); at ε 8: 0.630 vs 0.620, a difference of +0.010 within the std "
            "over seeds (0.028).") in md


def test_no_verdict_with_one_seed_or_near_the_majority_and_d_only_where_exact(tmp_path):
    """One seed, or both aggregators within 0.05 of the majority class: no verdict; without a
    baseline among the central runs the first in registry order is the reference; an
    aggregator that did not learn without DP is not named again for clipping; under an upload
    codec d is not derivable from the bytes: noise / signal "—"."""
    dp_run(tmp_path, "central_eps3_seed0", 0, {"fedit": 0.52, "toy": 0.53}, mode="central",
           sigma=2.0, target=3.0)
    dp_run(tmp_path, "none_seed0", 0, {"fedit": 0.8, "toy": 0.52})
    dp_run(tmp_path, "clip_seed0", 0, {"fedit": 0.54, "toy": 0.51}, mode="local")
    dp_run(tmp_path, "central_eps8_seed0", 0, {"fedit": 0.60, "toy": 0.70}, mode="central",
           sigma=1.5, target=8.0, upload_codec="int8")
    md = privacy_section(str(tmp_path), str(tmp_path), Names(PRIVATE, None, "flora_na"))
    assert ("Without DP, Toy stayed within 0.05 of the majority class: their DP rows say "
            "nothing about DP's price. With clipping alone, FedIT stayed within 0.05 of the "
            "majority class: clipping already erases") in md       # Toy named once, above
    assert ("Toy against FedIT (final accuracy): at ε 3: 0.530 vs 0.520, both within 0.05 of "
            "the majority class (no verdict); at ε 8: 0.700 vs 0.600 (one seed: no verdict).") in md
    assert line(md, "| Toy | central | 8 |")[0].endswith("| 1.5 | 0.5 | 3.5 | — | 1.750 |")
    assert line(md, "| Toy | central | 3 |")[0].endswith("| 2 | 0.5 | 3.5 | 171 | 1.750 |")


def test_learned_is_judged_against_each_seeds_own_majority_class(tmp_path):
    """The seeds' dev subsets differ, and so do their majority classes (0.5, 0.6): FedIT at 0.62
    and 0.64 is 0.08 above on average (learned), Toy at 0.56 and 0.63 only 0.045 (not), though
    both means clear the first seed's 0.5 by far; the header gives the majority over seeds."""
    for s, majority in ((0, 0.5), (1, 0.6)):
        dp_run(tmp_path, f"none_seed{s}", s, {"fedit": 0.62 - 0.04 * s + 0.06 * s,
                                              "toy": 0.56 + 0.07 * s}, majority=majority)
    md = privacy_section(str(tmp_path), str(tmp_path), Names(PRIVATE, None, "fedit"))
    assert "majority-class accuracy 0.550 ± 0.071 (each seed's dev subset)" in md
    assert ("Without DP, Toy stayed within 0.05 of the majority class: their DP rows say "
            "nothing about DP's price.") in md


def test_smoke_run_draws_no_conclusion_and_no_runs_say_not_run(built, tmp_path):
    """A TINY run's section has its table and figure but no reading; without runs/privacy/ the
    section says so and has no block for the results page."""
    dp_run(tmp_path, "none_seed0", 0, {"fedit": 0.8, "flora_na": 0.81})
    dp_run(tmp_path, "central_eps1_seed0", 0, {"fedit": 0.6, "toy": 0.7}, mode="central",
           sigma=4.0, target=1.0)
    (tmp_path / "pipeline.json").write_text(json.dumps({"mode": "QUICK", "tiny": True}))
    smoke = report.build_report(str(tmp_path), str(tmp_path), "flora_na", "fedit")
    section = smoke.body[smoke.body.index("## Privacy"):smoke.body.index("## How this was run")]
    assert "| FedIT | central | 1 |" in section and "privacy.png" in section
    assert "smoke test: numbers are not results" in section
    assert "Without DP" not in section and "Under central DP" not in section and "**" not in section
    assert "_Not run: nothing under `runs/privacy/` yet._" in built[0].body
    assert "privacy" not in built[0].blocks
