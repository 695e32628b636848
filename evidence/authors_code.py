"""What the FLoRA-NA authors' released solver computes, replayed effect by effect, and measured
on real client updates from this harness (RESULTS.md, "The authors' released solver, replayed").

    python -m evidence.authors_code --data-dir /work/shared/data --out runs/authors/minilm.json
    python -m evidence.authors_code --model smollm2 --target-modules q_proj ...   # 30 layers

The released code: github.com/chickbong221/Fed-LoRA, a FederatedScope(-LLM) fork whose commits
are by the paper's first authors (Le-Tuan Nguyen, Minh-Duong Nguyen), branch NoGirlfriend at
0ceaefa (2025-08-25), federatedscope/core/aggregators/exact_lora_aggregator.py, class
ExactClientsAggregator (federate.method 'exact_lora': aggregator_builder.py 91-92, e.g.
federatedscope/glue/yamls/sst2/fedex-lora.yaml). Line numbers below are that file's:
  optimize_exact_uv (119-183), called with lr=1e-2, steps=200 (75):
    135-137  the global A and B of every LoRA layer stacked in the global state_dict's order;
    125-126  the clients' A_u, B_u and changes dA_u = A_u - A_g, dB_u = B_u - B_g, stacked by
             extract_lora_AB (341-372) and extract_lora_AB_gradients (285-339) in sorted-name
             order (so 'layer.10' comes before 'layer.2');
    140-141  the target: the uniform mean over the K clients of B_u A_u;
    144-146  U = V = ones(K), torch.optim.AdamW([U, V], lr=lr): torch's defaults, weight decay
             0.01, eps 1e-8, betas (0.9, 0.999);
    148-163  `steps` steps on loss = mean over all entries of
             ((B_g + mean_u V_u dB_u) @ (A_g + mean_u U_u dA_u) - target)^2;
    168-181  each client's change scaled by the U_u, V_u of the last step (no best iterate);
  _grad_weighted_avg (69-116): new = global + sum_u (n_u / N) * (U_u dA_u, or V_u dB_u), key
    by key by name; other trainable parameters (the head) get their data-weighted mean change.
`replay` computes exactly that, in float32 as our uploads are, and each of five effects can be
switched off (Effects): the eps effect of a loss averaged over entries, the weight decay, the
last iterate, the uniform target against data-size weights applied, and the layer order.
`main` trains clients on SST-2 through train.py's own functions, the global model following
--aggregator (FedIT by default), and every round evaluates the replay with each effect off in
turn, FedIT, this project's FLoRA-NA (ALS) and its authors variant (evidence/authors_variant.py)
on the same uploads: each one's divergence from the data-weighted ideal update
M = sum_u p_u B_u A_u, dense in float64.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass

import torch
import tyro
from torch import Tensor

import flora_na as fl
from evidence import authors_variant
from harness import federation, provenance

Factors = dict[str, tuple[Tensor, Tensor]]          # {layer name: (A (r, k), B (d, r))}


@dataclass(frozen=True)
class Effects:
    """Which behaviours of the released code the replay keeps (True: as the code does)."""
    tiny_loss: bool = True       # loss averaged over all entries: with LoRA-sized factors its
    #                              gradients are far below Adam's eps (else: divided by the
    #                              target's mean square, so they are O(1))
    weight_decay: bool = True    # AdamW's default decay 0.01 pulls U, V towards 0 (else: 0)
    last_iterate: bool = True    # U, V after the last step (else: the lowest loss seen)
    uniform_target: bool = True  # fit the uniform mean, apply n_u / N (else: n_u / N in both)
    layer_order: bool = True     # global factors in state_dict order, clients' sorted by name
    #                              (else: both sorted)


def _sorted_names(names) -> list[str]:
    """The clients' order in the released code: its parameter names (layer name + suffix)
    sorted as strings; the suffix is common, so this is the sort of the layer names."""
    return sorted(names, key=lambda n: f"{n}.lora_A.default.weight")


def replay(global_factors: Factors, clients: list[Factors], n: Tensor, effects=Effects(),
           steps: int = 200, lr: float = 1e-2) -> tuple[Factors, dict]:
    """The released code's aggregation of one round (module docstring), with `effects`.
    global_factors: the global model's LoRA factors in its state_dict order; clients: each
    client's factors by name; n: the clients' sample counts. Returns the new global factors
    and {"U", "V" (K,): the coefficients applied, "loss_first", "loss_last": the loss at the
    start and at the returned iterate, "grad_first": the largest |dloss/dU_u|, |dloss/dV_u| at
    the start (Adam's eps is 1e-8)}."""
    names = list(global_factors)                                     # state_dict order
    order = _sorted_names(names)                                     # the clients' order
    stack = lambda i, src, keys: torch.stack([src[k][i].float() for k in keys])  # noqa: E731
    A_all = torch.stack([stack(0, c, order) for c in clients])       # (K, L, r, k)
    B_all = torch.stack([stack(1, c, order) for c in clients])       # (K, L, d, r)
    dA = A_all - stack(0, global_factors, order)                     # (K, L, r, k) by name
    dB = B_all - stack(1, global_factors, order)
    glob = names if effects.layer_order else order
    A_g, B_g = stack(0, global_factors, glob), stack(1, global_factors, glob)   # (L, r, k) ..
    K = len(clients)
    data = (n / n.sum()).float()                                     # (K,) n_u / N
    if effects.uniform_target:
        target = torch.stack([B_all[i] @ A_all[i] for i in range(K)]).mean(dim=0)  # (L, d, k)
        fit = torch.full((K,), 1.0 / K)
    else:
        target = torch.einsum("k,kldx->ldx", data, B_all @ A_all)
        fit = data
    scale = 1.0 if effects.tiny_loss else target.square().mean().item()
    U = torch.nn.Parameter(torch.ones(K))
    V = torch.nn.Parameter(torch.ones(K))
    opt = torch.optim.AdamW([U, V], lr=lr, weight_decay=0.01 if effects.weight_decay else 0.0)

    def loss_of() -> Tensor:
        if effects.uniform_target:          # the code's mean over clients, as written
            A_hat = A_g + (U.view(-1, 1, 1, 1) * dA).mean(dim=0)
            B_hat = B_g + (V.view(-1, 1, 1, 1) * dB).mean(dim=0)
        else:
            A_hat = A_g + ((fit * U).view(-1, 1, 1, 1) * dA).sum(dim=0)
            B_hat = B_g + ((fit * V).view(-1, 1, 1, 1) * dB).sum(dim=0)
        return torch.mean((B_hat @ A_hat - target) ** 2) / scale

    best = (float("inf"), U.detach().clone(), V.detach().clone())
    first = grad_first = None
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of()
        if loss.item() < best[0]:
            best = (loss.item(), U.detach().clone(), V.detach().clone())
        loss.backward()
        if first is None:
            first = loss.item()
            grad_first = max(U.grad.abs().max().item(), V.grad.abs().max().item())
        opt.step()
    with torch.no_grad():
        last = loss_of().item()
        first = last if first is None else first
    if effects.last_iterate or last < best[0]:
        best = (last, U.detach().clone(), V.detach().clone())
    _, U_out, V_out = best
    new = {}
    for name in names:                        # _grad_weighted_avg: by name, data weights
        A0, B0 = global_factors[name]
        new[name] = (A0 + sum(data[i] * U_out[i] * (c[name][0] - A0)
                              for i, c in enumerate(clients)),
                     B0 + sum(data[i] * V_out[i] * (c[name][1] - B0)
                              for i, c in enumerate(clients)))
    return new, {"U": U_out, "V": V_out, "loss_first": first, "loss_last": best[0],
                 "grad_first": grad_first}


# ---------------------------------------------------------------------------------------------
# The measurement on real client updates
# ---------------------------------------------------------------------------------------------


SETTINGS = {                                   # name: Effects of the replay
    "released code": Effects(),
    "  without its weight decay": Effects(weight_decay=False),
    "  loss scaled to O(1) (no eps effect)": Effects(tiny_loss=False),
    "  best iterate instead of the last": Effects(last_iterate=False),
    "  data-size weights in the fit too": Effects(uniform_target=False),
    "  global factors in sorted order too": Effects(layer_order=False),
    "  all five changed": Effects(False, False, False, False, False),
}


@dataclass
class Args:
    """Replay the authors' released solver on real client updates, round by round."""
    data_dir: str | None = dataclasses.field(default_factory=lambda: os.environ.get("FLORA_DATA"))
    """folder with glue_data/SST-2 (train.py's --data-dir; default $FLORA_DATA)"""
    model: str = "minilm"
    """train.py's --model"""
    target_modules: str | None = None
    """train.py's --target-modules (e.g. q_proj: SmolLM2's 30 layers of one shape)"""
    clients: int = 3
    """clients (the authors' default is 3)"""
    rounds: int = 3
    """rounds"""
    local_steps: int = 5
    """local steps per client per round"""
    batch_size: int = 16
    """client batch size"""
    lr: float = 1e-3
    """client learning rate (AdamW)"""
    max_length: int = 64
    """max tokens per example"""
    max_train_examples: int | None = 3000
    """training subset"""
    dirichlet_alpha: float = 0.5
    """Dirichlet alpha over labels"""
    seed: int = 0
    """seed of the partition, initialisation and batches"""
    aggregator: str = "fedit"
    """the aggregator whose global model the rounds follow"""
    steps: int = 200
    """the released code's AdamW steps"""
    threads: int = 1
    """torch CPU threads"""
    out: str | None = None
    """write every number and the machine to this JSON"""


def dense_divergences(clients: list[Factors], p: Tensor, new: Factors) -> tuple[Tensor, Tensor]:
    """Per layer (L,): ||M - B_new A_new||_F and ||M||_F, M = sum_u p_u B_u A_u, float64."""
    div, norm = [], []
    for name, (A, B) in new.items():
        M = sum(w * c[name][1].double() @ c[name][0].double() for w, c in zip(p.tolist(), clients))
        div.append((M - B.double() @ A.double()).norm())
        norm.append(M.norm())
    return torch.stack(div), torch.stack(norm)


def evaluate_round(uploads: list[Factors], n: Tensor, previous: Factors, steps: int) -> dict:
    """Every method's new global factors on one round's uploads, and their divergences."""
    p = (n / n.sum()).double()
    out = {}
    fedit = federation.server_step(uploads, p, "fedit")
    methods = {"FedIT": (fedit.factors, None)}
    for name, options in (("FLoRA-NA, ALS (this project's default)", None),
                          ("FLoRA-NA, the authors' variant (this project's solver)",
                           authors_variant.NAME)):
        update = federation.server_step(uploads, p, options or fl.METHOD, {}, previous=previous)
        methods[name] = (update.factors, None)
    for name, effects in SETTINGS.items():
        methods["replay: " + name.strip()] = replay(previous, uploads, n, effects, steps=steps)
    naive, norm = dense_divergences(uploads, p, fedit.factors)
    for name, (new, info) in methods.items():
        div, _ = dense_divergences(uploads, p, new)
        row = {"rel_div_mean": (div / norm).mean().item(),
               "rel_div_total": (div.square().sum() / norm.square().sum()).sqrt().item(),
               "removed": 1 - (div.square().sum() / naive.square().sum()).sqrt().item()}
        if info is not None:
            row |= {"U": [info["U"].min().item(), info["U"].max().item()],
                    "V": [info["V"].min().item(), info["V"].max().item()],
                    "loss_first": info["loss_first"], "loss_last": info["loss_last"],
                    "grad_first": info["grad_first"]}
        out[name] = row
    return out


def main(args: Args) -> list[dict]:
    import train
    torch.set_num_threads(args.threads)
    machine = provenance.record(torch.device("cpu"))                 # the code as it starts
    with tempfile.TemporaryDirectory() as tmp:
        targs = train.Args(task="sst2", data_dir=args.data_dir, model=args.model,
                           target_modules=args.target_modules, aggregator=args.aggregator,
                           clients=args.clients, rounds=args.rounds, local_steps=args.local_steps,
                           batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                           max_train_examples=args.max_train_examples,
                           dirichlet_alpha=args.dirichlet_alpha, seed=args.seed, device="cpu",
                           threads=args.threads, out=os.path.join(tmp, "run"))
        names = train.check_args(targs)
        task, data = train.load_data(targs)
        parts = federation.partition(data.labels, args.clients, args.dirichlet_alpha or None,
                                     args.seed, min_size=1)
        model, tokenizer = train.model_loader(targs, torch.device("cpu"))()
        make_batch = task.batcher(tokenizer, data.train, args.max_length)
        state = train.start_state(model, targs.out, resume=False)
        n = torch.tensor([len(ix) for ix in parts], dtype=torch.float64)
        rows = []
        layers = list(state["factors"])
        print(f"{args.model}: {len(layers)} LoRA layers; sorted-name order "
              f"{'differs from' if _sorted_names(layers) != layers else 'equals'} the "
              f"state_dict order; clients' sample counts {n.int().tolist()}", flush=True)
        for rnd in range(args.rounds):
            uploads, heads = [], []
            for u in range(args.clients):
                upload, head, _ = train.client_update(
                    model, make_batch, parts[u], factors=dict(state["factors"]),
                    head=state["head"], lr=args.lr, optimizer="adamw", trains="AB",
                    local_steps=args.local_steps, batch_size=args.batch_size, seed=args.seed,
                    round_=rnd, u=u)
                uploads.append(upload)
                heads.append(head)
            result = evaluate_round(uploads, n, state["factors"], args.steps)
            rows.append({"round": rnd + 1, "methods": result})
            print(f"\nround {rnd + 1}: relative divergence ||M - update|| / ||M|| (mean over "
                  f"layers; all layers together), share of FedIT's removed")
            for name, row in result.items():
                extra = (f"  U in [{row['U'][0]:.4f}, {row['U'][1]:.4f}], V in "
                         f"[{row['V'][0]:.4f}, {row['V'][1]:.4f}], first gradient "
                         f"{row['grad_first']:.1e}" if "U" in row else "")
                print(f"  {name:62s} {row['rel_div_mean']:.5f}  {row['rel_div_total']:.5f}  "
                      f"{100 * row['removed']:+7.2f}%{extra}", flush=True)
            train.server_update(names[0], state, model, uploads, heads, n / n.sum(),
                                list(range(args.clients)), n_clients=args.clients,
                                options={}, track_solvers=False, device=torch.device("cpu"),
                                seed=args.seed, round_=rnd,
                                private_head=train.keeps_own_head(targs, names[0]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": dataclasses.asdict(args), "layers": layers, "rows": rows,
                       "machine": machine}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
