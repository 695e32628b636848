"""The matrix-free path of flora_na.solve_flora_na for many clients: cost linear in U.

solve_flora_na(..., path="matrix_free") (or "auto" past choose_path's size) imports this module
when it needs it; nothing imports it at module level. Same objective, start, solvers and
finish as flora_na.py's Gram path (sections 1-2 there), reached through passes over the
factors instead of U x U Gram blocks; the comment below derives it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from flora_na import FloraNAResult, _whitener

RESTRICTED_SWEEPS = 3          # ALS sweeps per restricted solve while the subspace still grows

# flora_na.py's Gram path holds G_A, G_B (L, U, U, r, r) and spends O(L (U r)^2 (d + k)) forming them:
# 2 GiB per block and minutes per layer at U = 1000, r = 16. A cross-device round (hundreds to
# thousands of clients) takes this path instead; solve_flora_na picks it by size (choose_path).
#
# What it forms, per layer (or per stack of layers that share (P, Q)):
#   * a float64 copy of the factors: all arithmetic is float64, as in the Gram path;
#   * the ideal update M = sum_u p_u B_u A_u (d, k), once, in O(U r d k). Reporting ||M||_F and
#     the divergences exactly costs either this or the Gram blocks' O((U r)^2 (d + k)); past
#     U r > d k / (d + k) this is the cheaper one, and with M in hand every divergence is the sum
#     of squares ||M - B_hat A_hat||^2 (exact: no cancellation) and every product with M costs
#     O(r d k), independent of U;
#   * "virtual clients" B'_j = sum_u V[u, j] B_u and A'_j = sum_u W[u, j] A_u for the columns of
#     bases V (U, s_P), W (U, s_Q) of a subspace of coefficient space that grows by (at most) one
#     column per side per iteration, with their r x r Gram blocks, T[i, j] = <M, B'_i A'_j> and
#     the products B'_i^T M (r, k), M A'_j^T (d, r). s ~ 10-70 (the iteration count): small.
# Its ALS never forms a U x U or (U r) x (U r) matrix: the normal matrices of the Gram path's ALS
# half-steps, H[u, v] = <B_u A_hat, B_v A_hat>, exist here only through products with B_hat, A_hat.
#
# How it solves (a subspace, or Rayleigh-Ritz, method; the nonlinear analogue of conjugate
# gradients). P = V a and Q = W b, starting at FedIT (V = W = p, up to scale). Each iteration
#   1. takes the full gradients at the current (P, Q), with R = M - B_hat A_hat (d, k):
#        g_P[u] = <B_u, R A_hat^T>,  g_Q[u] = <A_u, B_hat^T R>   (one pass over the B_u, one
#      over the A_u), where R A_hat^T = sum_j b_j M A'_j^T - B_hat A_hat A_hat^T and B_hat^T R
#      likewise come from the stored products: no d x k array is made per iteration;
#   2. appends each to its basis, orthonormalising the new virtual client sum_u g_u B_u against
#      the others in the Frobenius inner product (one more pass each), unless it lies in their
#      span: g then adds nothing the factors can see. Orthonormal virtual clients keep the
#      restricted problem well scaled however weakly a direction moves the factors;
#   3. minimises ||M - (sum_j a_j B'_j)(sum_j b_j A'_j)||^2 over (a, b) from the last (a, b):
#      an s-client problem in Gram space, solved by the Gram path's own method (prox-ALS sweeps,
#      each followed by a joint Levenberg-Marquardt step), O(s^2 r^2) per sweep; at most
#      RESTRICTED_SWEEPS sweeps while the subspace grows (a small subspace can hold a narrow
#      valley that the next gradients lead around), to convergence once it has stopped growing
#      (it then holds the whole problem the factors see).
# So an iteration costs four passes over the factors, O(U r (d + k)), plus O(r d k) for the new
# virtual clients' products with M.
# Why this and not CG inside each ALS half-step: were Q held fixed, f would be a quadratic in P
# and the span of successive gradients would be the Krylov space of conjugate gradients on the
# half-step's U x U system, so each restricted optimum would be as good as CG's iterate. CG in
# ALS throws its Krylov space away after every half-step (measured: ~20 products, two passes
# each, per half-step), while here every direction found for P and for Q is kept, and step 3
# moves P and Q jointly, which is what the Gram path's LM step is for. Measured on drift cases
# like real rounds': 7-12 iterations for U = 10..1000 (more when clients nearly coincide).
# Both paths end at the same divergence (tests/test_solver_scale.py: within 1e-6 of ||M||,
# U <= 200), except where the Gram path stalls in a narrow valley at max_iter sweeps: there this
# path, which leaves such valleys by growing its subspace, goes lower.
# Stopping rule: the Gram path's, an iteration that lowers f by at most tol ||M||^2, and also by
#   at most sqrt(tol) f, so that near an exact fit the divergence is resolved to ~sqrt(tol) of
#   itself rather than of ||M||; or no new direction (the gradients lie in the subspace after a
#   converged restricted solve: a stationary point); or max_iter iterations. f is computed as
#   in the Gram path during the solve; the divergences reported are the exact dense ones.
# Never worse than FedIT: FedIT is the starting point, each restricted solve starts from the last
#   point and only goes down, and the result is compared with FedIT at the end, as in the Gram path.
# tie_layers: a stack of layers shares V, W, (a, b); gradients and objectives sum over the stack.
#   Untied layers are solved one at a time, so memory is one layer's float64 copy plus its M.
# The result is finished exactly as the Gram path finishes it (FedIT fallback, then the (cP, Q/c)
#   normalisation with the same c), from |B_hat|, |A_hat|, <B_hat, B_bar> computed directly.
# solver="adamw" runs flora_na.py's AdamW (section 2: same coordinates, objective, start) through
#   the same passes; its preconditioner is the one place this path forms U x U matrices (the two
#   Gauss-Newton blocks at the start, O(U^2 r (d + k)), less than forming M while U < k).
# On a GPU the design is unchanged (same code, dtype and device from the inputs): forming M is one
# float64 GEMM and each pass streams the factors once, so the cost is M's O(U r d k) plus a few
# dozen passes at memory bandwidth; the restricted solves are many tiny kernels (launch-bound,
# milliseconds), and the float64 copy must fit in device memory (3 GiB at U = 3000, d = k = 4096).

class _ClientStack:
    """The factors of n layers that share (P, Q), in float64, and their M. Every product with
    the clients is one pass over the factors: combine (U,) -> sum_u c_u X_u, or pair
    X -> (<X_u, X>)_u summed over the stack, each O(n U r d) or O(n U r k)."""

    def __init__(self, A: Tensor, B: Tensor, p: Tensor):
        self.A = A.double().contiguous()                               # (n, U, r, k)
        self.B = B.double().contiguous()                               # (n, U, d, r)
        n, U, r, k = self.A.shape
        d = self.B.shape[2]
        self.M = torch.zeros(n, d, k, dtype=torch.float64, device=A.device)      # (n, d, k)
        chunk = max(1, 2**22 // (n * d * r))      # clients per GEMM: a 32 MiB permuted copy
        for u in range(0, U, chunk):              # M += [p_u B_u]_u (d, c r) @ [A_u]_u (c r, k)
            c = min(chunk, U - u)
            B_c = torch.empty(n, d, c, r, dtype=torch.float64, device=A.device)   # (n, d, c, r)
            torch.mul(self.B[:, u:u + c].permute(0, 2, 1, 3), p[u:u + c, None], out=B_c)
            self.M.baddbmm_(B_c.view(n, d, c * r), self.A[:, u:u + c].reshape(n, c * r, k))
        self.norm_M2 = torch.linalg.vector_norm(self.M, dim=(1, 2)).square()   # (n,) ||M||^2

    def combine_B(self, c: Tensor) -> Tensor:
        """sum_u c_u B_u (n, d, r) for c (U,)."""
        n, U, d, r = self.B.shape
        return (c @ self.B.view(n, U, d * r)).view(n, d, r)

    def combine_A(self, c: Tensor) -> Tensor:
        """sum_u c_u A_u (n, r, k) for c (U,)."""
        n, U, r, k = self.A.shape
        return (c @ self.A.view(n, U, r * k)).view(n, r, k)

    def pair_B(self, X: Tensor) -> Tensor:
        """sum over the stack of <B_u, X>_F, (U,), for X (n, d, r)."""
        n, U, d, r = self.B.shape
        return (self.B.view(n, U, d * r) @ X.reshape(n, d * r, 1)).sum(0)[:, 0]

    def pair_A(self, X: Tensor) -> Tensor:
        """sum over the stack of <A_u, X>_F, (U,), for X (n, r, k)."""
        n, U, r, k = self.A.shape
        return (self.A.view(n, U, r * k) @ X.reshape(n, r * k, 1)).sum(0)[:, 0]

    def gauss_newton(self, S_A: Tensor, S_B: Tensor) -> tuple[Tensor, Tensor]:
        """The Gauss-Newton blocks of flora_na.py section 2, summed over the stack, H_P[a, c] =
        tr(B_a^T B_c S_A) and H_Q[b, d] = tr(S_B A_b A_d^T), each (U, U), for S_A = A_hat A_hat^T and S_B =
        B_hat^T B_hat (n, r, r): AdamW's preconditioner, O(U^2 r (d + k)) in chunks of clients
        (the only U x U matrices this path makes, and only for solver="adamw")."""
        n, U, d, r = self.B.shape
        k = self.A.shape[3]
        H_P = self.B.new_zeros(U, U)
        H_Q = self.A.new_zeros(U, U)
        chunk = max(1, 2**22 // (n * r * max(d, k)))
        for u in range(0, U, chunk):
            BS = (self.B[:, u:u + chunk] @ S_A[:, None]).flatten(2)   # (n, c, d r) B_c S_A
            SA = (S_B[:, None] @ self.A[:, u:u + chunk]).flatten(2)   # (n, c, r k) S_B A_d
            H_P[:, u:u + chunk] = (self.B.flatten(2) @ BS.mT).sum(0)
            H_Q[:, u:u + chunk] = (self.A.flatten(2) @ SA.mT).sum(0)
        return H_P, H_Q


def _restricted_f(G_A, G_B, T, norm_M2, a, b) -> Tensor:
    """||M - B_hat A_hat||^2 summed over the stack, for B_hat = sum_i a_i B'_i and A_hat =
    sum_j b_j A'_j, from G_B[i, j] = B'_i^T B'_j (n, s_P, s_P, r, r), G_A[i, j] = A'_i A'_j^T
    (n, s_Q, s_Q, r, r) and T[i, j] = <M, B'_i A'_j> (n, s_P, s_Q)."""
    S_B = torch.einsum("i,j,nijxy->nxy", a, a, G_B)                   # (n, r, r) B_hat^T B_hat
    S_A = torch.einsum("i,j,nijxy->nxy", b, b, G_A)                   # (n, r, r) A_hat A_hat^T
    cross = torch.einsum("i,nij,j->n", a, T, b)                       # (n,) <M, B_hat A_hat>
    return (norm_M2 - 2 * cross + torch.einsum("nxy,nyx->n", S_B, S_A)).sum()


def _restricted_lm_step(G_A, G_B, T, norm_M2, a, b, f, damping):
    """_lm_step on the restricted problem: one Levenberg-Marquardt step in (a, b) jointly, kept
    only if it lowers f. The terms with M come from T instead of p-weighted Gram blocks."""
    s_P, s_Q = a.numel(), b.numel()
    S_A = torch.einsum("i,j,nijxy->nxy", b, b, G_A)                   # (n, r, r) A_hat A_hat^T
    S_B = torch.einsum("i,j,nijxy->nxy", a, a, G_B)                   # (n, r, r) B_hat^T B_hat
    X = torch.einsum("j,nijxy->nixy", a, G_B)                         # (n, s_P, r, r) B'_i^T B_hat
    Y = torch.einsum("i,nijxy->njxy", b, G_A)                         # (n, s_Q, r, r) A_hat A'_j^T
    H_P = torch.einsum("nijxy,nyx->ij", G_B, S_A)                     # (s_P, s_P)
    H_Q = torch.einsum("nxy,nijyx->ij", S_B, G_A)                     # (s_Q, s_Q)
    C = torch.einsum("nixy,njxy->ij", X, Y)               # (s_P, s_Q) <B'_i A_hat, B_hat A'_j>
    g_P = torch.einsum("nij,j->i", T, b) - H_P @ a                    # (s_P,) J^T residual
    g_Q = torch.einsum("nij,i->j", T, a) - H_Q @ b                    # (s_Q,)
    JJ = torch.cat([torch.cat([H_P, C], 1), torch.cat([C.mT, H_Q], 1)], 0)   # (s_P + s_Q,) x 2
    scale = JJ.diagonal().mean()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    eye = torch.eye(s_P + s_Q, dtype=JJ.dtype, device=JJ.device)
    step = torch.linalg.solve(JJ + damping * scale * eye, torch.cat([g_P, g_Q]))
    a_new, b_new = a + step[:s_P], b + step[s_P:]
    f_new = _restricted_f(G_A, G_B, T, norm_M2, a_new, b_new)
    better = f_new < f
    damping = torch.where(better, damping / 3, damping * 4).clamp(1e-12, 1e12)
    return (torch.where(better, a_new, a), torch.where(better, b_new, b),
            torch.where(better, f_new, f), damping)


def _converged(f_prev: Tensor, f: Tensor, norm_M2: Tensor, tol: float) -> Tensor:
    """The stopping rule of this module: an iteration lowered f by at most tol ||M||^2 (the
    Gram path's rule) and by at most sqrt(tol) f, so that near an exact fit (f << ||M||^2)
    the divergence is resolved to ~sqrt(tol) of itself, not of ||M||."""
    return f_prev - f <= torch.minimum(tol * norm_M2.sum(), math.sqrt(tol) * f_prev)


def _restricted_als(G_A, G_B, T, norm_M2, a, b, max_iter: int, tol: float, prox: float):
    """_als on the restricted problem, from (a, b): prox-ALS sweeps, each followed by up to
    three joint LM steps, until a sweep lowers f by at most tol ||M||^2 or max_iter sweeps.
    Returns a, b, the sweeps run and whether it converged."""
    def prox_step(H, g, x):
        """argmin_x' x'^T H x' - 2 g^T x' + lam ||x' - x||^2 with lam = prox * mean diag H."""
        lam = prox * H.diagonal().mean()
        lam = torch.where(lam > 0, lam, torch.ones_like(lam))         # H = 0: stay
        eye = torch.eye(x.numel(), dtype=H.dtype, device=H.device)
        return torch.linalg.solve(H + lam * eye, g + lam * x)

    f_prev = _restricted_f(G_A, G_B, T, norm_M2, a, b)
    damping = torch.full_like(f_prev, 1e-3)
    for sweep in range(1, max_iter + 1):
        S_A = torch.einsum("i,j,nijxy->nxy", b, b, G_A)               # (n, r, r)
        a = prox_step(torch.einsum("nijxy,nyx->ij", G_B, S_A), torch.einsum("nij,j->i", T, b), a)
        S_B = torch.einsum("i,j,nijxy->nxy", a, a, G_B)               # (n, r, r)
        b = prox_step(torch.einsum("nxy,nijyx->ij", S_B, G_A), torch.einsum("nij,i->j", T, a), b)
        f = _restricted_f(G_A, G_B, T, norm_M2, a, b)
        for _ in range(3):
            a, b, f_new, damping = _restricted_lm_step(G_A, G_B, T, norm_M2, a, b, f, damping)
            moved, f = f_new < f, f_new
            if moved:
                break
        if f_prev - f <= tol * norm_M2.sum():     # the Gram path's rule
            return a, b, sweep, True
        f_prev = f
    return a, b, max_iter, False


def _first_virtual_client(p: Tensor, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """FedIT's combination X = sum_u p_u X_u (n, ...) as the first virtual client, scaled to unit
    Frobenius norm over the stack: (column of the basis (U,), virtual client, coefficient (1,))."""
    size = X.norm()
    size = torch.where(size > 0, size, torch.ones_like(size))         # X = 0 (B = 0): keep p
    return p / size, X / size, size[None]


def _new_virtual_client(basis: Tensor, virtual: Tensor, g: Tensor, X: Tensor):
    """Append direction g (U,), whose combination is X = sum_u g_u X_u (n, ...), to a basis
    (U, s) whose virtual clients (n, s, ...) are orthonormal in the Frobenius inner product over
    the stack: Gram-Schmidt in the factors' space (twice, for orthogonality in floating point),
    applied to g alongside. Orthonormal virtual clients keep the restricted problem well scaled
    however small a direction's effect on the factors. Returns (new column, new virtual client),
    or None when X lies in their span (to 1e-8 of its size): g adds nothing the factors see."""
    size = X.norm()
    for _ in range(2):
        c = torch.einsum("ns...,n...->s", virtual, X)                 # (s,) <X'_j, X>
        X = X - torch.einsum("s,ns...->n...", c, virtual)
        g = g - basis @ c
    new_size = X.norm()
    if new_size == 0 or new_size <= 1e-8 * size:
        return None
    return g / new_size, X / new_size


def _append_block(G: Tensor, row: Tensor) -> Tensor:
    """Gram blocks G (n, s, s, r, r) of s virtual clients, grown by one whose blocks with
    clients 0..s are row (n, s + 1, r, r), G[new, j] = row[:, j]; G[j, new] = row[:, j]^T."""
    n, s = G.shape[:2]
    out = G.new_empty(n, s + 1, s + 1, *G.shape[3:])                   # (n, s + 1, s + 1, r, r)
    out[:, :s, :s] = G
    out[:, s] = row
    out[:, :s, s] = row[:, :s].mT
    return out


def _subspace_als(stack: _ClientStack, p: Tensor, max_iter: int, tol: float, prox: float):
    """The subspace method above, for one stack sharing (P, Q). Returns P, Q (U,) and the
    number of iterations. Besides the four passes, an iteration touches M only to form the new
    virtual clients' B'^T M and M A'^T (O(r d k)); the gradients and f come from those and the
    small Gram blocks (f as in the Gram path; the reported divergences are recomputed exactly)."""
    M = stack.M                                                       # (n, d, k)
    V, B_1, a = _first_virtual_client(p, stack.combine_B(p))          # P = V a = p (FedIT)
    W, A_1, b = _first_virtual_client(p, stack.combine_A(p))          # Q = W b = p
    V, W = V[:, None], W[:, None]                                     # (U, s_P), (U, s_Q) bases
    Bv, Av = B_1[:, None], A_1[:, None]               # (n, s_P, d, r), (n, s_Q, r, k) virtual
    BvM = Bv.mT @ M[:, None]                                          # (n, s_P, r, k) B'_i^T M
    MAv = M[:, None] @ Av.mT                                          # (n, s_Q, d, r) M A'_j^T
    G_B = Bv.mT[:, :, None] @ Bv[:, None]                             # (n, 1, 1, r, r)
    G_A = Av[:, :, None] @ Av.mT[:, None]                             # (n, 1, 1, r, r)
    T = torch.einsum("nixk,njxk->nij", BvM, Av)                       # (n, 1, 1) <M, B'_i A'_j>
    f, it, converged = _restricted_f(G_A, G_B, T, stack.norm_M2, a, b), 0, True
    for it in range(1, max_iter + 1):
        B_hat = torch.einsum("i,nidr->ndr", a, Bv)                    # (n, d, r)
        A_hat = torch.einsum("j,njrk->nrk", b, Av)                    # (n, r, k)
        S_B = torch.einsum("i,j,nijxy->nxy", a, a, G_B)               # (n, r, r) B_hat^T B_hat
        S_A = torch.einsum("i,j,nijxy->nxy", b, b, G_A)               # (n, r, r) A_hat A_hat^T
        X_P = torch.einsum("j,njdr->ndr", b, MAv) - B_hat @ S_A       # (n, d, r) R A_hat^T
        X_Q = torch.einsum("i,nirk->nrk", a, BvM) - S_B @ A_hat       # (n, r, k) B_hat^T R
        g_P, g_Q = stack.pair_B(X_P), stack.pair_A(X_Q)               # (U,) each, -1/2 df/dP, dQ
        new_P = _new_virtual_client(V, Bv, g_P, stack.combine_B(g_P))
        new_Q = _new_virtual_client(W, Av, g_Q, stack.combine_A(g_Q))
        if new_P is None and new_Q is None and converged:
            break                          # a restricted optimum whose gradients it spans
        if new_P is not None:                                         # new virtual B'
            v, B_new = new_P                                          # (U,), (n, d, r)
            V, a = torch.cat([V, v[:, None]], 1), torch.cat([a, a.new_zeros(1)])
            Bv = torch.cat([Bv, B_new[:, None]], 1)                   # (n, s_P, d, r)
            BvM = torch.cat([BvM, (B_new.mT @ M)[:, None]], 1)        # (n, s_P, r, k)
            G_B = _append_block(G_B, B_new.mT[:, None] @ Bv)          # (n, s_P, s_P, r, r)
            T = torch.cat([T, torch.einsum("nxk,njxk->nj", BvM[:, -1], Av)[:, None]], 1)
        if new_Q is not None:                                         # new virtual A'
            w, A_new = new_Q                                          # (U,), (n, r, k)
            W, b = torch.cat([W, w[:, None]], 1), torch.cat([b, b.new_zeros(1)])
            Av = torch.cat([Av, A_new[:, None]], 1)                   # (n, s_Q, r, k)
            MAv = torch.cat([MAv, (M @ A_new.mT)[:, None]], 1)        # (n, s_Q, d, r)
            G_A = _append_block(G_A, A_new[:, None] @ Av.mT)          # (n, s_Q, s_Q, r, r)
            T = torch.cat([T, torch.einsum("nidr,ndr->ni", Bv, MAv[:, -1])[:, :, None]], 2)
        # While the subspace grows, a few sweeps per iteration: a small subspace can hold a
        # narrow valley that the next gradients lead around. Once it spans every direction
        # the factors see, the restricted problem is the whole problem: solve it out.
        grew = new_P is not None or new_Q is not None
        a, b, _, converged = _restricted_als(G_A, G_B, T, stack.norm_M2, a, b,
                                             RESTRICTED_SWEEPS if grew else max_iter, tol, prox)
        f, f_prev = _restricted_f(G_A, G_B, T, stack.norm_M2, a, b), f
        if _converged(f_prev, f, stack.norm_M2, tol) and converged:
            break
    return V @ a, W @ b, it


def _adamw_matrix_free(stack: _ClientStack, p: Tensor, steps: int, lr: float,
                       weight_decay: float):
    """_adamw through the stack's passes: the same whitened coordinates and objective, with the
    Gauss-Newton blocks from the stack (gauss_newton) and f from the dense residual."""
    f = lambda P, Q: torch.linalg.vector_norm(                       # noqa: E731  summed
        stack.M - stack.combine_B(P) @ stack.combine_A(Q), dim=(1, 2)
    ).square().sum()
    P_0 = p.clone()                                                   # (U,)
    f_0 = f(P_0, P_0)
    scale = torch.maximum(f_0, 1e-30 * stack.norm_M2.sum()).clamp_min(1e-300)
    B_0, A_0 = stack.combine_B(P_0), stack.combine_A(P_0)   # (n, d, r), (n, r, k)
    H_P, H_Q = stack.gauss_newton(A_0 @ A_0.mT, B_0.mT @ B_0)         # (U, U) each
    W_P = _whitener(H_P[None] / scale)[0]                            # (U, U)
    W_Q = _whitener(H_Q[None] / scale)[0]
    x = torch.zeros_like(P_0, requires_grad=True)                     # (U,)
    y = torch.zeros_like(P_0, requires_grad=True)
    opt = torch.optim.AdamW([x, y], lr=lr, weight_decay=weight_decay)
    best_f = torch.tensor(math.inf, dtype=torch.float64, device=p.device)
    best_P, best_Q = P_0.clone(), P_0.clone()
    for step in range(steps + 1):
        P, Q = P_0 + W_P @ x, P_0 + W_Q @ y                           # (U,) each
        ratio = f(P, Q) / scale
        with torch.no_grad():                                          # keep the best iterate
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


def _finish_stack(stack: _ClientStack, p: Tensor, P: Tensor, Q: Tensor, iterations: int,
                  bound: bool, dtype_A: torch.dtype, dtype_B: torch.dtype) -> FloraNAResult:
    """What solve_flora_na does after its solve, for one stack: fall back to FedIT if (P, Q)
    is worse in total over the stack, rescale to (cP, Q/c) with the Gram path's c, and report
    the divergences, here from the dense residuals (exact, no cancellation)."""
    n, r = stack.M.shape[0], stack.A.shape[2]
    B_hat, A_hat = stack.combine_B(P), stack.combine_A(Q)             # (n, d, r), (n, r, k)
    B_bar, A_bar = stack.combine_B(p), stack.combine_A(p)             # FedIT's factors
    R = torch.baddbmm(stack.M, B_hat, A_hat, alpha=-1)                # (n, d, k) M - B_hat A_hat
    f = torch.linalg.vector_norm(R, dim=(1, 2)).square()              # (n,)
    torch.baddbmm(stack.M, B_bar, A_bar, alpha=-1, out=R)             # FedIT's, same buffer
    f_naive = torch.linalg.vector_norm(R, dim=(1, 2)).square()        # (n,)
    del R
    if f.sum() > f_naive.sum():                   # round-off must never lose to FedIT
        P, Q, B_hat, A_hat, f = p, p, B_bar, A_bar, f_naive
    # the Gram path's c: c^4 = (|A_hat| |B_bar|)^2 / (|B_hat| |A_bar|)^2, summed over the
    # stack, with the sign of <B_hat, B_bar>; the product B_hat A_hat is unchanged
    sq = lambda X, Y: (X * Y).sum()               # noqa: E731  <X, Y>_F over the stack
    c = (sq(A_hat, A_hat) * sq(B_bar, B_bar) / (sq(B_hat, B_hat) * sq(A_bar, A_bar)))
    c = c.sqrt().sqrt()
    c = torch.where(torch.isfinite(c) & (c > 0), c, torch.ones_like(c))
    c = c * torch.where(sq(B_hat, B_bar) < 0, -1.0, 1.0)
    P, Q, B_hat, A_hat = P * c, Q / c, B_hat * c, A_hat / c
    bound_tail = None
    if bound:                                     # Eckart-Young from M's singular values
        bound_tail = torch.linalg.svdvals(stack.M)[:, r:].square().sum(-1).sqrt()
    return FloraNAResult(
        P=P.expand(n, -1), Q=Q.expand(n, -1), A_hat=A_hat.to(dtype_A), B_hat=B_hat.to(dtype_B),
        divergence=f.sqrt(), divergence_naive=f_naive.sqrt(),
        divergence_bound=bound_tail, norm_M=stack.norm_M2.sqrt(), iterations=iterations)


def solve_matrix_free(A: Tensor, B: Tensor, p: Tensor, *, solver: str, tie_layers: bool,
                      max_iter: int, tol: float, prox: float, steps: int, lr: float,
                      weight_decay: float, bound: bool) -> FloraNAResult:
    """flora_na.solve_flora_na(path="matrix_free"), p already checked and normalised: the
    layers one at a time, or all as one stack when tie_layers."""
    if solver not in ("als", "adamw"):
        raise ValueError(f"unknown solver {solver!r}: use 'als' or 'adamw'")
    L = A.shape[0]
    parts = []
    for layers in [slice(0, L)] if tie_layers else [slice(l, l + 1) for l in range(L)]:
        stack = _ClientStack(A[layers], B[layers], p)
        if solver == "als":
            P, Q, iters = _subspace_als(stack, p, max_iter, tol, prox)
        else:
            P, Q, iters = _adamw_matrix_free(stack, p, steps, lr, weight_decay)
        parts.append(_finish_stack(stack, p, P, Q, iters, bound, A.dtype, B.dtype))
        del stack                                 # one layer's float64 copy at a time
    cat = lambda name: torch.cat([getattr(x, name) for x in parts])   # noqa: E731
    return FloraNAResult(
        P=cat("P"), Q=cat("Q"), A_hat=cat("A_hat"), B_hat=cat("B_hat"),
        divergence=cat("divergence"), divergence_naive=cat("divergence_naive"),
        divergence_bound=cat("divergence_bound") if bound else None, norm_M=cat("norm_M"),
        iterations=max(x.iterations for x in parts))
