"""Tests for evidence/authors_code.py, the replay of the FLoRA-NA authors' released solver: each
effect it can switch, on toy factors, against what the released code's arithmetic implies, and
against this project's solver of the same objective (flora_na.py's authors variant)."""
from __future__ import annotations

import math

import pytest
import torch

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import Tensor

import flora_na as F
import flora_na as fl
from evidence import authors_variant as AV
from evidence.authors_code import Effects, _sorted_names, replay
from test_flora_na import (combine, dense_M, factors, gram_scale, normalised, round_factors, split,
                           whitened_dense_adamw)

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def toy(seed: int, L: int, scale_A: float, scale_B: float, change: float, K: int = 3, d: int = 16,
        k: int = 16, r: int = 4):
    """Global factors of L layers named as a Llama's (state_dict order: layer 0, 1, .., L - 1),
    K clients = global + change * (noise of the factors' sizes), and sample counts."""
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(L)]
    glob = {n: (scale_A * torch.randn(r, k, generator=g), scale_B * torch.randn(d, r, generator=g))
            for n in names}
    clients = [{n: (A + change * scale_A * torch.randn(r, k, generator=g),
                    B + change * scale_B * torch.randn(d, r, generator=g))
                for n, (A, B) in glob.items()} for _ in range(K)]
    return glob, clients, torch.tensor([50.0, 300.0, 120.0, 80.0][:K])


def stacked(factors, names, i):
    return torch.stack([factors[n][i].double() for n in names])


def test_sorted_names_put_layer_10_before_layer_2():
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(12)]
    order = _sorted_names(names)
    assert order[:4] == [names[0], names[1], names[10], names[11]] and order[4] == names[2]
    assert _sorted_names(names[:11]) != names[:11] and _sorted_names(names[:10]) == names[:10]


@pytest.mark.parametrize("L, mismatched", [(10, False), (11, True), (12, True)])
def test_the_layer_order_pairs_mismatched_layers_from_layer_10_on(L, mismatched):
    """Clients that did not move: the target is the global product itself, so at U = V = 1
    the released code's loss is 0 unless it pairs a layer's global factors with another
    layer's target, which its two orders do once a layer index has two digits (11 or more
    layers), and only then."""
    glob, _, n = toy(0, L, 0.3, 1e-2, 0.0)
    clients = [dict(glob) for _ in range(3)]
    _, keep = replay(glob, clients, n, steps=1)
    _, fixed = replay(glob, clients, n, Effects(layer_order=False), steps=1)
    size = (0.3 * 1e-2) ** 2                    # a product entry's square, roughly
    assert fixed["loss_first"] < 1e-9 * size    # float32 round-off of the mean only
    assert (keep["loss_first"] > 1e-3 * size) == mismatched
    assert (keep["loss_first"] < 1e-9 * size) == (not mismatched)


def test_lora_sized_factors_move_only_by_the_weight_decay():
    """With factors of LoRA's sizes (A ~ 1/sqrt(k), B ~ 1e-3) the loss's gradients are far
    below Adam's eps = 1e-8, so each step moves U, V by ~lr * grad / eps, and the decay's
    factor (1 - lr * 0.01) per step is all that shows: 0.98 after 200 steps. Without the
    decay they stay at 1; the last iterate is then slightly worse than the start."""
    glob, clients, n = toy(1, 4, 1 / 8, 1e-3, 0.1)
    _, info = replay(glob, clients, n)
    assert info["grad_first"] < 1e-10
    decayed = (1 - 1e-2 * 0.01) ** 200
    assert abs(decayed - 0.9802) < 1e-4
    for c in (info["U"], info["V"]):
        assert (c - decayed).abs().max() < 2e-3
    _, no_decay = replay(glob, clients, n, Effects(weight_decay=False))
    for c in (no_decay["U"], no_decay["V"]):
        assert (c - 1).abs().max() < 2e-3
    assert info["loss_last"] > info["loss_first"]
    _, best = replay(glob, clients, n, Effects(last_iterate=False))
    assert best["loss_last"] <= best["loss_first"]


@pytest.mark.parametrize("scale_A, scale_B, effects", [
    (1.0, 1.0, Effects()),                                  # O(1) factors: the code as it is
    (1 / 8, 1e-3, Effects(tiny_loss=False, weight_decay=False)),   # LoRA's sizes, loss O(1)
])
def test_the_code_reaches_the_optimum_of_its_objective_when_gradients_exceed_eps(
        scale_A, scale_B, effects):
    """The released code minimises, tied across all layers, ||mean_u B_u A_u - (B_g + mean_u
    V_u dB_u)(A_g + mean_u U_u dA_u)||^2 / (L d k): flora_na's authors variant (uniform target,
    coefficients U_u / K on the changes, tied) is the same objective, whose optimum this
    project's solver finds. Where the gradients are not below Adam's eps (O(1) factors, or
    LoRA's sizes with the loss scaled to O(1)), the code's AdamW gets there too."""
    L, K, d, k = 4, 3, 16, 16
    glob, clients, n = toy(2, L, scale_A, scale_B, 0.5, K=K, d=d, k=k)
    _, info = replay(glob, clients, n, effects)
    names = list(glob)
    A = torch.stack([torch.stack([c[m][0] for c in clients]) for m in names])   # (L, K, r, k)
    B = torch.stack([torch.stack([c[m][1] for c in clients]) for m in names])
    previous = (stacked(glob, names, 0).float(), stacked(glob, names, 1).float())
    w = torch.full((K,), 1 / K, dtype=f64)
    opt = AV.solve_on_changes(A, B, w, previous, start=w, tie_layers=True, steps=400, path="gram")
    scale = 1.0 if effects.tiny_loss else (
        sum(w[i] * stacked(c, names, 1) @ stacked(c, names, 0) for i, c in enumerate(clients))
        .square().mean().item())
    f_opt = opt.divergence.square().sum().item() / (L * d * k) / scale
    # the same objective at U = V = 1 (the replay's first loss) from flora_na's Gram space
    start = AV.divergence(A, B, w, w, w, previous).square().sum().item()
    assert math.isclose(start / (L * d * k) / scale, info["loss_first"], rel_tol=1e-4)
    assert info["loss_last"] <= f_opt + 1e-4 * (info["loss_first"] - f_opt)


def test_no_steps_is_fedit_and_the_update_applies_data_weights():
    """U = V = 1 applied with n_u / N is FedIT's average, key by key; after the solve the
    update is global + sum_u (n_u / N) U_u (A_u - A_g) (V_u for B), whatever was fitted."""
    glob, clients, n = toy(3, 3, 0.5, 0.5, 0.3)
    p = n / n.sum()
    new, info = replay(glob, clients, n, steps=0)
    assert info["U"].eq(1).all() and info["V"].eq(1).all()
    for name, (A, B) in new.items():
        torch.testing.assert_close(A, sum(w * c[name][0] for w, c in zip(p.float(), clients)))
        torch.testing.assert_close(B, sum(w * c[name][1] for w, c in zip(p.float(), clients)))
    new, info = replay(glob, clients, n, Effects(tiny_loss=False), steps=50)
    assert not info["U"].eq(1).all()
    for name, (A0, B0) in glob.items():
        torch.testing.assert_close(new[name][0], A0 + sum(
            w * u * (c[name][0] - A0) for w, u, c in zip(p.float(), info["U"], clients)))
        torch.testing.assert_close(new[name][1], B0 + sum(
            w * v * (c[name][1] - B0) for w, v, c in zip(p.float(), info["V"], clients)))


def test_the_uniform_target_is_the_mean_and_the_data_target_the_weighted_sum():
    """loss_first at U = V = 1 (a FedIT-like start) against a dense evaluation of both targets."""
    L, K = 3, 3
    glob, clients, n = toy(4, L, 0.5, 0.5, 0.3, K=K)
    names = list(glob)
    p = (n / n.sum()).double()
    A_g, B_g = stacked(glob, names, 0), stacked(glob, names, 1)
    for effects, w in ((Effects(), torch.full((K,), 1 / K, dtype=f64)),
                       (Effects(uniform_target=False), p)):
        _, info = replay(glob, clients, n, effects, steps=1)
        A_hat = A_g + sum(wi * (stacked(c, names, 0) - A_g) for wi, c in zip(w, clients))
        B_hat = B_g + sum(wi * (stacked(c, names, 1) - B_g) for wi, c in zip(w, clients))
        target = sum(wi * stacked(c, names, 1) @ stacked(c, names, 0) for wi, c in zip(w, clients))
        want = (B_hat @ A_hat - target).square().mean().item()
        assert math.isclose(info["loss_first"], want, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------
# The authors' variant (evidence/authors_variant.py) against a dense float64 re-implementation
# of its objective (moved here from test_flora_na.py with the variant)
# ---------------------------------------------------------------------------------------------



def dense_variant_f(A, B, w, P, Q, previous=None) -> Tensor:
    """||M_w - B_hat A_hat||_F^2 per layer (L,), dense float64, differentiable in P and Q:
    M_w = sum_u w_u B_u A_u, and B_hat = sum_u P_u B_u, or with previous = (A_g, B_g)
    B_hat = B_g + sum_u P_u (B_u - B_g) (A_hat likewise)."""
    if previous is None:
        B_hat, A_hat = combine(B, P), combine(A, Q)
    else:
        A_g, B_g = (x.double() for x in previous)
        B_hat = B_g + combine(B.double() - B_g[:, None], P)
        A_hat = A_g + combine(A.double() - A_g[:, None], Q)
    return (dense_M(A, B, w) - B_hat @ A_hat).flatten(1).square().sum(1)


def variant_scale(A, B, w, P, Q, previous=None) -> Tensor:
    """gram_scale for the variant: the size of the terms its Gram expansion subtracts."""
    if previous is None:
        return gram_scale(A, B, w, P, Q)
    A_g, B_g = previous
    A2, B2 = torch.cat([A_g[:, None], A], 1), torch.cat([B_g[:, None], B], 1)
    on = lambda c: torch.cat([1 - c.sum(-1, keepdim=True), c], -1)   # noqa: E731
    return gram_scale(A2, B2, torch.cat([torch.zeros(1, dtype=f64), normalised(w)]), on(P), on(Q))


@given(data=st.data(), changes=st.booleans())
def test_variant_objective_and_gradients_equal_the_dense_ones(data, changes):
    """divergence(..., previous) and its autograd gradients at random coefficients, Gram space
    against dense float64, for coefficients on the factors or on the changes."""
    A, B, w = data.draw(factors())
    L, U = A.shape[:2]
    previous = None
    if changes:                       # global factors of the clients' own sizes
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
        previous = (torch.randn(A[:, 0].shape, generator=g) * A.abs().max(),
                    torch.randn(B[:, 0].shape, generator=g) * B.abs().max())
    coeff = hnp.arrays(np.float64, U, elements=st.floats(-3, 3))
    P = torch.from_numpy(data.draw(coeff)).requires_grad_(True)
    Q = torch.from_numpy(data.draw(coeff)).requires_grad_(True)
    dense = dense_variant_f(A, B, w, P, Q, previous)
    S2 = variant_scale(A, B, w, P.detach(), Q.detach(), previous).square()   # (L,)
    public = (AV.divergence(A, B, w, P.detach(), Q.detach(), previous) if changes else
              F.divergence(A, B, w, P.detach(), Q.detach())).square()
    torch.testing.assert_close(public, dense.detach(), atol=(1e-12 * S2).max().item() + 1e-300,
                               rtol=0)
    p = normalised(w)                 # the objective the solver differentiates, unsquare-rooted
    A2, B2, p2 = AV._with_global(A, B, p, previous) if changes else (A, B, p)
    on = AV._on_factors if changes else (lambda c: c)                 # noqa: E731
    gram = F._squared_divergence(*F.gram_blocks(A2, B2), p2, on(P), on(Q))
    torch.testing.assert_close(gram, dense, atol=(1e-12 * S2).max().item() + 1e-300, rtol=0)
    grad_gram = torch.autograd.grad(gram.sum(), (P, Q))
    grad_dense = torch.autograd.grad(dense.sum(), (P, Q))
    for got, want in zip(grad_gram, grad_dense):   # each term O(S^2) per unit coefficient
        torch.testing.assert_close(got, want, atol=1e-10 * S2.sum().item() + 1e-300, rtol=0)


VARIANT_CASES = [  # (seed, L, U, target weights, start, tie_layers, path): on the changes
    (0, 3, 4, "uniform", "ones", True, "gram"),          # the authors' variant
    (1, 2, 5, "uniform", "ones", True, "matrix_free"),
    (3, 1, 6, "data", "ones", False, "matrix_free"),
    (6, 2, 4, "data", "average", False, "gram"),
]


@pytest.mark.parametrize("seed, L, U, target, init, tie, path", VARIANT_CASES)
def test_variant_adamw_follows_a_dense_adamw(seed, L, U, target, init, tie, path):
    """The solver's AdamW for each option, 10 steps, against whitened_dense_adamw: the same
    product B_hat A_hat (and, on the changes, which are not rescaled, the same P and Q)."""
    A, B, n, previous = round_factors(seed, L, U, 8, 7, 2, 1e-1, 0.3, True)
    p = normalised(n)
    w = p if target == "data" else torch.full_like(p, 1 / U)
    start = p if init == "average" else w
    res = AV.solve_on_changes(A, B, w, previous, steps=10, lr=1e-2, tie_layers=tie,
                              start=start, path=path)
    P, Q = whitened_dense_adamw(A, B, w, start, previous, tie, 10, 1e-2)
    torch.testing.assert_close(res.P, P, atol=1e-9, rtol=0)       # on the changes: not rescaled
    torch.testing.assert_close(res.Q, Q, atol=1e-9, rtol=0)
    f_dense = dense_variant_f(A, B, w, P, Q, previous)
    f_res = dense_variant_f(A, B, w, res.P, res.Q, previous)
    torch.testing.assert_close(f_res, f_dense, atol=1e-12 * f_dense.max().item(), rtol=1e-9)
    f_start = dense_variant_f(A, B, w, start.expand(L, U), start.expand(L, U), previous)
    assert (f_res.sum() < f_start.sum()) if tie else (f_res < f_start).all()   # it moved


def _authors(seed=5, U=4, **changes):
    A, B, n, previous = round_factors(seed, 2, U, 8, 7, 2, 1e-1, 0.3, True)
    return A, B, normalised(n), previous, AV.flora_na_authors(split(A), split(B), n,
                                                              previous=previous, **changes)


def test_authors_variant_sends_the_fitted_coefficients_with_data_weights():
    """As the authors' code: the fit is against the uniform mean, with coefficients U_u / U on
    the changes; what is sent is B_g + sum_u p_u U_u (B_u - B_g) (A likewise)."""
    A, B, p, (A_g, B_g), agg = _authors()
    res = agg.info["result"]
    U = A.shape[1]
    c_B, c_A = res.P * U, res.Q * U                                   # their U_u, V_u
    B_sent = B_g.double() + combine(B.double() - B_g.double()[:, None], c_B * p)
    A_sent = A_g.double() + combine(A.double() - A_g.double()[:, None], c_A * p)
    torch.testing.assert_close(agg.B.double(), B_sent, atol=1e-6 * B_sent.abs().max().item(),
                               rtol=0)
    torch.testing.assert_close(agg.A.double(), A_sent, atol=1e-6 * A_sent.abs().max().item(),
                               rtol=0)
    uniform = torch.full((U,), 1 / U, dtype=f64)                      # the fit's own target
    fitted = dense_variant_f(A, B, uniform, res.P, res.Q, (A_g, B_g))
    start = dense_variant_f(A, B, uniform, uniform.expand(2, U), uniform.expand(2, U),
                            (A_g, B_g))
    assert fitted.sum() < start.sum()                                 # tied: the sum goes down
    assert (res.P == res.P[:1]).all()


def test_authors_variant_without_steps_is_fedit():
    """Zero steps: U = V = 1, which with data weights applied is FedIT's average."""
    A, B, p, _, agg = _authors(steps=0)
    fedit = F.fedit(split(A), split(B), p)
    torch.testing.assert_close(agg.A, fedit.A, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(agg.B, fedit.B, atol=1e-8, rtol=1e-5)


def test_variant_input_is_checked():
    A, B, p, previous = round_factors(0, 1, 3, 5, 4, 2, 1e-1, 0.3, True)
    with pytest.raises(ValueError, match="needs the global factors"):
        AV.flora_na_authors(split(A), split(B), p)
    with pytest.raises(ValueError, match="do not match"):
        AV.flora_na_authors(split(A), split(B), p, previous=(previous[0][:, :1], previous[1]))
    with pytest.raises(ValueError, match="needs equal client ranks"):
        AV.flora_na_authors([A[:, 0], A[:, 1, :1]], [B[:, 0], B[:, 1, :, :1]], p[:2],
                            previous=previous)


def test_variant_registers_through_the_public_call():
    """The plug-in's entry is in the registry under its name, as any third party's would be."""
    entry = F.AGGREGATORS[AV.NAME]
    assert entry.aggregate is AV.flora_na_authors and not entry.mixed_ranks
    assert {"previous", "tie_layers", "steps", "lr"} <= set(entry.options)
    F.register(AV.NAME, entry)                               # again: a no-op
    with pytest.raises(ValueError, match="another aggregator"):
        F.register(AV.NAME, F.AGGREGATORS["fedit"])
