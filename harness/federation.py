"""The server's side of a round on a real model, its divergence diagnostics, and how data and
participation are split across clients.

flora_na.py aggregates the factors of L layers of one shape; a model's adapted layers come in a
few shapes (q and v of a GQA Llama differ), so the server step groups them by shape, calls the
registry's aggregator once per group, and returns a typed `RoundUpdate`. It also measures, once
per round and per layer, how far each aggregate is from the ideal update M = sum_u p_u B_u A_u:
exactly, from a QR of the stacked factors, where flora_na.py's Gram-space expansion (fine for
optimising) cannot resolve divergences below about 1e-8 of ||M||.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

import flora_na as fl

Factors = dict[str, tuple[Tensor, Tensor]]          # {layer name: (A (r, k), B (d, r))}


# --- exact divergences of any aggregate


def exact_divergences(A: Sequence[Tensor], B: Sequence[Tensor], p: Tensor,
                      agg: fl.Aggregate, client_ranks: Sequence[int] = ()) -> dict[str, Tensor]:
    """Per layer (L,) in float64: ||M|| ("norm_M"), ||M - B_bar A_bar|| of FedIT ("naive"),
    ||M - effective update|| of `agg` ("aggregate") and the rank-r Eckart-Young bound
    ("bound", r the largest client rank), for A (U x (L, r, k)), B (U x (L, d, r)) (clients
    of mixed ranks zero-padded to r, flora_na.pad_ranks). For each rank rho < r in
    `client_ranks`, also the rank-rho bound ("bound_r<rho>") and, when the aggregate is a
    pair (A', B'), what a client of rank rho applies, its first rho components
    ("client_r<rho>": ||M - B'[:, :rho] A'[:rho]||).

    One QR of the stacked factors Z_B = [p_1 B_1 .. p_U B_U | B_bar | B'] (L, d, m) and
    Z_A = [A_1; ..; A_U; A_bar; A'] (L, m, k) gives Z_B = Q_b R_b, Z_A^T = Q_a R_a, and every
    difference of products of these columns is Q_b (R_b D R_a^T) Q_a^T for a diagonal +-1/0
    selector D, whose norm is that of the small core R_b D R_a^T. Its round-off is relative to
    the factors' sizes, not to ||M||^2 as in the Gram expansion, so tiny divergences stay exact.
    An aggregate that changes the frozen weights (FedEx-LoRA, FLoRA) is compared densely."""
    p = p.to(torch.float64)
    rank = max(a.shape[1] for a in A)
    A_bar = fl.weighted_sum(p, [a.double() for a in A])          # FedIT's, in exact arithmetic
    B_bar = fl.weighted_sum(p, [b.double() for b in B])
    extra_A = [A_bar] + ([agg.A.double()] if agg.A is not None else [])
    extra_B = [B_bar] + ([agg.B.double()] if agg.B is not None else [])
    Z_B = torch.cat([w * b.double() for w, b in zip(p.tolist(), B)] + extra_B, dim=2)  # (L, d, m)
    Z_A = torch.cat([a.double() for a in A] + extra_A, dim=1)                          # (L, m, k)
    _, R_b = torch.linalg.qr(Z_B, mode="r")                      # (L, min(d, m), m)
    _, R_a = torch.linalg.qr(Z_A.mT, mode="r")                   # (L, min(k, m), m)
    n_M = sum(a.shape[1] for a in A)                             # columns that make M
    sel = lambda *signs: torch.cat([torch.full((n,), s, dtype=torch.float64, device=R_b.device)
                                    for n, s in signs])          # (m,) the selector D
    core = lambda D: (R_b * D) @ R_a.mT                          # (L, ., .) = R_b D R_a^T
    core_M = R_b[..., :n_M] @ R_a[..., :n_M].mT
    S = torch.linalg.svdvals(core_M)                             # singular values of M
    r_bar, r_new = B_bar.shape[-1], (agg.B.shape[-1] if agg.B is not None else 0)
    out = {"norm_M": S.square().sum(-1).sqrt(),
           "naive": core(sel((n_M, 1.0), (r_bar, -1.0), (r_new, 0.0))).flatten(1).norm(dim=1),
           "bound": S[:, rank:].square().sum(-1).sqrt()}
    for rho in sorted({q for q in client_ranks if q < rank}):
        out[f"bound_r{rho}"] = S[:, rho:].square().sum(-1).sqrt()
        if agg.base_delta is None and agg.A is not None:
            out[f"client_r{rho}"] = core(sel((n_M, 1.0), (r_bar, 0.0), (rho, -1.0),
                                             (r_new - rho, 0.0))).flatten(1).norm(dim=1)
    if agg.base_delta is None:
        out["aggregate"] = core(sel((n_M, 1.0), (r_bar, 0.0), (r_new, -1.0))).flatten(1).norm(dim=1)
    else:                                                        # dense: W itself changes
        eff = agg.base_delta.double() + (agg.B.double() @ agg.A.double() if agg.A is not None else 0)
        M = fl.weighted_sum(p, [b.double() @ a.double() for a, b in zip(A, B)])  # (L, d, k)
        out["aggregate"] = (M - eff).flatten(1).norm(dim=1)
    return out


# --- the server step over every adapted layer


def stacked_groups(client_factors: list[Factors], device: str | torch.device = "cpu"
                   ) -> Iterator[tuple[list[str], list[Tensor], list[Tensor]]]:
    """Per group of same-shape layers: (layer names, U x A (L, r, k), U x B (L, d, r)), the
    clients' factors in the aggregators' layout, in a fixed layer order."""
    groups: dict[tuple, list[str]] = {}
    for name, (A, B) in client_factors[0].items():
        groups.setdefault((B.shape[0], A.shape[1]), []).append(name)
    for names in groups.values():
        yield (names, [torch.stack([cf[n][0] for n in names]).to(device) for cf in client_factors],
               [torch.stack([cf[n][1] for n in names]).to(device) for cf in client_factors])


@dataclass
class RoundUpdate:
    """The server's answer to one round, per adapted layer."""
    factors: Factors | None                  # new global (A, B); None: clients restart LoRA
    base_delta: dict[str, Tensor]            # added to the frozen W (times LoRA scaling)
    bytes_up: int                            # LoRA factors, all clients -> server
    bytes_down: int                          # server -> all clients
    divergence: dict[str, dict[str, float]]  # {layer: {naive, aggregate, bound, norm_M}}


def server_step(client_factors: list[Factors], p: Tensor, name: str, options: dict | None = None,
                device: str | torch.device = "cpu", scales: Sequence[float] | None = None,
                rank: int | None = None, previous: Factors | None = None,
                trains: str | None = None, variances: list[dict] | None = None) -> RoundUpdate:
    """One server step over every adapted layer: client_factors[u] = {layer: (A, B)}, p the
    weights of the clients that answered. `options` may hold any aggregator's options; each
    aggregator receives those its registry entry declares, and `previous` (the global factors
    the clients started from) as option previous = (A (L, r, k), B (L, d, r)) and `trains`
    (the factors the clients trained this round) if it declares them.
    variances[u] = {layer: (var_A (r_u,), var_B (r_u,))} (a stochastic upload codec's rounding
    variance sums, codecs.send_factors; None for a factor sent exactly) reach an aggregator that
    declares option `variance` as (var_A, var_B), each U x (L, r_u) or None.

    Clients of different ranks: scales[u] = s_u / s, client u's LoRA scaling over the global
    model's, and `rank` the global rank R. Each B_u is brought to the global scaling first
    (flora_na.py section 3), so the aggregate is a rank-R pair in the global model's units
    (to_client gives each client its share); only aggregators with mixed_ranks accept this."""
    if name not in fl.AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose from {', '.join(fl.AGGREGATORS)}")
    entry = fl.AGGREGATORS[name]
    p = fl.check_weights(p, len(client_factors), name)
    ranks = [next(iter(cf.values()))[0].shape[0] for cf in client_factors]
    mixed = len(set(ranks)) > 1 or (rank is not None and ranks[0] != rank)
    if mixed and not entry.mixed_ranks:
        raise ValueError(f"{name} needs every client at the global rank; got ranks {ranks}")
    if scales is not None and any(c != 1 for c in scales):
        client_factors = [{n: (A, B * c) for n, (A, B) in cf.items()}
                          for cf, c in zip(client_factors, scales)]
    mine = {k: v for k, v in {**(options or {}), "rank": rank, "trains": trains}.items()
            if k in entry.options and v is not None}
    update = RoundUpdate(None if entry.restart else {}, {}, 0, 0, {})
    for names, A, B in stacked_groups(client_factors, device):
        if previous is not None and "previous" in entry.options:
            mine["previous"] = tuple(torch.stack([previous[n][i] for n in names]).to(device)
                                     for i in (0, 1))
        if variances is not None and "variance" in entry.options:
            mine["variance"] = tuple(
                None if any(v.get(n, (None, None))[i] is None for v in variances for n in names)
                else [torch.stack([v[n][i] for n in names]).double().to(device) * c ** (2 * i)
                      for v, c in zip(variances, scales or [1.0] * len(variances))]
                for i in (0, 1))                  # B_u scaled by c: its variance by c^2
        agg = entry.aggregate(A, B, p, **mine)
        update.bytes_up += agg.bytes_up
        update.bytes_down += agg.bytes_down
        A_pad, B_pad = fl.pad_ranks(A, B, rank if mixed else None)
        div = {k: v.tolist() for k, v in exact_divergences(
            A_pad, B_pad, p.to(A[0].device), agg, ranks if mixed else ()).items()}
        for i, n in enumerate(names):
            if update.factors is not None:
                update.factors[n] = (agg.A[i].cpu(), agg.B[i].cpu())
            if agg.base_delta is not None:
                update.base_delta[n] = agg.base_delta[i].cpu()
            update.divergence[n] = {k: v[i] for k, v in div.items()}
    return update


def to_client(factors: Factors, rank: int, scale: float) -> Factors:
    """A client's share of the global pair: its first `rank` components, with B brought to
    the client's LoRA scaling (scale = s_u / s), so the client applies s B[:, :r] A[:r]
    (flora_na.py section 3). At the global rank and scaling the factors are returned as
    they are."""
    if scale == 1 and all(A.shape[0] == rank for A, _ in factors.values()):
        return dict(factors)
    return {n: (A[:rank].clone(), B[:, :rank] / scale) for n, (A, B) in factors.items()}


RANK_PROFILES = ("uniform", "random", "heavy_tail")


def client_ranks(n_clients: int, rank: int, seed: int, ranks: Sequence[int] | None = None,
                 profile: str | None = None) -> list[int]:
    """Each client's LoRA rank. `ranks` (e.g. [4, 8, 16]) is cycled over the clients; a
    `profile` draws from the ladder 2, 4, 8, .. below `rank`, plus `rank` itself (rank 16:
    2, 4, 8, 16), in the manner of FlexLoRA's resource profiles (the proportions are ours):
    "uniform" gives each ladder rank an equal share of the clients, "heavy_tail" shares
    falling by half at each step up (rank 16: 8/15, 4/15, 2/15, 1/15: most clients small, a
    few large), both as exact quantiles (the largest rank appears once there are enough
    clients), assigned in a seeded random order; "random" draws each client's rank uniformly
    from the ladder. Neither: every client at `rank`."""
    if ranks is not None and profile is not None:
        raise ValueError("give client ranks or a rank profile, not both")
    if ranks is not None:
        bad = [r for r in ranks if not 1 <= r <= rank]
        if not ranks or bad:
            raise ValueError(f"client ranks must be in 1..{rank} (the global --rank), got "
                             f"{list(ranks)}")
        return [ranks[u % len(ranks)] for u in range(n_clients)]
    if profile is None:
        return [rank] * n_clients
    if profile not in RANK_PROFILES:
        raise ValueError(f"unknown rank profile {profile!r}; choose from {', '.join(RANK_PROFILES)}")
    ladder = [2 ** i for i in range(1, rank.bit_length()) if 2 ** i < rank] + [rank]
    g = torch.Generator().manual_seed(_mix(seed, 7))
    if profile == "random":
        return [ladder[i] for i in torch.randint(len(ladder), (n_clients,), generator=g).tolist()]
    w = torch.ones(len(ladder), dtype=torch.float64)
    if profile == "heavy_tail":
        w = 0.5 ** torch.arange(len(ladder), dtype=torch.float64)
    cdf = torch.cumsum(w / w.sum(), 0)
    quantiles = (torch.arange(n_clients, dtype=torch.float64) + 0.5) / n_clients
    picks = torch.searchsorted(cdf, quantiles).clamp(max=len(ladder) - 1)
    order = torch.randperm(n_clients, generator=g)
    return [ladder[i] for i in picks[order].tolist()]


def _mix(seed: int, salt: int) -> int:
    return (seed * 1_000_003 + salt) % (1 << 62)


# FLoRA-NA variants the divergence tracking solves on each round's uploads: key -> (solver,
# tie_layers, target). The target weights the ideal update the solver fits: "data" is p (the
# clients' data sizes), "uniform" is 1/U, as the authors' released code fits; every variant's
# divergence is measured against the data-weighted M = sum_u p_u B_u A_u that the round
# should deliver. "solver_als" and "solver_adamw" are the keys the divergence study has
# recorded since it began.
TRACKED_VARIANTS = {"solver_als": ("als", False, "data"),
                    "solver_adamw": ("adamw", False, "data"),
                    "solver_als_tied": ("als", True, "data"),
                    "solver_als_uniform": ("als", False, "uniform"),
                    "solver_als_tied_uniform": ("als", True, "uniform")}


def solver_divergences(client_factors: list[Factors], p: Tensor) -> dict[str, dict[str, float]]:
    """Per layer, the divergence ||M - B_hat A_hat|| each of FLoRA-NA's TRACKED_VARIANTS
    reaches on these uploads (per-layer or tied (P, Q), fitted to the data-weighted or the
    uniform mean), all measured against the data-weighted M with exact_divergences: the
    divergence studies' extra columns."""
    p = p.to(torch.float64)
    uniform = torch.full_like(p, 1.0 / len(p))                   # (U,)
    out: dict[str, dict[str, float]] = {}
    for names, A, B in stacked_groups(client_factors):
        A_s, B_s = torch.stack(A, 1), torch.stack(B, 1)          # (L, U, r, k), (L, U, d, r)
        for key, (solver, tie, target) in TRACKED_VARIANTS.items():
            res = fl.solve_flora_na(A_s, B_s, p if target == "data" else uniform,
                                    solver=solver, tie_layers=tie, bound=False)
            agg = fl.Aggregate(res.A_hat, res.B_hat, None, 0, 0)
            div = exact_divergences(A, B, p, agg)["aggregate"]   # (L,)
            for i, n in enumerate(names):
                out.setdefault(n, {})[key] = div[i].item()
    return out


def uncompressed_divergences(raw: list[Factors], decoded: list[Factors], p: Tensor,
                             update: RoundUpdate, scales: Sequence[float] | None = None,
                             rank: int | None = None) -> dict:
    """Against M of the clients' factors before an upload codec (`raw`), per layer: ||M|| and
    the divergence of FedIT's average of the `decoded` uploads ("naive") and of the round's
    `update` ("aggregate"), made from the decoded ones; as relative_divergences returns them
    (scales, rank: server_step's, for clients of mixed ranks)."""
    p = fl.check_weights(p, len(raw), "uncompressed_divergences")
    if scales is not None:
        raw, decoded = ([{n: (A, B * c) for n, (A, B) in cf.items()} for cf, c in zip(fs, scales)]
                        for fs in (raw, decoded))
    out = {}
    for (names, A, B), (_, A_d, B_d) in zip(stacked_groups(raw), stacked_groups(decoded)):
        R = max([a.shape[1] for a in A] + [rank or 0])
        (A, B), (A_d, B_d) = fl.pad_ranks(A, B, R), fl.pad_ranks(A_d, B_d, R)
        fedit = fl.Aggregate(*(fl.weighted_sum(p, [x.double() for x in X]) for X in (A_d, B_d)),
                             None, 0, 0)                     # in exact arithmetic, as "naive"
        stack = lambda d, i: torch.stack([d[n] if i is None else d[n][i] for n in names]).to(
            A[0].device)                                                      # noqa: E731
        agg = fl.Aggregate(*(None if update.factors is None else stack(update.factors, i)
                             for i in (0, 1)),
                           stack(update.base_delta, None) if update.base_delta else None, 0, 0)
        naive = exact_divergences(A, B, p, fedit)
        ours = exact_divergences(A, B, p, agg)["aggregate"]
        for i, n in enumerate(names):
            out[n] = {"naive": naive["aggregate"][i].item(), "aggregate": ours[i].item(),
                      "norm_M": naive["norm_M"][i].item()}
    return relative_divergences(out)


def relative_divergences(divergence: dict[str, dict[str, float]],
                         extra: dict[str, dict[str, float]] | None = None) -> dict:
    """Per-layer divergences relative to ||M||, and their means over layers."""
    per_layer = {}
    for n, d in divergence.items():
        scale = d["norm_M"] if d["norm_M"] > 0 else 1.0
        per_layer[n] = {k: v / scale for k, v in {**d, **(extra or {}).get(n, {})}.items()
                        if k != "norm_M"}
    keys = next(iter(per_layer.values())).keys()
    mean = {k: sum(v[k] for v in per_layer.values()) / len(per_layer) for k in keys}
    return {"relative_mean": mean, "relative_per_layer": per_layer}


# --- partitioning data across clients, and who takes part in a round


def _dirichlet(alpha: Tensor, g: torch.Generator) -> Tensor:
    """One Dirichlet draw seeded from `g`, sampled in log space: Gamma(a) = Gamma(a + 1) U^(1/a)
    with U uniform, so log Gamma(a) never underflows and a tiny alpha stays skewed (torch's
    float32 sampler returns the uniform share once every Gamma draw underflows to 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
        log_gamma = (torch.distributions.Gamma(alpha + 1, torch.ones_like(alpha)).sample().log()
                     + torch.rand_like(alpha).log() / alpha)
    return torch.softmax(log_gamma, 0)


def partition(labels: Sequence, n_clients: int, alpha: float | None, seed: int,
              min_size: int = 1, n_bins: int = 5) -> list[list[int]]:
    """Split example indices across clients; every example lands in exactly one client.
    alpha=None: IID (a random even split). Otherwise Dirichlet(alpha) over labels: for each
    class, its examples are shared out in proportions drawn from Dir(alpha) (smaller alpha,
    more skew). Float labels (STS-B scores) are first cut into n_bins equal-width bins.
    Draws again (up to 100 times) until every client has at least min_size examples."""
    n = len(labels)
    if n_clients < 1:
        raise ValueError(f"need at least one client, got {n_clients}")
    if n < n_clients * min_size:
        raise ValueError(f"{n} examples cannot give {n_clients} clients {min_size} each")
    g = torch.Generator().manual_seed(seed)
    if alpha is None:
        perm = torch.randperm(n, generator=g).tolist()
        return [sorted(perm[u::n_clients]) for u in range(n_clients)]
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    y = torch.as_tensor(labels)
    if y.is_floating_point():                                       # regression: bin scores
        lo, hi = y.min(), y.max()
        y = ((y - lo) / (hi - lo + 1e-12) * n_bins).long().clamp(max=n_bins - 1)
    concentration = torch.full((n_clients,), float(alpha), dtype=torch.float64)
    for _ in range(100):
        clients = [[] for _ in range(n_clients)]
        for c in torch.unique(y).tolist():
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)].tolist()
            share = _dirichlet(concentration, g)                    # (n_clients,)
            cuts = (torch.cumsum(share, 0) * len(idx)).round().long().tolist()
            for u, (a, b) in enumerate(zip([0] + cuts[:-1], cuts)):
                clients[u] += idx[a:b]
        if min(map(len, clients)) >= min_size:
            return [sorted(c) for c in clients]
    raise ValueError(f"Dirichlet(alpha={alpha}) left a client with fewer than {min_size} "
                     f"examples in 100 draws; use fewer clients or a larger alpha")


def participants(n_clients: int, fraction: float, round_: int, seed: int) -> list[int]:
    """Clients that train in this round: a seeded random max(1, round(fraction U)) of them."""
    if not 0 < fraction <= 1:
        raise ValueError(f"participation must be in (0, 1], got {fraction}")
    m = max(1, round(fraction * n_clients))
    g = torch.Generator().manual_seed(seed * 100_003 + round_)
    return sorted(torch.randperm(n_clients, generator=g)[:m].tolist())
