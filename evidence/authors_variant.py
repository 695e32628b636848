"""FLoRA-NA as the authors' released code runs it, registered as the aggregator "flora_na_authors".

A replay of someone else's choices, not the method (flora_na.py is the method): the released
code (FederatedScope fork, chickbong221/Fed-LoRA; evidence/authors_code.py replays it line by
line) fits one (P, Q) for all LoRA layers,
  * to the uniform mean M_w = sum_u w_u B_u A_u, w_u = 1/U, instead of the data-weighted M;
  * with coefficients on the clients' changes relative to the global factors (A_g, B_g) they
    started from: B_hat = B_g + sum_u P_u (B_u - B_g), A_hat likewise;
  * from P = Q = w (their U = V = 1 on the mean), by AdamW, 200 steps at lr 1e-2;
and sends the fitted coefficient of client u with the data weights, p_u c_u = P_u p_u / w_u,
so what is sent is not the fitted optimum. This module solves that objective with flora_na.py's
Gram primitives and whitened AdamW (and flora_na_scale.py's passes on the matrix-free path),
and registers it through flora_na.register, as any plug-in aggregator does:

    python train.py --plugins evidence.authors_variant --aggregator flora_na_authors

Coefficients on the changes are coefficients on U + 1 factors, the global pair first with
1 - sum_u P_u (_with_global, _on_factors); no (cP, Q/c) rescaling, which would move B_g.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

import flora_na as fl
from flora_na import (Aggregate, Aggregator, FloraNAResult, Option, _check_clients,
                      _check_factors, _hat_gram, _layer_total, _nbytes, _norm_M2, _share_bytes,
                      _squared_divergence, _whitener, choose_path, divergence_bound, gram_blocks)

NAME = "flora_na_authors"


def _with_global(A: Tensor, B: Tensor, p: Tensor, previous: tuple[Tensor, Tensor]):
    """Coefficients on the clients' changes relative to the global factors (A_g, B_g) are
    coefficients on U + 1 factors: 1 - sum_u P_u on B_g, P_u on B_u (_on_factors). Returns those
    factors, A (L, U + 1, r, k) and B (L, U + 1, d, r) with the global pair first, and M's
    weights (0, p): M itself is unchanged."""
    A_g, B_g = previous
    if A_g.shape != A[:, 0].shape or B_g.shape != B[:, 0].shape:
        raise ValueError(f"previous global factors A {tuple(A_g.shape)}, B {tuple(B_g.shape)} "
                         f"do not match one client's A {tuple(A[:, 0].shape)}, "
                         f"B {tuple(B[:, 0].shape)}")
    if not (torch.isfinite(A_g).all() and torch.isfinite(B_g).all()):
        raise ValueError("previous global factors contain NaN or Inf")
    A = torch.cat([A_g.to(A)[:, None], A], 1)                            # (L, U + 1, r, k)
    B = torch.cat([B_g.to(B)[:, None], B], 1)                            # (L, U + 1, d, r)
    return A, B, torch.cat([p.new_zeros(1), p])


def _on_factors(P: Tensor) -> Tensor:
    """Coefficients (..., U) on the changes -> (..., U + 1) on the factors of _with_global."""
    return torch.cat([1 - P.sum(-1, keepdim=True), P], -1)


def _to_changes(H: Tensor) -> Tensor:
    """A quadratic form (..., U + 1, U + 1) in the coefficients on _with_global's factors as one
    in the coefficients on the changes (..., U, U): T^T H T with T = d(_on_factors)/dP = [-1; I]."""
    return H[..., 1:, 1:] - H[..., :1, 1:] - H[..., 1:, :1] + H[..., :1, :1]


def divergence(A: Tensor, B: Tensor, p: Tensor, P: Tensor, Q: Tensor,
               previous: tuple[Tensor, Tensor]) -> Tensor:
    """||M - (B_g + sum_u P_u (B_u - B_g))(A_g + sum_u Q_u (A_u - A_g))||_F per layer (L,), in
    Gram space, for previous = (A_g (L, r, k), B_g (L, d, r))."""
    p = _check_factors(A, B, p).to(A.device)
    A, B, p = _with_global(A, B, p, previous)
    G_A, G_B = gram_blocks(A, B)
    P, Q = (_on_factors(torch.as_tensor(c, dtype=torch.float64, device=A.device)) for c in (P, Q))
    return _squared_divergence(G_A, G_B, p, P, Q).clamp_min(0).sqrt()


def _adamw(G_A, G_B, p, tie_layers: bool, steps: int, lr: float, weight_decay: float,
           start: Tensor):
    """flora_na._adamw on the coefficients on the changes: G_A, G_B and p are _with_global's,
    the start is `start`, and the whitening acts on the changes' Gauss-Newton blocks."""
    L = G_A.shape[0]
    n = 1 if tie_layers else L
    total = _layer_total(tie_layers)
    norm_M2 = _norm_M2(G_A, G_B, p)                                   # (L,)
    f = lambda P, Q: total(_squared_divergence(                      # noqa: E731  (n,)
        G_A, G_B, p, _on_factors(P).expand(L, -1), _on_factors(Q).expand(L, -1), norm_M2))
    P_0 = start.expand(n, -1).clone()                                 # (n, U)
    f_0 = f(P_0, P_0).clamp_min(0)                                    # (n,)
    scale = torch.maximum(f_0, 1e-30 * total(norm_M2)).clamp_min(1e-300)
    S_B = _hat_gram(_on_factors(P_0).expand(L, -1), G_B)              # (L, r, r) at the start
    S_A = _hat_gram(_on_factors(P_0).expand(L, -1), G_A)
    H_P = total(torch.einsum("lacij,lji->lac", G_B, S_A))             # (n, U + 1, U + 1)
    H_Q = total(torch.einsum("lij,lbdji->lbd", S_B, G_A))
    W_P = _whitener(_to_changes(H_P) / scale[:, None, None])          # (n, U, U)
    W_Q = _whitener(_to_changes(H_Q) / scale[:, None, None])
    x = torch.zeros_like(P_0, requires_grad=True)                     # (n, U)
    y = torch.zeros_like(P_0, requires_grad=True)
    opt = torch.optim.AdamW([x, y], lr=lr, weight_decay=weight_decay)
    best_f = torch.full((n,), math.inf, dtype=G_A.dtype, device=G_A.device)
    best_P, best_Q = P_0.clone(), P_0.clone()
    for step in range(steps + 1):
        P = P_0 + torch.einsum("nuv,nv->nu", W_P, x)                  # (n, U)
        Q = P_0 + torch.einsum("nuv,nv->nu", W_Q, y)
        ratio = f(P, Q) / scale                                       # (n,) f / f_0
        with torch.no_grad():
            better = ratio < best_f
            best_f = torch.where(better, ratio, best_f)
            best_P[better], best_Q[better] = P[better], Q[better]
        if step == steps:
            break
        opt.zero_grad()
        ratio.sum().backward()
        opt.step()
    return best_P.expand(L, -1), best_Q.expand(L, -1), steps


def _solve_gram(A, B, p, previous, start, tie_layers, steps, lr, weight_decay, bound):
    """The Gram path: AdamW on the changes through _with_global's U + 1 factors; never worse
    than the start; no (cP, Q/c) rescaling."""
    A_g, B_g, p_g = _with_global(A, B, p, previous)                    # U + 1 factors
    G_A, G_B = gram_blocks(A_g, B_g)                                   # (L, U', U', r, r) each
    P, Q, iters = _adamw(G_A, G_B, p_g, tie_layers, steps, lr, weight_decay, start)
    f = _squared_divergence(G_A, G_B, p_g, _on_factors(P), _on_factors(Q))
    f_start = _squared_divergence(G_A, G_B, p_g, *[_on_factors(start)] * 2)
    f_naive = _squared_divergence(G_A, G_B, p_g, *[_on_factors(p)] * 2)   # FedIT
    total = _layer_total(tie_layers)
    f, f_start = f.clamp_min(0), f_start.clamp_min(0)
    worse = (total(f) > total(f_start))[:, None]       # round-off must never lose to the start
    P, Q = torch.where(worse, start, P), torch.where(worse, start, Q)  # (L, U) each
    f = torch.where(worse[:, 0], f_start, f)
    A_hat = torch.einsum("lu,lurk->lrk", _on_factors(Q), A_g.double()).to(A.dtype)
    B_hat = torch.einsum("lu,ludr->ldr", _on_factors(P), B_g.double()).to(B.dtype)
    return FloraNAResult(
        P=P, Q=Q, A_hat=A_hat, B_hat=B_hat,
        divergence=f.sqrt(), divergence_naive=f_naive.clamp_min(0).sqrt(),
        divergence_bound=divergence_bound(A, B, p) if bound else None,
        norm_M=_norm_M2(G_A, G_B, p_g).clamp_min(0).sqrt(), iterations=iters)


def _adamw_matrix_free(stack, p: Tensor, steps: int, lr: float, weight_decay: float,
                       start: Tensor):
    """flora_na_scale._adamw_matrix_free on the changes (stack of _with_global's factors)."""
    f = lambda P, Q: torch.linalg.vector_norm(                       # noqa: E731  summed
        stack.M - stack.combine_B(_on_factors(P)) @ stack.combine_A(_on_factors(Q)), dim=(1, 2)
    ).square().sum()
    P_0 = start.clone()                                               # (U,)
    f_0 = f(P_0, P_0)
    scale = torch.maximum(f_0, 1e-30 * stack.norm_M2.sum()).clamp_min(1e-300)
    B_0, A_0 = stack.combine_B(_on_factors(P_0)), stack.combine_A(_on_factors(P_0))
    H_P, H_Q = stack.gauss_newton(A_0 @ A_0.mT, B_0.mT @ B_0)         # (U + 1, U + 1) each
    W_P = _whitener(_to_changes(H_P)[None] / scale)[0]                # (U, U)
    W_Q = _whitener(_to_changes(H_Q)[None] / scale)[0]
    x = torch.zeros_like(P_0, requires_grad=True)                     # (U,)
    y = torch.zeros_like(P_0, requires_grad=True)
    opt = torch.optim.AdamW([x, y], lr=lr, weight_decay=weight_decay)
    best_f = torch.tensor(math.inf, dtype=torch.float64, device=p.device)
    best_P, best_Q = P_0.clone(), P_0.clone()
    for step in range(steps + 1):
        P, Q = P_0 + W_P @ x, P_0 + W_Q @ y                           # (U,) each
        ratio = f(P, Q) / scale
        with torch.no_grad():
            better = ratio < best_f
            best_f = torch.where(better, ratio, best_f)
            best_P = torch.where(better, P, best_P)
            best_Q = torch.where(better, Q, best_Q)
        if step == steps:
            break
        opt.zero_grad()
        ratio.backward()
        opt.step()
    return best_P.detach(), best_Q.detach(), steps


def _finish_stack(stack, p, P, Q, iterations, bound, dtype_A, dtype_B, start) -> FloraNAResult:
    """flora_na_scale._finish_stack on the changes: fall back to the start if worse in total,
    no rescaling, divergences from the dense residuals."""
    n, r = stack.M.shape[0], stack.A.shape[2]
    P_c, Q_c = P, Q
    B_hat, A_hat = stack.combine_B(_on_factors(P)), stack.combine_A(_on_factors(Q))
    B_bar, A_bar = stack.combine_B(p), stack.combine_A(p)             # FedIT's factors
    R = torch.baddbmm(stack.M, B_hat, A_hat, alpha=-1)                # (n, d, k)
    f = torch.linalg.vector_norm(R, dim=(1, 2)).square()              # (n,)
    torch.baddbmm(stack.M, B_bar, A_bar, alpha=-1, out=R)
    f_naive = torch.linalg.vector_norm(R, dim=(1, 2)).square()
    B_0, A_0 = stack.combine_B(_on_factors(start)), stack.combine_A(_on_factors(start))
    torch.baddbmm(stack.M, B_0, A_0, alpha=-1, out=R)
    f_start = torch.linalg.vector_norm(R, dim=(1, 2)).square()
    del R
    if f.sum() > f_start.sum():                   # round-off must never lose to the start
        P_c, Q_c, B_hat, A_hat, f = start, start, B_0, A_0, f_start
    bound_tail = None
    if bound:
        bound_tail = torch.linalg.svdvals(stack.M)[:, r:].square().sum(-1).sqrt()
    return FloraNAResult(
        P=P_c.expand(n, -1), Q=Q_c.expand(n, -1), A_hat=A_hat.to(dtype_A),
        B_hat=B_hat.to(dtype_B), divergence=f.sqrt(), divergence_naive=f_naive.sqrt(),
        divergence_bound=bound_tail, norm_M=stack.norm_M2.sqrt(), iterations=iterations)


def _solve_matrix_free(A, B, p, previous, start, tie_layers, steps, lr, weight_decay, bound):
    """The matrix-free path: the layers one at a time, or all as one stack when tied."""
    from flora_na_scale import _ClientStack
    L = A.shape[0]
    parts = []
    for layers in [slice(0, L)] if tie_layers else [slice(l, l + 1) for l in range(L)]:
        A_s, B_s, p_s = _with_global(A[layers], B[layers], p,
                                     (previous[0][layers], previous[1][layers]))
        stack = _ClientStack(A_s, B_s, p_s)
        P, Q, iters = _adamw_matrix_free(stack, p_s, steps, lr, weight_decay, start)
        parts.append(_finish_stack(stack, p_s, P, Q, iters, bound, A.dtype, B.dtype, start))
        del stack
    cat = lambda name: torch.cat([getattr(x, name) for x in parts])   # noqa: E731
    return FloraNAResult(
        P=cat("P"), Q=cat("Q"), A_hat=cat("A_hat"), B_hat=cat("B_hat"),
        divergence=cat("divergence"), divergence_naive=cat("divergence_naive"),
        divergence_bound=cat("divergence_bound") if bound else None, norm_M=cat("norm_M"),
        iterations=max(x.iterations for x in parts))


def solve_on_changes(A: Tensor, B: Tensor, p: Tensor, previous: tuple[Tensor, Tensor], *,
                     start: Tensor | None = None, tie_layers: bool = True, steps: int = 200,
                     lr: float = 1e-2, weight_decay: float = 0.0, bound: bool = False,
                     path: str = "auto") -> FloraNAResult:
    """min over P, Q of ||M - (B_g + sum_u P_u (B_u - B_g))(A_g + sum_u Q_u (A_u - A_g))||_F by
    flora_na.py's whitened AdamW from P = Q = start (default p), never worse than the start.
    A (L, U, r, k), B (L, U, d, r), p (U,) (normalised), previous = (A_g (L, r, k), B_g (L, d,
    r)); path as solve_flora_na's. P, Q (L, U) act on the changes; no (cP, Q/c) rescaling."""
    p = _check_factors(A, B, p).to(A.device)
    start = p if start is None else torch.as_tensor(
        start, dtype=torch.float64, device=A.device).flatten()
    if start.numel() != A.shape[1] or not torch.isfinite(start).all():
        raise ValueError(f"start must hold {A.shape[1]} finite coefficients, got "
                         f"{start.tolist()}")
    if path == "auto":
        path = choose_path(A.shape[1], A.shape[2], B.shape[2], A.shape[3])
    if path not in ("gram", "matrix_free"):
        raise ValueError(f"unknown path {path!r}: use 'auto', 'gram' or 'matrix_free'")
    solve = _solve_gram if path == "gram" else _solve_matrix_free
    return solve(A, B, p, previous, start, tie_layers, steps, lr, weight_decay, bound)


def flora_na_authors(A, B, p, *, previous: tuple[Tensor, Tensor] | None = None,
                     **solver_options) -> Aggregate:
    """The aggregator: fit the uniform mean on the changes from w = 1/U (solve_on_changes),
    send the fitted coefficients with the data weights, B_g + sum_u (P_u p_u / w_u)(B_u - B_g)
    (A likewise). info["result"] holds the solve against M_w."""
    p = _check_clients(A, B, p, True, NAME)
    if previous is None:
        raise ValueError(f"{NAME}: needs the global factors the clients started from "
                         f"(previous=(A_g, B_g))")
    A_s, B_s = torch.stack(A, 1), torch.stack(B, 1)                   # (L, U, r, k), (L, U, d, r)
    p = p.to(A_s.device)
    w = torch.full_like(p, 1 / len(A))                                # (U,) uniform target
    res = solve_on_changes(A_s, B_s, w, previous, start=w, **solver_options)
    P, Q = res.P * p / w, res.Q * p / w                               # (L, U) each, sent
    base_A, base_B = previous[0].double(), previous[1].double()
    A_hat = (base_A + torch.einsum("lu,lurk->lrk", Q, A_s.double() - base_A[:, None])
             ).to(A_s.dtype)                                          # (L, r, k)
    B_hat = (base_B + torch.einsum("lu,ludr->ldr", P, B_s.double() - base_B[:, None])
             ).to(B_s.dtype)                                          # (L, d, r)
    return Aggregate(A_hat, B_hat, None, _nbytes(*A, *B),
                     _share_bytes(A_hat, B_hat, [a.shape[1] for a in A]), info={"result": res})


def check_model(model, options: dict) -> None:
    """The authors' code ties one (P, Q) across every LoRA layer; tie_layers ties the layers
    of one shape, so for a model whose layers come in several shapes (a GQA Llama's q and v)
    refuse rather than tie less than the variant says."""
    if not options.get("tie_layers", True):
        return
    shapes = {(tuple(m.lora_B["default"].weight.shape), tuple(m.lora_A["default"].weight.shape))
              for m in fl.lora_layers(model).values()}
    if len(shapes) > 1:
        raise ValueError(f"{NAME} ties one (P, Q) across all LoRA layers, but this model's come "
                         f"in {len(shapes)} shapes (B, A): {sorted(shapes)}; choose "
                         f"--target-modules of one shape, or pass --agg-option "
                         f"{NAME}.tie_layers=false (one (P, Q) per layer)")


fl.register(NAME, Aggregator(flora_na_authors, "FLoRA-NA (authors' code)", options={
    "previous": None,
    "tie_layers": Option(True, "one (P, Q) for all layers of a shape, as the released code"),
    "steps": Option(200, "AdamW steps", minimum=1),
    "lr": Option(1e-2, "AdamW learning rate, a fraction of the start's divergence", minimum=0,
                 above=True),
    "weight_decay": Option(0.0, "AdamW weight decay, towards the start", minimum=0),
    "path": Option("auto", "auto (by size), gram or matrix_free", choices=("auto", "gram",
                                                                            "matrix_free"))},
    check_model=check_model))
