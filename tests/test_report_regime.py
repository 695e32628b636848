"""The regime study's section (evidence/report_regime.py) on run folders written by hand."""
from __future__ import annotations

import pytest

from evidence import report, report_regime
from report_runs import (built, config, line, results, rows, tracked_div,  # noqa: F401
                         write_run)



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
    assert report_regime.largest_error(str(built[2]), 2) == ["steps50", "base"]


def test_regime_runs_that_change_two_factors_are_refused(tmp_path):
    regime = dict(aggregator="fedit", track_solvers=True, rounds=2, clients=4, local_steps=10)
    for name, kw in (("a", {}), ("b", {}), ("c", {"local_steps": 5, "rank": 4})):
        write_run(tmp_path, "regime", name, config(**{**regime, **kw}),
                  rows("fedit", {2: 0.7}, rounds=2, div=tracked_div(0.2, 0.1)))
    with pytest.raises(ValueError, match="c changes local_steps, rank from the base setting"):
        report_regime.regime_settings(str(tmp_path))


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
