"""The block of a run of some aggregators only (evidence/report_subset.py, reproduce.sh with
AGGREGATORS=...): on run folders written by hand (tests/report_runs.py), an added aggregator
"toy" whose updates are exact, with FedIT and FLoRA-NA beside it at seed 0 only. The block is
the only one such a run publishes: the page's other blocks and README stay as they are."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from evidence import report
from evidence.report_subset import parse_aggregators, subset_key
from report_runs import (HERE, config, divergence, line, page_with, rows, tracked_div,
                         write_run)


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """GLUE SST-2: toy at seeds 0 and 1 (best 0.80, 0.70; exact: divergence 0), FedIT (0.60)
    and FLoRA-NA (0.65) at seed 0, centralised 0.90, majority 0.51; the regime study's tracked
    FedIT run at 50 local steps (divergence 0.5) and toy over two seeds there (0.70, 0.74 best);
    a mixed-ranks run of toy."""
    res = tmp_path_factory.mktemp("subset")
    (res / "pipeline.json").write_text('{"mode": "QUICK", "tiny": false, "jobs": 2, '
                                       '"threads": 1, "aggregators": "toy"}')
    command = "AGGREGATORS=toy REF_SEEDS=\"0\" bash reproduce.sh --only 2,3,7"
    (res / "stage_times.tsv").write_text("".join(
        f"{n}\t{name}\tok\t600\t2026-01-01 00:10:00\tQUICK\t2\t1\t{command}\t\n"
        for n, name in ((2, "regime"), (3, "glue"), (7, "mixed_ranks"))))
    exact = divergence(0.2, 0.0, 0.05)
    write_run(res, "glue", "sst2_seed0", config(aggregator="toy,fedit,flora_na"),
              rows("toy", {2: 0.7, 4: 0.8}, mb_up=0.25, div=exact)
              + rows("fedit", {2: 0.55, 4: 0.6}, div=divergence(0.2, 0.2, 0.05))
              + rows("flora_na", {2: 0.6, 4: 0.65}, div=divergence(0.2, 0.15, 0.05)))
    write_run(res, "glue", "sst2_seed1", config(aggregator="toy", seed=1, majority=0.51),
              rows("toy", {2: 0.7, 4: 0.6}, mb_up=0.25, div=exact))
    write_run(res, "glue", "sst2_centralised_seed0",
              config(clients=1, dirichlet_alpha=0, aggregator="fedit"),
              rows("fedit", {2: 0.85, 4: 0.9}))
    regime = dict(aggregator="fedit", track_solvers=True, rounds=2, clients=4, local_steps=50,
                  lr=0.002, dirichlet_alpha=0.5, rank=8, lora_alpha=16.0)
    write_run(res, "regime", "base", config(**{**regime, "local_steps": 10}),
              rows("fedit", {1: 0.6, 2: 0.7}, rounds=2, div=tracked_div(0.1, 0.05)))
    write_run(res, "regime", "steps50", config(**regime),
              rows("fedit", {1: 0.6, 2: 0.66}, rounds=2, div=tracked_div(0.5, 0.2)))
    acc = {**regime, "track_solvers": False}
    for seed, best in ((0, 0.70), (1, 0.74)):
        write_run(res, "regime", f"steps50_seed{seed}",
                  config(**{**acc, "aggregator": "toy", "seed": seed}),
                  rows("toy", {1: best - 0.1, 2: best}, rounds=2, div=exact))
    mixed = config(aggregator="toy", rank=16, rank_profile="heavy_tail")
    mixed["facts"]["client_ranks"] = [2, 2, 16]
    write_run(res, "mixed_ranks", "heavy_tail_seed0", mixed,
              rows("toy", {2: 0.6, 4: 0.7}, div=exact))
    return res


@pytest.fixture(scope="module")
def built(subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    return report.build_report(str(subset), str(out), "flora_na", "fedit",
                               aggregators=["toy"]), out


def test_the_block_is_the_only_one_published_and_there_is_no_headline(built):
    rep, out = built
    assert list(rep.blocks) == ["aggregators_toy"] and rep.headline is None
    block = rep.blocks["aggregators_toy"]
    assert block.startswith("## Toy, beside FedIT and FLoRA-NA in the same runs\n")
    assert block in rep.body                          # REPORT.md holds it too, last
    for stage, name in (("3", "glue"), ("2", "regime"), ("7", "mixed_ranks")):
        assert (f"_Stage {stage} ({name}) of `AGGREGATORS=toy REF_SEEDS=\"0\" bash reproduce.sh "
                f"--only 2,3,7`, QUICK mode") in block


def test_glue_rows_bytes_and_divergence(built):
    """Best over rounds with the seeds each row has; the exact aggregator's updates diverge by
    0 where FedIT's average of the same uploads would by 0.2; the learning check."""
    block = built[0].blocks["aggregators_toy"]
    assert line(block, "| Toy | **0.750 ± 0.071** | 0.750 | 1.25 |")
    assert line(block, "| FedIT | 0.600 (n=1) | 0.600 | 2.00 |")
    assert line(block, "| **FLoRA-NA** | 0.650 (n=1) | 0.650 | 2.00 |")
    assert line(block, "| centralised (1 client, IID) | 0.900 (n=1) |")
    assert line(block, "| Toy | 0 (0) | 0.200 |") and line(block, "| FedIT | 0.200 (0.200) | 0.200 |")
    assert "- Toy: the largest relative divergence of its update over every round and layer of " \
           "its runs is 0." in block
    assert "- SST-2: best federated Toy 0.750, FedIT 0.600, FLoRA-NA 0.650; majority class " \
           "0.505; centralised 0.900. Every federated model is above the majority class by " \
           "more than 0.02." in block


def test_regime_comparison_and_mixed_ranks(built):
    block = built[0].blocks["aggregators_toy"]
    assert line(block, "| local steps 50 | 0.500 | Toy | 0.720 ± 0.028 | 0.720 ± 0.028 | 0 (0) |")
    assert line(block, "| local steps 50 | 0.500 | FedIT | 0.660 (n=1) | 0.660 (n=1) | 0.500 (0.500) |")
    assert "### Mixed ranks: clients of different LoRA ranks" in block


def test_figures_get_names_of_their_own(built):
    rep, out = built
    block = rep.blocks["aggregators_toy"]
    assert "({FIG}aggregators_toy_glue_metric_vs_bytes.png)" in block
    assert (out / "aggregators_toy_glue_metric_vs_bytes.png").stat().st_size > 1000
    assert "({FIG}glue_metric_vs_bytes.png)" not in block


def test_command_line_writes_the_block_alone(subset, tmp_path):
    """On a page with the other blocks, the subset's block is added after the last of them
    (write_sections replaces it on a rerun); the other blocks and their figures stay as they
    are."""
    results = tmp_path / "results"
    os.symlink(subset, results)
    stale = page_with("regime", "glue", "mixed_ranks")
    (tmp_path / "RESULTS.md").write_text(stale)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "glue_metric_vs_bytes.png").write_bytes(b"the full run's figure")
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "evidence.report", "results", "--method", "flora_na",
           "--baseline", "fedit", "--aggregators", "toy", "--page", "RESULTS.md"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert "added section 'aggregators_toy' after section 'mixed_ranks'" in out
    assert "left as they are (no results for their stage here): regime, glue, bench, " \
           "generation, mixed_ranks" in out
    page = (tmp_path / "RESULTS.md").read_text()
    start = page.index("<!-- results:aggregators_toy:start -->")
    end = page.index("<!-- results:aggregators_toy:end -->") + len("<!-- results:aggregators_toy:end -->")
    assert page[:start] + page[end:] == stale.replace("<!-- results:mixed_ranks:end -->",
                                                       "<!-- results:mixed_ranks:end -->\n\n", 1)
    assert "### Toy, beside FedIT and FLoRA-NA in the same runs" in page[start:end]
    assert (tmp_path / "figures" / "glue_metric_vs_bytes.png").read_bytes() == b"the full run's figure"
    assert (tmp_path / "figures" / "aggregators_toy_glue_metric_vs_bytes.png").stat().st_size > 1000


def test_bad_aggregator_lists_are_refused(subset, tmp_path):
    assert subset_key(parse_aggregators("a, b")) == "aggregators_a_b"
    for text in ("", "a,a"):
        with pytest.raises(ValueError, match="distinct registry names"):
            parse_aggregators(text)
    with pytest.raises(ValueError, match="nope not among these runs' aggregators"):
        report.build_report(str(subset), str(tmp_path), "flora_na", "fedit", aggregators=["nope"])
