"""The report's driver (evidence/report.py): the whole report, the headline, the command line,
the results page's sections and where each came from, on run folders written by hand
(tests/report_runs.py). Each section has its own test file (tests/test_report_<section>.py)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from evidence import report
from report_runs import (HERE, built, config, line, page_with, results, rows,  # noqa: F401
                         unwrap, write_run)



def test_headline_names_the_commit_and_the_comparison(built):
    """README's headline, its prose wrapped at 100 columns (read here with the wraps undone)."""
    wrapped = built[0].headline
    assert max(len(l) for l in wrapped.splitlines() if not l.startswith("|")) <= 100
    head = unwrap(wrapped)
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
    for path in sorted((HERE / "evidence").glob("report*.py")):
        strings = {n.value for n in ast.walk(ast.parse(path.read_text()))
                   if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not set(flora_na.AGGREGATORS) & strings, path


def test_each_stage_says_which_code_and_machine_produced_it(built):
    """From provenance.jsonl, the bench JSON's "machine" and stage_times.tsv; and the figures."""
    md = built[0].body
    assert line(md, "| 3 glue | ok | 10.0 min | 2026-01-01 00:10:00 | `abc1234` | Test CPU (2 cores) |")
    assert line(md, "| 5 bench | — | — | — | `abc1234` | Test CPU (2 cores) |")
    assert line(md, "| 2 regime | — | — | — | `abc1234` | Test CPU (2 cores) |")
    for png in ("regime", "glue_metric_vs_round", "glue_metric_vs_bytes"):
        assert (built[1] / f"{png}.png").stat().st_size > 1000


def test_a_smoke_run_cannot_be_misread(results, tmp_path):
    """A TINY run's report: the smoke line above every table and under every figure, each PNG
    stamped, no bold, no verdict lines, no target checks."""
    import shutil

    import matplotlib.pyplot as plt
    tiny = tmp_path / "tiny"
    shutil.copytree(results, tiny)
    pipeline = json.loads((tiny / "pipeline.json").read_text())
    (tiny / "pipeline.json").write_text(json.dumps({**pipeline, "tiny": True}))
    plain = report.build_report(str(results), str(tmp_path), "flora_na", "fedit").body
    body = report.build_report(str(tiny), str(tiny), "flora_na", "fedit").body
    lines = body.splitlines()
    tables = [i for i, l in enumerate(lines) if l.startswith("|") and not lines[i - 1].startswith("|")]
    assert len(tables) >= 6 and all(lines[i - 2] == f"_{report.SMOKE}:_" for i in tables)
    figures = [l for l in lines if l.startswith("![")]
    assert len(figures) == 3 and all(l.endswith(f" _{report.SMOKE}_") for l in figures)
    assert body.count("**") == 2 and lines[2].startswith(f"**{report.SMOKE}.**")  # the note only
    for verdict in ("vs FedIT", "rank among", "Speed-up target", "largest at", "Bold:",
                    "FLoRA-NA - FedIT:", "shows the divergence effect"):
        assert verdict in plain and verdict not in body, verdict
    smoke = report.build_report(str(tiny), str(tiny), "flora_na", "fedit")
    assert smoke.blocks == {} and smoke.headline is None           # never published
    for png in ("regime", "glue_metric_vs_round", "glue_metric_vs_bytes"):
        stamped, clean = plt.imread(tiny / f"{png}.png"), plt.imread(tmp_path / f"{png}.png")
        assert stamped.shape == clean.shape and (stamped != clean).any()


def test_a_stage_that_failed_says_so_with_its_first_error(tmp_path):
    """A stage that ran and failed without results is reported as failed, never as not run."""
    (tmp_path / "stage_times.tsv").write_text(
        "3\tglue\tfailed(1)\t37\t2026-01-02 03:04:05\tQUICK\t2\t1\tbash reproduce.sh\t"
        "results/runs/glue/sst2_seed0: error: no data\n")
    md = report.build_report(str(tmp_path), str(tmp_path)).body
    assert ("_Failed: stage 3 (glue) of `bash reproduce.sh` ended failed(1) on 2026-01-02 "
            "03:04:05 with no results; first error: results/runs/glue/sst2_seed0: error: no data. "
            "Logs: `runs/glue/*.log`._") in md
    assert "_Not run: nothing under `runs/glue/` yet._" not in md
    assert "_Not run: nothing under `runs/bench/bench_solver.json` yet._" in md
