"""Clients of different LoRA ranks (issue 13), checked through real peft layers in float64.

A client of rank r_u applies s_u B_u A_u with its own scaling s_u = alpha / r_u. Here every
update is read off a real peft LoRA layer by a forward pass on the identity (layer(I) -
base(I) = the update, transposed), so the scalings are peft's own, not this code's. The
oracle: M = sum_u p_u (update of client u), and what the global model and each client apply
after the server step, all dense float64.
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import flora_na as fl
import train
from harness import federation, models
from test_train import (Killed, adapter_tensors, bert_args, bert_dir, glue_dir,  # noqa: F401
                        load_state, no_training, rows_of, run_killed_in_round_2, tensors_equal,
                        without_timing)

RANK, ALPHA = 4, 3.0                 # global rank 4, scaling 0.75; clients 1.5 .. 3: all differ
CLIENT_RANKS = [1, 2, 4, 2]
MIXED = [n for n, a in fl.AGGREGATORS.items() if a.mixed_ranks]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bert():
    """A 2-layer BERT classifier with LoRA (rank RANK, alpha ALPHA) on query and value, float64,
    dropout off."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=12, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=16)
    base = transformers.BertForSequenceClassification(config).double()
    return models.add_lora(base, RANK, ALPHA, dropout=0.0, head_modules=[]).eval()


@torch.no_grad()
def applied(model) -> dict[str, torch.Tensor]:
    """{layer: the update its LoRA adds to W (d, k)}, by a forward pass through peft."""
    out = {}
    for name, m in fl.lora_layers(model).items():
        eye = torch.eye(m.in_features, dtype=torch.float64)
        out[name] = (m(eye) - m.get_base_layer()(eye)).T
    return out


@torch.no_grad()
def client_round(model, p, shared_A: dict | None = None):
    """Random factors for each client at its rank: (uploads, the update each applies); with
    shared_A {layer: global A}, client u's A is its first r_u rows (RoLoRA's round on B)."""
    g = torch.Generator().manual_seed(1)
    uploads, updates = [], []
    for r in CLIENT_RANKS:
        models.set_rank(model, r)
        factors = {n: (shared_A[n][:r] if shared_A else
                       torch.randn(r, m.in_features, generator=g, dtype=torch.float64),
                       torch.randn(m.out_features, r, generator=g, dtype=torch.float64))
                   for n, m in fl.lora_layers(model).items()}
        fl.write_factors(model, factors)
        uploads.append({n: (A.float(), B.float()) for n, (A, B) in factors.items()})
        updates.append(applied(model))
    models.set_rank(model, RANK)
    return uploads, updates


def test_set_rank_builds_peft_layers_of_that_rank_and_scaling():
    model = tiny_bert()
    for r in (1, 3, RANK):
        models.set_rank(model, r)
        assert models.lora_rank(model) == r
        for m in fl.lora_layers(model).values():
            assert m.lora_A["default"].weight.shape[0] == r == m.lora_B["default"].weight.shape[1]
            assert m.scaling["default"] == ALPHA / r
            assert m.lora_A["default"].weight.requires_grad
            assert m.lora_A["default"].weight.dtype == torch.float64
    assert train.rank_scales(model, [1, 2, 4]) == {1: 4.0, 2: 2.0, 4: 1.0}
    assert models.lora_rank(model) == RANK


@pytest.mark.parametrize("name", MIXED)
def test_mixed_rank_server_step_through_real_peft_layers(name):
    model = tiny_bert()
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    trains = train.trained(fl.AGGREGATORS[name], 0)
    previous = {n: (A.double(), B.double()) for n, (A, B) in fl.read_factors(model).items()}
    uploads, updates = client_round(model, p, None if "A" in trains else
                                    {n: A for n, (A, _) in previous.items()})
    M = {n: sum(w * up[n] for w, up in zip(p.tolist(), updates)) for n in updates[0]}
    scales = train.rank_scales(model, CLIENT_RANKS)
    update = federation.server_step(uploads, p, name, scales=[scales[r] for r in CLIENT_RANKS],
                                    rank=RANK, previous=previous, trains=trains)
    base = {n: m.get_base_layer().weight.clone() for n, m in fl.lora_layers(model).items()}
    if update.base_delta:
        fl.add_to_base(model, {n: d.double() for n, d in update.base_delta.items()})
    if update.factors is None:                          # FLoRA: merged, LoRA restarts at 0
        fl.write_factors(model, {n: (A, torch.zeros_like(B)) for n, (A, B) in
                                 fl.read_factors(model).items()})
    else:
        fl.write_factors(model, update.factors)
    got = {n: applied(model)[n] + (m.get_base_layer().weight - base[n])
           for n, m in fl.lora_layers(model).items()}
    for n in M:
        norm_M = M[n].norm()
        div = (M[n] - got[n]).norm()
        reported = update.divergence[n]
        # every reported divergence is that of the update the global model really applies
        assert reported["aggregate"] / reported["norm_M"] == pytest.approx(
            (div / norm_M).item(), rel=1e-5, abs=1e-6)
        zero_pad = reported["naive"] / reported["norm_M"]
        tail = torch.linalg.svdvals(M[n])[RANK:].square().sum().sqrt() / norm_M
        if name in ("flora", "rolora"):                 # exact, whatever the ranks (RoLoRA:
            assert div <= 1e-6 * norm_M                 # about the shared frozen factor)
        elif name == "flexlora":
            assert (div / norm_M).item() == pytest.approx(tail.item(), abs=1e-6)
        elif name == "fedit":                           # zero-padding: what naive reports
            assert (div / norm_M).item() == pytest.approx(zero_pad, rel=1e-5)
        else:                                           # FLoRA-NA: never worse than it
            assert (div / norm_M).item() <= zero_pad + 1e-6
        if name != "flora":                             # a rank-R pair: Eckart-Young
            assert (div / norm_M).item() >= tail.item() - 1e-6
    if update.factors is None:
        return
    # each client's share, loaded into a real layer of its own rank, applies the global
    # update's first r_u components (its truncation), as reported for that rank
    for r in sorted(set(CLIENT_RANKS)):
        truncated = {n: (A.clone(), B.clone()) for n, (A, B) in update.factors.items()}
        for A, B in truncated.values():
            A[r:], B[:, r:] = 0, 0
        models.set_rank(model, RANK)
        fl.write_factors(model, truncated)
        want = applied(model)
        models.set_rank(model, r)
        fl.write_factors(model, federation.to_client(update.factors, r, scales[r]))
        for n, delta in applied(model).items():
            torch.testing.assert_close(delta, want[n], rtol=1e-6, atol=1e-7 * want[n].norm())
            if r < RANK:
                rel = update.divergence[n][f"client_r{r}"] / update.divergence[n]["norm_M"]
                assert rel == pytest.approx(((M[n] - delta).norm() / M[n].norm()).item(),
                                            rel=1e-5, abs=1e-6)


def test_equal_rank_methods_refuse_mixed_ranks_in_the_server_step():
    model = tiny_bert()
    uploads, _ = client_round(model, None)
    for name in (n for n in fl.AGGREGATORS if n not in MIXED):
        with pytest.raises(ValueError, match="global rank"):
            federation.server_step(uploads, torch.ones(4), name, rank=RANK)


@pytest.mark.parametrize("profile", federation.RANK_PROFILES)
def test_rank_profiles_are_seeded_and_use_the_ladder(profile):
    ranks = federation.client_ranks(40, 16, seed=3, profile=profile)
    assert ranks == federation.client_ranks(40, 16, seed=3, profile=profile)
    assert set(ranks) <= {2, 4, 8, 16} and len(ranks) == 40
    counts = [ranks.count(r) for r in (2, 4, 8, 16)]
    if profile == "uniform":
        assert counts == [10, 10, 10, 10]
    if profile == "heavy_tail":                  # 8/15, 4/15, 2/15, 1/15 of 40, as quantiles
        assert counts == [21, 11, 5, 3]
    assert federation.client_ranks(8, 16, 0, profile="heavy_tail").count(16) == 1


def test_client_ranks_cycle_and_reject_bad_values():
    assert federation.client_ranks(5, 8, 0, ranks=[2, 8]) == [2, 8, 2, 8, 2]
    assert federation.client_ranks(3, 8, 0) == [8, 8, 8]
    with pytest.raises(ValueError, match="1..8"):
        federation.client_ranks(3, 8, 0, ranks=[4, 16])
    with pytest.raises(ValueError, match="not both"):
        federation.client_ranks(3, 8, 0, ranks=[4], profile="uniform")
    with pytest.raises(ValueError, match="unknown rank profile"):
        federation.client_ranks(3, 8, 0, profile="pareto")


# --- the harness: train.py with clients of different ranks

BAD = {  # Args changes -> message; each must fail before anything is written
    "not integers": (dict(client_ranks="2,x"), "--client-ranks must be comma-separated integers"),
    "above the global rank": (dict(client_ranks="1,4"), r"client ranks must be in 1..2"),
    "zero": (dict(client_ranks="0,2"), r"client ranks must be in 1..2"),
    "both": (dict(client_ranks="1", rank_profile="uniform"), "not both"),
    "unknown profile": (dict(rank_profile="pareto"), "unknown rank profile 'pareto'"),
    "equal-rank aggregator": (dict(client_ranks="1,2", aggregator="fedit,fedex,ffa"),
                              "fedex, ffa need every client at the global rank; with mixed "
                              "client ranks use fedit, flora, flexlora, rolora, flora_na"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_rank_options_fail_before_anything_is_written(tmp_path, no_training, bert_dir,
                                                          glue_dir, case):
    changes, pattern = BAD[case]
    with pytest.raises(ValueError, match=pattern):
        train.main(bert_args(tmp_path / "run", bert_dir, glue_dir, **changes))
    assert not (tmp_path / "run").exists()


def mixed_args(out, bert_dir, glue_dir, **kw):
    """3 clients at ranks 1, 2, 1 (global rank 2), 3 rounds, 2 of 3 clients per round."""
    return bert_args(out, bert_dir, glue_dir, aggregator="all", client_ranks="1,2", rounds=3,
                     participation=0.67, eval_every=2, **kw)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, bert_dir, glue_dir):
    out = tmp_path_factory.mktemp("mixed") / "run"
    return out, train.main(mixed_args(out, bert_dir, glue_dir))


def test_all_means_the_mixed_rank_aggregators_and_they_train(mixed_run):
    out, log = mixed_run
    assert [r["aggregator"] for r in log if r["round"] == 1] == MIXED
    config = json.loads((out / "config.json").read_text())
    assert config["facts"]["client_ranks"] == [1, 2, 1]
    for row in log:
        div = row["divergence"]["relative_mean"]
        assert {"naive", "aggregate", "bound", "bound_r1"} <= div.keys()
        if row["aggregator"] != "flora":            # a pair: what a rank-1 client applies
            assert div["client_r1"] >= div["bound_r1"] - 1e-6
        # bytes: every client at its own rank (rank-1 uploads are half a rank-2 one)
    first = {r["aggregator"]: r for r in log if r["round"] == 1}
    layers = 4                                       # 2 BERT layers x (query, value), 32 x 32
    rank_1, rank_2 = layers * 1 * 64 * 4, layers * 2 * 64 * 4
    chosen = first["fedit"]["clients"]
    up = sum(rank_1 if [1, 2, 1][u] == 1 else rank_2 for u in chosen)
    for name in ("fedit", "flexlora", "flora_na"):
        assert first[name]["bytes_up"] == up and first[name]["bytes_down"] == up
    for name in MIXED:                               # the global model is saved at rank 2
        state = load_state(out / name)
        assert all(A.shape[0] == 2 for A, _ in state["factors"].values())
        model, _ = train.load_global(str(out / name))
        assert models.lora_rank(model) == 2


def test_mixed_rank_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, bert_dir,
                                                       glue_dir, mixed_run):
    uninterrupted, _ = mixed_run
    out = tmp_path / "run"
    args = mixed_args(out, bert_dir, glue_dir)
    run_killed_in_round_2(monkeypatch, lambda: train.main(args), "flora_na")
    train.main(mixed_args(out, bert_dir, glue_dir, resume=True))
    assert without_timing(rows_of(out)) == without_timing(rows_of(uninterrupted))
    for name in MIXED:
        assert tensors_equal(adapter_tensors(out / name), adapter_tensors(uninterrupted / name))


# --- the report's section (stage 7), on run folders written by hand

def test_report_section_for_mixed_ranks(tmp_path):
    from evidence import report_common, report_mixed_ranks
    from report_runs import REGISTRY, config, rows, write_run
    mixed = dict(rank=16, rank_profile="heavy_tail", clients=4)

    def div(aggregate):
        mean = {"naive": 0.2, "aggregate": aggregate, "bound": 0.05, "bound_r2": 0.3,
                "client_r2": aggregate + 0.3}
        return {"relative_mean": mean, "relative_per_layer": {"layer.0": mean}}

    registry = {n: {**info, "mixed_ranks": n in ("fedit", "flora_na")}
                for n, info in REGISTRY.items()}
    for seed, (fedit_acc, ours_acc) in enumerate([(0.70, 0.74), (0.72, 0.78)]):
        cfg = config(seed=seed, registry=registry, **mixed)
        cfg["facts"]["client_ranks"] = [2, 2, 4, 16]
        write_run(tmp_path, "mixed_ranks", f"heavy_tail_seed{seed}", cfg,
                  rows("fedit", {2: 0.6, 4: fedit_acc}, div=div(0.2))
                  + rows("flora_na", {2: 0.6, 4: ours_acc}, div=div(0.1)))
        ref = config(seed=seed, rank=2, clients=4, aggregator="fedit")
        ref["facts"]["client_ranks"] = [2, 2, 2, 2]
        write_run(tmp_path, "mixed_ranks", f"equal_rank2_seed{seed}", ref,
                  rows("fedit", {2: 0.6, 4: 0.65}, div=div(0.2)))
    names = report_common.Names.of(report_common.load_runs(str(tmp_path), "mixed_ranks"),
                                   "flora_na", "fedit")
    md = report_mixed_ranks.mixed_ranks_section(str(tmp_path), str(tmp_path), names)
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert "2 x rank 2, 1 x rank 4, 1 x rank 16 per run" in md
    assert "Unfinished" not in md          # 'all' with mixed ranks: only those that accept them
    assert lines["FedIT (mixed ranks)"] == ("| FedIT (mixed ranks) | 0.710 ± 0.014 | 0.710 ± 0.014 "
                                            "| 2.00 | 0.200 | 0.200 | 0.050 | 0.500 | 0.300 |")
    assert lines["**FLoRA-NA** (mixed ranks)"].startswith(
        "| **FLoRA-NA** (mixed ranks) | 0.760 ± 0.028 | 0.760 ± 0.028 | 2.00 | 0.100 |")
    assert lines["FedIT, all rank 2"].startswith("| FedIT, all rank 2 | 0.650 ± 0.000 |")
    assert [k for k in lines if k != "aggregator"] == ["FedIT (mixed ranks)", "**FLoRA-NA** (mixed ranks)", "FedIT, all rank 2"]
    assert (tmp_path / "mixed_ranks.png").stat().st_size > 0


def test_a_run_from_before_an_option_existed_resumes_at_its_default(tmp_path, bert_dir,
                                                                    glue_dir):
    """A run started before --client-ranks existed has no such key in config.json: it resumes
    at the option's default, and refuses another value."""
    train.main(bert_args(tmp_path / "run", bert_dir, glue_dir, rounds=1))
    path = tmp_path / "run" / "config.json"
    config = json.loads(path.read_text())
    del config["client_ranks"]
    path.write_text(json.dumps(config))
    train.main(bert_args(tmp_path / "run", bert_dir, glue_dir, rounds=1, resume=True))
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'client_ranks': \(None, '1,2'\)"):
        train.main(bert_args(tmp_path / "run", bert_dir, glue_dir, rounds=1, resume=True,
                             client_ranks="1,2"))
