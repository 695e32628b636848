"""Tests for harness/federation.py and the registry protocol of flora_na.py: exact divergences
against a dense float64 oracle at small drifts, the typed server step, each registry flag
against what its aggregator does, and no aggregator named outside the registry."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import flora_na as fl
from harness import federation

ROOT = Path(__file__).resolve().parents[1]
f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def drifted(seed: int, drift: float, L=2, U=4, r=3, d=12, k=10):
    """Float32 client factors = a shared base + drift * noise (what one round produces), p."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(L, 1, r, k, generator=g, dtype=f64) + drift * torch.randn(L, U, r, k, generator=g, dtype=f64)
    B = torch.randn(L, 1, d, r, generator=g, dtype=f64) + drift * torch.randn(L, U, d, r, generator=g, dtype=f64)
    p = torch.rand(U, generator=g, dtype=f64) + 0.1
    return [A[:, u].float() for u in range(U)], [B[:, u].float() for u in range(U)], p / p.sum()


def dense(A, B, p):
    """M and FedIT's (sum p B)(sum p A), by explicit float64 loops over clients."""
    M = sum(w * b.double() @ a.double() for w, a, b in zip(p.tolist(), A, B))
    naive = (sum(w * b.double() for w, b in zip(p.tolist(), B))
             @ sum(w * a.double() for w, a in zip(p.tolist(), A)))
    return M, naive


@pytest.mark.parametrize("drift", [1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
@pytest.mark.parametrize("name", ["fedit", "flora_na", "lora_fair", "flexlora", "fedex", "flora"])
def test_exact_divergences_match_a_dense_float64_oracle_at_small_drifts(name, drift):
    """Every reported number within 1e-6 of the dense value plus 1e-14 ||M||, down to
    divergences of 1e-12 ||M|| (FedIT's error is second order in the drift)."""
    A, B, p = drifted(0, drift)
    agg = fl.AGGREGATORS[name].aggregate(A, B, p)
    got = federation.exact_divergences(A, B, p, agg)
    M, naive = dense(A, B, p)
    eff = (agg.B.double() @ agg.A.double() if agg.A is not None else 0) + (
        agg.base_delta.double() if agg.base_delta is not None else 0)
    norm_M = M.flatten(1).norm(dim=1)
    want = {"norm_M": norm_M, "naive": (M - naive).flatten(1).norm(dim=1),
            "aggregate": (M - eff).flatten(1).norm(dim=1),
            "bound": torch.linalg.svdvals(M)[:, A[0].shape[1]:].square().sum(-1).sqrt()}
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-14 * norm_M.max().item(),
                                   msg=key)


def test_the_gram_expansion_cannot_resolve_what_the_qr_reports():
    """Why the harness reports from a QR: at drift 1e-5 the Gram expansion of FedIT's
    divergence is off by more than the value itself; the QR stays within 1e-6."""
    A, B, p = drifted(1, 1e-5)
    M, naive = dense(A, B, p)
    truth = (M - naive).flatten(1).norm(dim=1)
    gram = fl.divergence(torch.stack(A, 1), torch.stack(B, 1), p, p, p)
    exact = federation.exact_divergences(A, B, p, fl.fedit(A, B, p))["naive"]
    assert ((gram - truth).abs() > truth).any()
    torch.testing.assert_close(exact, truth, rtol=1e-6, atol=0)


def factors_of(A, B, names=("q", "v")) -> list[dict]:
    """Per client {layer: (A, B)} dicts from U x (L, ...) lists, L = len(names)."""
    return [{n: (a[i], b[i]) for i, n in enumerate(names)} for a, b in zip(A, B)]


@pytest.mark.parametrize("name", [n for n, a in fl.AGGREGATORS.items()   # plug-ins: own tests
                                  if a.aggregate.__module__ == "flora_na"])
def test_server_step_follows_the_registry_entry(name):
    """The typed RoundUpdate: factors None exactly when the entry restarts LoRA, a base delta
    exactly when it folds into W, the registry's aggregate per layer, divergences per layer."""
    entry = fl.AGGREGATORS[name]
    A, B, p = drifted(2, 1e-2)
    if "A" not in entry.trains[0]:                          # FFA-LoRA, RoLoRA: one shared A
        A = [A[0]] * len(A)
    if "B" not in entry.trains[0]:                          # Fed-SB: one shared B
        B = [B[0]] * len(B)
    update = federation.server_step(factors_of(A, B), p, name)
    agg = entry.aggregate(A, B, p)
    assert (update.factors is None) == entry.restart == (agg.A is None)
    assert bool(update.base_delta) == entry.folds_into_base == (agg.base_delta is not None)
    assert (update.bytes_up, update.bytes_down) == (agg.bytes_up, agg.bytes_down)
    for i, layer in enumerate(("q", "v")):
        if update.factors is not None:
            assert torch.equal(update.factors[layer][0], agg.A[i])
            assert torch.equal(update.factors[layer][1], agg.B[i])
        assert set(update.divergence[layer]) == {"naive", "aggregate", "bound", "norm_M"}


def test_server_step_routes_only_the_options_an_entry_declares():
    """One options dict for every aggregator: FLoRA-NA takes its solver options, FedIT ignores
    them, and a wrong value reaches the aggregator that owns it."""
    A, B, p = drifted(3, 1e-2)
    options = {"solver": "adamw", "steps": 5, "lr": 1e-2, "tie_layers": False, "fair_lambda": 0.5}
    federation.server_step(factors_of(A, B), p, "fedit", options)
    with_adamw = federation.server_step(factors_of(A, B), p, "flora_na", options)
    res = fl.solve_flora_na(torch.stack(A, 1), torch.stack(B, 1), p, solver="adamw", steps=5)
    assert torch.equal(with_adamw.factors["q"][0], res.A_hat[0])
    with pytest.raises(ValueError, match="unknown solver"):
        federation.server_step(factors_of(A, B), p, "flora_na", {**options, "solver": "nope"})
    with pytest.raises(ValueError, match="unknown aggregator"):
        federation.server_step(factors_of(A, B), p, "nope")


def test_solver_tracking_measures_every_variant_against_the_data_weighted_update():
    """--track-solvers' columns, per layer, against dense float64 products: each variant is
    ||M_p - B_hat A_hat|| with M_p = sum_u p_u B_u A_u, whatever weights the variant fitted;
    per-layer data-weighted variants lie between the bound and FedIT, the tied one's sum of
    squares is at most FedIT's and at least the per-layer optimum's, and the uniform-target
    variants are the solver run on 1/U, measured against M_p (so they can be worse than FedIT
    when client sizes are skewed)."""
    A, B, p = drifted(5, 3e-1, L=3, U=4)
    p = torch.tensor([0.55, 0.25, 0.15, 0.05], dtype=f64)                 # skewed sizes
    got = federation.solver_divergences(factors_of(A, B, ("q", "k", "v")), p)
    assert all(set(v) == set(federation.TRACKED_VARIANTS) for v in got.values())
    M, naive = dense(A, B, p)
    naive = (M - naive).flatten(1).norm(dim=1)                                   # (L,)
    bound = torch.linalg.svdvals(M)[:, A[0].shape[1]:].square().sum(-1).sqrt()  # (L,)
    col = lambda key: torch.tensor([got[n][key] for n in ("q", "k", "v")], dtype=f64)  # noqa: E731
    for key, (solver, tie, target) in federation.TRACKED_VARIANTS.items():
        w = p if target == "data" else torch.full((4,), 0.25, dtype=f64)
        res = fl.solve_flora_na(torch.stack(A, 1), torch.stack(B, 1), w, solver=solver,
                                tie_layers=tie)
        want = (M - res.B_hat.double() @ res.A_hat.double()).flatten(1).norm(dim=1)
        torch.testing.assert_close(col(key), want, rtol=1e-6, atol=1e-12, msg=key)
    for key in ("solver_als", "solver_adamw"):
        assert ((bound - 1e-9 <= col(key)) & (col(key) <= naive + 1e-9)).all(), key
    tied, untied = col("solver_als_tied").square().sum(), col("solver_als").square().sum()
    assert untied - 1e-9 <= tied <= naive.square().sum() + 1e-9
    # the uniform fit answers another question: here it is measurably off the data-weighted M
    assert (col("solver_als_uniform") > col("solver_als") * 1.05).all()


def test_mixed_ranks_are_accepted_exactly_where_the_registry_says():
    g = torch.Generator().manual_seed(4)
    A = [torch.randn(1, r, 5, generator=g) for r in (2, 4, 3)]
    B = [torch.randn(1, 6, r, generator=g) for r in (2, 4, 3)]
    A_g, B_g = torch.randn(1, 4, 5, generator=g), torch.randn(1, 6, 4, generator=g)
    for name, entry in fl.AGGREGATORS.items():
        if entry.mixed_ranks:       # RoLoRA: the frozen factor is the global one's first r_u
            frozen = "A" not in entry.trains[0]
            server = {k: v for k, v in {"previous": (A_g, B_g), "trains": entry.trains[0]}.items()
                      if k in entry.options}
            entry.aggregate([A_g[:, :a.shape[1]] for a in A] if frozen else A, B, torch.ones(3),
                            **server)
        else:
            with pytest.raises(ValueError, match="rank"):
                entry.aggregate(A, B, torch.ones(3))


@pytest.mark.parametrize("path", ["train.py", "harness/federation.py", "evidence/report.py",
                                  "flower_app/flora_na_app/server_app.py",
                                  "flower_app/flora_na_app/client_app.py",
                                  "flower_app/flora_na_app/wire.py",
                                  "harness/flower_local.py", "evidence/flower_overhead.py"])
def test_no_aggregator_is_named_outside_the_registry(path):
    """train.py, the server step, the report and the Flower app know aggregators only by the
    registry."""
    names = "|".join(map(re.escape, fl.AGGREGATORS))
    code = [line.split("#")[0] for line in (ROOT / path).read_text().splitlines()]
    hits = [line for line in code if re.search(rf"[\"']({names})[\"']", line)]
    assert hits == [], f"{path} names an aggregator: {hits}"


def test_server_step_passes_the_previous_global_factors_only_to_aggregators_that_declare_them(
        monkeypatch):
    """`previous` reaches an aggregator as the option previous = (A (L, r, k), B (L, d, r)),
    stacked in the layer order of its shape group, only if its registry entry declares it."""
    A, B, p = drifted(0, 1e-2, L=3)
    names = ["layer.0.q", "layer.0.v", "layer.1.q"]
    clients = [{n: (a[i], b[i]) for i, n in enumerate(names)} for a, b in zip(A, B)]
    previous = {n: (A[0][i] * 2, B[0][i] * 3) for i, n in enumerate(names)}
    got = {}

    def strict(A, B, p):                       # no **options: any extra option would raise
        return fl.fedit(A, B, p)

    def wants(A, B, p, previous=None):
        got["previous"] = previous
        return fl.fedit(A, B, p)
    monkeypatch.setitem(fl.AGGREGATORS, "strict", fl.Aggregator(strict, "Strict"))
    monkeypatch.setitem(fl.AGGREGATORS, "wants", fl.Aggregator(wants, "Wants",
                                                               options={"previous": None}))
    federation.server_step(clients, p, "strict", {}, previous=previous)
    federation.server_step(clients, p, "wants", {}, previous=previous)
    A_g, B_g = got["previous"]
    assert torch.equal(A_g, torch.stack([previous[n][0] for n in names]))
    assert torch.equal(B_g, torch.stack([previous[n][1] for n in names]))
    federation.server_step(clients, p, "wants", {})       # no previous given: none passed
    assert got["previous"] is None
