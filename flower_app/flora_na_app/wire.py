"""What travels between the ServerApp and the ClientApps, and the run config they share.

The run config ([tool.flwr.app.config] in pyproject.toml, overridden with `flwr run
--run-config`) holds train.py's command-line options under the same kebab-case names, so
one train.Args describes a run whichever way it is run; "" leaves an option at train.py's
default. The LoRA factors, the head, the frozen weights that an aggregator changed and the
frozen A0 of a core aggregator (Fed-SB: A = R A0) travel as float32 (ArrayRecord refuses
bfloat16) under "A/<layer>", "B/<layer>", "head/<parameter>", "W/<layer>" and "C/<layer>",
packed into one ArrayRecord of two arrays (packing.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from flwr.app import ArrayRecord

import train

from flora_na_app import packing

APP_KEYS = ("node-timeout", "round-timeout", "min-clients",    # the app's own: not train.py's
            "fraction-evaluate", "evaluate-every")
FROM_NODES = ("clients",)                      # set by the SuperNodes that connect


# train.py's codec options: the app does not pass factors through codecs yet, so its run
# config does not offer them, and refuses them rather than record a codec it does not apply.
NOT_YET = ("upload_codec", "download_codec", "codec_block", "codec_rounding", "topk_fraction")


def args_from(run_config: dict, **override) -> train.Args:
    """train.Args from a Flower run config, parsed by train.py's own command line (types,
    choices) so that a bad value fails as it would there; `override` sets fields directly.
    Options at train.py's default are not passed; list options (plugins, agg-option) are
    whitespace-separated strings, e.g. agg-option = "flora_na.solver=adamw flora_na.steps=50",
    so every process that parses the run config (the ClientApps too) imports the plugins."""
    fields = {f.name for f in dataclasses.fields(train.Args)}
    defaults = train.Args()
    argv = []
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if key in APP_KEYS:
            continue
        if name not in fields or name in FROM_NODES:
            raise ValueError(f"run config key {key!r} is not a train.py option this app takes")
        if name in NOT_YET:
            raise ValueError(f"run config key {key!r}: this app sends factors uncompressed (the "
                             f"codecs are train.py's only, for now); leave it out")
        if value == getattr(defaults, name) and type(value) is type(getattr(defaults, name)):
            continue
        if isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(getattr(defaults, name), list):
            argv += [f"--{key}", *str(value).split()] if str(value).split() else []
        elif value != "":
            argv += [f"--{key}", str(value)]
    try:
        args = train.parse_args(argv)
    except SystemExit as err:                  # tyro printed the reason
        raise ValueError(f"bad run config {run_config}: see the message above") from err
    return dataclasses.replace(args, **override)


def to_arrays(factors: dict | None = None, head: dict | None = None, base: dict | None = None,
              without_B: bool = False, core: dict | None = None) -> dict[str, np.ndarray]:
    """LoRA factors {layer: (A, B)} (only the A's if without_B), a head {parameter: tensor},
    frozen weights {layer: W} and core bases {layer: A0} as float32 numpy arrays under the
    keys above."""
    tensors = {}
    for layer, (A, B) in (factors or {}).items():
        tensors[f"A/{layer}"] = A
        if not without_B:
            tensors[f"B/{layer}"] = B
    tensors.update({f"head/{k}": v for k, v in (head or {}).items()})
    tensors.update({f"W/{k}": v for k, v in (base or {}).items()})
    tensors.update({f"C/{k}": v for k, v in (core or {}).items()})
    return {k: v.detach().float().cpu().contiguous().numpy() for k, v in tensors.items()}


def to_record(factors: dict | None = None, head: dict | None = None, base: dict | None = None,
              without_B: bool = False, core: dict | None = None) -> ArrayRecord:
    """to_arrays as one packed ArrayRecord (packing.py: two objects for Flower to move)."""
    return packing.pack(to_arrays(factors, head, base, without_B, core))


def from_record(record: ArrayRecord) -> dict[str, dict[str, torch.Tensor]]:
    """{"A": {layer: A}, "B": {layer: B}, "head": {parameter: tensor}, "W": {layer: W},
    "C": {layer: A0}} from an ArrayRecord made by to_record (missing kinds are empty)."""
    out: dict[str, dict[str, torch.Tensor]] = {"A": {}, "B": {}, "head": {}, "W": {}, "C": {}}
    for key, array in packing.unpack(record).items():
        tensor = torch.from_numpy(array)
        kind, name = key.split("/", 1)
        if kind not in out:
            raise ValueError(f"unexpected array {key!r}: expected A/, B/, head/, W/ or C/ keys")
        out[kind][name] = tensor
    return out
