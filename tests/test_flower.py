"""Tests for the Flower app (flower_app/): its run config is train.py's options, arrays travel
exactly, a Flower simulation gives train.py's results for every aggregator, a real local
deployment (one SuperLink, two SuperNodes, separate processes) gives train.py's FLoRA-NA run,
and a client that fails is left out of its round with p renormalised and the failure logged.

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
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the Flower app needs pip install -r requirements-flower.txt")

import flora_na as fl
import train
from harness import federation, flower_local
from harness.flower_local import LocalFederation
from test_train import adapter_tensors, build_bert, rows_of, write_sst2

sys.path.insert(0, str(flower_local.APP))   # the app's package, as Flower's processes see it
from flora_na_app import wire               # noqa: E402

TIMING = ("client_seconds", "server_seconds")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return build_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    return write_sst2(tmp_path_factory.mktemp("glue"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline(monkeypatch):
    """No network beyond localhost for every process a test starts: an HTTP client that
    tries to reach out meets a closed port instead."""
    dead = f"http://127.0.0.1:{flower_local.free_port()}"
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                "all_proxy"):
        monkeypatch.setenv(key, dead)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def tiny_args(out: Path, bert: Path, data: Path, **kw) -> train.Args:
    """test_train.py's tiny federated SST-2 run (2 rounds of 2 steps, rank 2, one thread)."""
    base = dict(task="sst2", model=str(bert), data_dir=str(data), out=str(out), clients=3,
                rounds=2, local_steps=2, batch_size=4, rank=2, lr=5e-3, max_length=16,
                eval_every=1, eval_batch_size=8, solver_steps=20, device="cpu", threads=1)
    return train.Args(**{**base, **kw})


def run_config(args: train.Args, **app) -> dict:
    """The Flower run config for the same run: train.py's options minus --clients (the
    number of SuperNodes), None as "", plus the app's own keys."""
    config = {f.name.replace("_", "-"): getattr(args, f.name)
              for f in dataclasses.fields(train.Args) if f.name != "clients"}
    config = {k: ("" if v is None else v) for k, v in config.items()}
    return {**config, "node-timeout": 120, "round-timeout": 600, **app}


def assert_same_run(ref: Path, got: Path, names: list[str]) -> float:
    """train.py's run `ref` and the Flower run `got` agree, row by row (every field but the
    timings and Flower's "failed"; floats to 1e-6) and tensor by tensor (float32 tolerance);
    returns the largest tensor difference."""
    ref_rows, got_rows = rows_of(ref), rows_of(got)
    assert [(r["aggregator"], r["round"]) for r in got_rows] == \
        [(r["aggregator"], r["round"]) for r in ref_rows]
    for r, g in zip(ref_rows, got_rows):
        assert g.pop("failed") == []
        assert len(g.pop("client_load_seconds")) == len(g.pop("client_train_seconds")) == \
            len(g["clients"])
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
               for f in dataclasses.fields(train.Args) if f.name not in wire.FROM_NODES}
    assert set(config) == set(options) | set(wire.APP_KEYS)
    for key, default in options.items():
        if key == "data-dir":                       # train.py's default is $FLORA_DATA
            assert config[key] == ""
        elif key != "out":
            assert config[key] == ("" if default is None else default), key
    assert wire.args_from(config) == dataclasses.replace(defaults, out=config["out"])


def test_run_config_values_become_train_args():
    args = wire.args_from({"task": "stsb", "lr": 0.02, "tie-layers": True, "max-train-examples": 40,
                           "target-modules": "", "node-timeout": 5})
    assert (args.task, args.lr, args.tie_layers, args.max_train_examples) == ("stsb", 0.02, True, 40)
    assert args.target_modules is None
    with pytest.raises(ValueError, match="'clients' is not a train.py option"):
        wire.args_from({"clients": 3})
    with pytest.raises(ValueError, match="'learning-rate' is not a train.py option"):
        wire.args_from({"learning-rate": 0.1})
    with pytest.raises(ValueError, match="bad run config"):
        wire.args_from({"rank": "eight"})


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


# one aggregator per path through the app: plain factors (FedIT, and FLoRA-NA, the method),
# private Bs kept on the nodes (FedSA-LoRA), changed frozen weights sent to the clients
# (FedEx-LoRA), and LoRA restarted after the merge (FLoRA)
PATHS = ("fedit", "fedsa", "fedex", "flora", "flora_na")


def test_simulation_equals_train_py(tmp_path, offline, bert_dir, glue_dir):
    """3 simulated SuperNodes, 2 of them sampled per round (train.py's participants): the same
    rows (losses, metrics, personalised metrics, clients, bytes) and the same saved adapters
    and frozen weights as train.py's in-process loop, with the same seed and partition."""
    names = list(PATHS)
    assert set(names) <= set(fl.AGGREGATORS)
    ref = tiny_args(tmp_path / "ref", bert_dir, glue_dir, aggregator=",".join(names),
                    participation=0.67)
    train.main(ref)
    got = dataclasses.replace(ref, out=str(tmp_path / "flower"))
    with LocalFederation(tmp_path / "fed") as fed:
        fed.start_superlink(simulation=True)
        done = fed.run(run_config(got), {"num-supernodes": 3})
    assert (tmp_path / "flower" / "metrics.jsonl").exists(), done.stdout[-3000:]
    largest = assert_same_run(tmp_path / "ref", tmp_path / "flower", names)
    config = json.loads((tmp_path / "flower" / "config.json").read_text())
    assert config == json.loads((tmp_path / "ref" / "config.json").read_text())
    provenance = json.loads((tmp_path / "flower" / "provenance.jsonl").read_text())
    assert provenance["engine"].startswith("flwr 1.42")
    print(f"largest adapter difference, simulation vs train.py: {largest:.3g}")


def test_deployment_with_two_supernodes_equals_train_py(tmp_path, offline, bert_dir, glue_dir):
    """One SuperLink and two SuperNodes, each a separate process on its own free port with its
    own node config (partition-id, num-partitions, its own data-dir): 2 rounds of FLoRA-NA
    save the adapter train.py saves, it loads as train.py's does, and every process (with
    those Flower started under it) is gone after."""
    ref = tiny_args(tmp_path / "ref", bert_dir, glue_dir, clients=2)
    train.main(ref)
    got = dataclasses.replace(ref, out=str(tmp_path / "flower"))
    own = [shutil.copytree(glue_dir, tmp_path / f"node{u}-data") for u in range(2)]
    with LocalFederation(tmp_path / "fed") as fed:
        fed.start_superlink()
        nodes = [fed.start_supernode(u, 2, data_dir=str(own[u])) for u in range(2)]
        done = fed.run(run_config(got))
        family = [p.pid for p in fed.procs] + [
            pid for p in fed.procs for pid in flower_local._descendants(p.pid)]
    assert all(p.poll() is not None for p in nodes)
    assert not any(flower_local._alive(pid) for pid in family)
    assert (tmp_path / "flower" / "metrics.jsonl").exists(), done.stdout[-3000:]
    largest = assert_same_run(tmp_path / "ref", tmp_path / "flower", ["flora_na"])
    model, _ = train.load_global(str(tmp_path / "flower" / "flora_na"))
    for name, (A, B) in fl.read_factors(model).items():
        assert torch.equal(A, torch.load(tmp_path / "flower" / "flora_na" / "state.pt",
                                         weights_only=False)["factors"][name][0])
    print(f"largest adapter difference, deployment vs train.py: {largest:.3g}")


def test_a_failing_client_is_left_out_with_p_renormalised(tmp_path, offline, bert_dir, glue_dir):
    """Client 1's data folder is empty, so its training raises: the round completes on
    client 0 alone (p = [1], so FedIT's global model is client 0's upload), the row names
    the failure, and the log says which client failed and why."""
    args = tiny_args(tmp_path / "flower", bert_dir, glue_dir, clients=2, rounds=1,
                     aggregator="fedit")
    empty = tmp_path / "empty"
    empty.mkdir()
    with LocalFederation(tmp_path / "fed") as fed:
        fed.start_superlink()
        fed.start_supernode(0, 2, data_dir=str(glue_dir))
        fed.start_supernode(1, 2, data_dir=str(empty))
        done = fed.run(run_config(args))
    [row] = rows_of(tmp_path / "flower")
    assert row["clients"] == [0], done.stdout[-3000:]
    [failure] = row["failed"]
    assert failure["client"] == 1 and "FileNotFoundError" in failure["error"]
    assert "client 1 (node" in done.stdout and "failed" in done.stdout
    assert "p renormalised over clients [0]: [1.0]" in done.stdout

    # the oracle: client 0's round, as train.py computes it, is the global model
    model, tokenizer = train.model_loader(args, torch.device("cpu"))()
    task, data = train.load_data(args)
    parts = federation.partition(data.labels, 2, args.dirichlet_alpha, args.seed)
    upload, head, loss = train.client_update(
        model, task.batcher(tokenizer, data.train, args.max_length), parts[0],
        factors=fl.read_factors(model), head=fl.head_state(model), lr=args.lr,
        optimizer=args.optimizer, train_A=True, local_steps=args.local_steps,
        batch_size=args.batch_size, seed=args.seed, round_=0, u=0)
    state = torch.load(tmp_path / "flower" / "fedit" / "state.pt", weights_only=False)
    assert row["train_loss"] == loss
    for name, (A, B) in upload.items():
        torch.testing.assert_close(state["factors"][name][0], A)
        torch.testing.assert_close(state["factors"][name][1], B)
    for key, value in head.items():
        torch.testing.assert_close(state["head"][key], value)
