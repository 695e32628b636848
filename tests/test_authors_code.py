"""Tests for evidence/authors_code.py, the replay of the FLoRA-NA authors' released solver: each
effect it can switch, on toy factors, against what the released code's arithmetic implies, and
against this project's solver of the same objective (flora_na.py's authors variant)."""
from __future__ import annotations

import math

import pytest
import torch

import flora_na as fl
from evidence.authors_code import Effects, _sorted_names, replay

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
    opt = fl.solve_flora_na(A, B, w, solver="adamw", tie_layers=True, previous=previous,
                            start=w, steps=400, path="gram")
    scale = 1.0 if effects.tiny_loss else (
        sum(w[i] * stacked(c, names, 1) @ stacked(c, names, 0) for i, c in enumerate(clients))
        .square().mean().item())
    f_opt = opt.divergence.square().sum().item() / (L * d * k) / scale
    # the same objective at U = V = 1 (the replay's first loss) from flora_na's Gram space
    start = fl.divergence(A, B, w, w, w, previous=previous).square().sum().item()
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
