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
import sys
from pathlib import Path

import pytest
import tyro

import flora_na as fl
import train
from evidence import bench_solver, report

HERE = Path(__file__).resolve().parent.parent   # the repository root


SETTINGS = ("STAGES", "SKIP", "GLUE_TASKS", "MODE", "TINY", "RESULTS", "PUBLISH", "JOBS", "THREADS",
            "FLORA_NA_VARIANT", "PYTEST_ARGS", "AGGREGATORS", "REF_SEEDS", "REGIME_ONLY",
            "DP_CENTRAL_AGGS", "DP_LOCAL_AGGS")


def dry_run(tmp_path, *argv, **env) -> subprocess.CompletedProcess:
    """reproduce.sh --dry-run with only the settings given here (none from the caller's shell)."""
    inherited = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env = {**inherited, "PYTHON": "python", "FLORA_DATA": str(tmp_path), **env}
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
                                                          else "results/quick", "flora_na", "fedit")
    assert {args.method, args.baseline} <= set(fl.AGGREGATORS)
    assert (args.page, args.readme) == (None, None)          # without --publish


def test_reproduce_sh_writes_results_page_and_readme_only_with_publish(tmp_path):
    """Every mode writes its report under results/<mode>/; only --publish (or PUBLISH=1) passes
    the tracked RESULTS.md and README.md to the report, and never from TINY."""
    report_line = lambda res: commands(res)[-1]                         # noqa: E731
    args = tyro.cli(report.Args, args=report_line(dry_run(tmp_path, "--publish"))[3:])
    assert (args.results, args.page, args.readme) == ("results/quick", "RESULTS.md", "README.md")
    args = tyro.cli(report.Args, args=report_line(dry_run(tmp_path, PUBLISH="1"))[3:])
    assert (args.page, args.readme) == ("RESULTS.md", "README.md")
    for argv in ((), ("--tiny",)):
        args = tyro.cli(report.Args, args=report_line(dry_run(tmp_path, *argv))[3:])
        assert (args.page, args.readme) == (None, None)
    assert args.results == "results/tiny"
    res = dry_run(tmp_path, "--tiny", "--publish")
    assert res.returncode == 2 and "a TINY run's numbers are not results" in res.stderr


def test_tiny_runs_a_smoke_subset_of_the_tests_and_every_stage(tmp_path):
    res = dry_run(tmp_path, "--tiny")
    assert res.returncode == 0, res.stderr
    lines = commands(res)
    assert ["python", "-m", "pytest", "-q", "-x", "tests/test_data.py",
            "tests/test_report_glue.py"] in lines
    stages = {a.out.split("/")[3] for a in (train.parse_args(argv[2:]) for argv in lines
                                             if argv[1] == "train.py")}
    assert stages == {"regime", "glue", "generation", "mixed_ranks", "compression", "privacy"}


def test_a_given_data_folder_reaches_every_run(tmp_path):
    """--data-dir (or FLORA_DATA) is passed to every train.py run; without one, train.py finds
    the data itself (harness.tasks.data_root), so no --data-dir is passed."""
    given = tmp_path / "given"
    given.mkdir()
    res = dry_run(tmp_path, "--tiny", "--data-dir", str(given))
    runs = [train.parse_args(argv[2:]) for argv in commands(res) if argv[1] == "train.py"]
    assert runs and all(a.data_dir == str(given) for a in runs)
    inherited = {k: v for k, v in os.environ.items() if k not in SETTINGS + ("FLORA_DATA",)}
    res = subprocess.run(["bash", str(HERE / "reproduce.sh"), "--dry-run", "--tiny"],
                         env={**inherited, "PYTHON": "python"}, cwd=HERE, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--data-dir" not in res.stdout


def test_reproduce_sh_names_only_the_aggregators_it_compares():
    """No list of every aggregator: outside comments the script names the method, the
    baseline, FedIT for the centralised reference, FedSA-LoRA for the paper's GSM8K table and
    FFA-LoRA, FlexLoRA and RoLoRA for the compression stage (issue 23's comparison)."""
    code = "\n".join(line.split("#", 1)[0] for line in (HERE / "reproduce.sh").read_text().splitlines())
    # a name as a word of its own, not part of an option such as --flora-na-variant
    named = {name for name in fl.AGGREGATORS if re.search(rf"(?<![\w-]){name}(?![\w-])", code)}
    assert named == {"fedit", "fedsa", "flora_na", "ffa", "flexlora", "rolora"}


def test_reproduce_sh_selects_stages_and_rejects_bad_options(tmp_path):
    res = dry_run(tmp_path, "--only", "2,5")
    stages = re.findall(r"Stage (\d+):", res.stdout)
    assert res.returncode == 0 and stages == ["2", "5", "8"]     # the report runs after any
    res = dry_run(tmp_path, "--skip", "1,3,4,6,7,9", "--no-report")
    assert re.findall(r"Stage (\d+):", res.stdout) == ["2", "5", "10"]
    res = dry_run(tmp_path, "--skip", "1,3,4,6,7,9,10", "--no-report")
    assert re.findall(r"Stage (\d+):", res.stdout) == ["2", "5"]
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


@pytest.mark.parametrize("mode, seeds", [("QUICK", {0, 1}), ("FULL", {0, 1, 2}), ("TINY", {0})])
def test_compression_stage_runs_every_codec_for_the_compared_aggregators(tmp_path, mode, seeds):
    """Stage 9, before the report: SST-2, one run per (upload codec, seed) of FedIT, FFA-LoRA,
    FlexLoRA, RoLoRA and FLoRA-NA (none, fp16, int8, int4, int2, top-k 10% and 1%; TINY: none, int4,
    top-k 1%), and FLoRA-NA alone with --upload-variance and its noise-aware Gram at int4 and
    int2 (TINY: int4), each in its own folder under runs/compression/; the TINY runs are tiny."""
    env = {"TINY": "1"} if mode == "TINY" else {"MODE": mode}
    res = dry_run(tmp_path, "--only", "9", **env)
    assert res.returncode == 0, res.stderr
    assert re.findall(r"Stage (\d+):", res.stdout) == ["9", "8"]
    runs = [train.parse_args(argv[2:]) for argv in commands(res) if argv[1] == "train.py"]
    for a in runs:
        train.check_args(a)
        assert a.task == "sst2" and "/runs/compression/" in a.out and a.resume
    plain = [a for a in runs if not a.upload_variance]
    aware = [a for a in runs if a.upload_variance]
    codecs = {"none", "int4", "topk0.01"} if mode == "TINY" else {
        "none", "fp16", "int8", "int4", "int2", "topk0.1", "topk0.01"}
    spec = lambda a: a.upload_codec + (f"{a.topk_fraction:g}" if a.upload_codec == "topk" else "")  # noqa: E731
    assert {(spec(a), a.seed) for a in plain} == {(c, s) for c in codecs for s in seeds}
    assert len(plain) == len(codecs) * len(seeds)
    assert all(a.aggregator == "fedit,ffa,flexlora,rolora,flora_na" for a in plain)
    assert {(a.upload_codec, a.seed) for a in aware} == {
        (c, s) for c in ({"int4"} if mode == "TINY" else {"int4", "int2"}) for s in seeds}
    assert all(a.aggregator == "flora_na" and a.agg_option == ["flora_na.gram_correction=noise_aware"]
               for a in aware)
    assert len({a.out for a in runs}) == len(runs)
    if mode == "TINY":
        assert all(a.rounds == 1 and a.max_train_examples <= 100 for a in runs)


@pytest.mark.parametrize("mode, seeds, epsilons", [("QUICK", None, {1, 3, 8, 64}),
                                                   ("FULL", {0, 1, 2}, {1, 3, 8, 64}),
                                                   ("TINY", {0}, {8}),
                                                   ("AUTHORS", {0, 1, 2}, {1, 3, 8, 64})])
def test_privacy_stage_runs_every_dp_setting_for_the_compared_aggregators(tmp_path, mode, seeds,
                                                                          epsilons):
    """Stage 10, before the report: SST-2, per seed one run without DP and one with clipping
    alone (local, noise 0) of the local-DP aggregators, and per target epsilon one local-DP run
    of them and one central-DP run of the linear ones (FedIT, FFA-LoRA; the method only under
    local DP, the authors' variant in its place), each in its own folder under runs/privacy/
    named for its setting; one clip C and delta 1e-5 throughout, one training budget; a
    centralised reference per seed (FedIT, 1 client, IID, no DP) seeing as many examples a round
    as the sampled clients together; the TINY runs are tiny. DP_CENTRAL_AGGS and DP_LOCAL_AGGS
    replace the aggregator lists."""
    env = {"TINY": "1"} if mode == "TINY" else {"MODE": "FULL", "FLORA_NA_VARIANT": "authors"} \
        if mode == "AUTHORS" else {"MODE": mode}
    res = dry_run(tmp_path, "--only", "10", **env)
    assert res.returncode == 0, res.stderr
    assert re.findall(r"Stage (\d+):", res.stdout) == ["10", "8"]
    runs = [train.parse_args(argv[2:]) for argv in commands(res) if argv[1] == "train.py"]
    method = "flora_na_authors" if mode == "AUTHORS" else fl.METHOD
    seeds = seeds if seeds is not None else {a.seed for a in runs}     # QUICK's: to be chosen
    assert seeds and {a.seed for a in runs} == seeds
    expected = {f"{name}_seed{s}" for s in seeds for name in ["none", "clip", "centralised"] + [
        f"{dp}_eps{e}" for e in epsilons for dp in ("central", "local")]}
    assert {os.path.basename(a.out) for a in runs} == expected and len(runs) == len(expected)
    central = [a for a in runs if "/centralised_seed" in a.out]   # 1 client, same examples
    runs = [a for a in runs if a not in central]
    for c in central:
        a = next(a for a in runs if a.seed == c.seed)
        assert (c.aggregator, c.dp, c.clients, c.participation, c.dirichlet_alpha) == (
            "fedit", "none", 1, 1.0, 0.0)
        assert c.local_steps == a.local_steps * round(a.clients * a.participation)
        assert (c.rounds, c.batch_size, c.rank) == (a.rounds, a.batch_size, a.rank)
        assert 0 < c.lr <= a.lr     # its own lr where its sequential steps need a smaller one
    for a in runs:
        assert train.check_args(a) == a.aggregator.split(",")
        assert a.task == "sst2" and "/runs/privacy/" in a.out and a.resume
        setting, seed = os.path.basename(a.out).rsplit("_seed", 1)
        dp, _, eps = setting.partition("_eps")
        assert a.seed == int(seed) and a.dp == {"none": "none", "clip": "local"}.get(dp, dp)
        assert a.aggregator == ("fedit,ffa" if dp == "central" else f"fedit,ffa,{method}")
        assert (a.dp_noise, a.dp_target_epsilon) == (
            (0.0, None) if dp == "clip" else (None, None) if dp == "none" else (None, float(eps)))
    (clip, delta), = {(a.dp_clip, a.dp_delta) for a in runs if a.dp != "none"}   # one of each
    assert clip > 0 and delta == 1e-5
    assert len({(a.clients, a.rounds, a.local_steps, a.rank, a.lr) for a in runs}) == 1
    if mode == "TINY":
        assert all(a.clients == 2 and a.rounds == 1 and a.max_train_examples <= 100 for a in runs)
    res = dry_run(tmp_path, "--only", "10", DP_CENTRAL_AGGS="ffa", DP_LOCAL_AGGS=method, **env)
    runs = [train.parse_args(argv[2:]) for argv in commands(res) if argv[1] == "train.py"]
    assert runs and all(a.aggregator == ("ffa" if a.dp == "central" else method) for a in runs
                        if a.clients > 1)


def test_a_fresh_clone_stops_without_data_and_stays_clean_after_a_tiny_run(tmp_path):
    """From a fresh clone (of this repository's HEAD): with no data anywhere and the Hub off,
    `bash reproduce.sh` stops in seconds, before the test stage, naming the three ways to supply
    data; a TINY run of the benchmark stage and the report (the cheapest selection that writes a
    report, ~30 s) leaves `git status --porcelain` empty."""
    import time
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(HERE), str(clone)], check=True, timeout=120)
    inherited = {k: v for k, v in os.environ.items() if k not in SETTINGS + ("FLORA_DATA",)}
    offline = {**inherited, "PYTHON": "python", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HOME": str(tmp_path / "hf")}
    t0 = time.monotonic()
    res = subprocess.run(["bash", "reproduce.sh"], cwd=clone, env=offline, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and time.monotonic() - t0 < 30
    assert "Supply the data one of three ways" in res.stderr and "Stage 1" not in res.stdout
    res = subprocess.run(["bash", "reproduce.sh", "--tiny", "--only", "5"], cwd=clone,
                         env={**offline, "THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "the report is results/tiny/REPORT.md" in res.stdout
    assert "smoke test: numbers are not results" in (clone / "results/tiny/REPORT.md").read_text()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout
    assert status == ""
    # a stage whose runs fail: recorded with its first error, and reported as failed
    (tmp_path / "data/gsm8k").mkdir(parents=True)
    for split in ("train", "test"):
        (tmp_path / f"data/gsm8k/{split}.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    python = tmp_path / "python"                      # train.py fails, everything else runs
    python.write_text(f'#!/bin/sh\n[ "$1" = train.py ] && {{ echo "error: boom" >&2; exit 1; }}\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    res = subprocess.run(["bash", "reproduce.sh", "--tiny", "--only", "6", "--data-dir",
                          str(tmp_path / "data")], cwd=clone, env={**offline, "PYTHON": str(python)},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "stage(s) 6 failed" in res.stderr
    record = (clone / "results/tiny/stage_times.tsv").read_text().splitlines()[-2].split("\t")
    assert record[:3] == ["6", "generation", "failed(1)"]
    assert record[9] == "results/tiny/runs/generation/gsm8k_flora_na: error: boom"
    assert ("_Failed: stage 6 (generation) of `bash reproduce.sh --only 6 --tiny` ended failed(1)"
            in (clone / "results/tiny/REPORT.md").read_text())


def _subset_pair() -> tuple[str, str]:
    """Two registered aggregators other than the method and the baseline, one that accepts
    clients of mixed ranks and one that does not (from the registry, named nowhere here)."""
    others = [n for n in fl.AGGREGATORS if n not in (fl.METHOD, "fedit")]
    return (next(n for n in others if fl.AGGREGATORS[n].mixed_ranks),
            next(n for n in others if not fl.AGGREGATORS[n].mixed_ranks))


@pytest.mark.parametrize("mode", ["QUICK", "FULL"])
def test_some_aggregators_only_run_beside_the_references_at_ref_seeds(tmp_path, mode):
    """AGGREGATORS=a,b (stages 2, 3, 7): into results/<mode>_a_b/; stage 3 trains a,b at every
    seed and task, the method and the baseline beside them (and the centralised reference)
    at REF_SEEDS only; stage 2's comparison over seeds adds a,b; stage 7 runs mixed ranks with
    those of a,b that accept them, and a,b at the equal-rank references; the report gets
    --aggregators and, with --publish, the results page only (no README headline)."""
    mixed, equal = _subset_pair()
    subset = f"{mixed},{equal}"
    res = dry_run(tmp_path, "--only", "2,3,7", "--publish", MODE=mode, AGGREGATORS=subset)
    assert res.returncode == 0, res.stderr
    lines = commands(res)
    runs = [train.parse_args(argv[2:]) for argv in lines if argv[1] == "train.py"]
    folder = f"results/{mode.lower()}_{mixed}_{equal}/runs/"
    assert runs and all(a.out.startswith(folder) for a in runs)
    refs = {"fedit", fl.METHOD}
    for a in runs:
        train.check_args(a)
    glue = [a for a in runs if "/glue/" in a.out]
    for a in glue:
        aggs = set(a.aggregator.split(","))
        if a.clients == 1:
            assert a.seed == 0 and aggs == {"fedit"}
        else:
            assert aggs == {mixed, equal} | (refs if a.seed == 0 else set()), a
    assert {a.seed for a in glue if a.clients > 1} == {0, 1, 2}
    assert "the other seeds of {0 1 2}" in res.stdout
    assert f"{mixed},{equal},{fl.METHOD} at seed 0, {mixed},{equal} at the other seeds" in res.stdout
    mix = [a for a in runs if "/mixed_ranks/" in a.out]
    heavy = [a for a in mix if a.rank_profile]
    assert heavy and all(set(a.aggregator.split(",")) == {mixed} | (refs if a.seed == 0 else set())
                         for a in heavy)
    assert all(set(a.aggregator.split(",")) == {mixed, equal} | (refs if a.seed == 0 else set())
               for a in mix if not a.rank_profile)
    assert f"mixed ranks: {mixed} of {subset}" in res.stdout
    report_args = tyro.cli(report.Args, args=lines[-1][3:])
    assert report_args.aggregators == subset and report_args.page == "RESULTS.md"
    assert report_args.readme is None
    # every seed a reference seed; an explicit folder is used as given
    res = dry_run(tmp_path, "--only", "3", AGGREGATORS=subset, REF_SEEDS="0 1 2",
                  RESULTS="results/peers")
    glue = [train.parse_args(argv[2:]) for argv in commands(res) if argv[1] == "train.py"]
    assert all(a.out.startswith("results/peers/") for a in glue)
    assert all(set(a.aggregator.split(",")) >= refs for a in glue if a.clients > 1)


def test_bad_aggregator_lists_are_refused(tmp_path):
    mixed, _ = _subset_pair()
    for names, message in ((f"{mixed},nope", "not registered: nope"),
                           (f"{mixed},{mixed}", "name each once"),
                           (f"{mixed},{fl.METHOD}", "name each once, and neither")):
        res = dry_run(tmp_path, AGGREGATORS=names)
        assert res.returncode == 2 and message in res.stderr, res.stderr
    res = dry_run(tmp_path, MODE="FULL", AGGREGATORS=mixed, FLORA_NA_VARIANT="authors")
    assert res.returncode == 2 and "do not combine" in res.stderr


def test_regime_only_runs_these_settings_and_the_base_and_compares_them(tmp_path):
    res = dry_run(tmp_path, "--only", "2", REGIME_ONLY="lr5e-3 steps50")
    runs = [train.parse_args(argv[2:]) for argv in commands(res) if argv[1] == "train.py"]
    assert sorted(os.path.basename(a.out) for a in runs) == ["base", "lr5e-3", "steps50"]
    assert {(a.lr, a.local_steps) for a in runs} == {(2e-3, 10), (5e-3, 10), (2e-3, 50)}
    assert "at the 2 setting(s) with the largest fedit divergence" in res.stdout
