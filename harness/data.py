"""The data the experiments read: fetch it from the Hugging Face Hub once, check it before a run.

    python -m harness.data fetch --out data/          # the pipeline's tasks, then runs are offline
    python -m harness.data fetch --out data/ --tasks all
    python -m harness.data check --tasks sst2,stsb,gsm8k   # reproduce.sh's preflight
    python -m harness.data where                       # the folder the loaders will read, or "hub"

`fetch` writes every task in exactly the layout harness/tasks.py reads (the layout of
../shared/data): glue/<TASK>/{train,dev}.tsv with a header line naming the loader's columns
(MNLI: dev_matched.tsv and dev_mismatched.tsv; CoLA: the headerless GLUE columns),
gsm8k/{train,test}.jsonl and mbpp/mbpp.jsonl (all 974 tasks; the loader splits them by task_id).
Each split's row count is checked against the canonical number before anything is moved into
place, so a folder is either complete or untouched. The rows come from the same Hub datasets the
loaders read without a folder, so a fetched folder loads to the same examples as the Hub.
Where the loaders look first: harness.tasks.data_root.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from harness import tasks

# Rows per split of the Hub datasets the loaders read (GLUE's train and dev sizes; GSM8K; MBPP's
# "full" config, which harness.tasks.MBPP_SPLITS splits by task_id)
CANONICAL_ROWS = {
    ("cola", "train"): 8551, ("cola", "dev"): 1043,
    ("sst2", "train"): 67349, ("sst2", "dev"): 872,
    ("mrpc", "train"): 3668, ("mrpc", "dev"): 408,
    ("qqp", "train"): 363846, ("qqp", "dev"): 40430,
    ("stsb", "train"): 5749, ("stsb", "dev"): 1500,
    ("mnli", "train"): 392702, ("mnli", "dev_matched"): 9815, ("mnli", "dev_mismatched"): 9832,
    ("qnli", "train"): 104743, ("qnli", "dev"): 5463,
    ("rte", "train"): 2490, ("rte", "dev"): 277,
    ("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319,
    **{("mbpp", split): len(ids) for split, ids in tasks.MBPP_SPLITS.items()},
}
# The tasks reproduce.sh runs (GLUE in QUICK and FULL, GSM8K in stage 6)
PIPELINE_TASKS = ("rte", "mrpc", "stsb", "sst2", "gsm8k")
ALL_TASKS = (*tasks.GLUE_TASKS, "gsm8k", "mbpp")


def _splits(task: str) -> list[str]:
    """The splits of a task as the loaders name them."""
    if task in tasks.GLUE_TASKS:
        return ["train", *(f.removesuffix(".tsv") for f in tasks.GLUE_TASKS[task].dev_files)]
    return ["train", "test"] if task == "gsm8k" else list(tasks.MBPP_SPLITS)


def _hub(task: str, split: str) -> list[dict]:
    """One split's rows from the Hub dataset its loader reads."""
    if task in tasks.GLUE_TASKS:
        return tasks._from_hub("nyu-mll/glue", tasks.GLUE_TASKS[task].hub_config,
                               split.replace("dev", "validation"), "a glue folder")
    if task == "gsm8k":
        return tasks._from_hub("openai/gsm8k", "main", split, "gsm8k/")
    return tasks._from_hub("google-research-datasets/mbpp", "full", split, "mbpp/")


def _field(text, where: str) -> str:
    """A text as one tab-separated field; ValueError if it holds a tab or a line break (the
    loader would split it)."""
    text = str(text)
    if "\t" in text or "\n" in text:
        raise ValueError(f"{where}: a tab or line break inside {text[:60]!r} would break the tsv")
    return text


def _glue_tsv(task: str, split: str, rows: list[dict]) -> str:
    """A GLUE split as the loader reads it: the loader's column names on a header line (CoLA:
    the headerless GLUE columns source, label, original_label, sentence)."""
    spec = tasks.GLUE_TASKS[task]
    lines = [] if spec.header else ["\t".join(c for c in spec.columns if c)]
    for i, row in enumerate(rows):
        texts = [v for k, v in row.items() if k not in ("label", "idx")]  # as tasks.load_glue
        label = repr(float(row["label"])) if spec.num_labels == 1 else str(int(row["label"]))
        where = f"{task} {split} row {i}"
        if spec.header:                          # CoLA: source, label, original_label, sentence
            lines.append(f"hub\t{label}\t\t{_field(texts[0], where)}")
        else:
            fields = [_field(t, where) for t in texts[:2 if spec.columns[1] else 1]]
            lines.append("\t".join([*fields, label]))
    return "\n".join(lines) + "\n"


def fetch(out: str | os.PathLike, task_names=PIPELINE_TASKS, counts=CANONICAL_ROWS) -> list[str]:
    """Write every split of the tasks from the Hub under `out` in the loaders' layout, each
    row count checked against `counts` first; returns the files written. Nothing is moved into
    `out` unless every split of every task downloaded and counted right."""
    out = Path(out)
    unknown = [t for t in task_names if t not in ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(ALL_TASKS)}")
    files: dict[str, str] = {}                    # path under out -> text
    for task in task_names:
        got = {split: _hub(task, split) for split in _splits(task)}
        for split, rows in got.items():
            if counts.get((task, split)) not in (None, len(rows)):
                raise ValueError(f"{task} {split}: the Hub gave {len(rows)} rows, expected "
                                 f"{counts[(task, split)]}; nothing was written")
        if task in tasks.GLUE_TASKS:
            for split, rows in got.items():
                files[f"glue/{tasks.GLUE_TASKS[task].folder}/{split}.tsv"] = _glue_tsv(task, split, rows)
        elif task == "gsm8k":
            for split, rows in got.items():
                files[f"gsm8k/{split}.jsonl"] = "".join(
                    json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                    for r in rows)
        else:
            for split, rows in got.items():
                wrong = [r["task_id"] for r in rows if r["task_id"] not in tasks.MBPP_SPLITS[split]]
                if wrong:
                    raise ValueError(f"mbpp {split}: task ids {wrong[:5]} lie outside the split's "
                                     f"range {tasks.MBPP_SPLITS[split]}; nothing was written")
            rows = sorted((r for rs in got.values() for r in rs), key=lambda r: r["task_id"])
            files["mbpp/mbpp.jsonl"] = "".join(json.dumps(dict(r)) + "\n" for r in rows)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".fetch-") as tmp:
        for name, text in files.items():         # all written first, then moved into place
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        for name in files:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(Path(tmp) / name), str(out / name))
    return [str(out / name) for name in files]


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether huggingface.co answers on port 443 within `timeout` seconds (the datasets
    library retries for ~30 s before it gives up offline)."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check(task_names, data_dir: str | None = None, allow_unisolated_exec: bool = False) -> list[str]:
    """Load every split of each task from where the loaders will read it, and check that this
    machine can evaluate it (MBPP: the sandbox); one line per task. Raises with DATA_HELP when
    the data cannot be read."""
    root = tasks.data_root(data_dir)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if root is None and not offline and not hub_reachable():
        raise RuntimeError("no local data (no --data-dir or FLORA_DATA, and none of "
                           f"{', '.join(tasks.LOCAL_DATA)} exists here) and the Hugging Face "
                           f"Hub is unreachable. {tasks.DATA_HELP}")
    lines = []
    for name in task_names:
        task = tasks.get_task(name, allow_unisolated_exec)
        task.check()
        sizes = {split: len(task.read(root, split)) for split in ("train", *task.eval_splits)}
        lines.append(f"{name}: " + ", ".join(f"{n} {s}" for s, n in sizes.items())
                     + f" rows from {root if root else 'the Hugging Face Hub'}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download tasks from the Hub into a data folder")
    f.add_argument("--out", default="data", help="the data folder (default: data)")
    f.add_argument("--tasks", default=",".join(PIPELINE_TASKS),
                   help=f"comma-separated, or all (default: {','.join(PIPELINE_TASKS)})")
    c = sub.add_parser("check", help="load each task from where the loaders will read it")
    c.add_argument("--tasks", required=True, help="comma-separated task names")
    c.add_argument("--data-dir", default=None, help="as train.py's --data-dir")
    c.add_argument("--allow-unisolated-exec", action="store_true", help="as train.py's")
    w = sub.add_parser("where", help="print the data folder the loaders will read, or hub")
    w.add_argument("--data-dir", default=None, help="as train.py's --data-dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            names = ALL_TASKS if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
            if not hub_reachable():
                raise RuntimeError("fetch reads the Hugging Face Hub, which is unreachable from "
                                   "here. " + tasks.DATA_HELP)
            for path in fetch(args.out, names):
                print(f"wrote {path}")
        elif args.command == "check":
            for line in check([t for t in args.tasks.split(",") if t], args.data_dir,
                              args.allow_unisolated_exec):
                print(line)
        else:
            root = tasks.data_root(args.data_dir)
            print(root if root else "hub")
    except (OSError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
