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
import re
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr", reason="the Flower app needs pip install -r requirements-flower.txt")

import flora_na as fl
import train
from harness import flower_local
from harness.flower_local import LocalFederation
from test_train import adapter_tensors, build_bert, rows_of, run_killed_in_round_2, write_sst2

sys.path.insert(0, str(flower_local.APP))   # the app's package, as Flower's processes see it
from flora_na_app import client_work, wire  # noqa: E402

TIMING = ("client_seconds", "server_seconds")
FEDERATED_EVAL = ("federated_eval_metrics", "federated_eval_clients", "federated_eval_failed")
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


NOT_IN_FLOWER_YET = wire.NOT_YET   # train.py's codec options: refused by the app for now


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
    for g in got_rows:                              # federated evaluation: Flower's only
        for key in FEDERATED_EVAL:
            g.pop(key, None)
    assert [(r["aggregator"], r["round"]) for r in got_rows] == \
        [(r["aggregator"], r["round"]) for r in ref_rows]
    for r, g in zip(ref_rows, got_rows):
        if "failed" in g:                                 # Flower's rows only
            assert [f["client"] for f in g.pop("failed")] == list(failing)
        for key in ("client_load_seconds", "client_train_seconds"):
            assert len(g.pop(key, g["clients"])) == len(g["clients"])
        for key in TIMING:
            r.pop(key), g.pop(key)
        # relative to ||M||, of float32 factors: below 1e-6 it is their round-off (all there
        # is where the aggregate is exact: Fed-SB stores A = R A0, rounded, not R)
        assert _close(g.pop("divergence"), r.pop("divergence"), abs=1e-6), (r, g)
        assert _close(g, r), (r, g)
    largest = 0.0
    for name in names:
        want, have = adapter_tensors(ref / name), adapter_tensors(got / name)
        assert want.keys() == have.keys()
        for key in want:
            torch.testing.assert_close(have[key], want[key])
            largest = max(largest, (have[key] - want[key]).abs().max().item())
    return largest


def _close(x, y, abs: float = 1e-12) -> bool:
    """Nested dicts and lists equal, floats to a relative 1e-6 (or to `abs`)."""
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(
            _close(x[k], y[k], abs) for k in x)
    if isinstance(x, list):
        return isinstance(y, list) and len(x) == len(y) and all(
            _close(a, b, abs) for a, b in zip(x, y))
    if isinstance(x, float) or isinstance(y, float):
        return x == pytest.approx(y, rel=1e-6, abs=abs)
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
    for key in NOT_IN_FLOWER_YET:                   # given anyway: refused, not ignored
        with pytest.raises(ValueError, match="uncompressed"):
            wire.args_from({**config, key.replace("_", "-"): "int4"})
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
    """Factors, head, frozen weights and core bases come back bit for bit; bfloat16 travels as
    float32 and casts back exactly; without_B sends only the A factors."""
    g = torch.Generator().manual_seed(0)
    factors = {"l0.q": (torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)),
               "l1.v": (torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g))}
    head = {"classifier.weight": torch.randn(2, 6, generator=g)}
    base = {"l0.q": torch.randn(6, 8, generator=g).bfloat16()}
    core = {"l0.q": torch.randn(2, 8, generator=g)}
    got = wire.from_record(wire.to_record(factors, head, base, core=core))
    assert got["C"].keys() == core.keys() and torch.equal(got["C"]["l0.q"], core["l0.q"])
    for layer, (A, B) in factors.items():
        assert torch.equal(got["A"][layer], A) and torch.equal(got["B"][layer], B)
    assert torch.equal(got["head"]["classifier.weight"], head["classifier.weight"])
    assert got["W"]["l0.q"].dtype == torch.float32
    assert torch.equal(got["W"]["l0.q"].bfloat16(), base["l0.q"])
    only_A = wire.from_record(wire.to_record(factors, without_B=True))
    assert only_A["B"] == {} and only_A["head"] == {} and only_A["A"].keys() == factors.keys()
    assert only_A["C"] == {}


def test_a_message_carries_its_arrays_packed_in_two():
    """Flower moves each Array as an object of its own (one HTTP request per hop): the
    factors, head and frozen weights travel as one flat array and a layout, bit for bit;
    other dtypes and records that pack did not make are refused."""
    import numpy as np
    from flwr.app import Array, ArrayRecord
    from flora_na_app import packing
    g = np.random.default_rng(0)
    arrays = {"A/l0": g.standard_normal((2, 8)).astype(np.float32),
              "B/l0": g.standard_normal((6, 2)).astype(np.float32),
              "head/bias": np.float32([np.nan, -0.0, np.inf]),
              "W/empty": np.zeros((0, 3), np.float32)}
    record = packing.pack(arrays)
    assert list(record.keys()) == ["packed", "layout"]
    got = packing.unpack(record)
    assert list(got) == list(arrays)
    for k in arrays:
        assert got[k].dtype == np.float32 and got[k].shape == arrays[k].shape
        assert got[k].tobytes() == arrays[k].tobytes()
    assert packing.unpack(packing.pack({})) == {}
    with pytest.raises(ValueError, match="float32 arrays only, got {'x': 'float64'}"):
        packing.pack({"x": np.zeros(2)})
    with pytest.raises(ValueError, match="expected a packed ArrayRecord"):
        packing.unpack(ArrayRecord({"A/l0": Array(arrays["A/l0"])}))


class FakeGrid:
    """A Grid whose nodes answer queries at once: `answers` maps a node id to its
    (partition-id, num-partitions), or to an error reason; an error reply comes from node 1
    (the SuperLink), as Flower's "node unavailable" does."""

    def __init__(self, answers: dict):
        self.answers, self.sent = answers, {}

    def get_node_ids(self):
        return list(self.answers)

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            ids.append(f"m{len(self.sent)}")
            self.sent[ids[-1]] = msg
        return ids

    def pull_messages(self, ids):
        replies = []
        for msg_id in ids:
            node = self.sent[msg_id].metadata.dst_node_id
            answer, error = self.answers[node], None
            if isinstance(answer, str):
                error, node = SimpleNamespace(reason=answer, code=5), 1
            content = None if error else {"node": {"partition-id": answer[0],
                                                   "num-partitions": answer[1]}}
            replies.append(SimpleNamespace(
                metadata=SimpleNamespace(reply_to_message_id=msg_id, src_node_id=node),
                has_error=lambda e=error: e is not None, error=error, content=content))
        return replies


@pytest.fixture
def task_identity():
    """Flower's Message needs the identity of the process's task (set by Flower at run time)."""
    from flwr.supercore.task_identity import TaskIdentity
    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


def test_replies_belong_to_their_requests_and_a_node_without_identity_is_left_out(
        task_identity, caplog):
    """find_clients maps partition ids to nodes by the message each reply answers: node 11
    (no node config: its ClientApp raised) and node 13 (lost: the SuperLink answers for it,
    from node id 1) are left out with a warning, the others make the federation; every
    query carries the server's code version."""
    sys.path.insert(0, str(flower_local.APP))
    from flora_na_app import server_app, version
    grid = FakeGrid({10: (1, 2), 11: "ValueError: node config {} needs partition-id",
                     12: (0, 2), 13: "Node Unavailable"})
    assert server_app.find_clients(grid, timeout=5) == {1: 10, 0: 12}
    assert {m.content["config"]["code-version"] for m in grid.sent.values()} == {
        version.code_version()}
    warned = " ".join(r.getMessage() for r in caplog.records)
    for text in ("node 11 cannot say which client it is and is left out",
                 "node config {} needs partition-id", "node 13 cannot say", "Node Unavailable"):
        assert text in warned, warned


def test_a_client_of_another_code_version_refuses():
    from flora_na_app import version
    version.check(version.code_version())
    with pytest.raises(ValueError, match="this client runs code version .* the server 0000"):
        version.check("0000")


def test_the_dirichlet_failure_says_which_options_fix_it():
    args = train.Args(dirichlet_alpha=0.01)
    with pytest.raises(ValueError, match="raise dirichlet-alpha .* set dirichlet-alpha=0 .* "
                       "raise max-train-examples, or run fewer clients"):
        client_work.partition([0, 1] * 50, 100, args)


def test_weighted_metrics_weigh_each_set_by_its_size():
    from flora_na_app import server_app
    merged = server_app.weighted_metrics([
        {"matched_accuracy": 1.0, "matched_n_eval": 3, "mismatched_accuracy": 0.0,
         "mismatched_n_eval": 1, "num-examples": 4},
        {"matched_accuracy": 0.0, "matched_n_eval": 1, "mismatched_accuracy": 1.0,
         "mismatched_n_eval": 3, "num-examples": 4}])
    assert merged == {"matched_accuracy": 0.75, "matched_n_eval": 4,
                      "mismatched_accuracy": 0.75, "mismatched_n_eval": 4, "num-examples": 8}


# ---------------------------------------------------------------------------------------------
# Flower's simulation and a local deployment against train.py's in-process loop
# ---------------------------------------------------------------------------------------------


# one aggregator per path through the app: private Bs kept on the nodes (FedSA-LoRA, first:
# it is the one resumed), plain factors (FedIT, and FLoRA-NA, the method), changed frozen
# weights sent to the clients (FedEx-LoRA), LoRA restarted after the merge (FLoRA), the factor
# trained by round (RoLoRA), frozen factors set once on the server and A0 sent (Fed-SB); and
# test_train.py's toy aggregator, registered there alone: the run config's plugins bring it
# into every Flower process, and its own option (shrink) travels in agg-option
PATHS = ("fedsa", "fedit", "fedex", "flora", "flora_na", "rolora", "fedsb", "toy_shrink")


def federated_eval_in_process(run_dir: Path, config: dict, clients: list[int], n: int,
                              node_configs: dict | None = None) -> dict:
    """What federated evaluation of run_dir's saved global model by `clients` (of n) gives when
    computed here: each client's metrics on its evaluation data (client_work.my_eval_data with
    that client's node config), merged by server_app.weighted_metrics."""
    from flora_na_app import server_app
    model, tokenizer = train.load_global(str(run_dir))
    results = []
    for u in clients:
        node = {"partition-id": u, "num-partitions": n, **(node_configs or {}).get(u, {})}
        data_dir = node.get("data-dir")
        args = wire.args_from(config, **({} if data_dir is None else {"data_dir": data_dir}))
        task, data = train.load_data(args)
        mine = client_work.my_eval_data(node, {"data": data})
        metrics = train.evaluate(task, model, tokenizer, mine, **train.eval_options(args))
        results.append({**metrics, "num-examples": sum(len(x) for x in mine.evals.values())})
    return server_app.weighted_metrics(results)


def test_simulation_resumes_train_py_and_equals_it(tmp_path, monkeypatch, bert_dir, glue_dir):
    """train.py runs 3 rounds with 2 of 3 clients per round and is killed in FedSA-LoRA's
    second round; a Flower simulation with 3 SuperNodes resumes the run: FedSA-LoRA's rounds 2
    and 3 (its clients get their last B from the server, then keep it in context.state) and
    every round of the others. The result is the uninterrupted train.py run: the same rows
    (losses, metrics, personalised metrics, clients, bytes) and the same saved adapters and
    frozen weights, with the same seed and partition. With federated evaluation on
    (fraction-evaluate=1, evaluate-every=2): rounds 2 and 3 of every aggregator also carry
    federated_eval_metrics, the weighted mean of what each client's ClientApp scored, equal to
    evaluating the saved global model on each client's share of the dev set here; every dev
    example is scored once, so the pooled accuracy is the server's; and the training, after an
    evaluation, is train.py's. The toy aggregator reaches the app's processes only through
    plugins = "test_train" (this folder on their PYTHONPATH)."""
    assert set(PATHS) <= set(fl.AGGREGATORS)
    ref = tiny_args(tmp_path / "ref", bert_dir, glue_dir, aggregator=",".join(PATHS),
                    participation=0.67, rounds=3, plugins=["test_train"],
                    agg_option=["flora_na.steps=20", "toy_shrink.shrink=0.5"])
    train.main(ref)

    got = dataclasses.replace(ref, out=str(tmp_path / "flower"))
    run_killed_in_round_2(monkeypatch, lambda: train.main(got))
    assert [(r["aggregator"], r["round"]) for r in rows_of(tmp_path / "flower")] == [(PATHS[0], 1)]

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))     # for plugins test_train
    config = run_config(got, resume=True, **{"fraction-evaluate": 1.0, "evaluate-every": 2})
    with LocalFederation(tmp_path / "fed") as fed:
        fed.start_superlink(simulation=True)
        done = fed.run(config, {"num-supernodes": 3})
    rows = rows_of(tmp_path / "flower")
    assert [(r["aggregator"], r["round"]) for r in rows if "failed" in r] == [
        (name, t) for name in PATHS for t in (1, 2, 3)][1:], done.stdout[-3000:]
    assert done.ok and done.status == "finished:completed", (done.status, done.details)
    assert [(r["aggregator"], r["round"]) for r in rows if "federated_eval_metrics" in r] == [
        (name, t) for name in PATHS for t in (2, 3)]
    for r in rows:
        if "federated_eval_metrics" in r:
            assert r["federated_eval_clients"] == [0, 1, 2] and r["federated_eval_failed"] == []
            merged = r["federated_eval_metrics"]
            assert merged["n_eval"] == merged["num-examples"] == r["metrics"]["n_eval"] == 12
            assert merged["accuracy"] == pytest.approx(r["metrics"]["accuracy"], abs=1e-9)
        if r["round"] == 3:
            here = federated_eval_in_process(tmp_path / "flower" / r["aggregator"], config,
                                             [0, 1, 2], 3)
            assert _close(r["federated_eval_metrics"], here), (r, here)
    largest = assert_same_run(tmp_path / "ref", tmp_path / "flower", list(PATHS))
    config, want = (json.loads((tmp_path / run / "config.json").read_text())
                    for run in ("flower", "ref"))
    for c in (config, want):   # facts list all registered aggregators; other tests add plug-ins
        c["facts"]["aggregators"] = {k: v for k, v in c["facts"]["aggregators"].items()
                                     if k in PATHS}
    assert config == want
    starts = [json.loads(line) for line in open(tmp_path / "flower" / "provenance.jsonl")]
    assert [s.get("engine") for s in starts] == [None, "flwr 1.42.0"]
    print(f"largest adapter difference, simulation vs train.py: {largest:.3g}")


def write_own_data(folder: Path, glue_dir: Path, examples: list) -> Path:
    """An SST-2 folder whose training set is `examples` (in this order) and whose dev set is
    glue_dir's: what a client machine holds of its own."""
    (folder / "SST-2").mkdir(parents=True)
    rows = ["sentence\tlabel"] + [f"{e.text_a}\t{e.label}" for e in examples]
    (folder / "SST-2" / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "SST-2" / "dev.tsv").write_bytes(
        (glue_dir / "glue_data" / "SST-2" / "dev.tsv").read_bytes())
    return folder


def rows_when(out: Path, n: int, proc, timeout: float = 300) -> list[dict]:
    """metrics.jsonl's rows once it holds n of them (while `proc`, the run, goes on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(rows := rows_of(out)) >= n:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"no row {n} in {out} (run exit code {proc.poll()})")


def test_deployment_survives_lost_nodes_and_a_superlink_restart(tmp_path, bert_dir, glue_dir):
    """One SuperLink (with --database) and three SuperNodes, separate processes on free
    localhost ports, 3 rounds of FLoRA-NA with min-clients=2: SuperNode 2 is killed (SIGKILL)
    as round 2 starts, SuperNode 1 stopped (SIGTERM) as round 3 starts. Round 2 goes on
    without client 2 (Flower's "node unavailable" reply, sent by the SuperLink, is client 2's
    failure; p renormalised; the row's "failed"); round 3, left with one client, fails the
    run. Round 1 is train.py's 3-client round 1. Then the SuperLink restarts on the same
    database: SuperNode 0 (which holds its own data: train.py's partition 0) survives it, 1 and 2 start again, and `resume=true` redoes round 3
    with all three, numbered 3/3 in Flower's log too. Warm clients: each node loads the
    model once (round 2 loads nothing). The first run's outcome is finished:failed with
    the min-clients reason, the second's finished:completed (flwr run exits 0 for both);
    federated evaluation after the resumed round 3 equals the in-process scores. 175 s at a
    load of ~7 on 2 cores: starting and round 1 ~64 s (the ServerApp's and the workers'
    imports), round 2 ~50 s (Flower notices the killed node after 2 missed 30 s heartbeats,
    hard-coded in Flower 1.42), round 3 ~9 s, SuperLink restart and resumed round 3 ~48 s."""
    ref = tiny_args(tmp_path / "ref", bert_dir, glue_dir, rounds=1, aggregator="flora_na")
    train.main(ref)
    got = dataclasses.replace(ref, out=str(tmp_path / "flower"), rounds=3)
    out = tmp_path / "flower"
    config = run_config(got, **{"round-timeout": 120, "min-clients": 2,
                                "fraction-evaluate": 1.0, "evaluate-every": 3})
    task, data = train.load_data(ref)                 # client 0 holds its own data
    part0 = client_work.partition(data.labels, 3, ref)[0]
    own = write_own_data(tmp_path / "client0", glue_dir, [data.train[i] for i in part0])
    phases, t0 = {}, time.monotonic()
    with LocalFederation(tmp_path / "fed") as fed:
        fed.start_superlink()
        nodes = [fed.start_supernode(0, 3, data_dir=str(own), own_data=True)] + [
            fed.start_supernode(u, 3) for u in (1, 2)]
        first = fed.submit(config, name="run1")
        rows_when(out, 1, first)
        phases["start, round 1"] = time.monotonic() - t0
        nodes[2].kill()                             # lost in round 2
        rows_when(out, 2, first)
        phases["round 2 (a node lost)"] = time.monotonic() - t0 - sum(phases.values())
        nodes[1].terminate()                        # stopped before round 3 reaches it
        first.wait(300)
        outcome1 = fed.outcome("run1", first.returncode)
        phases["round 3 fails"] = time.monotonic() - t0 - sum(phases.values())
        fed.restart_superlink()
        nodes += [fed.start_supernode(u, 3) for u in (1, 2)]
        second = fed.run({**config, "resume": True}, name="run2")
        phases["restart, resumed round 3"] = time.monotonic() - t0 - sum(phases.values())
        survived = nodes[0].poll() is None
        family = [p.pid for p in fed.procs] + [pid for p in fed.procs for pid in
                                               flower_local._descendants(p.pid) +
                                               flower_local._session(p.pid)]
    log1, log2 = (tmp_path / "fed" / "run1.log").read_text(), second.stdout
    rows = rows_of(out)
    assert [(r["round"], r["clients"], [f["client"] for f in r["failed"]]) for r in rows] == [
        (1, [0, 1, 2], []), (2, [0, 1], [2]), (3, [0, 1, 2], [])], log1[-3000:] + log2[-3000:]
    assert "Node Unavailable" in rows[1]["failed"][0]["error"]
    ref_row = rows_of(tmp_path / "ref")[0]
    assert _close({k: v for k, v in rows[0].items() if k in ref_row and k not in TIMING},
                  {k: v for k, v in ref_row.items() if k not in TIMING})
    assert "round 2: client 2 (node " in log1 and "left out of the round" in log1
    assert "round 2: p renormalised over clients [0, 1]: [0.5, 0.5]" in log1
    assert "round 3: 1 client(s) answered, fewer than min-clients=2" in log1
    assert "Exit Code: 201" in log1 and "Exit Code" not in log2
    # flwr run exits 0 either way (Flower 1.42); the SuperLink's record says what happened
    assert first.returncode == second.returncode == 0
    assert (outcome1.status, second.status) == ("finished:failed", "finished:completed")
    assert "fewer than min-clients=2" in outcome1.details and not outcome1.ok and second.ok
    assert survived
    # federated evaluation after round 3 only (evaluate-every=3): client 0 scores its own
    # dev set, clients 1 and 2 their thirds of the shared one
    assert [r["round"] for r in rows if "federated_eval_metrics" in r] == [3]
    assert rows[2]["federated_eval_clients"] == [0, 1, 2]
    here = federated_eval_in_process(out / "flora_na", config, [0, 1, 2], 3,
                                     {0: {"data-dir": str(own), "own-data": True}})
    assert _close(rows[2]["federated_eval_metrics"], here), (rows[2], here)
    assert here["num-examples"] == 12 + 4 + 4
    assert "[ROUND 2/3]" in log1 and "[ROUND 3/3]" in log2 and "[ROUND 1/" not in log2
    found = re.findall(r"clients \(partition-id: node id\): \{.*?\b0: (\d+)", log1 + log2)
    assert len(found) == 2 and found[0] == found[1]           # the same SuperNode 0
    assert max(rows[1]["client_load_seconds"]) < 0.2 * min(rows[0]["client_load_seconds"])
    model, _ = train.load_global(str(out / "flora_na"))   # the adapter loads as train.py's
    state = torch.load(out / "flora_na" / "state.pt", weights_only=False)
    for name, (A, B) in fl.read_factors(model).items():
        assert torch.equal(A, state["factors"][name][0]) and torch.equal(B, state["factors"][name][1])
    assert not [pid for pid in family if flower_local._alive(pid)]
    print(f"flwr run's exit codes: {first.returncode}, {second.returncode}; rounds (s): "
          f"{[round(r['client_seconds'] + r['server_seconds'], 1) for r in rows]}; phases (s): "
          f"{ {k: round(v, 1) for k, v in phases.items()} }")


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
