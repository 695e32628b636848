"""reproduce.sh in DRY_RUN mode: every command it would run is one that train.py, the solver
benchmark and the report accept, the GLUE stage covers every registered aggregator through
`--aggregator all`, and the script names no other aggregator than those its experiments compare.
Nothing is trained: each test takes seconds.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import tyro

import flora_na as fl
import train
from evidence import bench_solver, report

HERE = Path(__file__).resolve().parent.parent   # the repository root


SETTINGS = ("STAGES", "SKIP", "GLUE_TASKS", "MODE", "TINY", "RESULTS", "README", "JOBS", "THREADS",
            "FLORA_NA_VARIANT")


def dry_run(tmp_path, *argv, **env) -> subprocess.CompletedProcess:
    """reproduce.sh --dry-run with only the settings given here (none from the caller's shell)."""
    inherited = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env = {**inherited, "PYTHON": "python", "FLORA_DATA": str(tmp_path), "README": "0", **env}
    return subprocess.run(["bash", str(HERE / "reproduce.sh"), "--dry-run", *argv], env=env,
                          cwd=HERE, capture_output=True, text=True, timeout=120)


def commands(res: subprocess.CompletedProcess) -> list[list[str]]:
    return [shlex.split(line) for line in res.stdout.splitlines() if line.startswith("python ")]


@pytest.mark.parametrize("mode, glue_tasks", [("QUICK", {"stsb", "sst2"}),
                                              ("FULL", {"rte", "mrpc", "stsb", "sst2"})])
def test_reproduce_sh_commands_parse(tmp_path, mode, glue_tasks):
    """DRY_RUN prints each stage's commands: every train.py line passes train.py's own checks,
    the benchmark's and the report's parse with their Args, and the GLUE stage runs every
    registered aggregator (`--aggregator all`) on its tasks x 3 seeds."""
    res = dry_run(tmp_path, MODE=mode)
    assert res.returncode == 0, res.stderr
    lines = commands(res)
    runs = [train.parse_args(argv[2:]) for argv in lines if argv[1] == "train.py"]
    assert {a.task for a in runs} == glue_tasks | {"gsm8k"}
    for a in runs:
        train.check_args(a)
        assert a.resume and a.out.startswith("results/")
    assert len({a.out for a in runs}) == len(runs)          # no two runs share a folder
    glue = [a for a in runs if "/glue/" in a.out and a.clients > 1]
    assert {(a.task, a.seed) for a in glue} == {(t, s) for t in glue_tasks for s in (0, 1, 2)}
    assert all(a.aggregator == "all" for a in glue)
    assert all(train.check_args(a) == list(fl.AGGREGATORS) for a in glue)
    bench = [argv for argv in lines if argv[1:3] == ["-m", "evidence.bench_solver"]]
    assert len(bench) == 1 and tyro.cli(bench_solver.Args, args=bench[0][3:]).out
    assert ["python", "-m", "pytest", "-q"] in lines and lines[-1][1:3] == ["-m", "evidence.report"]
    args = tyro.cli(report.Args, args=lines[-1][3:])
    assert (args.results, args.method, args.baseline) == ("results/full" if mode == "FULL"
                                                          else "results", "flora_na", "fedit")
    assert {args.method, args.baseline} <= set(fl.AGGREGATORS)
    assert (args.page, args.readme) == (None, None)          # README=0


def test_reproduce_sh_writes_results_page_and_readme_only_from_a_real_run(tmp_path):
    report_line = lambda res: commands(res)[-1]                         # noqa: E731
    args = tyro.cli(report.Args, args=report_line(dry_run(tmp_path, README="1"))[3:])
    assert (args.page, args.readme) == ("RESULTS.md", "README.md")
    args = tyro.cli(report.Args, args=report_line(dry_run(tmp_path, README="1", TINY="1"))[3:])
    assert (args.results, args.page, args.readme) == ("results/tiny", None, None)


def test_reproduce_sh_names_only_the_aggregators_it_compares():
    """No list of every aggregator: outside comments the script names the method, the
    baseline, FedIT for the centralised reference and FedSA-LoRA for the paper's GSM8K table."""
    code = "\n".join(line.split("#", 1)[0] for line in (HERE / "reproduce.sh").read_text().splitlines())
    # a name as a word of its own, not part of an option such as --flora-na-variant
    named = {name for name in fl.AGGREGATORS if re.search(rf"(?<![\w-]){name}(?![\w-])", code)}
    assert named == {"fedit", "fedsa", "flora_na"}


def test_reproduce_sh_selects_stages_and_rejects_bad_options(tmp_path):
    res = dry_run(tmp_path, "--only", "2,5")
    stages = re.findall(r"Stage (\d):", res.stdout)
    assert res.returncode == 0 and stages == ["2", "5", "8"]     # the report runs after any
    res = dry_run(tmp_path, "--skip", "1,3,4,6,7", "--no-report")
    assert re.findall(r"Stage (\d):", res.stdout) == ["2", "5"]
    res = dry_run(tmp_path, "--only", "3,4")
    assert res.returncode == 2 and "stage 4 (sensitivity) is retired" in res.stderr
    res = dry_run(tmp_path, "--bogus")
    assert res.returncode == 2 and "unknown option --bogus" in res.stderr
    res = dry_run(tmp_path, MODE="huge")
    assert res.returncode == 2 and "MODE must be QUICK or FULL" in res.stderr


def test_full_mode_runs_the_authors_variant_apart(tmp_path):
    """FLORA_NA_VARIANT=authors (FULL only): every train.py run loads the plug-in and runs its
    aggregator where the method would run, into its own results folder, and the report leaves
    RESULTS.md and README.md alone."""
    res = dry_run(tmp_path, MODE="FULL", FLORA_NA_VARIANT="authors", README="1")
    assert res.returncode == 0, res.stderr
    runs = [train.parse_args(argv[2:]) for argv in commands(res) if argv[1] == "train.py"]
    assert runs
    for a in runs:
        assert a.out.startswith("results/full_authors/runs/")
        assert a.plugins == ["evidence.authors_variant"]
        names = train.check_args(a)
        assert "flora_na_authors" in fl.AGGREGATORS
        assert fl.METHOD not in names or a.aggregator == "all"   # stage 3: every one
    report = [argv for argv in commands(res) if argv[1:3] == ["-m", "evidence.report"]]
    assert len(report) == 1 and "--page" not in report[0] and "--readme" not in report[0]
    res = dry_run(tmp_path, MODE="QUICK", FLORA_NA_VARIANT="authors")
    assert res.returncode == 2 and "FLORA_NA_VARIANT=authors is for MODE=FULL" in res.stderr


@pytest.mark.parametrize("mode", ["QUICK", "FULL"])
def test_regime_study_changes_one_factor_at_a_time_with_every_variant_tracked(tmp_path, mode):
    """Stage 2's sweep: the baseline alone, seed 0, --track-solvers, one run per setting under
    runs/regime/; every run differs from the base run in at most one of local steps, lr,
    Dirichlet alpha, rank (LoRA alpha following it) and clients, and together they cover local
    steps 1, 5, 10, 25, 50, two more client lrs, alpha 0.1, 0.5 and IID, and ranks 4, 8, 16."""
    res = dry_run(tmp_path, "--only", "2", MODE=mode)
    assert res.returncode == 0, res.stderr
    runs = [train.parse_args(argv[2:]) for argv in commands(res) if argv[1] == "train.py"]
    assert all(a.aggregator == "fedit" and a.track_solvers and a.seed == 0 and a.task == "sst2"
               and "/runs/regime/" in a.out for a in runs)
    for a in runs:
        train.check_args(a)
    base, = [a for a in runs if a.out.endswith("/base")]
    factors = ("local_steps", "lr", "dirichlet_alpha", "rank", "clients")
    for a in runs:
        assert sum(getattr(a, f) != getattr(base, f) for f in factors) <= 1, a.out
        assert a.lora_alpha / a.rank == base.lora_alpha / base.rank
    values = {f: {getattr(a, f) for a in runs} for f in factors}
    assert values["local_steps"] == {1, 5, 10, 25, 50}
    assert len(values["lr"]) == 3 and values["rank"] == {4, 8, 16}
    assert values["dirichlet_alpha"] == {0.1, 0.5, 0.0} and len(values["clients"]) == 2
    assert "at the 2 setting(s) with the largest fedit divergence" in res.stdout
