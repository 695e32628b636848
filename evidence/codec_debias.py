"""Evidence (not a test): does FLoRA-NA's debiased Gram (harness/codecs.py, this project's own
addition) help when clients upload stochastically rounded factors? Where, if anywhere?

Synthetic factors, one layer: each client's A_u (r, k), B_u (d, r) is a shared global factor
plus a client change of relative size --change (1: independent clients; 0.1: clients near a
common global pair, as after a few rounds of training). Clients upload A_u, B_u through an int
codec with stochastic rounding, and the variance sums that the debiased Gram needs. For each
(codec, change, d = k, rank, clients) cell, --reps draws of the rounding, each solved three ways
on the decoded factors by flora_na.solve_flora_na with gram_correction none (plain), debiased
(both Grams corrected) and noise_aware (only ||M||^2 and the cross term <M, B_hat A_hat>
corrected, the sent product's own norm kept with its noise). noise_aware() below, an L-BFGS on
codecs.noise_aware_objective, is the reference the solver's option is tested against.
Reported, as means over the draws with the standard error of the paired difference (plain minus
the other, so a positive gain means better than plain):
  coef   ||P Q^T - P* Q*^T||_F, the distance to the uncompressed solve's coefficients (P*, Q*),
         through the outer product, which the (cP, Q/c) rescaling leaves unchanged
  sent   ||M - (sum_u P_u Q(B_u))(sum_u Q_u Q(A_u))||_F / ||M||_F: how far the aggregate the
         server actually sends (coefficients on the decoded factors) is from the true M
Beside them, `sent` for FedIT on the decoded factors and for the uncompressed FLoRA-NA.

    python -m evidence.codec_debias                     # the default grid, a few minutes
    python -m evidence.codec_debias --codecs int2 --dims 64 --reps 8    # under a minute
    python -m evidence.codec_debias --out runs/codec_debias.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import flora_na as fl
from harness.codecs import Codec, noise_aware_objective


def synthetic(U: int, r: int, d: int, k: int, change: float, seed: int):
    """A (1, U, r, k), B (1, U, d, r) = global + change * client part; p (U,) in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(1, 1, r, k, generator=g) + change * torch.randn(1, U, r, k, generator=g)
    B = torch.randn(1, 1, d, r, generator=g) + change * torch.randn(1, U, d, r, generator=g)
    return A / k ** 0.5, B / d ** 0.5, torch.rand(U, generator=g) + 0.5


def upload(codec: Codec, A, B, generator):
    """Decoded factors and the variance sums each client sends, stacked (1, U, ...)."""
    U = A.shape[1]
    pa = [codec.encode(A[:, u], generator=generator, variance_dim=-1) for u in range(U)]
    pb = [codec.encode(B[:, u], generator=generator, variance_dim=-2) for u in range(U)]
    stack = lambda xs: torch.stack(xs, 1)                                  # noqa: E731
    return (stack([codec.decode(x) for x in pa]), stack([codec.decode(x) for x in pb]),
            stack([x["variance"] for x in pa]), stack([x["variance"] for x in pb]))


def sent_divergence(M, A, B, P, Q) -> float:
    """||M - (sum P_u B_u)(sum Q_u A_u)|| / ||M|| for one layer, dense in float64."""
    B_hat = torch.einsum("u,udr->dr", P.flatten().double(), B[0].double())
    A_hat = torch.einsum("u,urk->rk", Q.flatten().double(), A[0].double())
    return ((M - B_hat @ A_hat).norm() / M.norm()).item()


def noise_aware(A_q, B_q, p, var_A, var_B, iters: int = 200):
    """(P, Q) (1, U) minimising codecs.noise_aware_objective, an unbiased estimate of the
    expected squared divergence of what is sent, by L-BFGS in float64 from FedIT's p.
    The reference for the solver's gram_correction="noise_aware" (tests/test_gram_correction)."""
    G_A, G_B = fl.gram_blocks(A_q, B_q)
    w = (p / p.sum()).double()
    U = len(w)
    x = torch.cat([w, w]).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = noise_aware_objective(G_A, G_B, w, x[None, :U], x[None, U:], var_A, var_B).sum()
        f.backward()
        return f
    opt.step(closure)
    x = x.detach()
    return x[None, :U], x[None, U:]


CORRECTIONS = {"plain": "none", "debiased": "debiased", "aware": "noise_aware"}


def cell(codec: Codec, U: int, r: int, d: int, k: int, change: float, reps: int, seed: int):
    A, B, p = synthetic(U, r, d, k, change, seed)
    M = torch.einsum("u,udr,urk->dk", p.double() / p.sum(), B[0].double(), A[0].double())
    ref = fl.solve_flora_na(A, B, p, path="gram")
    outer = lambda res: res.P[0][:, None] * res.Q[0][None, :]             # noqa: E731
    generator = torch.Generator().manual_seed(seed + 1)
    rows = {key: [] for key in ("coef_plain", "coef_debiased", "coef_aware", "sent_plain",
                                "sent_debiased", "sent_aware", "sent_fedit")}
    for _ in range(reps):
        A_q, B_q, var_A, var_B = upload(codec, A, B, generator)
        for name in ("plain", "debiased", "aware"):
            res = fl.solve_flora_na(A_q, B_q, p, path="gram", var_A=var_A, var_B=var_B,
                                    gram_correction=CORRECTIONS[name])
            rows[f"coef_{name}"].append((outer(res) - outer(ref)).norm().item())
            rows[f"sent_{name}"].append(sent_divergence(M, A_q, B_q, res.P, res.Q))
        rows["sent_fedit"].append(sent_divergence(M, A_q, B_q, p / p.sum(), p / p.sum()))
    t = {key: torch.tensor(v, dtype=torch.float64) for key, v in rows.items()}
    out = {"codec": codec.name, "U": U, "r": r, "d": d, "k": k, "change": change, "reps": reps,
           "sent_uncompressed": sent_divergence(M, A, B, ref.P, ref.Q)}
    for what in ("coef", "sent"):
        diff = t[f"{what}_plain"] - t[f"{what}_debiased"]
        out |= {f"{what}_plain": t[f"{what}_plain"].mean().item(),
                f"{what}_debiased": t[f"{what}_debiased"].mean().item(),
                f"{what}_gain": diff.mean().item(),
                f"{what}_gain_se": (diff.std() / reps ** 0.5).item()}
        diff = t[f"{what}_plain"] - t[f"{what}_aware"]
        out |= {f"{what}_aware": t[f"{what}_aware"].mean().item(),
                f"{what}_aware_gain": diff.mean().item(),
                f"{what}_aware_gain_se": (diff.std() / reps ** 0.5).item()}
    out["sent_fedit"] = t["sent_fedit"].mean().item()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codecs", default="int2,int4,int8")
    ap.add_argument("--ranks", default="4,16")
    ap.add_argument("--clients", default="4,16")
    ap.add_argument("--dims", default="64,256", help="d = k")
    ap.add_argument("--changes", default="1.0,0.1")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ints = lambda s: [int(x) for x in s.split(",")]                      # noqa: E731
    start, rows = time.time(), []
    print("codec | U | r | d | change | coef: plain, debiased (gain +- se), noise-aware "
          "(gain +- se) | sent: plain, debiased (gain +- se), noise-aware (gain +- se) | "
          "sent FedIT | sent uncompressed")
    for name in args.codecs.split(","):
        for change in [float(x) for x in args.changes.split(",")]:
            for d in ints(args.dims):
                for r in ints(args.ranks):
                    for U in ints(args.clients):
                        row = cell(Codec(name), U, r, d, d, change, args.reps, args.seed)
                        rows.append(row)
                        print(f"{name} | {U} | {r} | {d} | {change} | " + " | ".join(
                            f"{row[w + '_plain']:.4g}, {row[w + '_debiased']:.4g} "
                            f"({row[w + '_gain']:+.2g} +- {row[w + '_gain_se']:.1g}), "
                            f"{row[w + '_aware']:.4g} ({row[w + '_aware_gain']:+.2g} +- "
                            f"{row[w + '_aware_gain_se']:.1g})" for w in ("coef", "sent"))
                            + f" | {row['sent_fedit']:.4g} | {row['sent_uncompressed']:.4g}",
                            flush=True)
    print(f"{time.time() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
