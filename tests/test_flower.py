"""Tests for the Flower app (flower_app/): its run config is train.py's options, arrays travel
exactly, a Flower simulation resumes a killed train.py run and gives train.py's results for
one aggregator of every path through the app (and with upload and download codecs on), and a
real local deployment (one SuperLink, three SuperNodes, separate processes) in which one
client fails every round gives train.py's 2-client FLoRA-NA run: the failing client is left
out with p renormalised and the failure logged.

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
              if f.name != "clients"}
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
        # "uncompressed" (the divergence against the clients' factors before an upload codec):
        # train.py's rows only (a resumed run's rows before Flower too), since a Flower server
        # never sees the factors a client encodes
        for row in (r, g):
            row["divergence"].pop("uncompressed", None)
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
               if f.name not in wire.FROM_NODES}
    assert set(config) == set(options) | set(wire.APP_KEYS)
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
    factors, head and frozen weights travel as one flat array of bytes and a layout, bit for
    bit, a codec's integers at their own size; non-numeric arrays and records that pack did
    not make are refused."""
    import numpy as np
    from flwr.app import Array, ArrayRecord
    from flora_na_app import packing
    g = np.random.default_rng(0)
    arrays = {"A/l0": g.standard_normal((2, 8)).astype(np.float32),
              "B/l0": g.standard_normal((6, 2)).astype(np.float32),
              "head/bias": np.float32([np.nan, -0.0, np.inf]),
              "W/empty": np.zeros((0, 3), np.float32),
              "P/l0.A/values/int8": np.int8([[-7, 7], [0, 1]]),
              "P/l0.A/indices/int32": np.int32([3, 2 ** 31 - 1]),
              "P/l0.A/scales/float16": np.float16([0.5])}   # 64 + 48 + 12 + 4 + 8 + 2 bytes
    record = packing.pack(arrays)
    assert record["packed"].numpy().nbytes == sum(a.nbytes for a in arrays.values()) == 138
    assert list(record.keys()) == ["packed", "layout"]
    got = packing.unpack(record)
    assert list(got) == list(arrays)
    for k in arrays:
        assert got[k].dtype == arrays[k].dtype and got[k].shape == arrays[k].shape
        assert got[k].tobytes() == arrays[k].tobytes()
    assert packing.unpack(packing.pack({})) == {}
    with pytest.raises(ValueError, match="numeric arrays only, got {'x': 'object'}"):
        packing.pack({"x": np.array([None])})
    with pytest.raises(ValueError, match="expected a packed ArrayRecord"):
        packing.unpack(ArrayRecord({"A/l0": Array(arrays["A/l0"])}))


@pytest.mark.parametrize("name", ["int4", "bf16", "topk"])
def test_a_coded_upload_travels_as_its_payload(name):
    """A client's coded upload (client_work.encode_upload: train.encode_up's payloads) goes
    through the wire and the server's decode (train.decode_up) to what train.py's send_up
    gives, bit for bit and at its byte count: the packed message holds the payload's bytes
    (values, scales, indices at their dtypes) plus the uncounted shapes, the factors that do
    not travel (here B) and the head as float32, and topk's residuals (in `keep` and in the
    reply, for state.pt); a payload field beside the codec's own (the rounding variance)
    travels too."""
    import numpy as np
    from flora_na_app import packing
    from harness import codecs
    g = torch.Generator().manual_seed(1)
    upload = {"l0.q": (torch.randn(2, 40, generator=g), torch.randn(30, 2, generator=g)),
              "l1.v": (torch.randn(2, 9, generator=g), torch.randn(7, 2, generator=g))}
    head = {"classifier.bias": torch.randn(2, generator=g)}
    codec = codecs.Codec(name, block=16, fraction=0.25)
    want, want_bytes = train.send_up(upload, codec, "A", seed=5, round_=1, u=2,
                                     feedback={} if name == "topk" else None)
    keep = {}
    arrays = client_work.encode_upload(upload, head, codec, "A", {}, {}, keep, name="fedsa",
                                       seed=5, round_=1, u=2, feedback_kept=False)
    record = packing.pack(arrays)
    coded = sum(a.nbytes for k, a in arrays.items() if k.startswith("P/") and "/shape/" not in k)
    assert coded == want_bytes
    residuals = (2 * 40 + 2 * 9) * 4 if name == "topk" else 0
    assert record["packed"].numpy().nbytes == (want_bytes + 2 * 2 * 8 + (30 * 2 + 7 * 2) * 4
                                               + 2 * 4 + residuals)
    got = wire.from_record(record)
    upload_got, nbytes, _ = train.decode_up(got["P"], codec, {
        layer: (got["A"].get(layer), got["B"].get(layer)) for layer in upload})
    assert nbytes == want_bytes and upload_got.keys() == want.keys()
    for layer in want:
        for x, y in zip(upload_got[layer], want[layer]):
            assert x.dtype == y.dtype and torch.equal(x, y)
    assert torch.equal(got["head"]["classifier.bias"], head["classifier.bias"])
    if name == "topk":              # the residual kept on the node, and sent for state.pt
        assert set(keep["feedback-up/fedsa"]) == set(got["F"]) == {"l0.q.A", "l1.v.A"}
        for key, f in got["F"].items():
            assert np.array_equal(keep["feedback-up/fedsa"][key], f["residual"].numpy())
        # the next round from the kept residual is send_up's with its feedback carried on
        feedback = {k: {"residual": v["residual"].clone()} for k, v in got["F"].items()}
        want2, _ = train.send_up(upload, codec, "A", seed=5, round_=2, u=2, feedback=feedback)
        kept = {"feedback-up/fedsa": keep["feedback-up/fedsa"]}
        got2 = wire.from_record(packing.pack(client_work.encode_upload(
            upload, head, codec, "A", {}, kept, {}, name="fedsa", seed=5, round_=2, u=2,
            feedback_kept=True)))
        upload2, _, _ = train.decode_up(got2["P"], codec, {l: (None, upload[l][1]) for l in upload})
        assert all(torch.equal(upload2[l][0], want2[l][0]) for l in upload)
        with pytest.raises(ValueError, match="holds none .was the SuperNode restarted"):
            client_work.encode_upload(upload, head, codec, "A", {}, {}, {}, name="fedsa",
                                      seed=5, round_=2, u=2, feedback_kept=True)
    if codec.stochastic:            # any field of a payload travels: here the variance sums
        payloads = train.encode_up(upload, codec, "AB", seed=5, round_=1, u=2, variance=True)
        sent = wire.from_record(packing.pack(wire.to_arrays(coded=payloads)))["P"]
        _, nbytes, variances = train.decode_up(sent, codec, {l: (None, None) for l in upload})
        for layer in upload:
            for part, v in zip("AB", variances[layer]):
                assert torch.equal(v, payloads[f"{layer}.{part}"]["variance"])
        assert variances["l0.q"][0].shape == (2,) and variances["l0.q"][1].shape == (2,)
        assert nbytes == sum(codecs.payload_bytes(x) for x in payloads.values())
    with pytest.raises(ValueError, match="expected P/<name>/<field>/<torch dtype>"):
        wire.split({"P/l0.q.A/values/Tensor": np.zeros(1, np.float32)})


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


def test_simulation_with_codecs_equals_train_py(tmp_path, monkeypatch, bert_dir, glue_dir):
    """Codecs through the app, against train.py's runs with the same options: (1) int4
    uploads with stochastic rounding (each client's generator seeded as train.py seeds it) and
    their variance sums (FLoRA-NA's noise-aware Gram), int8 downloads, FedSA-LoRA (its B kept
    on the node, A coded) and FLoRA-NA, 2 rounds, all in Flower; (2) top-k uploads and downloads with error feedback, killed in train.py in
    FedSA-LoRA's round 2 and resumed in Flower: FedSA-LoRA's clients get their residuals from
    state.pt with their first message, then keep them in context.state (round 3); FLoRA-NA's
    keep theirs over its 3 rounds. Same rows (bytes up and down included) and adapters as the
    uninterrupted train.py runs; the codecs in config.json as train.py writes it."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    runs = {"int4": dict(upload_codec="int4", download_codec="int8", codec_block=16, rounds=2,
                         upload_variance=True),
            "topk": dict(upload_codec="topk", download_codec="topk", topk_fraction=0.3,
                         rounds=3)}
    configs = {}
    for run, codec in runs.items():
        gram = ["flora_na.gram_correction=noise_aware"] if codec.get("upload_variance") else []
        ref = tiny_args(tmp_path / f"ref-{run}", bert_dir, glue_dir, aggregator="fedsa,flora_na",
                        participation=0.67, agg_option=[*gram, "flora_na.steps=20"], **codec)
        train.main(ref)
        got = dataclasses.replace(ref, out=str(tmp_path / f"flower-{run}"))
        if run == "topk":
            run_killed_in_round_2(monkeypatch, lambda: train.main(got))
            assert [(r["aggregator"], r["round"]) for r in rows_of(Path(got.out))] == [("fedsa", 1)]
        configs[run] = run_config(got, resume=run == "topk")
    with LocalFederation(tmp_path / "fed") as fed:
        fed.start_superlink(simulation=True)
        done, seconds = {}, {}
        for run, config in configs.items():
            t0 = time.monotonic()
            done[run] = fed.run(config, {"num-supernodes": 3}, name=run)
            seconds[run] = round(time.monotonic() - t0, 1)
    for run, codec in runs.items():
        ref, got = tmp_path / f"ref-{run}", tmp_path / f"flower-{run}"
        assert done[run].ok, (run, done[run].status, done[run].details, done[run].stdout[-3000:])
        rows = rows_of(got)
        assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows)
        assert_same_run(ref, got, ["fedsa", "flora_na"])
        config, want = (json.loads((folder / "config.json").read_text()) for folder in (got, ref))
        for c in (config, want):   # facts list the registered aggregators: tests add plug-ins
            c["facts"]["aggregators"] = {k: v for k, v in c["facts"]["aggregators"].items()
                                         if k in ("fedsa", "flora_na")}
        assert config == want and {k: config[k] for k in codec} == codec
    # topk: the residuals in state.pt are train.py's (what a further resume would send)
    for name in ("fedsa", "flora_na"):
        want = torch.load(tmp_path / "ref-topk" / name / "state.pt", weights_only=False)
        have = torch.load(tmp_path / "flower-topk" / name / "state.pt", weights_only=False)
        for key in ("feedback_up", "feedback_down"):
            torch.testing.assert_close(have[key], want[key])
    print(f"flwr run seconds: {seconds}")


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


# ---------------------------------------------------------------------------------------------
# Client-level DP (run config dp, train.py's --dp) and Flower's own DP wrappers and mods
# ---------------------------------------------------------------------------------------------


def test_dp_in_a_simulation_equals_train_py(tmp_path, bert_dir, glue_dir):
    """The run config's dp goes through train.py's own code (dp_upload on the client: the
    clipping, and local DP's noise; round_weights, dp_reclip and dp_noise on the server): a simulation
    of 2 of 3 clients per round with central DP gives train.py's rows (epsilon and the
    clients' change norms included) and adapters. One simulation (~60 s): local DP differs
    only in dp_upload's noise, drawn by the same call on the client."""
    dp, names = "central", "fedsa,ffa"
    ref = tiny_args(tmp_path / "ref", bert_dir, glue_dir, aggregator=names, participation=0.67,
                    dp=dp, dp_clip=0.05, dp_noise=2.0, dp_delta=1e-3)
    train.main(ref)
    got = dataclasses.replace(ref, out=str(tmp_path / "flower"))
    with LocalFederation(tmp_path / "fed") as fed:
        fed.start_superlink(simulation=True)
        done = fed.run(run_config(got), {"num-supernodes": 3})
    assert done.ok and done.status == "finished:completed", (done.status, done.stdout[-3000:])
    assert_same_run(tmp_path / "ref", tmp_path / "flower", names.split(","))
    rows = rows_of(tmp_path / "flower")
    assert all(r["epsilon"] > 0 and len(r["dp_norms"]) == 2 for r in rows)


def test_flowers_dp_wrappers_and_mods_are_refused(task_identity):
    """Flower's DP strategy wrapper around the app's strategy (it would skip aggregation or
    noise nothing of this app's factors) stops at its first configure_train with a message
    that names the run config's dp; Flower's DP mods on the ClientApp are refused at load."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.clientapp import ClientApp
    from flwr.clientapp.mod import LocalDpMod, arrays_size_mod, fixedclipping_mod
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
    from flora_na_app import client_app, server_app
    inner = server_app.RegistryStrategy.__new__(server_app.RegistryStrategy)
    inner.driving, inner.state = False, {"round": 0}     # as __init__ leaves them
    wrapped = DifferentialPrivacyClientSideFixedClipping(inner, 1.0, 1.0, 3)
    with pytest.raises(RuntimeError, match=r"driven by another strategy's start .* dp = "
                                           r"\"central\" or \"local\""):
        list(wrapped.configure_train(1, ArrayRecord(), ConfigRecord(), None))
    client_app.refuse_flower_dp_mods(ClientApp(mods=[arrays_size_mod]))   # not DP: fine
    for mod in (fixedclipping_mod, LocalDpMod(1.0, 1.0, 1.0, 1e-5)):
        with pytest.raises(ValueError, match="Flower's DP mods .* set the run config's dp"):
            client_app.refuse_flower_dp_mods(ClientApp(mods=[mod]))
