"""Tests for the Flower app (flower_app/): its run config is train.py's options, arrays travel
exactly, a Flower simulation resumes a killed train.py run and gives train.py's results for
one aggregator of every path through the app, and a real local deployment (one SuperLink,
three SuperNodes, separate processes) in which one client fails every round gives train.py's
2-client FLoRA-NA run: the failing client is left out with p renormalised and the failure
logged.

Every Flower process runs offline: Flower's offline settings (harness.flower_local.OFFLINE_ENV)
and, for any HTTP client that would still reach out, proxies that point at a closed local
port. Processes are started on free localhost ports and stopped by their pids, also when a
test fails. The tiny BERT and SST-2 data are test_train.py's.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the Flower app needs pip install -r requirements-flower.txt")

import flora_na as fl
import train
from harness import federation, flower_local
from harness.flower_local import LocalFederation
from test_train import adapter_tensors, build_bert, rows_of, run_killed_in_round_2, write_sst2

sys.path.insert(0, str(flower_local.APP))   # the app's package, as Flower's processes see it
from flora_na_app import wire               # noqa: E402

TIMING = ("client_seconds", "server_seconds")
pytestmark = pytest.mark.usefixtures("one_thread")     # conftest.py's: and restored after


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return build_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    return write_sst2(tmp_path_factory.mktemp("glue"))


@pytest.fixture(autouse=True, scope="module")
def offline():
    """No network beyond localhost for every process this module starts: an HTTP client that
    tries to reach out meets a closed port instead."""
    dead = f"http://127.0.0.1:{flower_local.free_port()}"
    with pytest.MonkeyPatch.context() as mp:
        for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                    "all_proxy"):
            mp.setenv(key, dead)
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        yield


# train.py's codec options (issue 23, phase B1): the app does not pass factors through codecs
# yet (its parity with a codec on is a later phase), so its run config does not offer them.
NOT_IN_FLOWER_YET = ("upload_codec", "download_codec", "codec_block", "codec_rounding",
                     "topk_fraction")


def tiny_args(out: Path, bert: Path, data: Path, **kw) -> train.Args:
    """test_train.py's tiny federated SST-2 run (2 rounds of 2 steps, rank 2, one thread)."""
    base = dict(task="sst2", model=str(bert), data_dir=str(data), out=str(out), clients=3,
                rounds=2, local_steps=2, batch_size=4, rank=2, lr=5e-3, max_length=16,
                eval_every=1, eval_batch_size=8, agg_option=["flora_na.steps=20"], device="cpu", threads=1)
    return train.Args(**{**base, **kw})


def run_config(args: train.Args, **app) -> dict:
    """The Flower run config for the same run: train.py's options minus --clients (the
    number of SuperNodes), None as "", plus the app's own keys."""
    config = {f.name.replace("_", "-"): getattr(args, f.name)
              for f in dataclasses.fields(train.Args)
              if f.name != "clients" and f.name not in NOT_IN_FLOWER_YET}
    config = {k: ("" if v is None else " ".join(v) if isinstance(v, list) else v)
              for k, v in config.items()}
    return {**config, "node-timeout": 120, "round-timeout": 600, **app}


def assert_same_run(ref: Path, got: Path, names: list[str], failing: tuple = ()) -> float:
    """train.py's run `ref` and the Flower run `got` agree, row by row (every field but the
    timings; floats to 1e-6) and tensor by tensor (float32 tolerance), and Flower's rows name
    the clients `failing` as failed; returns the largest tensor difference."""
    ref_rows, got_rows = rows_of(ref), rows_of(got)
    assert [(r["aggregator"], r["round"]) for r in got_rows] == \
        [(r["aggregator"], r["round"]) for r in ref_rows]
    for r, g in zip(ref_rows, got_rows):
        if "failed" in g:                                 # Flower's rows only
            assert [f["client"] for f in g.pop("failed")] == list(failing)
        for key in ("client_load_seconds", "client_train_seconds"):
            assert len(g.pop(key, g["clients"])) == len(g["clients"])
        for key in TIMING:
            r.pop(key), g.pop(key)
        assert _close(g, r), (r, g)
    largest = 0.0
    for name in names:
        want, have = adapter_tensors(ref / name), adapter_tensors(got / name)
        assert want.keys() == have.keys()
        for key in want:
            torch.testing.assert_close(have[key], want[key])
            largest = max(largest, (have[key] - want[key]).abs().max().item())
    return largest


def _close(x, y) -> bool:
    """Nested dicts and lists equal, floats to a relative 1e-6."""
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list):
        return isinstance(y, list) and len(x) == len(y) and all(map(_close, x, y))
    if isinstance(x, float) or isinstance(y, float):
        return x == pytest.approx(y, rel=1e-6, abs=1e-12)
    return x == y


# ---------------------------------------------------------------------------------------------
# The run config and the arrays: fast, no Flower process
# ---------------------------------------------------------------------------------------------


def test_run_config_is_train_py_options_with_its_defaults():
    """pyproject.toml's [tool.flwr.app.config] holds every train.py option but --clients
    under its command-line name, at train.py's default ("" for None), and the app's keys."""
    config = tomllib.loads((flower_local.APP / "pyproject.toml").read_text())
    config = config["tool"]["flwr"]["app"]["config"]
    defaults = train.Args()
    options = {f.name.replace("_", "-"): getattr(defaults, f.name)
               for f in dataclasses.fields(train.Args)
               if f.name not in wire.FROM_NODES + NOT_IN_FLOWER_YET}
    assert set(config) == set(options) | set(wire.APP_KEYS)
    assert not {k.replace("_", "-") for k in NOT_IN_FLOWER_YET} & set(config)
    for key, default in options.items():
        if key == "data-dir":                       # train.py's default is $FLORA_DATA
            assert config[key] == ""
        elif key != "out":
            assert config[key] == ("" if default in (None, []) else default), key
    assert wire.args_from(config) == dataclasses.replace(defaults, out=config["out"])


def test_run_config_values_become_train_args():
    args = wire.args_from({"task": "stsb", "lr": 0.02, "track-solvers": True,
                           "max-train-examples": 40, "target-modules": "", "node-timeout": 5,
                           "agg-option": "flora_na.tie_layers=true  flora_na.steps=50"})
    assert (args.task, args.lr, args.track_solvers, args.max_train_examples) == \
        ("stsb", 0.02, True, 40)
    assert args.agg_option == ["flora_na.steps=50", "flora_na.tie_layers=true"]
    assert args.target_modules is None
    with pytest.raises(ValueError, match="'clients' is not a train.py option"):
        wire.args_from({"clients": 3})
    with pytest.raises(ValueError, match="'learning-rate' is not a train.py option"):
        wire.args_from({"learning-rate": 0.1})
    with pytest.raises(ValueError, match="bad run config"):
        wire.args_from({"rank": "eight"})


def test_plugins_and_aggregator_options_come_from_the_run_config():
    """plugins and agg-option in the run config, as train.py's --plugins and --agg-option: the
    plug-in registers its aggregator in whichever process parses the config (a ClientApp's
    too), and its options reach the aggregator; a bad value fails as on the command line."""
    config = tomllib.loads((flower_local.APP / "pyproject.toml").read_text())
    config = {**config["tool"]["flwr"]["app"]["config"], "plugins": "evidence.authors_variant",
              "aggregator": "flora_na_authors", "agg-option": "flora_na_authors.steps=50"}
    args = wire.args_from(config)
    assert args.plugins == ["evidence.authors_variant"] and "flora_na_authors" in fl.AGGREGATORS
    assert train.aggregator_options(args, "flora_na_authors")["steps"] == 50
    with pytest.raises(ValueError, match="must be >= 1"):
        train.check_args(wire.args_from({**config, "agg-option": "flora_na_authors.steps=0"}))


def test_arrays_travel_exactly():
    """Factors, head and frozen weights come back bit for bit; bfloat16 travels as float32
    and casts back exactly; without_B sends only the A factors."""
    g = torch.Generator().manual_seed(0)
    factors = {"l0.q": (torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)),
               "l1.v": (torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g))}
    head = {"classifier.weight": torch.randn(2, 6, generator=g)}
    base = {"l0.q": torch.randn(6, 8, generator=g).bfloat16()}
    got = wire.from_record(wire.to_record(factors, head, base))
    for layer, (A, B) in factors.items():
        assert torch.equal(got["A"][layer], A) and torch.equal(got["B"][layer], B)
    assert torch.equal(got["head"]["classifier.weight"], head["classifier.weight"])
    assert got["W"]["l0.q"].dtype == torch.float32
    assert torch.equal(got["W"]["l0.q"].bfloat16(), base["l0.q"])
    only_A = wire.from_record(wire.to_record(factors, without_B=True))
    assert only_A["B"] == {} and only_A["head"] == {} and only_A["A"].keys() == factors.keys()


# ---------------------------------------------------------------------------------------------
# Flower's simulation and a local deployment against train.py's in-process loop
# ---------------------------------------------------------------------------------------------


# one aggregator per path through the app: private Bs kept on the nodes (FedSA-LoRA, first:
# it is the one resumed), plain factors (FedIT, and FLoRA-NA, the method), changed frozen
# weights sent to the clients (FedEx-LoRA), and LoRA restarted after the merge (FLoRA); and
# test_train.py's toy aggregator, registered there alone: the run config's plugins bring it
# into every Flower process, and its own option (shrink) travels in agg-option
PATHS = ("fedsa", "fedit", "fedex", "flora", "flora_na", "toy_shrink")


def test_simulation_resumes_train_py_and_equals_it(tmp_path, monkeypatch, bert_dir, glue_dir):
    """train.py runs 3 rounds with 2 of 3 clients per round and is killed in FedSA-LoRA's
    second round; a Flower simulation with 3 SuperNodes resumes the run: FedSA-LoRA's rounds 2
    and 3 (its clients get their last B from the server, then keep it in context.state) and
    every round of the others. The result is the uninterrupted train.py run: the same rows
    (losses, metrics, personalised metrics, clients, bytes) and the same saved adapters and
    frozen weights, with the same seed and partition. The toy aggregator reaches the app's
    processes only through plugins = "test_train" (this folder on their PYTHONPATH)."""
    assert set(PATHS) <= set(fl.AGGREGATORS)
    ref = tiny_args(tmp_path / "ref", bert_dir, glue_dir, aggregator=",".join(PATHS),
                    participation=0.67, rounds=3, plugins=["test_train"],
                    agg_option=["flora_na.steps=20", "toy_shrink.shrink=0.5"])
    train.main(ref)

    got = dataclasses.replace(ref, out=str(tmp_path / "flower"))
    run_killed_in_round_2(monkeypatch, lambda: train.main(got))
    assert [(r["aggregator"], r["round"]) for r in rows_of(tmp_path / "flower")] == [(PATHS[0], 1)]

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))     # for plugins test_train
    with LocalFederation(tmp_path / "fed") as fed:
        fed.start_superlink(simulation=True)
        done = fed.run(run_config(got, resume=True), {"num-supernodes": 3})
    rows = rows_of(tmp_path / "flower")
    assert [(r["aggregator"], r["round"]) for r in rows if "failed" in r] == [
        (name, t) for name in PATHS for t in (1, 2, 3)][1:], done.stdout[-3000:]
    largest = assert_same_run(tmp_path / "ref", tmp_path / "flower", list(PATHS))
    config = json.loads((tmp_path / "flower" / "config.json").read_text())
    assert config == json.loads((tmp_path / "ref" / "config.json").read_text())
    starts = [json.loads(line) for line in open(tmp_path / "flower" / "provenance.jsonl")]
    assert [s.get("engine") for s in starts] == [None, "flwr 1.42.0"]
    print(f"largest adapter difference, simulation vs train.py: {largest:.3g}")


def write_own_data(folder: Path, glue_dir: Path, examples: list) -> Path:
    """An SST-2 folder whose training set is `examples` (in this order) and whose dev set is
    glue_dir's: what a client machine holds of its own."""
    (folder / "SST-2").mkdir(parents=True)
    rows = ["sentence\tlabel"] + [f"{e.text_a}\t{e.label}" for e in examples]
    (folder / "SST-2" / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    shutil.copy(glue_dir / "glue_data" / "SST-2" / "dev.tsv", folder / "SST-2" / "dev.tsv")
    return folder


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, bert_dir, glue_dir) -> dict:
    """One SuperLink and three SuperNodes, each a separate process on its own free port, and
    2 rounds of FLoRA-NA through them, the clients at different LoRA ranks (1, 2, 1; global
    rank 2). Clients 0 and 1 hold their own data (own-data=true): exactly train.py's two
    partitions of the SST-2 set; client 2's data folder is empty, so its training raises
    every round. Also train.py's 2-client run, as the reference."""
    root = tmp_path_factory.mktemp("deployment")
    ref = tiny_args(root / "ref", bert_dir, glue_dir, clients=2, client_ranks="1,2")
    train.main(ref)
    task, data = train.load_data(ref)
    parts = federation.partition(data.labels, 2, ref.dirichlet_alpha, ref.seed, min_size=1)
    own = [write_own_data(root / f"client{u}", glue_dir, [data.train[i] for i in parts[u]])
           for u in range(2)] + [root / "client2"]
    own[2].mkdir()
    got = dataclasses.replace(ref, out=str(root / "flower"))
    with LocalFederation(root / "fed") as fed:
        fed.start_superlink()
        nodes = [fed.start_supernode(u, 3, data_dir=str(own[u]), own_data=True)
                 for u in range(3)]
        done = fed.run(run_config(got))
        family = [p.pid for p in fed.procs] + [
            pid for p in fed.procs for pid in flower_local._descendants(p.pid)]
    return {"ref": root / "ref", "out": root / "flower", "log": done.stdout, "nodes": nodes,
            "alive_after": [pid for pid in family if flower_local._alive(pid)]}


def test_deployment_equals_train_py(deployment):
    """Separate processes with their own node config (partition-id, num-partitions, their own
    data), each client training at its own rank: the rows and the saved adapter are train.py's
    2-client run (the failing client left out, p renormalised over the others), the adapter
    loads as train.py's does, and
    every process, with those Flower started under it, is gone after the run."""
    assert (deployment["out"] / "metrics.jsonl").exists(), deployment["log"][-3000:]
    largest = assert_same_run(deployment["ref"], deployment["out"], ["flora_na"], failing=(2,))
    assert "client_r1" in rows_of(deployment["out"])[0]["divergence"]["relative_mean"]
    model, _ = train.load_global(str(deployment["out"] / "flora_na"))
    state = torch.load(deployment["out"] / "flora_na" / "state.pt", weights_only=False)
    for name, (A, B) in fl.read_factors(model).items():
        assert torch.equal(A, state["factors"][name][0])
        assert torch.equal(B, state["factors"][name][1])
    assert all(p.poll() is not None for p in deployment["nodes"])
    assert deployment["alive_after"] == []
    print(f"largest adapter difference, deployment vs train.py: {largest:.3g}")


def test_a_failing_client_is_left_out_with_p_renormalised(deployment):
    """Client 2 raises in every round: each round completes on clients 0 and 1, the row names
    the failure, and the log says which client and node failed, why, and the new p."""
    rows = rows_of(deployment["out"])
    assert [r["clients"] for r in rows] == [[0, 1], [0, 1]], deployment["log"][-3000:]
    for row in rows:
        [failure] = row["failed"]
        assert failure["client"] == 2 and "FileNotFoundError" in failure["error"]
        assert "GLUE sst2 train: expected the file" in failure["error"]
    log = deployment["log"]
    for rnd in (1, 2):
        assert f"round {rnd}: client 2 (node {rows[0]['failed'][0]['node']}) failed" in log
        assert f"round {rnd}: p renormalised over clients [0, 1]:" in log
    assert "FileNotFoundError" in log and str(Path("client2") / "SST-2" / "train.tsv") in log


def test_every_process_is_stopped_when_the_block_fails(tmp_path):
    """A failure inside `with LocalFederation(...)` still stops the SuperLink, the SuperNode
    and what Flower started under them."""
    with pytest.raises(RuntimeError, match="a failing test"):
        with LocalFederation(tmp_path) as fed:
            fed.start_superlink()
            fed.start_supernode(0, 1)
            time.sleep(2)                       # let them start their own children
            family = [p.pid for p in fed.procs] + [
                pid for p in fed.procs for pid in flower_local._descendants(p.pid)]
            assert all(flower_local._alive(pid) for pid in family)
            raise RuntimeError("a failing test")
    assert not any(flower_local._alive(pid) for pid in family)
