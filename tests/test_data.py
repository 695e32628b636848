"""harness/data.py and harness.tasks.data_root, offline: a fake `datasets.load_dataset` serves small
in-memory tables shaped like the Hub's (column names, label ids, split names; MRPC's sentence1/2
where the tsv says "#1 String", STS-B's float32 scores, MNLI's two validation splits, CoLA's
headerless file, GSM8K's two columns, MBPP's "full" config split by task_id). What `fetch` writes
must load to exactly the examples the Hub path gives. No network, no model: seconds."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness import data, tasks

HERE = Path(__file__).resolve().parent.parent   # the repository root


def _glue(columns, texts, labels):
    return [{**dict(zip(columns, t)), "label": y, "idx": i}
            for i, (t, y) in enumerate(zip(texts, labels))]


PAIRS = [("A \"quoted\" start", "naïve café ,"), (" leading space", "trailing space "),
         ("it 's", "'' odd quotes ``")]
HUB = {  # (path, config, split) -> rows, as datasets.load_dataset gives them
    ("nyu-mll/glue", "sst2", "train"): _glue(["sentence"], [[a] for a, _ in PAIRS], [0, 1, 1]),
    ("nyu-mll/glue", "sst2", "validation"): _glue(["sentence"], [["fine ."], ["bad"]], [1, 0]),
    ("nyu-mll/glue", "cola", "train"): _glue(["sentence"], [["He left ."], ["Left he ."]], [1, 0]),
    ("nyu-mll/glue", "cola", "validation"): _glue(["sentence"], [["Yes ."]], [1]),
    ("nyu-mll/glue", "mrpc", "train"): _glue(["sentence1", "sentence2"], PAIRS, [1, 0, 1]),
    ("nyu-mll/glue", "mrpc", "validation"): _glue(["sentence1", "sentence2"], PAIRS[:2], [0, 1]),
    ("nyu-mll/glue", "stsb", "train"): _glue(["sentence1", "sentence2"], PAIRS,
                                             [3.799999952316284, 0.0, 5.0]),
    ("nyu-mll/glue", "stsb", "validation"): _glue(["sentence1", "sentence2"], PAIRS[:1], [1.25]),
    ("nyu-mll/glue", "mnli", "train"): _glue(["premise", "hypothesis"], PAIRS, [0, 1, 2]),
    ("nyu-mll/glue", "mnli", "validation_matched"): _glue(["premise", "hypothesis"], PAIRS[:2], [2, 0]),
    ("nyu-mll/glue", "mnli", "validation_mismatched"): _glue(["premise", "hypothesis"], PAIRS[1:], [1, 1]),
    ("openai/gsm8k", "main", "train"): [{"question": "2 + 2?", "answer": "2 + 2 = 4\n#### 4"}],
    ("openai/gsm8k", "main", "test"): [{"question": "Half of 8?", "answer": "#### 4"},
                                       {"question": "“Quoted”", "answer": "#### 1"}],
    **{("google-research-datasets/mbpp", "full", split): [
        {"task_id": i, "text": f"Write f{i}.", "code": f"def f{i}():\n\treturn {i}",
         "test_list": [f"assert f{i}() == {i}"], "test_setup_code": "",
         "challenge_test_list": []} for i in (ids[0], ids[-1])]
       for split, ids in tasks.MBPP_SPLITS.items()},
}


def _task_split(path: str, config: str, split: str) -> tuple[str, str]:
    """(task, split) as the loaders name them, of a Hub (path, config, split)."""
    if path == "nyu-mll/glue":
        return config, split.replace("validation", "dev")
    return path.split("/")[-1], split


FAKE_COUNTS = {_task_split(*key): len(rows) for key, rows in HUB.items()}
TASKS = ["cola", "sst2", "mrpc", "stsb", "mnli", "gsm8k", "mbpp"]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The fake Hub, and a working directory with no data folder and no $FLORA_DATA."""
    import datasets

    def load_dataset(path, config, split):
        if (path, config, split) not in HUB:
            raise ConnectionError(f"Couldn't reach {path!r} on the Hub (fake)")
        return [dict(r) for r in HUB[(path, config, split)]]
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.delenv("FLORA_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_fetched_folder_loads_to_the_same_examples_as_the_hub(hub):
    written = data.fetch(hub / "fetched", TASKS, FAKE_COUNTS)
    assert sorted(Path(p).relative_to(hub / "fetched").as_posix() for p in written) == sorted([
        "glue/CoLA/train.tsv", "glue/CoLA/dev.tsv", "glue/SST-2/train.tsv", "glue/SST-2/dev.tsv",
        "glue/MRPC/train.tsv", "glue/MRPC/dev.tsv", "glue/STS-B/train.tsv", "glue/STS-B/dev.tsv",
        "glue/MNLI/train.tsv", "glue/MNLI/dev_matched.tsv", "glue/MNLI/dev_mismatched.tsv",
        "gsm8k/train.jsonl", "gsm8k/test.jsonl", "mbpp/mbpp.jsonl"])
    assert tasks.data_root() is None                      # nothing local here: the Hub path
    for name in TASKS:
        task = tasks.get_task(name)
        for split in data._splits(name):
            from_hub = task.read(None, split)
            assert task.read(hub / "fetched", split) == from_hub, (name, split)
            assert len(from_hub) == FAKE_COUNTS[(name, split)]
    # the loaders' particulars: MRPC's header, STS-B's float32 score to the last bit
    assert (hub / "fetched/glue/MRPC/train.tsv").read_text().startswith("#1 String\t#2 String\tQuality\n")
    assert tasks.load_glue("stsb", hub / "fetched")[0].label == 3.799999952316284


def test_a_wrong_row_count_writes_nothing(hub):
    with pytest.raises(ValueError, match=r"sst2 train: the Hub gave 3 rows, expected 67349; "
                                         "nothing was written"):
        # stsb counts right and is held back; sst2's train split has the canonical count wanted
        data.fetch(hub / "out", ["stsb", "sst2"], {**FAKE_COUNTS, ("sst2", "train"): 67349})
    assert not (hub / "out").exists() or not any((hub / "out").rglob("*.tsv"))


def test_a_tab_inside_a_text_is_refused(hub, monkeypatch):
    monkeypatch.setitem(HUB, ("nyu-mll/glue", "sst2", "validation"),
                        _glue(["sentence"], [["a\tb"]], [1]))
    with pytest.raises(ValueError, match="sst2 dev row 0: a tab or line break"):
        data.fetch(hub / "out", ["sst2"], {})


def test_data_root_resolution_order(hub, monkeypatch):
    """--data-dir, $FLORA_DATA, ./data, ../shared/data, else None (the Hub)."""
    work = hub / "repo"
    for d in ("given", "env", "repo/data", "shared/data"):
        (hub / d).mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("FLORA_DATA", str(hub / "env"))
    assert tasks.data_root(hub / "given") == hub / "given"
    assert tasks.data_root() == hub / "env"
    monkeypatch.delenv("FLORA_DATA")
    assert tasks.data_root() == Path("data")
    (work / "data").rmdir()
    assert tasks.data_root() == Path("../shared/data")
    (hub / "shared/data").rmdir()
    assert tasks.data_root() is None
    with pytest.raises(FileNotFoundError, match=r"--data-dir '.*nowhere' is not a folder\. "
                                                r"Supply the data one of three ways"):
        tasks.data_root(hub / "nowhere")
    monkeypatch.setenv("FLORA_DATA", str(hub / "nowhere"))
    with pytest.raises(FileNotFoundError, match="FLORA_DATA '.*nowhere' is not a folder"):
        tasks.data_root()


def test_check_loads_each_task_and_stops_at_once_offline(hub, monkeypatch):
    data.fetch(hub / "data", ["gsm8k"], FAKE_COUNTS)
    assert data.check(["gsm8k"]) == ["gsm8k: 1 train, 2 test rows from data"]
    (hub / "data/gsm8k/test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="gsm8k/test.jsonl"):
        data.check(["gsm8k"])
    monkeypatch.chdir(hub / "data")                          # no local copy any more
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=5.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(RuntimeError, match="Hub is unreachable. Supply the data one of three ways: "
                                           r"\(1\) once, while online, `python -m harness.data fetch"):
        data.check(["sst2"])


def test_command_line_where_and_check(tmp_path):
    """The CLI as reproduce.sh calls it, in a subprocess: `where` prints the folder, `check`
    one line per task, and an error is one line on stderr with exit status 1."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(HERE), "HOME": str(tmp_path)}
    (tmp_path / "data/gsm8k").mkdir(parents=True)
    for split in ("train", "test"):
        (tmp_path / f"data/gsm8k/{split}.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    run = lambda *a: subprocess.run([sys.executable, "-m", "harness.data", *a], cwd=tmp_path,  # noqa: E731
                                    env=env, capture_output=True, text=True, timeout=120)
    assert run("where").stdout == "data\n"
    assert run("check", "--tasks", "gsm8k").stdout == "gsm8k: 1 train, 1 test rows from data\n"
    bad = run("check", "--tasks", "gsm8k", "--data-dir", "nowhere")
    assert bad.returncode == 1 and bad.stderr.startswith("error: --data-dir 'nowhere' is not a folder")
    assert len(bad.stderr.strip().splitlines()) == 1


SHARED = HERE.parent / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/data beside this checkout")
def test_canonical_counts_are_those_of_the_real_files():
    """CANONICAL_ROWS against the real files of ../shared/data, for every split present."""
    checked = 0
    for (name, split), n in data.CANONICAL_ROWS.items():
        try:
            rows = tasks.get_task(name).read(SHARED, split)
        except FileNotFoundError:
            continue                                   # QQP, MNLI, QNLI train, CoLA: not there
        assert len(rows) == n, (name, split)
        checked += 1
    assert checked >= 14                               # sst2 mrpc rte stsb gsm8k x2, mbpp x4
