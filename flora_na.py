"""FLoRA-NA: nearly accurate aggregation of LoRA factors in federated fine-tuning.

Each client u trains LoRA factors B_u (d x r) and A_u (r x k) and the server wants the ideal
update M = sum_u p_u B_u A_u, but it may only send back one rank-r pair. FedIT sends
(sum_u p_u B_u)(sum_u p_u A_u), which is not M; FLoRA-NA sends B_hat = sum_u P_u B_u and
A_hat = sum_u Q_u A_u with coefficient vectors P, Q chosen on the server to minimise the
divergence ||M - B_hat A_hat||_F, at no extra communication.

Paper: Nguyen et al., "Communication-Efficient and Accurate Approach for Aggregation in
Federated Low-Rank Adaptation", arXiv 2509.26399 (https://arxiv.org/abs/2509.26399).

Read top to bottom: no function or class uses a name defined below it (tests/test_reading_order.py).
  1. LoRA factors in and out of a peft model, and the client step
  2. Gram primitives and the divergence        } the solver: one block, torch + stdlib only,
  3. the FLoRA-NA solver (ALS + LM, AdamW)     } between the COPYABLE SOLVER markers
  4. aggregators, simplest first: FedIT .. LoRA-FAIR, RoLoRA, Fed-SB, then FLoRA-NA
  5. the registry: each aggregator, what its clients do differently, and its options
The solver stands before the baselines (which need none of it) to be one block to copy. The
matrix-free path for many clients is flora_na_scale.py; the authors' released variant is a
plug-in, evidence/authors_variant.py. Shapes: L layers of one shape, U clients, rank r,
B_u (d, r), A_u (r, k), so B_u @ A_u is (out, in) like nn.Linear.weight; p (U,), p_u = n_u / sum n.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# 1. LoRA factors in and out of a peft model, and the client step
# ---------------------------------------------------------------------------------------------


def lora_layers(model) -> dict[str, torch.nn.Module]:
    """Every peft LoRA layer of `model` (active adapter "default"), by module name."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def read_factors(model) -> dict[str, tuple[Tensor, Tensor]]:
    """{layer name: (A (r, k), B (d, r))} copied out of the model, float32 on the CPU."""
    return {name: (m.lora_A["default"].weight.detach().float().cpu().clone(),
                   m.lora_B["default"].weight.detach().float().cpu().clone())
            for name, m in lora_layers(model).items()}


@torch.no_grad()
def write_factors(model, factors: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Load {layer name: (A, B)} into the model's LoRA layers (shapes must match)."""
    for name, m in lora_layers(model).items():
        A, B = factors[name]
        m.lora_A["default"].weight.copy_(A)
        m.lora_B["default"].weight.copy_(B)


@torch.no_grad()
def add_to_base(model, deltas: dict[str, Tensor]) -> None:
    """W <- W + scaling * delta per named layer; delta (out, in), transposed for fan_in_fan_out."""
    for name, m in lora_layers(model).items():
        if name in deltas:
            W = m.get_base_layer().weight
            delta = deltas[name].mT if m.fan_in_fan_out else deltas[name]
            W.add_((m.scaling["default"] * delta).to(W.dtype))


@torch.no_grad()
def restart_lora(model, generator: torch.Generator) -> None:
    """Fresh LoRA factors as peft makes them (A kaiming-uniform, B = 0), from `generator`."""
    for m in lora_layers(model).values():
        A = torch.empty_like(m.lora_A["default"].weight, device="cpu")
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        m.lora_A["default"].weight.copy_(A)
        m.lora_B["default"].weight.zero_()


def head_state(model) -> dict[str, Tensor]:
    """Trainable parameters that are not LoRA factors (e.g. the classification head)."""
    return {n: q.detach().float().cpu().clone() for n, q in model.named_parameters()
            if q.requires_grad and "lora_" not in n}


@torch.no_grad()
def load_head(model, state: dict[str, Tensor]) -> None:
    """Copy a head_state() dict back into the model."""
    params = dict(model.named_parameters())
    for n, v in state.items():
        params[n].copy_(v)


class _Core(torch.nn.Module):   # lora_A's weight as R @ A0, A0 (r, k) with orthonormal rows
    def __init__(self, A0: Tensor):
        super().__init__()
        self.register_buffer("A0", A0)
    def forward(self, R): return R @ self.A0
    def right_inverse(self, A): return A @ self.A0.mT      # R = A A0^T


def local_train(model, batches, *, lr: float, optimizer: str = "adamw", weight_decay: float = 0.0,
                trains: str = "AB", core: dict[str, Tensor] | None = None,
                max_grad_norm: float = 1.0) -> float:
    """The client step: one step per batch, fresh optimizer; the mean loss. trains: the factors
    trained ("B": A frozen, as FFA-LoRA); core {layer: A0}: A is R @ A0 and only R trains
    (Fed-SB), folded back into A at the end, so what comes out is a standard LoRA pair."""
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}: use 'adamw' or 'sgd'")
    device = next(model.parameters()).device
    parametrize, layers = torch.nn.utils.parametrize, lora_layers(model) if core else {}
    for name, m in layers.items():                 # lora_A's weight becomes R @ A0: R trains
        parametrize.register_parametrization(m.lora_A["default"], "weight", _Core(
            core[name].to(device, m.lora_A["default"].weight.dtype)), unsafe=True)
    for name, param in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            param.requires_grad_(("A" if "lora_A" in name else "B") in trains)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = (torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD)(
        params, lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    for step, batch in enumerate(batches):
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"client training loss is {loss.item()} at local step "
                                     f"{step + 1} (lr {lr}, {optimizer}): lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        losses.append(loss.item())
    for m in layers.values():
        parametrize.remove_parametrizations(m.lora_A["default"], "weight")   # A = R A0
    for name, param in model.named_parameters():     # leave A, B trainable for the next user
        if "lora_A" in name or "lora_B" in name:
            param.requires_grad_(True)
    return sum(losses) / max(len(losses), 1)


# ----- BEGIN COPYABLE SOLVER: sections 2-3, down to END COPYABLE SOLVER; torch + stdlib -----
import math                      # the block's own imports, so that it runs alone
from dataclasses import dataclass

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# 2. Gram primitives and the divergence.
#
#    With B_hat = sum_a P_a B_a and A_hat = sum_b Q_b A_b, expand the paper's objective (Eq. 6)
#      ||M - B_hat A_hat||^2 = ||M||^2 - 2 <M, B_hat A_hat> + ||B_hat A_hat||^2
#    with the r x r Gram blocks G_B[u, v] = B_u^T B_v, G_A[u, v] = A_u A_v^T (tr(XY) = tr(YX)):
#      ||M||^2            = sum_uv p_u p_v tr(G_B[u, v] G_A[v, u])
#      <M, B_hat A_hat>   = sum_u p_u tr(X_u Y_u),  X_u = B_u^T B_hat = sum_a P_a G_B[u, a]
#                                                   Y_u = A_hat A_u^T = sum_b Q_b G_A[b, u]
#      ||B_hat A_hat||^2  = tr(S_B S_A),           S_B = B_hat^T B_hat = sum_ac P_a P_c G_B[a, c]
#                                                   S_A = A_hat A_hat^T = sum_bd Q_b Q_d G_A[b, d]
#    Blocks once, O(L U^2 r^2 (d + k)); then each evaluation is O(L U^2 r^2), free of d and k,
#    but a difference of terms as large as ||M||^2: below ~1e-8 ||M|| a value is round-off.
# ---------------------------------------------------------------------------------------------


def check_weights(p: Tensor, U: int, method: str) -> Tensor:
    """p as float64 summing to one; ValueError for the wrong size, negatives, NaN, all zero."""
    p = torch.as_tensor(p, dtype=torch.float64).flatten()
    if U == 0 or p.numel() != U:
        raise ValueError(f"{method}: {p.numel()} weights for {U} clients" if U else
                         f"{method}: no clients")
    if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"{method}: weights must be finite, >= 0, not all zero: {p.tolist()}")
    return p / p.sum()


def _check_factors(A: Tensor, B: Tensor, p: Tensor) -> Tensor:
    """Validate A (L, U, r, k), B (L, U, d, r), p (U,); return p / sum(p)."""
    if A.dim() != 4 or B.dim() != 4 or A.shape[:2] != B.shape[:2] or A.shape[2] != B.shape[3]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} disagree in layers, clients "
                         f"or rank; expected A (L, U, r, k) and B (L, U, d, r)")
    if A.shape[1] == 0 or A.shape[2] == 0:
        raise ValueError(f"no clients or zero rank: A has shape {tuple(A.shape)}")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ValueError("A or B contains NaN or Inf")
    return check_weights(p, A.shape[1], "solve_flora_na")


def gram_blocks(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """G_A[l, u, v] = A_u A_v^T, G_B[l, u, v] = B_u^T B_v (float64): all that touches d, k."""
    L, U, r, k = A.shape
    A_flat = A.double().reshape(L, U * r, k)                              # (L, U r, k)
    B_flat = B.double().permute(0, 2, 1, 3).reshape(L, B.shape[2], U * r)  # (L, d, U r)
    G_A = (A_flat @ A_flat.mT).view(L, U, r, U, r).permute(0, 1, 3, 2, 4).contiguous()
    G_B = (B_flat.mT @ B_flat).view(L, U, r, U, r).permute(0, 1, 3, 2, 4).contiguous()
    return G_A, G_B                                                      # (L, U, U, r, r) each


def _hat_gram(c, G): return torch.einsum("la,lc,lacij->lij", c, c, G)  # S_B, S_A (L, r, r)
def _X(P, G_B): return torch.einsum("la,luaij->luij", P, G_B)         # X_u (L, U, r, r)
def _Y(Q, G_A): return torch.einsum("lb,lbuij->luij", Q, G_A)         # Y_u (L, U, r, r)
def _norm_M2(G_A, G_B, p): return torch.einsum("u,v,luvij,lvuji->l", p, p, G_B, G_A)  # (L,) |M|^2


def _squared_divergence(G_A, G_B, p, P, Q, norm_M2=None) -> Tensor:
    """||M - B_hat A_hat||_F^2 per layer (L,) from Gram blocks; P, Q (L, U) or (U,)."""
    P, Q = P.expand(G_A.shape[0], -1), Q.expand(G_A.shape[0], -1)         # (L, U) each
    norm_M2 = _norm_M2(G_A, G_B, p) if norm_M2 is None else norm_M2
    S_B, S_A = _hat_gram(P, G_B), _hat_gram(Q, G_A)                        # (L, r, r) each
    cross = torch.einsum("u,luij,luji->l", p, _X(P, G_B), _Y(Q, G_A))     # <M, B_hat A_hat>
    return norm_M2 - 2 * cross + torch.einsum("lij,lji->l", S_B, S_A)


def divergence(A: Tensor, B: Tensor, p: Tensor, P: Tensor, Q: Tensor) -> Tensor:
    """||M - (sum_u P_u B_u)(sum_u Q_u A_u)||_F per layer (L,), computed in Gram space."""
    p = _check_factors(A, B, p).to(A.device)
    P, Q = (torch.as_tensor(c, dtype=torch.float64, device=A.device) for c in (P, Q))
    return _squared_divergence(*gram_blocks(A, B), p, P, Q).clamp_min(0).sqrt()


def divergence_bound(A: Tensor, B: Tensor, p: Tensor) -> Tensor:
    """min over rank-r X of ||M - X||_F (L,): the Eckart-Young tail, M = [p_u B_u]_u [A_u]_u."""
    p = _check_factors(A, B, p).to(A.device)
    L, U, r, k = A.shape
    B_stack = (B.double() * p[None, :, None, None]).permute(0, 2, 1, 3).reshape(L, -1, U * r)
    _, R_b = torch.linalg.qr(B_stack, mode="r")
    _, R_a = torch.linalg.qr(A.double().reshape(L, U * r, k).mT, mode="r")
    S = torch.linalg.svdvals(R_b @ R_a.mT)           # (L, U r) singular values of M, descending
    return S[:, r:].square().sum(-1).sqrt()


# ---------------------------------------------------------------------------------------------
# 3. The FLoRA-NA solver: min over P, Q of ||M - B_hat A_hat||_F^2, all in Gram space.
#
#    For fixed Q the objective is a convex quadratic in P:  P^T H_P P - 2 g_P^T P + ||M||^2,
#      H_P[a, c] = <B_a A_hat, B_c A_hat> = tr(G_B[a, c] S_A),
#      g_P[a]    = <B_a A_hat, M>         = sum_u p_u tr(G_B[u, a] Y_u),
#    and symmetrically in Q (H_Q[b, d] = tr(S_B G_A[b, d]), g_Q[b] = sum_u p_u tr(X_u G_A[b, u])).
#    Alternating exact minimisation (ALS) only goes down but crawls along valleys where P and
#    Q must move together, so each sweep ends with a Levenberg-Marquardt step on both, for the
#    residual R = M - B_hat A_hat: dR/dP_a = -B_a A_hat, dR/dQ_b = -B_hat A_b, so
#    J^T J = [[H_P, C], [C^T, H_Q]], C[u, v] = tr(X_u Y_v^T), -J^T R = (g_P - H_P P, g_Q - H_Q Q).
#    Departure from the paper (AdamW on (P, Q)): ALS + LM is the default because it solves each
#    half-step exactly and never goes up, with no learning rate or step count to tune. AdamW
#    stays (solver="adamw"), in coordinates where one lr suits every problem.
# ---------------------------------------------------------------------------------------------


@dataclass
class FloraNAResult:
    """Coefficients, aggregated factors and per-layer divergences ||M - B_hat A_hat||_F."""
    P: Tensor                        # (L, U) coefficients of B: B_hat = sum_u P_u B_u
    Q: Tensor                        # (L, U) coefficients of A: A_hat = sum_u Q_u A_u
    A_hat: Tensor                    # (L, r, k)
    B_hat: Tensor                    # (L, d, r)
    divergence: Tensor               # (L,) ||M - B_hat A_hat||_F
    divergence_naive: Tensor         # (L,) ||M - (sum p B)(sum p A)||_F  (FedIT)
    divergence_bound: Tensor | None  # (L,) best any rank-r product can do (Eckart-Young)
    norm_M: Tensor                   # (L,) ||M||_F, to report divergences relative to M
    iterations: int


def _layer_total(tie_layers: bool):  # what is minimised: each layer's f (L,), or tied, the sum (1,)
    return (lambda x: x.sum(0, keepdim=True)) if tie_layers else (lambda x: x)


def _lm_step(G_A, G_B, p, P, Q, f, damping, total, norm_M2):
    """One LM step in (P, Q), kept where it lowers f; returns P, Q, f and the new damping."""
    L, U = P.shape
    S_A, S_B = _hat_gram(Q, G_A), _hat_gram(P, G_B)                    # (L, r, r) each
    X, Y = _X(P, G_B), _Y(Q, G_A)                                      # (L, U, r, r) each
    H_P = torch.einsum("lacij,lji->lac", G_B, S_A)                     # (L, U, U)
    H_Q = torch.einsum("lij,lbdji->lbd", S_B, G_A)                     # (L, U, U)
    C = torch.einsum("luij,lvij->luv", X, Y)                           # (L, U, U)
    g_P = torch.einsum("u,luaij,luji->la", p, G_B, Y) - torch.einsum("lac,lc->la", H_P, P)
    g_Q = torch.einsum("u,luij,lbuji->lb", p, X, G_A) - torch.einsum("lbd,ld->lb", H_Q, Q)
    JJ = total(torch.cat([torch.cat([H_P, C], 2), torch.cat([C.mT, H_Q], 2)], 1))  # (L, 2U, 2U)
    Jr = total(torch.cat([g_P, g_Q], 1))                                           # (L, 2U)
    scale = JJ.diagonal(dim1=1, dim2=2).mean(-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    eye = torch.eye(2 * U, dtype=JJ.dtype, device=JJ.device)
    step = torch.linalg.solve(JJ + (damping * scale)[:, None, None] * eye, Jr.unsqueeze(-1))
    step = step[..., 0].expand(L, 2 * U)                               # (L, 2U)
    P_new, Q_new = P + step[:, :U], Q + step[:, U:]
    f_new = total(_squared_divergence(G_A, G_B, p, P_new, Q_new, norm_M2))
    better = f_new < f
    damping = torch.where(better, damping / 3, damping * 4).clamp(1e-12, 1e12)
    return (torch.where(better[:, None], P_new, P), torch.where(better[:, None], Q_new, Q),
            torch.where(better, f_new, f), damping)


def _als(G_A, G_B, p, tie_layers: bool, max_iter: int, tol: float, prox: float):
    """ALS from FedIT (P = Q = p), each half-step with a proximal term (well posed for singular
    H: B = 0, identical clients), then an LM step. Returns P, Q (L, U) and the sweeps run."""
    L, U = G_A.shape[:2]
    P, Q = p.expand(L, U).clone(), p.expand(L, U).clone()            # (L, U) each: FedIT
    eye = torch.eye(U, dtype=G_A.dtype, device=G_A.device)
    norm_M2 = _norm_M2(G_A, G_B, p)                                   # (L,)
    total = _layer_total(tie_layers)

    def prox_step(H, g, x):           # argmin_x' x'^T H x' - 2 g^T x' + lam ||x' - x||^2
        if tie_layers:
            H, g, x = H.sum(0, keepdim=True), g.sum(0, keepdim=True), x[:1]
        lam = prox * H.diagonal(dim1=1, dim2=2).mean(-1)
        lam = torch.where(lam > 0, lam, torch.ones_like(lam))[:, None, None]  # H = 0: stay
        x_new = torch.linalg.solve(H + lam * eye, (g + lam[..., 0] * x).unsqueeze(-1))[..., 0]
        return x_new.expand(L, U)

    f_prev = total(_squared_divergence(G_A, G_B, p, P, Q, norm_M2))
    damping = torch.full_like(f_prev, 1e-3)
    for it in range(1, max_iter + 1):
        H = torch.einsum("lacij,lji->lac", G_B, _hat_gram(Q, G_A))         # H_P (L, U, U)
        g = torch.einsum("u,luaij,luji->la", p, G_B, _Y(Q, G_A))           # g_P (L, U)
        P = prox_step(H, g, P)
        H = torch.einsum("lij,lbdji->lbd", _hat_gram(P, G_B), G_A)         # H_Q (L, U, U)
        g = torch.einsum("u,luij,lbuji->lb", p, _X(P, G_B), G_A)           # g_Q (L, U)
        Q = prox_step(H, g, Q)
        f = total(torch.einsum("lb,lbd,ld->l", Q, H, Q) - 2 * (g * Q).sum(-1) + norm_M2)
        for _ in range(3):            # the joint step, up to 3 times with rising damping
            P, Q, f_new, damping = _lm_step(G_A, G_B, p, P, Q, f, damping, total, norm_M2)
            moved, f = (f_new < f).any(), f_new
            if moved:
                break
        if ((f_prev - f) <= tol * total(norm_M2)).all():
            break
        f_prev = f
    return P, Q, it


# AdamW, the paper's optimiser. On (P, Q) themselves Adam steps by ~lr whatever the gradient, so
# once FedIT's gap is small every step overshoots, and nearly collinear clients make H_P, H_Q ill
# conditioned. Instead P = P_0 + W_P x, Q = Q_0 + W_Q y, W = (H / f_0 + floor I)^(-1/2), from
# FedIT's P_0 = Q_0 = p, f_0 its squared divergence, H the Gauss-Newton blocks there: a unit step
# in x moves B_hat A_hat by at most sqrt(f_0), so lr is a fraction of FedIT's divergence, AdamW
# minimises f / f_0 from x = y = 0, weight_decay pulls towards FedIT, and the floor keeps
# directions that barely move the product (B = 0) slow. Tied: one (x, y), f and f_0 summed.
ADAMW_FLOOR = 1e-6


def _whitener(H: Tensor) -> Tensor:
    """(H + floor I)^(-1/2) for symmetric H (n, U, U) >= 0, by eigendecomposition."""
    lam, V = torch.linalg.eigh(H)                                     # (n, U), (n, U, U)
    lam = lam.clamp_min(0)
    floor = (1e-12 * lam[:, -1:]).clamp_min(ADAMW_FLOOR)              # (n, 1)
    return (V * (lam + floor).rsqrt()[:, None, :]) @ V.mT


def _adamw(G_A, G_B, p, tie_layers: bool, steps: int, lr: float, weight_decay: float):
    """AdamW in the whitened coordinates above from FedIT, keeping the best iterate (the start
    included, so never worse than FedIT). Returns P, Q (L, U) and the steps."""
    L, n = G_A.shape[0], 1 if tie_layers else G_A.shape[0]
    total = _layer_total(tie_layers)
    norm_M2 = _norm_M2(G_A, G_B, p)                                   # (L,)
    f = lambda P, Q: total(_squared_divergence(                      # noqa: E731  (n,)
        G_A, G_B, p, P.expand(L, -1), Q.expand(L, -1), norm_M2))
    P_0 = p.expand(n, -1).clone()                                     # (n, U)
    f_0 = f(P_0, P_0).clamp_min(0)                                    # (n,)
    scale = torch.maximum(f_0, 1e-30 * total(norm_M2)).clamp_min(1e-300)
    S_B, S_A = _hat_gram(P_0.expand(L, -1), G_B), _hat_gram(P_0.expand(L, -1), G_A)  # (L, r, r)
    H_P = total(torch.einsum("lacij,lji->lac", G_B, S_A))             # (n, U, U) Gauss-Newton
    H_Q = total(torch.einsum("lij,lbdji->lbd", S_B, G_A))
    W_P, W_Q = _whitener(H_P / scale[:, None, None]), _whitener(H_Q / scale[:, None, None])
    x, y = torch.zeros_like(P_0, requires_grad=True), torch.zeros_like(P_0, requires_grad=True)
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


MATRIX_FREE_MIN_CLIENTS = 32   # path="auto" keeps the Gram path (the tests' oracle) up to here


def choose_path(U: int, r: int, d: int, k: int) -> str:
    """path="auto": "matrix_free" once U > MATRIX_FREE_MIN_CLIENTS and forming M (U r d k
    multiply-adds) costs less than the Gram blocks ((U r)^2 (d + k)); else "gram"."""
    return "matrix_free" if U > MATRIX_FREE_MIN_CLIENTS and U * r * (d + k) > d * k else "gram"


def solve_flora_na(A: Tensor, B: Tensor, p: Tensor, *, solver: str = "als",
                   tie_layers: bool = False, max_iter: int = 200, tol: float = 1e-12,
                   prox: float = 1e-6, steps: int = 200, lr: float = 1e-2,
                   weight_decay: float = 0.0, bound: bool = False, path: str = "auto"
                   ) -> FloraNAResult:
    """P, Q minimising ||M - (sum_u P_u B_u)(sum_u Q_u A_u)||_F per layer, M = sum_u p_u B_u A_u;
    A (L, U, r, k), B (L, U, d, r) (mixed ranks: pad_ranks), p (U,); device, dtype from A, B.
    path: "gram" (~U^2), "matrix_free" (linear in U: flora_na_scale.py) or "auto" (choose_path)."""
    p = _check_factors(A, B, p).to(A.device)
    if path == "auto":
        path = choose_path(A.shape[1], A.shape[2], B.shape[2], A.shape[3])
    if path == "matrix_free":
        from flora_na_scale import solve_matrix_free     # beside flora_na.py; or path="gram"
        return solve_matrix_free(A, B, p, solver=solver, tie_layers=tie_layers,
                                 max_iter=max_iter, tol=tol, prox=prox, steps=steps, lr=lr,
                                 weight_decay=weight_decay, bound=bound)
    if path != "gram":
        raise ValueError(f"unknown path {path!r}: use 'auto', 'gram' or 'matrix_free'")
    G_A, G_B = gram_blocks(A, B)                                       # (L, U, U, r, r) each
    if solver == "als":
        P, Q, iters = _als(G_A, G_B, p, tie_layers, max_iter, tol, prox)
    elif solver == "adamw":
        P, Q, iters = _adamw(G_A, G_B, p, tie_layers, steps, lr, weight_decay)
    else:
        raise ValueError(f"unknown solver {solver!r}: use 'als' or 'adamw'")
    f = _squared_divergence(G_A, G_B, p, P, Q).clamp_min(0)            # (L,)
    f_naive = _squared_divergence(G_A, G_B, p, p, p).clamp_min(0)
    total = _layer_total(tie_layers)
    worse = (total(f) > total(f_naive))[:, None]       # round-off must never lose to FedIT
    P, Q = torch.where(worse, p, P), torch.where(worse, p, Q)
    f = torch.where(worse[:, 0], f_naive, f)
    # (P, Q) and (cP, Q / c) give the same product; the paper leaves c free. We fix it because
    # clients go on training B_hat and A_hat and each factor's gradient scales with the other:
    # c keeps their norms in FedIT's proportion (sum p B, sum p A), sign agreeing with FedIT's B.
    tr_B, tr_A = torch.einsum("luvii->luv", G_B), torch.einsum("luvii->luv", G_A)  # (L, U, U)
    inner = lambda T, x, y: total(torch.einsum("lu,luv,lv->l", x.expand(P.shape),  # noqa: E731
                                                T, y.expand(P.shape)))
    c = (inner(tr_A, Q, Q) * inner(tr_B, p, p) / (inner(tr_B, P, P) * inner(tr_A, p, p)))
    c = c.sqrt().sqrt()                       # c^2 = (|A_hat| |B_bar|) / (|B_hat| |A_bar|)
    c = torch.where(torch.isfinite(c) & (c > 0), c, torch.ones_like(c))
    c = (c * torch.where(inner(tr_B, P, p) < 0, -1.0, 1.0))[:, None]
    P, Q = P * c, Q / c                                                # (L, U) each
    A_hat = torch.einsum("lu,lurk->lrk", Q, A.double()).to(A.dtype)   # (L, r, k)
    B_hat = torch.einsum("lu,ludr->ldr", P, B.double()).to(B.dtype)   # (L, d, r)
    return FloraNAResult(P, Q, A_hat, B_hat, f.clamp_min(0).sqrt(), f_naive.clamp_min(0).sqrt(),
                         divergence_bound(A, B, p) if bound else None,
                         _norm_M2(G_A, G_B, p).clamp_min(0).sqrt(), iters)
# ----- END COPYABLE SOLVER -------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# 4. Aggregators, simplest first: f(A, B, p, **options) -> Aggregate; A, B lists of U tensors
#    (L, r_u, k), (L, d, r_u); p any scale. Mixed ranks: with B_u <- (s_u / s) B_u (s: the
#    global LoRA scaling) M = sum_u p_u B_u A_u as everywhere here, and client u taking A[:r_u],
#    B[:, :r_u] (s / s_u) of the global rank-R pair applies the global update truncated, exactly.
# ---------------------------------------------------------------------------------------------


@dataclass
class Aggregate:
    """What the server sends back for L layers of one shape."""
    A: Tensor | None                 # (L, r', k) new global A; None: clients restart LoRA
    B: Tensor | None                 # (L, d, r') new global B; None: clients restart LoRA
    base_delta: Tensor | None        # (L, d, k) folded into frozen W (times LoRA scaling)
    bytes_up: int                    # all clients -> server, this round
    bytes_down: int                  # server -> all clients, this round
    info: dict = field(default_factory=dict)  # e.g. FLoRA-NA's solver result


# Bytes of tensors; of a global pair (L, R, k), (L, d, R) sent as each client's first r_u.
def _nbytes(*tensors): return sum(t.numel() * t.element_size() for t in tensors)
def _share_bytes(A, B, ranks): return sum(_nbytes(A[:, :r], B[:, :, :r]) for r in ranks)


def _check_clients(A: list, B: list, p: Tensor, same_rank: bool, method: str) -> Tensor:
    """Validate clients' A (L, r_u, k), B (L, d, r_u); return p / sum(p), float64."""
    if len(A) == 0 or len(A) != len(B):
        raise ValueError(f"{method}: need as many A as B factors (>= 1), got {len(A)} and {len(B)}")
    for u, (a, b) in enumerate(zip(A, B)):
        if a.dim() != 3 or b.dim() != 3 or a.shape[1] != b.shape[2] or (
                a.shape[0], b.shape[0], a.shape[2], b.shape[1]) != (
                A[0].shape[0], A[0].shape[0], A[0].shape[2], B[0].shape[1]):
            raise ValueError(f"{method}: client {u} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                             f"expected A (L, r, k), B (L, d, r) with client 0's L, d, k")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"{method}: client {u}'s A or B contains NaN or Inf")
    if same_rank and len({a.shape[1] for a in A}) > 1:
        raise ValueError(f"{method} needs equal client ranks, got {[a.shape[1] for a in A]}")
    return check_weights(p, len(A), method)


def weighted_sum(p: Tensor, X: list[Tensor]) -> Tensor:   # sum_u p_u X_u in float64, X's dtype
    return sum(w * x.double() for w, x in zip(p.tolist(), X)).to(X[0].dtype)


def pad_ranks(A: list[Tensor], B: list[Tensor], rank: int | None = None):
    """Clients' factors zero-padded to rank R = `rank` or the largest r_u: A_u (L, R, k),
    B_u (L, d, R); no product B_u A_u changes, factors of rank R are returned as they are."""
    ranks = [a.shape[1] for a in A]
    R = max(ranks) if rank is None else rank
    if R < max(ranks):
        raise ValueError(f"rank {R} is below the largest client rank {max(ranks)}")
    pad = torch.nn.functional.pad
    return ([pad(a, (0, 0, 0, R - a.shape[1])) if a.shape[1] < R else a for a in A],
            [pad(b, (0, R - b.shape[2])) if b.shape[2] < R else b for b in B])


def fedit(A, B, p, rank: int | None = None, **_) -> Aggregate:
    """FedIT: average A and B separately (inexact); mixed ranks: HetLoRA's zero-padding to R."""
    p = _check_clients(A, B, p, False, "fedit")
    A_pad, B_pad = pad_ranks(A, B, rank)
    A_bar, B_bar = weighted_sum(p, A_pad), weighted_sum(p, B_pad)   # (L, R, k), (L, d, R)
    return Aggregate(A_bar, B_bar, None, _nbytes(*A, *B),
                     _share_bytes(A_bar, B_bar, [a.shape[1] for a in A]))


def ffa(A, B, p, **_) -> Aggregate:
    """FFA-LoRA: A stays frozen at a shared init, only B is trained and averaged; exact."""
    p = _check_clients(A, B, p, True, "ffa")
    if any(not torch.equal(a, A[0]) for a in A):
        raise ValueError("ffa: clients' A differ; FFA-LoRA keeps A frozen at a shared init")
    B_bar = weighted_sum(p, B)                               # (L, d, r)
    return Aggregate(A[0], B_bar, None, _nbytes(*B), len(B) * _nbytes(B_bar))


def fedsa(A, B, p, **_) -> Aggregate:
    """FedSA-LoRA: only A is shared; clients keep B and head, evaluation uses their averages."""
    p = _check_clients(A, B, p, True, "fedsa")
    A_bar = weighted_sum(p, A)                               # (L, r, k)
    return Aggregate(A_bar, weighted_sum(p, B), None, _nbytes(*A), len(A) * _nbytes(A_bar))


def fedex(A, B, p, **_) -> Aggregate:
    """FedEx-LoRA: FedIT plus the residual M - B_bar A_bar folded into W (a d x k download)."""
    p = _check_clients(A, B, p, True, "fedex")
    A_bar, B_bar = weighted_sum(p, A), weighted_sum(p, B)
    M = weighted_sum(p, [b.double() @ a.double() for a, b in zip(A, B)]).to(A[0].dtype)
    residual = M - B_bar @ A_bar                                     # (L, d, k) = W layout
    return Aggregate(A_bar, B_bar, residual, _nbytes(*A, *B),
                     len(A) * _nbytes(A_bar, B_bar, residual))


def flora(A, B, p, **_) -> Aggregate:
    """FLoRA: stack B* = [B_1 .. B_U], A* = [p_1 A_1; ..; p_U A_U], so B* A* = M exactly; each
    client downloads the stack, merges it into W and restarts LoRA. Ranks may differ."""
    p = _check_clients(A, B, p, False, "flora")
    B_star = torch.cat(list(B), dim=2)                                 # (L, d, sum r_u)
    A_star = torch.cat([w * a for w, a in zip(p.tolist(), A)], dim=1)  # (L, sum r_u, k)
    return Aggregate(None, None, B_star @ A_star, _nbytes(*A, *B),
                     len(A) * _nbytes(A_star, B_star))


def lowrank_svd(B_stack: Tensor, A_stack: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of B_stack @ A_stack (L, d, R) @ (L, R, k) from QRs and the small core's SVD."""
    Q_b, R_b = torch.linalg.qr(B_stack.double())                  # (L, d, m_b), (L, m_b, R)
    Q_a, R_a = torch.linalg.qr(A_stack.double().mT)               # (L, k, m_a), (L, m_a, R)
    U_c, S, V_cT = torch.linalg.svd(R_b @ R_a.mT, full_matrices=False)  # core (L, m_b, m_a)
    return Q_b @ U_c, S, Q_a @ V_cT.mT


def flexlora(A, B, p, rank: int | None = None, **_) -> Aggregate:
    """FlexLoRA: M's truncated SVD as rank-r factors (r: the largest client rank unless given),
    sqrt S on each side so neither dwarfs the other; client u keeps the first r_u components."""
    p = _check_clients(A, B, p, False, "flexlora")
    r = max(a.shape[1] for a in A) if rank is None else rank
    if r < 1:
        raise ValueError(f"flexlora: rank must be >= 1, got {r}")
    B_stack = torch.cat([w * b.double() for w, b in zip(p.tolist(), B)], dim=2)  # (L, d, R)
    A_stack = torch.cat([a.double() for a in A], dim=1)                          # (L, R, k)
    U_, S, V = lowrank_svd(B_stack, A_stack)          # M = U_ diag(S) V^T, never formed
    m = min(r, S.shape[-1])
    root = S[:, :m].sqrt()                                                       # (L, m)
    pad = torch.nn.functional.pad                       # zero components m..r if M has fewer
    B_r = pad(U_[:, :, :m] * root[:, None, :], (0, r - m)).to(B[0].dtype)          # (L, d, r)
    A_r = pad((V[:, :, :m] * root[:, None, :]).mT, (0, 0, 0, r - m)).to(A[0].dtype)  # (L, r, k)
    return Aggregate(A_r, B_r, None, _nbytes(*A, *B),
                     _share_bytes(A_r, B_r, [a.shape[1] for a in A]))


def lora_fair(A, B, p, fair_lambda: float = 1e-3, **_) -> Aggregate:
    """LoRA-FAIR: average, then correct B on the server so (B_bar + dB) A_bar ~ M:
    B' = argmin ||M - B' A_bar||^2 + lam ||B' - B_bar||^2, a ridge regression in r x r."""
    p = _check_clients(A, B, p, True, "lora_fair")
    A_bar, B_bar = weighted_sum(p, A).double(), weighted_sum(p, B).double()
    MAt = sum(w * b.double() @ (a.double() @ A_bar.mT) for w, a, b in zip(p.tolist(), A, B))
    G = A_bar @ A_bar.mT                                              # (L, r, r)
    lam = fair_lambda * G.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-300)[:, None, None]
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    # B' (G + lam I) = M A_bar^T + lam B_bar, solved as a linear system for B'^T
    B_new = torch.linalg.solve(G + lam * eye, (MAt + lam * B_bar).mT).mT   # (L, d, r)
    A_bar, B_new = A_bar.to(A[0].dtype), B_new.to(B[0].dtype)
    return Aggregate(A_bar, B_new, None, _nbytes(*A, *B), len(A) * _nbytes(A_bar, B_new))


def rolora(A, B, p, rank: int | None = None, previous=None, trains: str | None = None,
           **_) -> Aggregate:
    """RoLoRA: rounds alternate training B (A frozen at the global A) and A (B frozen), so the
    trained factor's average is exact and only it travels; B first (peft's B = 0 gives A no
    gradient; no code released). trains: the round's factor (else the unshared one); mixed
    ranks: zero-padded, about the global frozen factor (previous)."""
    p = _check_clients(A, B, p, False, "rolora")
    A_pad, B_pad = pad_ranks(A, B, rank)
    trains = trains or ("B" if all(torch.equal(a, A_pad[0]) for a in A_pad) else "A")
    frozen, trained = (A_pad, B_pad) if trains == "B" else (B_pad, A_pad)
    if trains not in ("A", "B") or previous is None and any(
            not torch.equal(f, frozen[0]) for f in frozen):
        raise ValueError(f"rolora: clients' frozen factor differs (trains={trains!r}); RoLoRA "
                         f"trains one factor a round, the other shared")
    fixed = frozen[0] if previous is None else previous[0 if trains == "B" else 1]
    new = weighted_sum(p, trained)
    cut = lambda r: new[:, :, :r] if trains == "B" else new[:, :r]   # client u's share of it
    return Aggregate(*((fixed, new) if trains == "B" else (new, fixed)), None, _nbytes(
        *(B if trains == "B" else A)), sum(_nbytes(cut(a.shape[1])) for a in A))


def fedsb(A, B, p, **_) -> Aggregate:
    """Fed-SB: B and A0 frozen (fedsb_init), each client trains an r x r core R_u with
    A_u = R_u A0; averaging A_u averages R_u (p-weighted; Fed-SB's script: uniform), exact.
    R travels: r^2 per layer each way."""
    p = _check_clients(A, B, p, True, "fedsb")
    if any(not torch.equal(b, B[0]) for b in B):
        raise ValueError("fedsb: clients' B differ; Fed-SB keeps B frozen at its initialisation")
    L, r = A[0].shape[:2]
    core = L * r * r * A[0].element_size()                             # one client's R
    return Aggregate(weighted_sum(p, A), B[0], None, len(A) * core, len(A) * core)


@torch.enable_grad()
def fedsb_init(model, batches, *, lr: float, init_samples: int = 50, **_) -> dict[str, Tensor]:
    """LoRA-SB's initialisation, run once before round 1 (Fed-SB): G = dL/dW summed over the
    first `init_samples` single-example batches, Adam's first step -lr sign(G) as the update,
    its rank-r SVD U S V^T; sets B = U, A = R A0 with R = S / s (s: the LoRA scaling), A0 = V^T,
    so round 1 starts from that step (R = S / s: LoRA-SB's paper); returns {layer: A0}. Fed-SB
    computes G once from pooled data (50 samples), lr its first warm-up lr; here lr is the
    client lr (no warm-up). Departures: no dropout, an exact SVD, not svd_lowrank."""
    layers, device, core = lora_layers(model), next(model.parameters()).device, {}
    W = {n: m.get_base_layer().weight for n, m in layers.items()}
    G = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in W.items()}
    model.eval()
    for w in W.values():
        w.requires_grad_(True)
    for _, batch in zip(range(init_samples), batches):
        model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        for n, w in W.items():
            G[n], w.grad = G[n] + (0 if w.grad is None else w.grad), None
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for n, m in layers.items():
            W[n].requires_grad_(False)
            step = -lr * torch.sign(G[n].mT if m.fan_in_fan_out else G[n]).double().cpu()
            U, S, Vh = torch.linalg.svd(step, full_matrices=False)
            r = m.lora_A["default"].weight.shape[0]
            m.lora_B["default"].weight.copy_(U[:, :r])
            m.lora_A["default"].weight.copy_(S[:r, None] / m.scaling["default"] * Vh[:r])
            core[n] = Vh[:r].float()
    return core


def flora_na(A, B, p, rank: int | None = None, **solver_options) -> Aggregate:
    """FLoRA-NA: B_hat = sum P_u B_u, A_hat = sum Q_u A_u (solve_flora_na), FedIT's bytes; mixed
    ranks: of the zero-padded factors (FedIT's zero-padding is the start), as FedIT sends them."""
    p = _check_clients(A, B, p, False, "flora_na")
    A_pad, B_pad = pad_ranks(A, B, rank)
    A_s, B_s = torch.stack(A_pad, 1), torch.stack(B_pad, 1)           # (L, U, R, k), (L, U, d, R)
    res = solve_flora_na(A_s, B_s, p, **solver_options)
    return Aggregate(res.A_hat, res.B_hat, None, _nbytes(*A, *B),
                     _share_bytes(res.A_hat, res.B_hat, [a.shape[1] for a in A]),
                     info={"result": res})


# ---------------------------------------------------------------------------------------------
# 5. The registry: all the client loop, the server (train.py, the Flower app) and the report
#    need of each aggregator, its options too. Adding one is a function and a register() call.
# ---------------------------------------------------------------------------------------------

SERVER_OPTIONS = ("rank", "previous", "trains")  # set by the server: global rank, start, trained


@dataclass(frozen=True)
class Option:
    """An aggregator's option: default, one-line help, accepted values (train.check_option)."""
    default: object
    help: str = ""
    choices: tuple = ()              # the accepted values, where they are few
    minimum: float | None = None     # numbers: the least accepted value ...
    above: bool = False              # ... or, if True, the value must exceed it


@dataclass(frozen=True)
class Aggregator:
    """One aggregation method: the server's function and what clients do differently."""
    aggregate: Callable[..., Aggregate]  # f(A, B, p, **options) -> Aggregate
    display_name: str                    # as tables and figures name it
    trains: tuple = ("AB",)              # round t trains trains[t % len], the rest stays global
    private_B: bool = False              # each client keeps its own B; only A travels
    private_head: bool = False           # each client keeps its own head (e.g. the classifier)
    restart: bool = False                # the update is merged into W, clients restart LoRA
    folds_into_base: bool = False        # (part of) the update is added to the frozen W
    mixed_ranks: bool = False            # accepts clients of different ranks
    linear: bool = False                 # the release is a fixed-weight linear function of the
    #   uploads: the server needs only weighted sums (secure aggregation, central DP apply)
    options: dict = field(default_factory=dict)  # name -> Option (a bare value: its default)
    check_model: Callable | None = None  # (model, options): ValueError if it cannot run on it
    init: Callable | None = None         # sets B, A = R A0 once, returns A0; then R trains only

    def __post_init__(self):
        object.__setattr__(self, "options", {k: v if isinstance(v, Option) else Option(v)
                                             for k, v in self.options.items()})


def _positive(default, help): return Option(default, help, minimum=0, above=True)  # > 0


AGGREGATORS: dict[str, Aggregator] = {
    "fedit": Aggregator(fedit, "FedIT", mixed_ranks=True, linear=True, options={"rank": None}),
    "ffa": Aggregator(ffa, "FFA-LoRA", trains=("B",), linear=True),
    "fedsa": Aggregator(fedsa, "FedSA-LoRA", private_B=True, private_head=True, linear=True),
    "fedex": Aggregator(fedex, "FedEx-LoRA", folds_into_base=True),
    "flora": Aggregator(flora, "FLoRA", restart=True, folds_into_base=True, mixed_ranks=True),
    "flexlora": Aggregator(flexlora, "FlexLoRA", mixed_ranks=True, options={"rank": None}),
    "lora_fair": Aggregator(lora_fair, "LoRA-FAIR", options={"fair_lambda": _positive(
        1e-3, "ridge weight, relative to the mean diagonal of A_bar A_bar^T")}),
    "rolora": Aggregator(rolora, "RoLoRA", trains=("B", "A"), mixed_ranks=True, linear=True,
                         options={"rank": None, "previous": None, "trains": None}),
    "fedsb": Aggregator(fedsb, "Fed-SB", trains=("A",), linear=True, init=fedsb_init, options={
        "init_samples": Option(50, "examples whose gradient initialises B, A (Fed-SB: 50)",
                               minimum=1)}),
    "flora_na": Aggregator(flora_na, "FLoRA-NA", mixed_ranks=True, options={
        "rank": None,
        "solver": Option("als", "als (exact alternating + LM) or adamw (AdamW, whitened)",
                         choices=("als", "adamw")),
        "tie_layers": Option(False, "one (P, Q) for all layers of a shape, as the authors' code"),
        "steps": Option(200, "adamw: AdamW steps", minimum=1),
        "lr": _positive(1e-2, "adamw: learning rate, a fraction of FedIT's divergence"),
        "weight_decay": Option(0.0, "adamw: weight decay, towards FedIT", minimum=0),
        "max_iter": Option(200, "als: sweeps (matrix-free path: iterations)", minimum=1),
        "tol": Option(1e-12, "als: stop once a sweep lowers f by <= tol ||M||^2", minimum=0),
        "prox": _positive(1e-6, "als: proximal weight, relative to each half-step's diagonal"),
        "path": Option("auto", "auto (by size), gram (cost ~U^2) or matrix_free (linear in U)",
                       choices=("auto", "gram", "matrix_free"))}),
}
METHOD = "flora_na"              # the aggregator this file is about (train.py's default)


def register(name: str, aggregator: Aggregator) -> None:
    """Add an aggregator (train.py --aggregator name), e.g. from a plug-in (--plugins module)."""
    if not name.isidentifier() or name == "all":
        raise ValueError(f"aggregator name {name!r}: use a Python identifier other than 'all'")
    if AGGREGATORS.get(name, aggregator) != aggregator:
        raise ValueError(f"another aggregator is registered as {name!r}")
    AGGREGATORS[name] = aggregator
