"""Tests for evidence/peers_code.py, the exact peers' released code transcribed to torch: each
transcribed function against an obviously-correct float64 oracle of what its lines compute, the
facts about that code which differ from its paper's description (each pinned by a test that
fails if the fact stops holding), and, on the same inputs, this project's registry entries."""
from __future__ import annotations

import types

import peft
import pytest
import torch

import flora_na as fl
from evidence import peers_code as pc

f64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def sign_pattern(d: int, k: int, g: int, seed: int) -> torch.Tensor:
    """A gradient (d, k) whose sign matrix has rank g exactly: rows and columns in g groups,
    each block one sign, random positive magnitudes (so -lr sign(G) is a rank-g matrix)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.nn.functional.one_hot(torch.arange(d) % g, g).double()      # (d, g)
    cols = torch.nn.functional.one_hot(torch.randperm(k, generator=gen) % g, g).double()
    core = torch.ones(g, g, dtype=f64).tril() - torch.ones(g, g, dtype=f64).triu(1)  # det 2^(g-1)
    flips = torch.where(torch.rand(g, 1, generator=gen, dtype=f64) < 0.5, -1.0, 1.0)
    signs = rows @ (flips * core) @ cols.T                           # (d, k) of +-1, rank g
    return signs * (0.1 + torch.rand(d, k, generator=gen, dtype=f64))


def best_rank(X: torch.Tensor, r: int) -> torch.Tensor:
    """The oracle: X's truncated SVD of rank r (Eckart-Young), float64."""
    U, S, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


# ---------------------------------------------------------------------------------------------
# Fed-SB's code against float64 oracles
# ---------------------------------------------------------------------------------------------


def test_fedsb_aggregate_is_the_uniform_mean_in_float32():
    """aggregate_models_fed_sb: the uniform mean over clients, float32 whatever the input dtype
    (bf16 uploads in the authors' runs), whatever the clients' sample counts."""
    gen = torch.Generator().manual_seed(0)
    Rs = [torch.randn(3, 8, 8, generator=gen).to(torch.bfloat16) for _ in range(4)]
    out = pc.aggregate(Rs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), sum(R.double() for R in Rs) / 4, rtol=1e-6, atol=1e-7)


def test_fedsb_initial_gradient_is_minus_lr_sign_of_the_batch_normalised_sum():
    gen = torch.Generator().manual_seed(1)
    grads, sizes = [torch.randn(6, 5, generator=gen) for _ in range(3)], [10, 10, 4]
    total = pc.grad_sum(grads, sizes)
    torch.testing.assert_close(total, grads[0] / 10 + grads[1] / 10 + grads[2] / 4)
    X = pc.process_grads(total, 2e-3)
    assert torch.equal(X.abs(), torch.full_like(X, 2e-3)) and torch.equal(X < 0, total > 0)
    assert pc.effective_lr(1e-4, 0.02, 500) == pytest.approx(1e-5)


@pytest.mark.parametrize("d, k, r, g", [(24, 16, 4, 3), (40, 56, 8, 8), (16, 16, 2, 1)])
def test_fedsb_initialisation_is_the_truncated_svd_when_rank_at_most_r(d, k, r, g):
    """On a sign matrix of rank g <= r, svd_lowrank is exact: delta W = B R A equals
    -lr sign(G) itself (float32 factors: to fp32 tolerance), B and A have orthonormal columns
    and rows, and R is the diagonal of singular values, largest first."""
    X = pc.process_grads(sign_pattern(d, k, g, seed=d + k), 1e-3)
    A, R, B = pc.initialise(X.float(), r, out_dtype=torch.float32)
    assert (A.shape, R.shape, B.shape) == ((r, k), (r, r), (d, r))
    torch.testing.assert_close(pc.delta(A, R, B).double(), X, rtol=0, atol=1e-5 * X.abs().max())
    eye = torch.eye(g, dtype=f64)
    torch.testing.assert_close(B[:, :g].double().T @ B[:, :g].double(), eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(A[:g].double() @ A[:g].double().T, eye, rtol=0, atol=1e-5)
    s = R.diagonal()
    assert torch.equal(R, torch.diag(s)) and bool((s[:-1] >= s[1:]).all())
    torch.testing.assert_close(s[:g].double(), torch.linalg.svdvals(X)[:g], rtol=1e-5, atol=0)


def test_fedsb_initial_adapter_is_not_zero():
    """Unlike LoRA's B = 0, the model starts at W + scaling * B R A: with scaling 1 (lora_alpha
    = lora_r for fed-sb) one approximate sign-gradient step of size lr, of Frobenius norm about
    lr * sqrt(d k) for a rank-r sign matrix."""
    X = pc.process_grads(sign_pattern(32, 24, 4, seed=3), 1e-3)
    A, R, B = pc.initialise(X.float(), 4, out_dtype=torch.float32)
    norm = pc.delta(A, R, B).double().norm()
    assert norm == pytest.approx(1e-3 * (32 * 24) ** 0.5, rel=1e-5)


def test_fact_fedsb_casts_its_factors_to_bfloat16():
    """Fact: get_svd_grad returns U, diag(s), V^T in bfloat16 (svd_utils.py 32-34), then cast
    to the gradient's dtype, so the frozen A, B and the starting R carry bf16 rounding: delta W is off the float32 SVD's by
    ~2^-8 relative (0.1% to 1%), not by fp32 rounding."""
    X = pc.process_grads(sign_pattern(48, 40, 6, seed=4), 1e-3).float()
    exact = pc.delta(*pc.initialise(X, 6, out_dtype=torch.float32)).double()
    A, R, B = pc.initialise(X, 6)
    for factor in (A, R, B):              # float32 like the gradient, holding bf16 values
        assert factor.dtype == torch.float32
        assert torch.equal(factor, factor.to(torch.bfloat16).float())
    rel = ((pc.delta(A.float(), R.float(), B.float()).double() - exact).norm()
           / exact.norm()).item()
    assert 1e-3 < rel < 1e-2


def test_fact_fedsb_svd_is_randomised_not_the_truncated_svd():
    """Fact: torch.svd_lowrank(q=r, niter=10) is a randomised approximation. On a sign matrix
    of full rank (the usual case: the sign of a gradient) its rank-r approximation leaves a
    residual within 1% of the optimal one, yet differs from the truncated SVD itself by tens of
    percent: the sign matrix's spectrum is flat, so many rank-r subspaces are nearly optimal."""
    gen = torch.Generator().manual_seed(5)
    X = pc.process_grads(torch.randn(64, 48, generator=gen, dtype=f64), 1e-3)
    D = pc.delta(*pc.initialise(X.float(), 8, out_dtype=torch.float32)).double()
    Xr = best_rank(X, 8)
    ratio = ((X - D).norm() / (X - Xr).norm()).item()
    assert 1 < ratio < 1.01
    assert ((D - Xr).norm() / Xr.norm()).item() > 0.2


def test_fedsb_svd_leaves_the_callers_rng_alone_and_is_deterministic():
    """The code reseeds the global RNG with 42 before svd_lowrank; the transcription does so
    inside fork_rng: the same output from any RNG state, and the caller's stream unchanged."""
    X = pc.process_grads(torch.randn(20, 12, dtype=f64), 1e-3).float()
    torch.manual_seed(7)
    first = pc.svd_grad(X, 4, out_dtype=torch.float32)
    after = torch.rand(3)
    torch.manual_seed(7)
    torch.rand(5)
    second = pc.svd_grad(X, 4, out_dtype=torch.float32)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    torch.manual_seed(7)
    torch.testing.assert_close(torch.rand(3), after, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# RoLoRA as boyi-liu/FedLLM-Factory implements it (a third party's code, not the authors')
# ---------------------------------------------------------------------------------------------


def test_factory_rolora_trains_A_first_then_alternates():
    assert [pc.factory_trained_factor(t) for t in range(5)] == ["A", "B", "A", "B", "A"]


def test_factory_aggregate_is_the_data_weighted_mean():
    gen = torch.Generator().manual_seed(8)
    Xs, n = [torch.randn(2, 6, 4, generator=gen) for _ in range(3)], [50, 300, 120]
    torch.testing.assert_close(pc.factory_aggregate(Xs, n).double(),
                               sum(x.double() * m for x, m in zip(Xs, n)) / 470,
                               rtol=1e-6, atol=1e-7)


def test_fact_factory_rolora_chains_its_clients_after_the_first_round():
    """Fact about the third-party code: clients train the server's one model in place and the
    server reloads only global_lora, which after round 0 holds the factor the previous round
    trained. From round 1 on, each client starts from the previous client's trained factor
    (sequential training), not from the global one; round 0 (global_lora: the initial A) is
    parallel as the paper's algorithm is."""
    def client(step):
        def train(model):                               # a "client" adds its own step in place
            model[trained] = model[trained] + step
        return train
    A0, B0 = torch.zeros(2, 3), torch.zeros(4, 2)
    model = {"A": A0.clone(), "B": B0.clone()}
    steps = [1.0, 10.0, 100.0]
    trained = pc.factory_trained_factor(0)                           # "A"
    up = pc.factory_local_run(model, {"A": A0}, [client(s) for s in steps], 0)
    assert [u["A"][0, 0].item() for u in up] == steps                # each from the global A
    A1 = pc.factory_aggregate([u["A"] for u in up], [1, 1, 1])
    model["A"] = A1.clone()
    trained = pc.factory_trained_factor(1)                           # "B"
    up = pc.factory_local_run(model, {"A": A1}, [client(s) for s in steps], 1)
    assert [u["B"][0, 0].item() for u in up] == [1.0, 11.0, 111.0]   # chained: not from B0


# ---------------------------------------------------------------------------------------------
# Theirs and ours on the same inputs
# ---------------------------------------------------------------------------------------------

class Probe(torch.nn.Module):
    """One linear layer W (d, k) whose loss is sum(W_eff * C) for the batch's C (identity
    input): each sample's gradient of W is its own C, so the test chooses G exactly."""
    def __init__(self, d: int, k: int):
        super().__init__()
        self.lin = torch.nn.Linear(k, d, bias=False)

    def forward(self, C):                                       # C (d, k)
        out = self.lin(torch.eye(self.lin.in_features))         # (k, d) = W_eff^T
        return types.SimpleNamespace(loss=(out * C.T).sum())


def probe_model(d: int, k: int, r: int, alpha: float):
    torch.manual_seed(0)
    return peft.get_peft_model(Probe(d, k), peft.LoraConfig(r=r, lora_alpha=alpha,
                                                            target_modules=["lin"]))


@pytest.mark.parametrize("r, g, alpha", [(4, 3, 8.0), (6, 6, 6.0)])
def test_fedsb_init_ours_equals_theirs_where_the_svd_is_exact(r, g, alpha):
    """The same gradient G = sum of per-sample gradients (one per batch, as both codes sum
    them), its sign matrix of rank g <= r: their initialise (float32 factors) and our
    fedsb_init set the same starting update, delta W = -lr sign(G), to fp32 tolerance. Their R
    is the singular values with scaling 1 (lora_alpha = lora_r); ours keeps --lora-alpha and
    holds R = S / s, so s R_ours = R_theirs: the same product, while the trained R's step moves
    delta W s times as far under AdamW."""
    d, k, lr = 24, 16, 1e-3
    P = torch.sign(sign_pattern(d, k, g, seed=r)).float()
    gen = torch.Generator().manual_seed(9)
    samples = [{"C": P * (0.5 + torch.rand(d, k, generator=gen))} for _ in range(3)]
    model = probe_model(d, k, r, alpha)
    core = fl.fedsb_init(model, iter(samples), lr=lr, init_samples=3)
    (name, m), = fl.lora_layers(model).items()
    s = m.scaling["default"]
    A, B = m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()
    G = pc.grad_sum([x["C"] for x in samples], [1, 1, 1])
    A_t, R_t, B_t = pc.initialise(pc.process_grads(G, lr), r, out_dtype=torch.float32)
    ours, theirs = s * B @ A, pc.delta(A_t, R_t, B_t).double()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * lr)
    torch.testing.assert_close(ours, -lr * P.double(), rtol=0, atol=1e-5 * lr)
    R_ours = A @ core[name].double().T                              # A = R A0
    torch.testing.assert_close(s * R_ours.diagonal()[:g], R_t.diagonal()[:g].double(),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("weights", [[1, 1, 1, 1], [50, 300, 120, 80]])
def test_fedsb_aggregate_ours_against_theirs(weights):
    """Clients' cores R_u (A_u = R_u A0 in our protocol, B shared). Equal data: our p-weighted
    mean equals their uniform mean of R, to fp32 tolerance. Fact: with unequal data their code
    still takes the uniform mean (aggregate_models_fed_sb; their clients hold equal contiguous
    slices), ours weights by p_u = n_u / N, the mean the exact update M = sum_u p_u B R_u A0
    needs; the two differ by sum_u (p_u - 1/U) R_u A0."""
    gen = torch.Generator().manual_seed(10)
    L, d, k, r, U = 2, 20, 12, 4, len(weights)
    A0 = torch.linalg.qr(torch.randn(L, k, r, generator=gen))[0].mT           # (L, r, k)
    B = torch.randn(L, d, r, generator=gen)
    Rs = [torch.randn(L, r, r, generator=gen) for _ in range(U)]
    p = torch.tensor(weights, dtype=f64) / sum(weights)
    ours = fl.fedsb([R @ A0 for R in Rs], [B] * U, p)
    theirs = pc.aggregate(Rs) @ A0
    assert torch.equal(ours.B, B)
    weighted = sum(w * R.double() for w, R in zip(p.tolist(), Rs)) @ A0.double()
    torch.testing.assert_close(ours.A.double(), weighted, rtol=1e-5, atol=1e-6)
    if len(set(weights)) == 1:
        torch.testing.assert_close(ours.A, theirs, rtol=1e-5, atol=1e-6)
    else:
        gap = (ours.A.double() - theirs.double()).norm() / theirs.double().norm()
        expected = sum((w - 1 / U) * R.double() for w, R in zip(p.tolist(), Rs)) @ A0.double()
        torch.testing.assert_close(ours.A.double() - theirs.double(), expected, rtol=1e-5,
                                   atol=1e-6)
        assert gap > 0.1


def test_rolora_aggregate_ours_equals_the_third_partys_data_weighted_mean():
    """A round that trains B (A shared): our rolora's new B is FedLLM-Factory's data-weighted
    mean of the uploaded B, to fp32 tolerance; A stays the shared one; a round that trains A
    likewise for A."""
    gen = torch.Generator().manual_seed(11)
    L, d, k, r, n = 2, 18, 14, 4, [50, 300, 120]
    A = torch.randn(L, r, k, generator=gen)
    Bs = [torch.randn(L, d, r, generator=gen) for _ in n]
    p = torch.tensor(n, dtype=f64) / sum(n)
    out = fl.rolora([A] * 3, Bs, p, trains="B")
    torch.testing.assert_close(out.B, pc.factory_aggregate(Bs, n), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.A, A)
    B = torch.randn(L, d, r, generator=gen)
    As = [torch.randn(L, r, k, generator=gen) for _ in n]
    out = fl.rolora(As, [B] * 3, p, trains="A")
    torch.testing.assert_close(out.A, pc.factory_aggregate(As, n), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.B, B)


def test_fact_the_third_partys_first_rolora_round_trains_A_while_B_is_zero():
    """Ours trains B first (registry: trains ("B", "A")); FedLLM-Factory's round 0 trains A,
    with peft's B = 0 at the start: the gradient of A is then exactly zero (delta W = s B A),
    so its first round moves A only by AdamW's decoupled weight decay (torch's default 0.01;
    utils/train_utils.py 33-36 sets none) and sends back the same A to every client."""
    assert fl.AGGREGATORS["rolora"].trains == ("B", "A") and pc.factory_trained_factor(0) == "A"
    model = probe_model(12, 10, 4, 8.0)
    (_, m), = fl.lora_layers(model).items()
    assert not m.lora_B["default"].weight.any()                   # peft's zero B
    model(torch.randn(12, 10)).loss.backward()
    assert m.lora_A["default"].weight.grad is not None
    assert not m.lora_A["default"].weight.grad.any()
    assert m.lora_B["default"].weight.grad.any()
