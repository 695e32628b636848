"""Core tests for flora_na.py sections 2 and 3: the aggregators and the FLoRA-NA solver.

Read in order: oracles (Gram space vs dense float64 loops, Eckart-Young vs a dense SVD, ALS
vs scipy), then hypothesis properties of the solver, then every aggregator in the registry,
then bad input. Failing examples hypothesis found are kept as fixed parametrized cases.

Tolerances, and why:
  * Gram space computes ||M - B_hat A_hat||^2 as ||M||^2 - 2<M, B_hat A_hat> + ||B_hat A_hat||^2,
    a difference of float64 terms as large as S^2, with
        S = (sum_u |P_u| |B_u|) (sum_u |Q_u| |A_u|) + sum_u p_u |B_u| |A_u|      (Frobenius norms).
    Its round-off is ~1e3 eps64 S^2, so the divergence (a square root) is good to about
    sqrt(1e3 * 2.2e-16) S ~ 5e-7 S: `gram_atol` allows 1e-6 S per layer.
  * Factors are float32 (as clients send them); A_hat and B_hat are rounded to float32 on
    the way out, a relative error ~1e-7 per factor: dense checks of returned float32 factors
    allow DENSE_RTOL = 1e-5 of ||M|| (plus `gram_atol` where a Gram-space number is compared).
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import Tensor
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import flora_na as F
from flora_na import AGGREGATORS, Aggregate, divergence, divergence_bound, lowrank_svd, \
    solve_flora_na

DENSE_RTOL = 1e-5      # float32 factors: relative error of a product of rounded factors
GRAM_RTOL = 1e-6       # Gram space: ~sqrt(eps64) of the scale S, see the module docstring
f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Slow, obviously correct references: explicit loops over layers and clients, float64
# ---------------------------------------------------------------------------------------------

def normalised(p) -> Tensor:
    p = torch.as_tensor(p, dtype=f64)
    return p / p.sum()


def dense_M(A: Tensor, B: Tensor, p) -> Tensor:
    """M[l] = sum_u p_u B[l, u] @ A[l, u], float64 (L, d, k), by explicit loops."""
    p = normalised(p)
    L, U = A.shape[:2]
    M = torch.zeros(L, B.shape[2], A.shape[3], dtype=f64)
    for l in range(L):
        for u in range(U):
            M[l] += p[u] * (B[l, u].double() @ A[l, u].double())
    return M


def combine(X: Tensor, c: Tensor) -> Tensor:
    """sum_u c[l, u] X[l, u] per layer, float64, by explicit loops; c (L, U) or (U,)."""
    L, U = X.shape[:2]
    c = torch.as_tensor(c, dtype=f64).expand(L, U)
    out = torch.zeros(L, *X.shape[2:], dtype=f64)
    for l in range(L):
        for u in range(U):
            out[l] += c[l, u] * X[l, u].double()
    return out


def dense_divergence(A, B, p, P, Q) -> Tensor:
    """||M - (sum_u P_u B_u)(sum_u Q_u A_u)||_F per layer (L,), dense float64."""
    return (dense_M(A, B, p) - combine(B, P) @ combine(A, Q)).flatten(1).norm(dim=1)


def dense_product_divergence(A, B, p, B_hat, A_hat) -> Tensor:
    """||M - B_hat @ A_hat||_F per layer for given (possibly float32) factors, in float64."""
    return (dense_M(A, B, p) - B_hat.double() @ A_hat.double()).flatten(1).norm(dim=1)


def dense_tail(M: Tensor, r: int) -> Tensor:
    """Eckart-Young: sqrt(sum_{i > r} sigma_i(M)^2) per layer, from a dense SVD."""
    return torch.linalg.svdvals(M)[:, r:].square().sum(-1).sqrt()


def gram_scale(A, B, p, P, Q) -> Tensor:
    """S per layer (see the module docstring): the size of the terms Gram space subtracts."""
    p = normalised(p)
    L, U = A.shape[:2]
    nA = A.double().flatten(2).norm(dim=2)                             # (L, U)
    nB = B.double().flatten(2).norm(dim=2)
    P = torch.as_tensor(P, dtype=f64).expand(L, U)
    Q = torch.as_tensor(Q, dtype=f64).expand(L, U)
    return (P.abs() * nB).sum(1) * (Q.abs() * nA).sum(1) + (p * nB * nA).sum(1)


def gram_atol(A, B, p, P, Q) -> Tensor:
    return GRAM_RTOL * gram_scale(A, B, p, P, Q) + 1e-300


def split(X: Tensor) -> list[Tensor]:
    """(L, U, ...) -> the aggregators' list of U tensors (L, ...)."""
    return [X[:, u] for u in range(X.shape[1])]


def effective_update(agg: Aggregate) -> Tensor:
    """What the global model's weights move by: B @ A (when sent) plus base_delta, float64."""
    out = 0
    if agg.A is not None:
        out = out + agg.B.double() @ agg.A.double()
    if agg.base_delta is not None:
        out = out + agg.base_delta.double()
    return out


def random_case(seed, L, U, d, k, r, scale_A=1.0, scale_B=1.0):
    """Gaussian float32 factors A (L, U, r, k), B (L, U, d, r) and weights p (U,)."""
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(L, U, r, k, generator=g, dtype=f64) * scale_A).float()
    B = (torch.randn(L, U, d, r, generator=g, dtype=f64) * scale_B).float()
    p = torch.rand(U, generator=g, dtype=f64) + 0.1
    return A, B, p


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

# entries on a 2^-15 grid in [-1, 1]: exact in float32, never subnormal after a 1e-6 scale
grid = st.integers(-2**15, 2**15).map(lambda i: i / 2**15)


@st.composite
def weights(draw, U: int) -> Tensor:
    """p (U,) >= 0 with zeros allowed and at least one positive entry."""
    p = draw(hnp.arrays(np.float64, U, elements=st.one_of(st.just(0.0), st.floats(1e-3, 1e3))))
    if not (p > 0).any():
        p[draw(st.integers(0, U - 1))] = 1.0
    return torch.from_numpy(p)


@st.composite
def factors(draw, max_L=2, max_U=16, max_dim=6, max_extra_rank=2, scales=True):
    """(A (L, U, r, k), B (L, U, d, r), p (U,)) float32, r from 1 to min(d, k) + extra, with
    separate magnitudes for A and B (1e-6 .. 1e6) and the degenerate cases of LoRA."""
    L = draw(st.integers(1, max_L))
    U = draw(st.integers(1, max_U))
    d, k = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    r = draw(st.integers(1, min(d, k) + max_extra_rank))
    kind = draw(st.sampled_from(["gaussian", "grid", "B=0", "identical", "shared A"]))
    if kind == "grid":                    # hypothesis picks the entries (shrinks to structure)
        A = torch.from_numpy(draw(hnp.arrays(np.float64, (L, U, r, k), elements=grid)))
        B = torch.from_numpy(draw(hnp.arrays(np.float64, (L, U, d, r), elements=grid)))
    else:
        A, B, _ = random_case(draw(st.integers(0, 2**32 - 1)), L, U, d, k, r)
        A, B = A.double(), B.double()
    if kind == "B=0":                     # round one of LoRA: B is initialised to zero
        B = torch.zeros_like(B)
    elif kind == "identical":
        A, B = A[:, :1].expand_as(A).clone(), B[:, :1].expand_as(B).clone()
    elif kind == "shared A":              # FFA-LoRA's setting
        A = A[:, :1].expand_as(A).clone()
    if scales:
        A = A * 10.0 ** draw(st.integers(-6, 6))
        B = B * 10.0 ** draw(st.integers(-6, 6))
    return A.float(), B.float(), draw(weights(U))


# ---------------------------------------------------------------------------------------------
# 1. Oracles: Gram space against dense float64
# ---------------------------------------------------------------------------------------------

@given(st.data())
def test_gram_divergence_equals_dense_loop(data):
    A, B, p = data.draw(factors())
    L, U = A.shape[:2]
    coeff = hnp.arrays(np.float64, (L, U), elements=st.floats(-3, 3))
    P, Q = torch.from_numpy(data.draw(coeff)), torch.from_numpy(data.draw(coeff))
    torch.testing.assert_close(divergence(A, B, p, P, Q), dense_divergence(A, B, p, P, Q),
                               atol=gram_atol(A, B, p, P, Q).max().item(), rtol=0)


def test_gram_divergence_accepts_one_coefficient_vector_for_all_layers():
    A, B, p = random_case(0, 3, 4, 5, 6, 2)
    p[1] = 0.0                                                    # a zero weight
    P, Q = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([1.0, 0.25, -0.5, 3.0])
    torch.testing.assert_close(divergence(A, B, p, P, Q), dense_divergence(A, B, p, P, Q),
                               atol=gram_atol(A, B, p, P, Q).max().item(), rtol=0)
    # at P = Q = p the divergence is FedIT's
    fedit = F.fedit(split(A), split(B), p)
    torch.testing.assert_close(divergence(A, B, p, normalised(p), normalised(p)),
                               dense_product_divergence(A, B, p, fedit.B, fedit.A),
                               atol=1e-5 * dense_M(A, B, p).norm().item(), rtol=0)


@given(st.data())
def test_divergence_bound_equals_dense_svd_tail(data):
    A, B, p = data.draw(factors())
    M = dense_M(A, B, p)
    atol = 1e-9 * M.flatten(1).norm(dim=1).max().item() + 1e-300
    torch.testing.assert_close(divergence_bound(A, B, p), dense_tail(M, A.shape[2]),
                               atol=atol, rtol=0)


@given(st.data())
def test_lowrank_svd_reproduces_the_dense_product_and_its_singular_values(data):
    L = data.draw(st.integers(1, 3))
    d, k, R = (data.draw(st.integers(1, 8)) for _ in range(3))
    scale = 10.0 ** data.draw(st.integers(-6, 6))
    B_stack = torch.from_numpy(data.draw(hnp.arrays(np.float64, (L, d, R), elements=grid)))
    A_stack = torch.from_numpy(data.draw(hnp.arrays(np.float64, (L, R, k), elements=grid)))
    B_stack = B_stack * scale
    U_, S, V = lowrank_svd(B_stack, A_stack)
    X = B_stack @ A_stack                                                  # (L, d, k)
    atol = 1e-12 * (B_stack.norm() * A_stack.norm()).item() + 1e-300
    torch.testing.assert_close(U_ @ torch.diag_embed(S) @ V.mT, X, atol=atol, rtol=0)
    dense_S = torch.linalg.svdvals(X)                                      # (L, min(d, k))
    m = min(S.shape[1], dense_S.shape[1])
    torch.testing.assert_close(S[:, :m], dense_S[:, :m], atol=atol, rtol=0)
    assert (S[:, m:].abs() <= atol).all() and (dense_S[:, m:].abs() <= atol).all()
    assert (S[:, :-1] >= S[:, 1:]).all() and (S >= 0).all()               # sorted, >= 0
    eye = torch.eye(S.shape[1], dtype=f64)
    torch.testing.assert_close(U_.mT @ U_, eye.expand(L, -1, -1), atol=1e-10, rtol=0)
    torch.testing.assert_close(V.mT @ V, eye.expand(L, -1, -1), atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------
# 1b. Oracles: the solver against scipy on the dense objective
# ---------------------------------------------------------------------------------------------

def scipy_minimise(A, B, p, P0, Q0) -> float:
    """BFGS on the 2U variables (P, Q) of the dense float64 objective ||M - B_hat A_hat||^2
    of one layer (A (U, r, k), B (U, d, r)) with its analytic gradient; returns the
    divergence ||M - B_hat A_hat||_F at the optimum it reaches from (P0, Q0)."""
    A, B, p = A.double().numpy(), B.double().numpy(), normalised(p).numpy()
    U = len(p)
    M = sum(p[u] * B[u] @ A[u] for u in range(U))

    def objective(x):
        P, Q = x[:U], x[U:]
        B_hat, A_hat = np.tensordot(P, B, 1), np.tensordot(Q, A, 1)
        R = M - B_hat @ A_hat
        grad_P = [-2 * np.sum(R * (B[u] @ A_hat)) for u in range(U)]
        grad_Q = [-2 * np.sum(R * (B_hat @ A[u])) for u in range(U)]
        return np.sum(R * R), np.array(grad_P + grad_Q)

    x0 = np.concatenate([np.asarray(P0, dtype=np.float64), np.asarray(Q0, dtype=np.float64)])
    out = scipy.optimize.minimize(objective, x0, jac=True, method="BFGS",
                                  options=dict(gtol=1e-13, maxiter=20000))
    return math.sqrt(max(out.fun, 0.0))


def test_scipy_oracle_matches_the_dense_reference():
    """The oracle itself: started at FedIT with no iterations it returns FedIT's divergence,
    and it never ends above where it started."""
    A, B, p = random_case(3, 1, 3, 4, 5, 2)
    pn = normalised(p)
    naive = dense_divergence(A, B, p, pn, pn)[0].item()
    assert scipy_minimise(A[0], B[0], p, pn, pn) <= naive
    # with U = 1 the optimum is exact: M = B A with P = Q = 1
    assert scipy_minimise(A[0, :1], B[0, :1], p[:1], [0.3], [0.2]) <= 1e-6 * naive


# (seed, U, d, k, r) where ALS (max_iter=200) stopped far from the optimum of its own basin:
# scipy started at ALS's (P, Q) goes on to a much lower divergence. The first is what
# hypothesis shrank to; the others came from a random search (3% of small cases swamp).
ALS_SWAMPS = [(0, 4, 2, 3, 2), (33, 4, 2, 3, 2), (60, 3, 2, 2, 2), (4, 5, 4, 2, 2)]


def _check_als_reaches_a_dense_optimum(A, B, p):
    res = solve_flora_na(A, B, p)
    M_norm = dense_M(A, B, p).flatten(1).norm(dim=1)
    for l in range(A.shape[0]):
        als = dense_divergence(A[l:l + 1], B[l:l + 1], p, res.P[l], res.Q[l])[0].item()
        polished = scipy_minimise(A[l], B[l], p, res.P[l], res.Q[l])
        tol = 1e-5 * M_norm[l].item() + gram_atol(A, B, p, res.P, res.Q)[l].item()
        assert als <= polished + tol, (
            f"layer {l}: ALS stopped at {als:.6g} after {res.iterations} iterations; scipy "
            f"from the same (P, Q) reaches {polished:.6g} (||M|| = {M_norm[l]:.3g})")
        assert res.divergence[l].item() <= als + tol     # reports what it returns


@pytest.mark.parametrize("seed, U, d, k, r", ALS_SWAMPS)
def test_als_reaches_the_dense_optimum_fixed_cases(seed, U, d, k, r):
    _check_als_reaches_a_dense_optimum(*random_case(seed, 1, U, d, k, r))


@settings(max_examples=25)
@given(seed=st.integers(0, 2**32 - 1), U=st.integers(1, 5), d=st.integers(1, 6),
       k=st.integers(1, 6), r=st.integers(1, 3))
def test_als_reaches_the_dense_optimum(seed, U, d, k, r):
    """ALS ends where scipy, started from ALS's answer, cannot go lower: a (local) optimum of
    the dense objective. (Scipy started from FedIT is not an oracle for the *value*: the
    objective is non-convex and each method lands in a better basin about equally often.)"""
    _check_als_reaches_a_dense_optimum(*random_case(seed, 1, U, d, k, r))


@pytest.mark.parametrize("seed, L, U, d, k, r", [(0, 1, 3, 5, 4, 2), (1, 2, 4, 6, 5, 1),
                                                 (2, 1, 2, 4, 6, 3)])
def test_adamw_with_enough_steps_is_near_als_and_never_above_naive(seed, L, U, d, k, r):
    A, B, p = random_case(seed, L, U, d, k, r)
    als = solve_flora_na(A, B, p)
    adamw = solve_flora_na(A, B, p, solver="adamw", steps=1000)
    norm_M = dense_M(A, B, p).flatten(1).norm(dim=1)
    assert (adamw.divergence <= als.divergence + 1e-2 * norm_M).all()
    assert (adamw.divergence <= adamw.divergence_naive).all()
    dense = dense_product_divergence(A, B, p, adamw.B_hat, adamw.A_hat)
    naive = dense_divergence(A, B, p, normalised(p), normalised(p))
    assert (dense <= naive + DENSE_RTOL * norm_M).all()


def test_solver_benchmark_small_run_checks_itself(tmp_path):
    """bench_solver.py (stage 5 of reproduce.sh) at toy shapes: every Gram row's divergence is
    re-evaluated densely in float64 and compared with the dense AdamW baseline, and the JSON
    holds the commit it ran at (tests/test_report.py tables a JSON of this layout)."""
    import json
    from evidence import bench_solver
    from harness import provenance
    out = tmp_path / "runs" / "bench" / "bench_solver.json"
    args = bench_solver.Args(device="cpu", layers=3, clients=4, rank=2, d=24, k=20,
                             dense_layers=2, steps=300, repeats=1, threads=1, out=str(out))
    assert bench_solver.main(args) == 0
    result = json.loads(out.read_text())
    assert result["failures"] == []
    assert [row["method"] for row in result["rows"]] == [
        "dense AdamW (baseline)", "Gram AdamW", "Gram ALS", "Gram ALS, bound=False"]
    for row in result["rows"]:
        assert row["rel_div"][:2] == pytest.approx(row["rel_div_dense_fp64"], abs=1e-6)
        assert max(row["rel_div"]) <= max(row["rel_naive"])
    assert result["machine"]["git_commit"] == provenance.git_commit()[0]


# ---------------------------------------------------------------------------------------------
# 1c. tie_layers: one (P, Q) for all layers, as the authors' code does
# ---------------------------------------------------------------------------------------------

def _check_tied(A, B, p, solver="als", against_untied=True, **options):
    tied = solve_flora_na(A, B, p, solver=solver, tie_layers=True, bound=True, **options)
    untied = solve_flora_na(A, B, p)
    assert (tied.P == tied.P[:1]).all() and (tied.Q == tied.Q[:1]).all()   # rows equal
    # per layer, the reported divergence is that of the shared (P, Q)
    torch.testing.assert_close(tied.divergence, dense_divergence(A, B, p, tied.P[0], tied.Q[0]),
                               atol=gram_atol(A, B, p, tied.P, tied.Q).max().item(), rtol=0)
    total = lambda x: x.square().sum().item()
    tol = gram_atol(A, B, p, tied.P, tied.Q).square().sum().item()     # squared-domain error
    assert total(tied.divergence) <= total(tied.divergence_naive) + tol
    if against_untied:
        assert total(tied.divergence) >= total(untied.divergence) - tol
    assert total(tied.divergence) >= total(tied.divergence_bound) - tol


@pytest.mark.parametrize("seed, L, U, d, k, r", [(0, 3, 4, 5, 6, 2), (1, 2, 6, 4, 4, 3),
                                                 (2, 4, 2, 6, 3, 1)])
def test_tie_layers_fixed_cases(seed, L, U, d, k, r):
    _check_tied(*random_case(seed, L, U, d, k, r))


@settings(max_examples=30)
@given(st.data())
def test_tie_layers(data):
    """On arbitrary (not drift-like) factors ALS is a local method: hypothesis found a Gaussian
    case (L 2, U 3) where the per-layer ALS stops in a local minimum that the tied solution
    beats on one layer. Tying can never beat the per-layer optimum, only a local minimum, so
    this property test checks the tied solution against FedIT and the bound; the fixed cases
    above and test_als_reaches_the_dense_optimum check optimality."""
    A, B, p = data.draw(factors(max_L=3, max_U=8))
    _check_tied(A, B, p, against_untied=False)


# ---------------------------------------------------------------------------------------------
# 1d. AdamW against the ALS optimum on factors as rounds produce them
# ---------------------------------------------------------------------------------------------

def round_factors(seed, L, U, d, k, r, drift, noise, global_B):
    """Factors as a round produces them: every client starts from the global (A_g, B_g) (peft's
    kaiming-uniform A_g; B_g = 0 in round one, else of the size B reaches) and moves by `drift`
    along a shared direction, by its own amount t_u ~ U(0.2, 1.8), plus client-specific noise
    of relative size `noise`; p from sample counts. Returns float32 A (L, U, r, k),
    B (L, U, d, r), p (U,) and the global factors (A_g (L, r, k), B_g (L, d, r))."""
    g = torch.Generator().manual_seed(seed)
    A_g = (2 * torch.rand(L, 1, r, k, generator=g, dtype=f64) - 1) / math.sqrt(k)
    B_g = global_B * 1e-2 * torch.randn(L, 1, d, r, generator=g, dtype=f64) / math.sqrt(r)
    t = 1 + 0.8 * (2 * torch.rand(1, U, 1, 1, generator=g, dtype=f64) - 1)      # (1, U, 1, 1)
    dA = torch.randn(L, 1, r, k, generator=g, dtype=f64) / math.sqrt(k)
    dB = 1e-2 * torch.randn(L, 1, d, r, generator=g, dtype=f64) / math.sqrt(r)
    A = A_g + drift * (t * dA + noise * torch.randn(L, U, r, k, generator=g, dtype=f64)
                       / math.sqrt(k))
    B = B_g + drift * (t * dB + noise * 1e-2 * torch.randn(L, U, d, r, generator=g, dtype=f64)
                       / math.sqrt(r))
    n = torch.randint(50, 500, (U,), generator=g).double()
    return A.float(), B.float(), n, (A_g[:, 0].float(), B_g[:, 0].float())


@st.composite
def rounds(draw, max_L=2, max_U=12, max_dim=12):
    """round_factors with hypothesis-chosen sizes, drifts 1e-3..1 and noise 0.03..1, and LoRA's
    shape: r at most half of d and k. (Beyond it the optimum can need large coefficients along
    a curved valley, and AdamW's 200 steps, whitened at FedIT's point, can stop short of 90% of
    the gap: 0.52 on a 5 x 2 layer of rank 2 with 7 clients, 0.78 after 2000 steps. The
    never-worse-than-FedIT properties cover those shapes.)
    Drift 1e-3 only in round one (B_g = 0): with B_g != 0 FedIT's relative divergence is then
    ~1e-7, where the Gram-space objective (module docstring) resolves nothing of the gap."""
    L, U = draw(st.integers(1, max_L)), draw(st.integers(2, max_U))
    d, k = draw(st.integers(4, max_dim)), draw(st.integers(4, max_dim))
    r = draw(st.integers(1, min(4, d // 2, k // 2)))
    global_B = draw(st.booleans())
    drift = draw(st.sampled_from([1e-2, 1e-1, 1.0] + ([] if global_B else [1e-3])))
    noise = draw(st.sampled_from([0.03, 0.3, 1.0]))
    return round_factors(draw(st.integers(0, 2**32 - 1)), L, U, d, k, r, drift, noise, global_B)


def _check_closes_the_gap(A, B, p, tie_layers=False, share=0.9):
    """AdamW at its defaults (200 steps, lr 1e-2, no decay) closes at least `share` of the gap
    between FedIT and the ALS optimum, in divergence evaluated densely (summed in squares over
    the layers when tied), up to the Gram-space resolution of f (1e3 eps64 S^2, module
    docstring) turned into a divergence."""
    adamw = solve_flora_na(A, B, p, solver="adamw", tie_layers=tie_layers)
    als = solve_flora_na(A, B, p, tie_layers=tie_layers)
    pn = normalised(p)
    total = (lambda x: x.square().sum(0, keepdim=True).sqrt()) if tie_layers else (lambda x: x)
    naive = total(dense_divergence(A, B, p, pn, pn))
    got = total(dense_divergence(A, B, p, adamw.P, adamw.Q))
    opt = total(dense_divergence(A, B, p, als.P, als.Q))
    # the scale of FedIT's and ALS's terms: coefficients AdamW blew up must not buy tolerance
    S = total(gram_scale(A, B, p, als.P, als.Q) + gram_scale(A, B, p, pn, pn))
    slack = 1e3 * 2.2e-16 * S.square() / (naive + opt).clamp_min(1e-300)
    assert (got <= opt + (1 - share) * (naive - opt) + slack).all(), (
        f"AdamW {got.tolist()}, ALS {opt.tolist()}, FedIT {naive.tolist()}")


# (seed, L, U, d, k, r, drift, noise, B_g != 0) of round_factors: with the whitening floor 1e-6
# alone, round-off eigenvalues of H (~1e-16 of the largest) were amplified 1e3 times and Adam
# ran off along them, the coefficients to 1e3 and the Gram-space objective to round-off; the
# best iterate then closed 22% of the gap. Found by a random search of small shapes.
ADAMW_RUN_OFF = [(32, 2, 7, 4, 2, 1, 1e-2, 0.03, True)]


@pytest.mark.parametrize("seed, L, U, d, k, r, drift, noise, global_B", ADAMW_RUN_OFF)
def test_adamw_closes_most_of_the_gap_fixed_cases(seed, L, U, d, k, r, drift, noise, global_B):
    A, B, p, _ = round_factors(seed, L, U, d, k, r, drift, noise, global_B)
    _check_closes_the_gap(A, B, p)


# Examples per run of the two AdamW gap properties below; a longer search of the same property:
#   FLORA_NA_GAP_EXAMPLES=300 python -m pytest -q test_flora_na.py -k "gap_to_the_als or \
#   tied_adamw" --hypothesis-seed=100
GAP_EXAMPLES = int(os.environ.get("FLORA_NA_GAP_EXAMPLES", "0"))


@settings(max_examples=GAP_EXAMPLES or 15)
@given(data=st.data())
def test_adamw_closes_most_of_the_gap_to_the_als_optimum(data):
    """At its defaults AdamW closes >= 90% of the gap on round factors of LoRA's shape (no
    exception in 850 random examples: 250, and 300 at each of hypothesis seeds 100 and 101 with
    GAP_EXAMPLES). Below 90% hypothesis had found cases with 7 clients of rank 2 (0.56 to 0.61);
    a search of 400 such random cases found 6 below 90% (0.52 to 0.88), each with r above half
    of d or k, outside `rounds` (its docstring). Cases that ran off along round-off directions,
    which the whitening's floor now stops, are kept in ADAMW_RUN_OFF."""
    A, B, p, _ = data.draw(rounds())
    _check_closes_the_gap(A, B, p)


@pytest.mark.parametrize("seed", range(6))
def test_adamw_closes_the_gap_on_the_evidence_cases(seed):
    """>= 90% at the defaults on fixed drift cases of each kind adamw_gap measures."""
    drift, noise, global_B = [(1e-1, 0.3, True), (1e-2, 0.3, True), (1.0, 1.0, True),
                              (1e-1, 0.03, False), (1e-3, 0.3, False), (1e-2, 1.0, False)][seed]
    A, B, p, _ = round_factors(seed, 2, 8, 10, 9, 3, drift, noise, global_B)
    _check_closes_the_gap(A, B, p)


@settings(max_examples=GAP_EXAMPLES or 10)
@given(data=st.data())
def test_tied_adamw_minimises_the_objective_it_keeps(data):
    """Tied across layers of very different sizes, AdamW minimises the sum of the layers'
    squared divergences, the objective tied ALS minimises and by which the best iterate is
    kept: >= 90% of the gap (no exception in 120 random examples, and 200 at each of
    hypothesis seeds 100 and 101). (The previous AdamW, which minimised the sum of relative
    ones and kept the best iterate by the absolute sum, fails this on most cases with layers
    1e3 apart.)"""
    A, B, p, _ = data.draw(rounds(max_L=3))
    scales = torch.tensor(data.draw(st.lists(st.sampled_from([1.0, 1e-1, 1e-3]),
                                             min_size=A.shape[0], max_size=A.shape[0])))
    _check_closes_the_gap(A, B * scales[:, None, None, None], p, tie_layers=True)


@pytest.mark.parametrize("path", ["gram", "matrix_free"])
def test_adamw_weight_decay_pulls_towards_the_start(path):
    """weight_decay decays the whitened coordinates, i.e. towards FedIT, never past it: a
    strong decay ends between FedIT and the undecayed result, and never at P = Q = 0."""
    A, B, p, _ = round_factors(1, 1, 6, 8, 7, 2, 1e-1, 0.3, True)
    free = solve_flora_na(A, B, p, solver="adamw", path=path)
    decayed = solve_flora_na(A, B, p, solver="adamw", path=path, weight_decay=50.0)
    assert free.divergence <= decayed.divergence <= decayed.divergence_naive
    assert decayed.divergence < decayed.divergence_naive     # it still moved
    assert decayed.P.abs().sum() > 0.5 and decayed.Q.abs().sum() > 0.5


# ---------------------------------------------------------------------------------------------
# 1e. The method's AdamW against a dense float64 re-implementation (the authors' variant's
#     solver: tests/test_authors_code.py)
# ---------------------------------------------------------------------------------------------

def whitened_dense_adamw(A, B, w, start, previous, tie_layers, steps, lr):
    """flora_na.py section 4's AdamW written densely: M_w and B_hat A_hat formed, the
    Gauss-Newton blocks H = J^T J from the dense Jacobian at the start, x, y in the coordinates
    W = (H / f_0 + floor I)^(-1/2) with floor = max(1e-6, 1e-12 lam_max), AdamW (no decay) on
    f / f_0, best iterate kept, all summed over the layers when tied. Returns P, Q (L, U)
    float64."""
    L, U = A.shape[:2]
    Ad, Bd = A.double(), B.double()
    if previous is None:
        base_A, base_B, X_A, X_B = 0, 0, Ad, Bd
    else:
        base_A, base_B = (x.double() for x in previous)
        X_A, X_B = Ad - base_A[:, None], Bd - base_B[:, None]         # the changes
    M = dense_M(A, B, w)                                              # (L, d, k)
    hats = lambda P, Q: (base_B + torch.einsum("lu,ludr->ldr", P, X_B),   # noqa: E731
                         base_A + torch.einsum("lu,lurk->lrk", Q, X_A))
    n = 1 if tie_layers else L
    total = (lambda x: x.sum(0, keepdim=True)) if tie_layers else (lambda x: x)
    def f(P, Q):                                                      # (n,)
        B_hat, A_hat = hats(P, Q)
        return total((M - B_hat @ A_hat).flatten(1).square().sum(1))
    P_0 = start.double().expand(L, U)
    B_0, A_0 = hats(P_0, P_0)
    J_P = (X_B @ A_0[:, None]).flatten(2)                             # (L, U, d k) dR/dP, -1
    J_Q = (B_0[:, None] @ X_A).flatten(2)                             # (L, U, d k) dR/dQ, -1
    f_0 = f(P_0, P_0)                                                 # (n,)
    W = []
    for J in (J_P, J_Q):
        lam, V = torch.linalg.eigh(total(J @ J.mT) / f_0[:, None, None])
        lam = lam.clamp_min(0)
        floor = (1e-12 * lam[:, -1:]).clamp_min(1e-6)                 # as flora_na.py's
        W.append(V @ torch.diag_embed((lam + floor).rsqrt()) @ V.mT)
    x = torch.zeros(n, U, dtype=f64, requires_grad=True)
    y = torch.zeros(n, U, dtype=f64, requires_grad=True)
    opt = torch.optim.AdamW([x, y], lr=lr, weight_decay=0.0)
    best = [torch.full((n,), math.inf, dtype=f64), P_0[:n].clone(), P_0[:n].clone()]
    for step in range(steps + 1):
        P = P_0[:n] + (W[0] @ x[..., None])[..., 0]
        Q = P_0[:n] + (W[1] @ y[..., None])[..., 0]
        ratio = f(P.expand(L, U), Q.expand(L, U)) / f_0
        for i in range(n):
            if ratio[i] < best[0][i]:
                best[0][i], best[1][i], best[2][i] = ratio[i].item(), P[i].detach(), Q[i].detach()
        if step == steps:
            break
        opt.zero_grad()
        ratio.sum().backward()
        opt.step()
    return best[1].expand(L, U), best[2].expand(L, U)


@pytest.mark.parametrize("seed, L, U, tie", [(4, 2, 4, True), (5, 2, 3, False)])
def test_adamw_follows_a_dense_adamw(seed, L, U, tie):
    """The solver's AdamW, 10 steps, against whitened_dense_adamw: the same product."""
    A, B, n, _ = round_factors(seed, L, U, 8, 7, 2, 1e-1, 0.3, True)
    p = normalised(n)
    res = solve_flora_na(A, B, p, solver="adamw", steps=10, lr=1e-2, tie_layers=tie, path="gram")
    P, Q = whitened_dense_adamw(A, B, p, p, None, tie, 10, 1e-2)
    dense = lambda P, Q: (dense_M(A, B, p) - combine(B, P) @ combine(A, Q)).flatten(1).square().sum(1)  # noqa: E731
    f_dense, f_res = dense(P, Q), dense(res.P, res.Q)
    torch.testing.assert_close(f_res, f_dense, atol=1e-12 * f_dense.max().item(), rtol=1e-9)
    f_start = dense(p.expand(L, U), p.expand(L, U))
    assert (f_res.sum() < f_start.sum()) if tie else (f_res < f_start).all()   # it moved


# ---------------------------------------------------------------------------------------------
# 2. Properties of the solver
# ---------------------------------------------------------------------------------------------

SOLVERS = [dict(solver="als"), dict(solver="adamw", steps=8)]


def _check_never_worse_than_fedit(A, B, p, tie_layers=False, **options):
    res = solve_flora_na(A, B, p, tie_layers=tie_layers, **options)
    norm_M = dense_M(A, B, p).flatten(1).norm(dim=1)
    pn = normalised(p)
    naive = dense_divergence(A, B, p, pn, pn)
    dense = dense_product_divergence(A, B, p, res.B_hat, res.A_hat)      # what clients get
    if tie_layers:                                   # only the sum over layers is promised
        tol = gram_atol(A, B, p, res.P, res.Q).square().sum()         # squared-domain error
        assert res.divergence.square().sum() <= res.divergence_naive.square().sum() + tol
        assert (dense.square().sum().sqrt()
                <= naive.square().sum().sqrt() + DENSE_RTOL * norm_M.square().sum().sqrt())
    else:
        assert (res.divergence <= res.divergence_naive).all()
        assert (dense <= naive + DENSE_RTOL * norm_M).all(), (dense, naive, norm_M)


@pytest.mark.parametrize("options", SOLVERS, ids=["als", "adamw"])
@pytest.mark.parametrize("tie_layers", [False, True])
@given(data=st.data())
def test_flora_na_never_worse_than_fedit(options, tie_layers, data):
    _check_never_worse_than_fedit(*data.draw(factors()), tie_layers=tie_layers, **options)


@pytest.mark.parametrize("options", SOLVERS, ids=["als", "adamw"])
@given(data=st.data())
def test_divergence_never_below_the_bound(options, data):
    A, B, p = data.draw(factors())
    res = solve_flora_na(A, B, p, bound=True, **options)
    tol = gram_atol(A, B, p, res.P, res.Q)
    assert (res.divergence >= res.divergence_bound - tol).all()
    assert (res.divergence_bound <= res.divergence_naive + tol).all()


@given(data=st.data())
def test_reported_divergence_is_that_of_the_returned_factors(data):
    """The rescaling (cP, Q/c) after the solve must not change the product."""
    A, B, p = data.draw(factors())
    res = solve_flora_na(A, B, p)
    torch.testing.assert_close(res.divergence, dense_divergence(A, B, p, res.P, res.Q),
                               atol=gram_atol(A, B, p, res.P, res.Q).max().item(), rtol=0)
    # B_hat = sum P_u B_u and A_hat = sum Q_u A_u, rounded to the inputs' dtype
    assert res.A_hat.dtype == A.dtype and res.B_hat.dtype == B.dtype
    torch.testing.assert_close(res.B_hat, combine(B, res.P).float())
    torch.testing.assert_close(res.A_hat, combine(A, res.Q).float())
    norm_M = dense_M(A, B, p).flatten(1).norm(dim=1)
    torch.testing.assert_close(res.norm_M, norm_M, atol=1e-6 * norm_M.max().item(), rtol=0)
    dense = dense_product_divergence(A, B, p, res.B_hat, res.A_hat)
    torch.testing.assert_close(res.divergence, dense, rtol=0,
                               atol=(gram_atol(A, B, p, res.P, res.Q)
                                     + DENSE_RTOL * norm_M).max().item())


@given(data=st.data())
def test_permuting_clients_permutes_P_and_Q(data):
    """Relabelling the clients gives an equally good answer whose coefficients belong to the
    same clients: un-permuted, they reach the same divergence on the original problem.
    (P and Q themselves are compared only where the optimum is well conditioned: along a
    flat valley, summation order alone moves them by far more than round-off, with the same
    divergence; hypothesis found such a case with 4 clients of rank 1.)"""
    A, B, p = data.draw(factors(max_U=8))
    perm = torch.tensor(data.draw(st.permutations(range(A.shape[1]))))
    res = solve_flora_na(A, B, p)
    res_perm = solve_flora_na(A[:, perm], B[:, perm], p[perm])
    atol = gram_atol(A, B, p, res.P, res.Q).max().item()
    torch.testing.assert_close(res_perm.divergence, res.divergence, atol=atol, rtol=0)
    torch.testing.assert_close(res_perm.divergence_naive, res.divergence_naive, atol=atol, rtol=0)
    back = torch.argsort(perm)                      # res_perm's coefficients, client order
    P, Q = res_perm.P[:, back], res_perm.Q[:, back]
    torch.testing.assert_close(divergence(A, B, p, P, Q), res.divergence, atol=atol, rtol=0)


def test_permuting_well_conditioned_clients_permutes_P_and_Q():
    """Distinct, well-conditioned clients: a unique optimum, so P and Q permute exactly."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(2, 5, 4, 30, generator=g, dtype=torch.float64)
    B = torch.randn(2, 5, 40, 4, generator=g, dtype=torch.float64)
    p = torch.tensor([0.1, 0.3, 0.15, 0.25, 0.2], dtype=torch.float64)
    perm = torch.tensor([3, 0, 4, 1, 2])
    res = solve_flora_na(A, B, p, max_iter=2000, tol=0)
    res_perm = solve_flora_na(A[:, perm], B[:, perm], p[perm], max_iter=2000, tol=0)
    torch.testing.assert_close(res_perm.P, res.P[:, perm], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(res_perm.Q, res.Q[:, perm], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("options", SOLVERS, ids=["als", "adamw"])
def test_degenerate_cases_are_exact_or_untouched(options):
    """One client, identical clients, B = 0: FedIT is exact, so is FLoRA-NA."""
    A, B, p = random_case(0, 2, 1, 5, 4, 2)                               # one client
    res = solve_flora_na(A, B, p, **options)
    assert (res.divergence <= gram_atol(A, B, p, res.P, res.Q)).all()
    A, B, p = random_case(1, 2, 5, 5, 4, 2)
    A, B = A[:, :1].expand_as(A).contiguous(), B[:, :1].expand_as(B).contiguous()
    res = solve_flora_na(A, B, p, **options)                               # identical clients
    assert (res.divergence <= gram_atol(A, B, p, res.P, res.Q)).all()
    dense = dense_product_divergence(A, B, p, res.B_hat, res.A_hat)
    assert (dense <= DENSE_RTOL * res.norm_M).all()
    res = solve_flora_na(A, torch.zeros_like(B), p, **options)             # B = 0
    assert (res.divergence == 0).all() and (res.B_hat == 0).all()
    assert torch.isfinite(res.P).all() and torch.isfinite(res.Q).all()


# ---------------------------------------------------------------------------------------------
# 3. The aggregator registry
# ---------------------------------------------------------------------------------------------

EXACT = {"fedex", "flora"}                      # exact by going beyond rank r (W or rank U r)
SAME_RANK = ["ffa", "fedsa", "fedex", "lora_fair", "fedsb"]
ANY_RANK = ["fedit", "flora", "flexlora", "flora_na", "rolora"]


def test_registry_lists_every_method():
    own = {n: a for n, a in AGGREGATORS.items() if a.aggregate.__module__ == "flora_na"}
    assert set(own) == EXACT | set(SAME_RANK) | set(ANY_RANK)   # plug-ins of other tests aside
    assert {n for n, a in own.items() if a.mixed_ranks} == set(ANY_RANK)


def share_frozen(name: str, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """A (L, U, r, k), B (L, U, d, r) with client 0's value for every client in the factor
    that the entry's first round does not train (FFA-LoRA, RoLoRA: A; Fed-SB: B)."""
    trains = AGGREGATORS[name].trains[0]
    return (A if "A" in trains else A[:, :1].expand_as(A).contiguous(),
            B if "B" in trains else B[:, :1].expand_as(B).contiguous())


LINEAR = {"fedit", "ffa", "fedsa", "rolora", "fedsb"}   # the release is a fixed-weight linear function of uploads


def released(agg: Aggregate) -> list[Tensor]:
    return [t.double() for t in (agg.A, agg.B, agg.base_delta) if t is not None]


@pytest.mark.parametrize("name", [n for n, a in AGGREGATORS.items()   # plug-ins: own tests
                                  if a.aggregate.__module__ == "flora_na"])
def test_linear_entries_release_a_fixed_weight_linear_function_of_the_uploads(name):
    """linear=True: the server needs only weighted sums (secure aggregation, central DP), so
    aggregating x X + y Y gives x agg(X) + y agg(Y); every other entry breaks this on random
    factors. x + y = 1, so a factor frozen at a shared value is itself such a combination."""
    entry = AGGREGATORS[name]
    assert entry.linear == (name in LINEAR)
    (A1, B1, p), (A2, B2, _) = random_case(0, 2, 3, 6, 5, 2), random_case(1, 2, 3, 6, 5, 2)
    if "A" not in entry.trains[0]:              # FFA-LoRA, RoLoRA: one A shared by the clients
        A1, A2 = (a[:, :1].expand_as(a).contiguous() for a in (A1, A2))
    if "B" not in entry.trains[0]:              # Fed-SB: one B shared by the clients
        B1, B2 = (b[:, :1].expand_as(b).contiguous() for b in (B1, B2))
    x, y = 0.3, 0.7
    mix = entry.aggregate(split(x * A1 + y * A2), split(x * B1 + y * B2), p)
    one, two = entry.aggregate(split(A1), split(B1), p), entry.aggregate(split(A2), split(B2), p)
    combined = [x * s + y * t for s, t in zip(released(one), released(two))]
    agree = len(combined) == len(released(mix)) and all(
        torch.allclose(m, c, rtol=1e-5, atol=1e-5) for m, c in zip(released(mix), combined))
    assert agree == entry.linear


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@settings(max_examples=20)
@given(data=st.data())
def test_every_aggregator_returns_an_aggregate_that_never_beats_the_bound(name, data):
    A, B, p = data.draw(factors(max_U=6))
    A, B = share_frozen(name, A, B)
    agg = AGGREGATORS[name].aggregate(split(A), split(B), p)
    assert isinstance(agg, Aggregate)
    assert agg.bytes_up > 0 and agg.bytes_down > 0
    L, U, r, k = A.shape
    delta = effective_update(agg)
    assert delta.shape == (L, B.shape[2], k) and torch.isfinite(delta).all()
    M = dense_M(A, B, p)
    if name not in EXACT:                       # a rank-r product: Eckart-Young bounds it
        tail = dense_tail(M, r)
        div = (M - delta).flatten(1).norm(dim=1)
        assert (div >= tail - DENSE_RTOL * M.flatten(1).norm(dim=1)).all()


@settings(max_examples=30)
@given(data=st.data())
def test_exact_methods_reproduce_M(data):
    A, B, p = data.draw(factors(max_U=6))
    M = dense_M(A, B, p)
    atol = 1e-5 * (normalised(p) * B.double().flatten(2).norm(dim=2)
                   * A.double().flatten(2).norm(dim=2)).sum(1).max().item() + 1e-30
    fedex = F.fedex(split(A), split(B), p)
    torch.testing.assert_close(effective_update(fedex), M, atol=atol, rtol=0)
    flora = F.flora(split(A), split(B), p)
    assert flora.A is None and flora.B is None
    torch.testing.assert_close(flora.base_delta.double(), M, atol=atol, rtol=0)
    A_shared = A[:, :1].expand_as(A).contiguous()
    ffa = F.ffa(split(A_shared), split(B), p)
    torch.testing.assert_close(effective_update(ffa), dense_M(A_shared, B, p), atol=atol, rtol=0)
    one = F.fedit(split(A[:, :1]), split(B[:, :1]), torch.ones(1))
    torch.testing.assert_close(effective_update(one), dense_M(A[:, :1], B[:, :1], [1.0]),
                               atol=atol, rtol=0)


@pytest.mark.parametrize("ranks", [[2, 4, 3], [1, 1, 5], [3]])
def test_flexlora_attains_the_bound_and_flora_is_exact_for_mixed_ranks(ranks):
    g = torch.Generator().manual_seed(sum(ranks))
    L, d, k = 2, 6, 5
    A = [torch.randn(L, r, k, generator=g) for r in ranks]
    B = [torch.randn(L, d, r, generator=g) for r in ranks]
    p = torch.rand(len(ranks), generator=g) + 0.1
    pn = normalised(p)
    M = sum(w * b.double() @ a.double() for w, a, b in zip(pn, A, B))
    atol = 1e-5 * M.flatten(1).norm(dim=1).max().item()
    flora = F.flora(A, B, p)
    torch.testing.assert_close(flora.base_delta.double(), M, atol=atol, rtol=0)
    flex = F.flexlora(A, B, p)
    r = max(ranks)
    assert flex.A.shape == (L, r, k) and flex.B.shape == (L, d, r)
    div = (M - effective_update(flex)).flatten(1).norm(dim=1)
    torch.testing.assert_close(div, dense_tail(M, r), atol=atol, rtol=0)
    # a client of rank r_u downloads the leading r_u components
    assert flex.bytes_down == sum(L * (r_u * k + d * r_u) * 4 for r_u in ranks)


@st.composite
def mixed_rank_factors(draw, max_L=2, max_U=6, max_dim=6):
    """Lists A (U x (L, r_u, k)), B (U x (L, d, r_u)) float32 with at least two different
    ranks, magnitudes 1e-3 .. 1e3, and weights p (U,)."""
    L, U = draw(st.integers(1, max_L)), draw(st.integers(2, max_U))
    d, k = draw(st.integers(2, max_dim)), draw(st.integers(2, max_dim))
    ranks = draw(st.lists(st.integers(1, min(d, k)), min_size=U, max_size=U)
                 .filter(lambda rs: len(set(rs)) > 1))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    drift = 10.0 ** draw(st.integers(-3, 0))       # clients near a shared pair, or far apart
    A0, B0 = torch.randn(L, max(ranks), k, generator=g), torch.randn(L, d, max(ranks), generator=g)
    A = [A0[:, :r] + drift * torch.randn(L, r, k, generator=g) for r in ranks]
    B = [B0[:, :, :r] + drift * torch.randn(L, d, r, generator=g) for r in ranks]
    sA, sB = (10.0 ** draw(st.integers(-3, 3)) for _ in range(2))
    return [a * sA for a in A], [b * sB for b in B], draw(weights(U))


def padded_dense(X: list[Tensor], rows: bool, R: int) -> list[Tensor]:
    """Zero-pad by explicit copying: A_u into (L, R, k) (rows) or B_u into (L, d, R)."""
    out = []
    for x in X:
        shape = (x.shape[0], R, x.shape[2]) if rows else (x.shape[0], x.shape[1], R)
        z = torch.zeros(shape, dtype=f64)
        if rows:
            z[:, :x.shape[1]] = x.double()
        else:
            z[:, :, :x.shape[2]] = x.double()
        out.append(z)
    return out


def test_pad_ranks_pads_with_zeros_and_leaves_equal_ranks_alone():
    g = torch.Generator().manual_seed(0)
    A = [torch.randn(2, r, 5, generator=g) for r in (1, 3, 2)]
    B = [torch.randn(2, 4, r, generator=g) for r in (1, 3, 2)]
    A_pad, B_pad = F.pad_ranks(A, B, 4)
    for got, want in zip(A_pad + B_pad, padded_dense(A, True, 4) + padded_dense(B, False, 4)):
        assert torch.equal(got.double(), want)
    A_same, B_same = F.pad_ranks(A[1:2], B[1:2])
    assert A_same[0] is A[1] and B_same[0] is B[1]
    with pytest.raises(ValueError, match="below the largest client rank 3"):
        F.pad_ranks(A, B, 2)


@settings(max_examples=40)
@given(data=st.data())
def test_mixed_rank_fedit_is_the_zero_padded_average(data):
    A, B, p = data.draw(mixed_rank_factors())
    R = max(a.shape[1] for a in A) + data.draw(st.integers(0, 1))
    agg = F.fedit(A, B, p, rank=R)
    pn = normalised(p)
    A_bar = sum(w * a for w, a in zip(pn, padded_dense(A, True, R)))
    B_bar = sum(w * b for w, b in zip(pn, padded_dense(B, False, R)))
    torch.testing.assert_close(agg.A.double(), A_bar, rtol=1e-6, atol=1e-6 * A_bar.abs().max())
    torch.testing.assert_close(agg.B.double(), B_bar, rtol=1e-6, atol=1e-6 * B_bar.abs().max())
    L, k, d = A[0].shape[0], A[0].shape[2], B[0].shape[1]
    assert agg.bytes_up == sum(L * a.shape[1] * (k + d) * 4 for a in A)
    assert agg.bytes_down == agg.bytes_up      # each client gets back a pair of its own rank


@settings(max_examples=60)
@given(data=st.data())
def test_mixed_rank_flora_na_never_worse_than_zero_padding_per_layer(data):
    """The equal-rank property, for clients of different ranks: per layer, dense float64,
    FLoRA-NA's rank-R product is no farther from M than zero-padded FedIT's, and no closer
    than the rank-R bound."""
    A, B, p = data.draw(mixed_rank_factors())
    R = max(a.shape[1] for a in A)
    pn = normalised(p)
    M = sum(w * b.double() @ a.double() for w, a, b in zip(pn, A, B))     # (L, d, k)
    norm_M = M.flatten(1).norm(dim=1)
    zero_pad = (M - effective_update(F.fedit(A, B, p))).flatten(1).norm(dim=1)
    agg = F.flora_na(A, B, p)
    assert agg.A.shape[1] == R and agg.B.shape[2] == R
    ours = (M - effective_update(agg)).flatten(1).norm(dim=1)
    A_pad, B_pad = F.pad_ranks(A, B)
    tol = gram_atol(torch.stack(A_pad, 1), torch.stack(B_pad, 1), p,
                    agg.info["result"].P, agg.info["result"].Q) + DENSE_RTOL * norm_M
    assert (ours <= zero_pad + tol).all(), (ours, zero_pad)
    assert (ours >= dense_tail(M, R) - tol).all()
    assert agg.bytes_down == F.fedit(A, B, p).bytes_down


@settings(max_examples=30)
@given(data=st.data())
def test_flexlora_divergence_is_the_rank_r_bound(data):
    A, B, p = data.draw(factors(max_U=6))
    M = dense_M(A, B, p)
    flex = F.flexlora(split(A), split(B), p)
    div = (M - effective_update(flex)).flatten(1).norm(dim=1)
    torch.testing.assert_close(div, dense_tail(M, A.shape[2]), rtol=0,
                               atol=DENSE_RTOL * M.flatten(1).norm(dim=1).max().item() + 1e-30)


@pytest.mark.parametrize("name", SAME_RANK)
def test_equal_rank_methods_reject_mixed_ranks(name):
    g = torch.Generator().manual_seed(0)
    A = [torch.randn(1, r, 5, generator=g) for r in (2, 4, 3)]
    B = [torch.randn(1, 6, r, generator=g) for r in (2, 4, 3)]
    with pytest.raises(ValueError, match="rank"):
        AGGREGATORS[name].aggregate(A, B, torch.ones(3))


def test_bytes_on_the_wire():
    A, B, p = random_case(0, 3, 4, 6, 5, 2)
    A_shared = A[:, :1].expand_as(A).contiguous()
    L, U, r, k = A.shape
    d = B.shape[2]
    up = U * L * (r * k + d * r) * 4                          # float32: numel * 4 per client
    fedit = F.fedit(split(A), split(B), p)
    assert fedit.bytes_up == up and fedit.bytes_down == up     # each client gets one pair back
    flora_na = F.flora_na(split(A), split(B), p)
    assert (flora_na.bytes_up, flora_na.bytes_down) == (fedit.bytes_up, fedit.bytes_down)
    fedex = F.fedex(split(A), split(B), p)
    assert fedex.bytes_up == up and fedex.bytes_down - fedit.bytes_down == U * L * d * k * 4
    ffa = F.ffa(split(A_shared), split(B), p)
    assert ffa.bytes_up == U * L * d * r * 4                  # only B travels up
    fedsa = F.fedsa(split(A), split(B), p)
    assert fedsa.bytes_up == U * L * r * k * 4                # only A travels up
    flora = F.flora(split(A), split(B), p)
    assert flora.bytes_down == U * L * (U * r * k + d * U * r) * 4   # the stacks, to everyone

    rolora = F.rolora(split(A_shared), split(B), p)           # round trains B: only B travels
    assert (rolora.bytes_up, rolora.bytes_down) == (U * L * d * r * 4, U * L * d * r * 4)
    B_shared = B[:, :1].expand_as(B).contiguous()
    rolora = F.rolora(split(A), split(B_shared), p)           # round trains A: only A travels
    assert (rolora.bytes_up, rolora.bytes_down) == (U * L * r * k * 4, U * L * r * k * 4)
    fedsb = F.fedsb(split(A), split(B_shared), p)             # an r x r core per layer each way
    assert (fedsb.bytes_up, fedsb.bytes_down) == (U * L * r * r * 4, U * L * r * r * 4)


@settings(max_examples=30)
@given(data=st.data())
def test_rolora_and_fedsb_are_exact_when_clients_share_the_frozen_factor(data):
    """With the factor a round does not train shared (RoLoRA: A or B; Fed-SB: B, and A_u =
    R_u A0), averaging the trained one gives B A = sum_u p_u B_u A_u, the dense oracle's M."""
    A, B, p = data.draw(factors(max_U=6))
    A_sh, B_sh = A[:, :1].expand_as(A).contiguous(), B[:, :1].expand_as(B).contiguous()
    scale = (normalised(p) * B.double().flatten(2).norm(dim=2)
             * A.double().flatten(2).norm(dim=2)).sum(1).max().item()
    for name, A_u, B_u, trains in (("rolora", A_sh, B, "B"), ("rolora", A, B_sh, "A"),
                                   ("rolora", A_sh, B, None), ("fedsb", A, B_sh, None)):
        agg = AGGREGATORS[name].aggregate(split(A_u), split(B_u), p, trains=trains)
        torch.testing.assert_close(effective_update(agg), dense_M(A_u, B_u, p), rtol=0,
                                   atol=1e-5 * scale + 1e-30)


def test_rolora_with_mixed_ranks_is_exact_about_the_global_frozen_factor():
    """Client u holds the first r_u components of the global pair: trained B_u (d, r_u) on the
    frozen A[:r_u], or trained A_u on B[:, :r_u]; zero-padded and averaged, about the global
    frozen factor (`previous`), the update is sum_u p_u B_u A_u exactly."""
    g = torch.Generator().manual_seed(3)
    L, d, k, ranks = 2, 7, 5, [1, 3, 2]
    A_g, B_g = torch.randn(L, 3, k, generator=g), torch.randn(L, d, 3, generator=g)
    p = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    new_B = [torch.randn(L, d, r, generator=g) for r in ranks]
    new_A = [torch.randn(L, r, k, generator=g) for r in ranks]
    for trains, A, B in (("B", [A_g[:, :r] for r in ranks], new_B),
                         ("A", new_A, [B_g[:, :, :r] for r in ranks])):
        agg = F.rolora(A, B, p, rank=3, previous=(A_g, B_g), trains=trains)
        M = sum(w * b.double() @ a.double() for w, a, b in zip(p.tolist(), A, B))
        torch.testing.assert_close(effective_update(agg), M, rtol=0, atol=1e-5)
        assert agg.bytes_up == sum(4 * L * (d * r if trains == "B" else r * k) for r in ranks)
    with pytest.raises(ValueError, match="frozen factor differs"):
        F.rolora(split(A0), split(B0), p0, trains="B")           # A not shared, no `previous`


def test_fedsb_rejects_clients_whose_B_differ():
    with pytest.raises(ValueError, match="B differ"):
        F.fedsb(split(A0), split(B0), p0)


def test_flora_na_aggregate_is_the_solver_result():
    A, B, p = random_case(5, 2, 4, 6, 5, 2)
    agg = F.flora_na(split(A), split(B), p)
    res = solve_flora_na(A, B, p)
    torch.testing.assert_close(agg.A, res.A_hat)
    torch.testing.assert_close(agg.B, res.B_hat)
    assert agg.base_delta is None
    torch.testing.assert_close(agg.info["result"].divergence, res.divergence)


@settings(max_examples=30)
@given(data=st.data())
def test_lora_fair_is_never_worse_than_fedit(data):
    """B' minimises ||M - B' A_bar||^2 + lam ||B' - B_bar||^2, which is FedIT's at B' = B_bar."""
    A, B, p = data.draw(factors(max_U=6))
    M = dense_M(A, B, p)
    pn = normalised(p)
    fair = F.lora_fair(split(A), split(B), p)
    div = (M - effective_update(fair)).flatten(1).norm(dim=1)
    naive = dense_divergence(A, B, p, pn, pn)
    assert (div <= naive + DENSE_RTOL * M.flatten(1).norm(dim=1)).all()


# ---------------------------------------------------------------------------------------------
# 4. Bad input raises ValueError naming the problem
# ---------------------------------------------------------------------------------------------

def _good():
    return random_case(0, 2, 3, 5, 4, 2)


def _with(X, index, value):
    X = X.clone()
    X[index] = value
    return X


A0, B0, p0 = _good()
BAD_SOLVER_INPUT = {
    # name: (A, B, p, options, message regex)
    "rank mismatch": (A0, B0[..., :1], p0, {}, "rank"),
    "client mismatch": (A0, B0[:, :2], p0, {}, "clients"),
    "layer mismatch": (A0, B0[:1], p0, {}, "layers"),
    "3-d A": (A0[0], B0, p0, {}, r"\(L, U, r, k\)"),
    "NaN in A": (_with(A0, (0, 1, 0, 0), math.nan), B0, p0, {}, "NaN"),
    "Inf in B": (A0, _with(B0, (1, 2, 3, 1), -math.inf), p0, {}, "Inf"),
    "negative weight": (A0, B0, torch.tensor([0.5, -0.1, 0.6]), {}, ">= 0"),
    "NaN weight": (A0, B0, torch.tensor([0.5, math.nan, 0.6]), {}, "finite"),
    "all-zero weights": (A0, B0, torch.zeros(3), {}, "zero"),
    "too few weights": (A0, B0, torch.ones(2), {}, "2 weights for 3 clients"),
    "no clients": (A0[:, :0], B0[:, :0], torch.ones(0), {}, "no clients"),
    "unknown solver": (A0, B0, p0, dict(solver="sgd"), "unknown solver 'sgd'"),
    "zero rank": (A0[:, :, :0], B0[..., :0], p0, {}, "zero rank"),
}


@pytest.mark.parametrize("case", BAD_SOLVER_INPUT)
def test_solver_rejects_bad_input(case):
    A, B, p, options, message = BAD_SOLVER_INPUT[case]
    with pytest.raises(ValueError, match=message):
        solve_flora_na(A, B, p, **options)
    if not options:                             # the Gram-space helpers validate the same way
        with pytest.raises(ValueError, match=message):
            divergence(A, B, p, torch.ones(A.shape[1] or 1), torch.ones(A.shape[1] or 1))
        with pytest.raises(ValueError, match=message):
            divergence_bound(A, B, p)


A_list, B_list = split(A0), split(B0)
BAD_CLIENTS = {
    # name: (A list, B list, p, message regex)
    "rank mismatch in a client": (A_list, [B_list[0], B_list[1][..., :1], B_list[2]], p0,
                                  "client 1"),
    "k differs between clients": ([A_list[0], A_list[1][..., :3], A_list[2]], B_list, p0,
                                  "client 1"),
    "d differs between clients": (A_list, [B_list[0], B_list[1], B_list[2][:, :4]], p0,
                                  "client 2"),
    "L differs between clients": ([A_list[0], A_list[1][:1], A_list[2]],
                                  [B_list[0], B_list[1][:1], B_list[2]], p0, "client 1"),
    "more A than B": (A_list, B_list[:2], p0, "3 and 2"),
    "no clients": ([], [], torch.ones(0), ">= 1"),
    "NaN in A": ([A_list[0], _with(A_list[1], (0, 0, 0), math.nan), A_list[2]], B_list, p0,
                 "NaN"),
    "Inf in B": (A_list, [B_list[0], B_list[1], _with(B_list[2], (1, 0, 0), math.inf)], p0,
                 "Inf"),
    "negative weight": (A_list, B_list, torch.tensor([0.5, -0.1, 0.6]), ">= 0"),
    "all-zero weights": (A_list, B_list, torch.zeros(3), "zero"),
    "too many weights": (A_list, B_list, torch.ones(4), "4 weights for 3 clients"),
}


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("case", BAD_CLIENTS)
def test_aggregators_reject_bad_input(name, case):
    A, B, p, message = BAD_CLIENTS[case]
    with pytest.raises(ValueError, match=message):
        AGGREGATORS[name].aggregate(A, B, p)


def test_flora_na_aggregator_rejects_an_unknown_solver():
    with pytest.raises(ValueError, match="unknown solver 'sgd'"):
        F.flora_na(A_list, B_list, p0, solver="sgd")
