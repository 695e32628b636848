"""What the sections share (evidence/report_common.py): runs read back, names, order, colours."""
from __future__ import annotations

import pytest

from evidence import report, report_common
from report_runs import REGISTRY, config, line, rows, write_run



def test_runs_that_say_all_are_checked_against_the_registry(tmp_path):
    write_run(tmp_path, "glue", "sst2_seed0", config(aggregator="all"), rows("fedit", {4: 0.6}))
    run, = report_common.load_runs(str(tmp_path), "glue")
    assert run.unfinished() == ["fedsa", "toy", "flora_na"]


def test_a_run_without_facts_is_named(tmp_path):
    cfg = config()
    del cfg["facts"]
    write_run(tmp_path, "glue", "sst2_seed0", cfg, rows("fedit", {4: 0.6}))
    with pytest.raises(ValueError, match="sst2_seed0/config.json has no 'facts'"):
        report_common.load_runs(str(tmp_path), "glue")


def test_a_newly_registered_aggregator_appears_with_its_display_name_and_place(tmp_path):
    """A name the report has never heard of, registered first: its row comes first, under its
    display name, in the first colour of the palette; the method is black."""
    registry = {"zeta_lora": {"display_name": "ZetaLoRA", "personalised": False}, **REGISTRY}
    write_run(tmp_path, "glue", "sst2_seed0", config(registry=registry),
              rows("zeta_lora", {4: 0.61}) + rows("flora_na", {4: 0.62}))
    md = report.build_report(str(tmp_path), str(tmp_path), method="flora_na").body
    assert line(md, "| ZetaLoRA |") == ["| ZetaLoRA | 0.610 | 0.610 | 2.00 |"] * 2
    assert md.index("| ZetaLoRA |") < md.index("| **FLoRA-NA** |")
    names = report_common.Names.of(report_common.load_runs(str(tmp_path), "glue"), "flora_na", None)
    assert names.style("zeta_lora")["color"] == report_common.PALETTE[0]
    assert names.style("toy")["color"] == report_common.PALETTE[3]
    assert names.style("flora_na")["color"] == "black"


def test_the_majority_class_is_each_seeds_own():
    """The seeds' dev subsets differ, so a section's majority class is counted once a seed
    (not taken from whichever run comes first), and a task without one (regression) has none."""
    run = lambda seed, maj: report_common.Run(f"r{seed}", {"seed": seed, "facts": {   # noqa: E731
        "majority_baseline": maj}}, [])
    runs = [run(0, 0.5125), run(0, 0.5125), run(1, 0.5025)]
    assert report_common.seed_majorities(runs) == [0.5125, 0.5025]
    assert report_common.majority_note(runs, "accuracy", [0, 1]) == \
        "; majority-class accuracy 0.507 ± 0.007 (each seed's dev subset)"
    assert report_common.mean_majority(runs) == pytest.approx(0.5075)
    assert report_common.majority_note([run(0, None)], "pearson", [0]) == ""
    assert report_common.mean_majority([run(0, None)]) is None
