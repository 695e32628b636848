"""What the exact peers' released code computes, transcribed to torch on tensors, so that
tests/test_peers_code.py can run it beside this project's registry entries on the same inputs.

Fed-SB (Singhal et al., arXiv 2502.15436), github.com/CERT-Lab/fed-sb. The upstream repository
cannot be fetched here; its history is held by the public fork putssander/fed-sb, whose own two
commits (2025-10-30: README, requirements, scripts, two one-line edits in fed_sb/DP/SNLI) touch
none of the files below. Every file quoted is at commit 3515e04824d218a92b13f8758e5d92aa3efe3e95
("make code public", Raghav Singhal, 2025-02-15) and unchanged since; line numbers are that
commit's:
  fed_sb/fed/fed_agg.py, aggregate_models_fed_sb (38-55): every state_dict key containing
      "default_lora_latent_mapping" (the r x r matrix R of each layer) and every "classifier"
      key becomes torch.stack([client[k].float() ...]).mean(0): the uniform mean over the
      clients, in float32, whatever their sample counts (`aggregate`);
  fed_sb/utils/gradient_utils.py, estimate_and_process_grads_torch (36-146): the sum over
      batches of the gradient of outputs.loss / samples_to_process (104; outputs.loss is
      already the batch mean), over the first num_samples examples (default 170) of the whole
      training set, then -lr * sign(sum) (140-141) (`process_grads`);
  fed_sb/fed/CR/train_cr_fed.py: lr = args.lr / (warmup_ratio * total_training_steps) (116-118;
      `effective_lr`), the estimate taken once on the server's copy of the whole training set
      before it is split (121-126), every client initialised from the same named_grads
      (160-183), lora_alpha = lora_r for fed-sb (334-335: LoRA scaling 1), clients' data the
      contiguous equal slices of the training set (162-163);
  fed_sb/utils/svd_utils.py, get_svd_grad (4-40): torch.manual_seed(42), a randn draw that is
      never used, torch.svd_lowrank(float32, q=rank, niter=10), U, s, V cast to bfloat16,
      returns (U, diag(s), V^T) (`svd_grad`);
  fed_sb/utils/initialization_utils.py, find_and_initialize_grad (79-152) with
      fed_sb/config/reconstruct_config.yaml (reconstr_mode separated, half_init_dec False,
      replacement_module_random_init False, r_squared True): for a layer with weight (d, k) and
      processed gradient G (d, k), get_replacement_module_grad (25-34) takes get_svd_grad(G^T)
      = (U (k, r), S, V^T (r, d)) as enc = U, dec = V^T; lora_B.weight = dec^T = V (d, r)
      (126), lora_A.weight = enc^T = U^T (r, k) (130), the latent R = S (134); A and B frozen
      (139-140), only R trains (`initialise`);
  fed_sb/utils/latent_utils.py, forward_latent (53-81) and get_delta_weight (10-50): the layer
      adds scaling * B R A x, so delta W = scaling * B @ R @ A (`delta`), not zero at the start:
      the initial model is W + scaling * (the rank-r SVD of -lr sign(G)), one approximate
      full-fine-tuning step.
LoRA-SB (github.com/RaghavSinghal10/lora-sb at 37b33d4, 2024-12-02), on which Fed-SB builds: the
same utils/svd_utils.py (identical) and utils/initialization_utils.py (one blank line apart).
Fed-SB vendors them under fed_sb/utils and imports nothing from LoRA-SB.

RoLoRA (Chen et al., arXiv 2502.01755, NeurIPS 2025): no code released by the authors could be
found. Searched (2026-12-07): repository names containing "rolora" (HuangOwen/RoLoRA and
Bob-Annette/V-RoLoRA are the unrelated rotated-outlier quantisation method), code and pages for
the title and the arXiv id; papernotes.org's NeurIPS 2025 entry says "Code: None", and a course
project reproducing it (TU Delft CS4725) works from the paper's supplementary material, which is
not retrievable here. One third-party implementation exists and is transcribed as such, not as
the authors' code: boyi-liu/FedLLM-Factory (commit 6a06799, 2026-04-21; alg/rolora.py last
changed 4e4cbfe, 2026-01-01, alg/ftbase.py), `factory_trained_factor`, `factory_aggregate` and
`factory_local_run` below.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Fed-SB (CERT-Lab/fed-sb at 3515e04)
# ---------------------------------------------------------------------------------------------


def aggregate(client_tensors: list[Tensor]) -> Tensor:
    """aggregate_models_fed_sb (fed_agg.py 43-51): one key's tensors from every client (the
    latent R of a layer, or a classifier tensor), their uniform mean in float32."""
    return torch.stack([t.float() for t in client_tensors], 0).mean(0)


def process_grads(grad_sum: Tensor, lr: float) -> Tensor:
    """gradient_utils.py 140-141: the processed gradient of one weight, -lr * sign(sum)."""
    return -1 * lr * torch.sign(grad_sum)


def grad_sum(batch_grads: list[Tensor], batch_sizes: list[int]) -> Tensor:
    """gradient_utils.py 100-114: the sum over batches of the gradient of loss / batch size,
    from each batch's gradient of its mean loss."""
    return sum(g / n for g, n in zip(batch_grads, batch_sizes))


def effective_lr(lr: float, warmup_ratio: float, total_training_steps: int) -> float:
    """train_cr_fed.py 116-118: the lr that scales the initialisation's sign gradient."""
    return lr / (warmup_ratio * total_training_steps)


def svd_grad(input_matrix: Tensor, rank: int, n_iter: int = 10,
             out_dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor, Tensor]:
    """get_svd_grad (svd_utils.py 4-40): (U (m, r), diag(s) (r, r), V^T (r, n)) of
    torch.svd_lowrank on the float32 matrix, cast to bfloat16 as the code does (out_dtype).
    The code reseeds torch's global RNG with 42 and draws an unused randn first, which fixes
    svd_lowrank's random start; here that happens inside fork_rng, so the caller's RNG is left
    as it was (the code's own call leaves the global RNG reseeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)
        size = input_matrix.size(1)
        torch.randn(size, rank, dtype=torch.float32)                 # R: drawn, never used
        U, s, V = torch.svd_lowrank(input_matrix.to(torch.float32), q=rank, niter=n_iter)
    U, s, V = U.to(out_dtype), s.to(out_dtype), V.to(out_dtype)
    return U, torch.diag(s), V.T


def initialise(grad: Tensor, rank: int, out_dtype: torch.dtype = torch.bfloat16
               ) -> tuple[Tensor, Tensor, Tensor]:
    """find_and_initialize_grad (initialization_utils.py 107-140) for one layer: from its
    processed gradient G (d, k) (process_grads), A (r, k), R (r, r), B (d, r) with delta W =
    scaling * B R A. get_replacement_module_grad casts to the gradient's dtype (29-31)."""
    U, S, Vt = svd_grad(grad.T, rank, out_dtype=out_dtype)          # (k, r), (r, r), (r, d)
    enc, dec = U.to(grad.dtype), Vt.to(grad.dtype)
    return enc.T, S.to(grad.dtype), dec.T                            # A (r, k), R, B (d, r)


def delta(A: Tensor, R: Tensor, B: Tensor, scaling: float = 1.0) -> Tensor:
    """get_delta_weight (latent_utils.py 38-41): scaling * B @ R @ A, (d, k); scaling =
    lora_alpha / r = 1 for fed-sb (train_cr_fed.py 334-335)."""
    return B @ R @ A * scaling


# ---------------------------------------------------------------------------------------------
# RoLoRA as a third party implemented it (boyi-liu/FedLLM-Factory at 6a06799; not the authors')
# ---------------------------------------------------------------------------------------------


def factory_trained_factor(round_: int) -> str:
    """alg/rolora.py, Client.run (14-19) and Server.__init__ (29-32): "B" in odd rounds, "A"
    in even ones; main.py sets server.round = rnd from 0, so the first round trains A."""
    return "B" if round_ % 2 == 1 else "A"


def factory_aggregate(client_tensors: list[Tensor], n_train: list[int]) -> Tensor:
    """alg/ftbase.py, FTBaseServer.aggregate (58-70): sum_u v_u * n_u / N for every key a
    client uploads (RoLoRA's clients upload only the factor they trained, rolora.py 23-26)."""
    data_sum = sum(n_train)
    out = 0
    for v, n in zip(client_tensors, n_train):
        out = out + v * n / data_sum
    return out


def factory_local_run(model: dict[str, Tensor], global_lora: dict[str, Tensor],
                      clients: list[Callable[[dict[str, Tensor]], None]], round_: int
                      ) -> list[dict[str, Tensor]]:
    """alg/ftbase.py, FTBaseServer.local_run (52-55) with alg/rolora.py's Client.run: every
    client trains the server's one model object in place (client_model = model), uploads its
    trained factor, then the server reloads global_lora with strict=False. global_lora holds
    only the factor the previous round trained (aggregate replaces it by the uploads' keys),
    so the factor trained this round is not reset between clients. `model`: {"A": .., "B": ..}
    trained in place by each client callable; returns each client's upload."""
    uploads = []
    trained = factory_trained_factor(round_)
    for train in clients:
        train(model)                                                # in place, on the one model
        uploads.append({trained: model[trained].clone()})
        for k, v in global_lora.items():                            # load_state_dict(strict=False)
            model[k] = v.clone()
    return uploads
