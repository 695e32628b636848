"""Where each section came from: the git commit(s) and machine(s) of its runs (provenance.jsonl,
a JSON file's "machine") and reproduce.sh's record of its stage (stage_times.tsv)."""
from __future__ import annotations

import glob
import json
import os

from harness import provenance


def stage_provenance(results: str, folder: str) -> tuple[str, str]:
    """(commits, machines) that produced the results under runs/<folder>/, from each run's
    provenance.jsonl (a line per start and resume) or the "machine" of a JSON file there (the
    benchmark's); runs from before provenance was recorded are counted as such."""
    root = os.path.join(results, "runs", folder)
    records, unrecorded = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.json"))):
        with open(path) as f:
            machine = json.load(f).get("machine")
        if machine is not None:
            records.append(machine)
    for run in sorted(glob.glob(os.path.join(root, "*", "config.json"))):
        path = os.path.join(os.path.dirname(run), "provenance.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                records += [json.loads(line) for line in f if line.strip()]
        else:
            unrecorded += 1
    commits = sorted({provenance.describe_commit(r.get("git_commit"), r.get("git_dirty", False))
                      for r in records})
    machines = sorted({f"{r.get('device_name', '?')} ({r.get('cpu_count', '?')} cores)"
                       for r in records})
    cells = [f"`{c}`" for c in commits] + [f"not recorded for {unrecorded} run(s)"] * bool(unrecorded)
    return ", ".join(cells) or "—", "; ".join(machines) or "—"


def stage_times(results: str) -> dict[str, list[str]]:
    """stage -> the stage_times.tsv line of the latest reproduce.sh run of it that did the
    work (a rerun that found every run done takes seconds): [stage, name, status, seconds,
    finished] and, since reproduce.sh records them, [mode, jobs, threads, command]."""
    path, latest = os.path.join(results, "stage_times.tsv"), {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                p = line.rstrip("\n").split("\t")
                if len(p) >= 5 and (int(p[3]) >= 10 or p[0] not in latest or p[2] != "ok"):
                    latest[p[0]] = p
    return latest


def first_error(p: list[str]) -> str:
    """"; first error: ..." from a failed stage's stage_times.tsv line, if reproduce.sh recorded it."""
    return f"; first error: {p[9]}" if len(p) >= 10 and p[9] else ""


def failed_line(results: str, stage: str, folder: str) -> str | None:
    """The line a section shows instead of "not run" when its stage ran, failed and left no
    results; None otherwise."""
    p = stage_times(results).get(stage)
    if p is None or p[2] == "ok":
        return None
    command = f" of `{p[8]}`" if len(p) >= 9 else ""
    return (f"\n_Failed: stage {stage} ({p[1]}){command} ended {p[2]} on {p[4]} with no results"
            f"{first_error(p) or '; no error recorded'}. Logs: `runs/{folder}/*.log`._\n")


def provenance_line(results: str, stage: str, folder: str, pipeline: dict) -> str:
    """One italic line under a section's heading: the reproduce.sh stage and command, mode,
    parallelism, git commit(s), machine(s), and when the stage finished after how long. The
    mode, parallelism and command come from the stage's own line in stage_times.tsv, or from
    pipeline.json (the latest invocation) for a line written before reproduce.sh recorded them."""
    commits, machines = stage_provenance(results, folder)
    p = stage_times(results).get(stage)
    if p is None:
        return (f"_Runs found under `runs/{folder}/` with no reproduce.sh record of stage "
                f"{stage}: code of commit {commits} on {machines}._")
    if len(p) >= 9:
        mode, jobs, threads, command = p[5:9]
    else:
        mode = pipeline.get("mode", "unknown") + (" TINY" if pipeline.get("tiny") else "")
        jobs, threads, command = pipeline.get("jobs", "?"), pipeline.get("threads", "?"), \
            "bash reproduce.sh"
    status = "" if p[2] == "ok" else f" (status: {p[2]}{first_error(p)})"
    return (f"_Stage {stage} ({p[1]}) of `{command}`, {mode} mode, {jobs} parallel run(s) x "
            f"{threads} torch thread(s): code of commit {commits} on {machines}; finished "
            f"{p[4]} after {int(p[3]) / 60:.1f} min{status}._")
