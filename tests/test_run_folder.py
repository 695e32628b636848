"""Run folders that no invocation of train.py damages (harness/run_folder.py): a folder that is
not a run is refused before anything is written; --resume verifies what it reuses (checksums),
rebuilds what derives from the state (adapter, metrics.jsonl) and refuses a damaged state or
config with the file named, before a line is appended; clear messages for bad --seed and
--out; numerics (threads, versions, CPU vendor, device) recorded and checked on --resume.
One tiny finished run (2 rounds of a 2-layer BERT, a few seconds) is copied for each case."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import train
from harness import run_folder
from test_train import adapter_tensors, bert_args, bert_dir, glue_dir, rows_of  # noqa: F401


@pytest.fixture(scope="module")
def finished(tmp_path_factory, bert_dir, glue_dir) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(bert_args(out, bert_dir, glue_dir))
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of the finished run to damage."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy, symlinks=True)
    return copy


def resume(run: Path, bert_dir, glue_dir, **kw):  # noqa: F811
    return train.main(bert_args(run, bert_dir, glue_dir, resume=True, **kw))


def provenance_lines(run: Path) -> int:
    return len((run / "provenance.jsonl").read_text().splitlines())


def test_out_holding_other_files_is_refused_before_anything_is_written(tmp_path, bert_dir,
                                                                       glue_dir):  # noqa: F811
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "metrics.jsonl").write_text("their data\n")
    with pytest.raises(ValueError, match="not a run of train.py.*nothing was written"):
        train.main(bert_args(theirs, bert_dir, glue_dir))
    assert sorted(p.name for p in theirs.iterdir()) == ["metrics.jsonl"]
    assert (theirs / "metrics.jsonl").read_text() == "their data\n"


@pytest.mark.parametrize("argument, message", [
    (dict(seed=2 ** 70), r"--seed must be an integer in \[0, 2\*\*63\), got 1180591620717411303424"),
    (dict(out=""), "--out is empty"),
])
def test_clear_messages_for_bad_arguments(tmp_path, bert_dir, glue_dir, argument,
                                          message):  # noqa: F811
    args = bert_args(tmp_path / "run", bert_dir, glue_dir)
    with pytest.raises(ValueError, match=message):
        train.main(train.Args(**{**args.__dict__, **argument}))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_damaged_adapter_is_rebuilt_from_the_state(run, finished, bert_dir, glue_dir,
                                                   damage, capsys):  # noqa: F811
    weights = next((run / "fedit" / "adapter").resolve().glob("*.safetensors"))
    if damage == "corrupt":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        shutil.rmtree((run / "fedit" / "adapter").resolve())
    resume(run, bert_dir, glue_dir)
    assert "rebuilt from" in capsys.readouterr().out
    expected, got = adapter_tensors(finished / "fedit"), adapter_tensors(run / "fedit")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("damage", ["deleted", "truncated mid-line"])
def test_damaged_metrics_are_rebuilt_from_the_states(run, finished, bert_dir, glue_dir,
                                                     damage, capsys):  # noqa: F811
    metrics = run / "metrics.jsonl"
    if damage == "deleted":
        metrics.unlink()
    else:
        metrics.write_text(metrics.read_text()[:-40])
    resume(run, bert_dir, glue_dir)
    assert "metrics.jsonl is missing or damaged" in capsys.readouterr().out
    assert rows_of(run) == rows_of(finished)


@pytest.mark.parametrize("damage", ["flipped byte", "garbage"])
def test_damaged_state_is_refused_with_the_file_named(run, bert_dir, glue_dir,
                                                      damage):  # noqa: F811
    state = run / "fedit" / "state.pt"
    data = bytearray(state.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = b"not a pickle"
    state.write_bytes(bytes(data))
    before = provenance_lines(run)
    with pytest.raises(ValueError, match=rf"{state}.*(checksum|cannot be read).*delete"):
        resume(run, bert_dir, glue_dir)
    assert provenance_lines(run) == before  # nothing appended


def test_truncated_config_is_refused_with_the_file_named(run, bert_dir, glue_dir):  # noqa: F811
    config = run / "config.json"
    config.write_text(config.read_text()[:200])
    before = provenance_lines(run)
    with pytest.raises(ValueError, match=rf"{config} is not valid JSON"):
        resume(run, bert_dir, glue_dir)
    assert provenance_lines(run) == before


def test_resume_under_other_numerics_needs_consent(run, bert_dir, glue_dir):  # noqa: F811
    config = json.loads((run / "config.json").read_text())
    assert config["numerics"]["threads"] == 1 and config["numerics"]["torch"] == torch.__version__
    before = provenance_lines(run)
    with pytest.raises(ValueError, match=r"different numerics.*'threads': \(1, 2\).*"
                                         r"--allow-numerics-change"):
        resume(run, bert_dir, glue_dir, threads=2)
    assert provenance_lines(run) == before
    resume(run, bert_dir, glue_dir, threads=2, allow_numerics_change=True)
    last = json.loads((run / "provenance.jsonl").read_text().splitlines()[-1])
    assert last["numerics_change"] == {"threads": [1, 2]}


def test_a_run_from_before_numerics_were_recorded(run, bert_dir, glue_dir):  # noqa: F811
    """Unknown numerics: --resume goes on (runs of earlier versions must resume) and records
    them, in config.json and, as unknown -> today's, in provenance.jsonl."""
    config = json.loads((run / "config.json").read_text())
    del config["numerics"]
    (run / "config.json").write_text(json.dumps(config))
    for checksums in run.glob("*/checksums.json"):
        checksums.unlink()  # nor checksums
    resume(run, bert_dir, glue_dir)
    assert json.loads((run / "config.json").read_text())["numerics"]["threads"] == 1
    last = json.loads((run / "provenance.jsonl").read_text().splitlines()[-1])
    assert last["numerics_change"]["threads"] == ["unknown", 1]
