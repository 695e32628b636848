"""What travels between the ServerApp and the ClientApps, and the run config they share.

The run config ([tool.flwr.app.config] in pyproject.toml, overridden with `flwr run
--run-config`) holds train.py's command-line options under the same kebab-case names, so
one train.Args describes a run whichever way it is run; "" leaves an option at train.py's
default. The LoRA factors, the head and the frozen weights that an aggregator changed travel
as float32 (ArrayRecord refuses bfloat16) under "A/<layer>", "B/<layer>", "head/<parameter>"
and "W/<layer>", with the frozen A0 of a core aggregator (Fed-SB: A = R A0) under "C/<layer>",
packed into one ArrayRecord of two arrays (packing.py). With an upload codec
(run config upload-codec, as train.py's --upload-codec) a client's factors that travel
(train.travelling) go up as the codec's payloads instead, every field at its own dtype under
"P/<layer>.<A|B>/<field>/<dtype>", and topk's error feedback (the residuals the client keeps
in context.state) under "F/<layer>.<A|B>/residual/float32", for the server's state.pt.
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
              without_B: bool = False, core: dict | None = None, coded: dict | None = None,
              feedback: dict | None = None) -> dict[str, np.ndarray]:
    """LoRA factors {layer: (A, B)} (only the A's if without_B; a factor given as None is
    left out), a head {parameter: tensor}, frozen weights {layer: W} and core bases {layer: A0}
    as float32 numpy arrays under the keys above; `coded` (codec payloads {name: {field:
    tensor}}) and `feedback` (a codec's error-feedback state, the same shape) at their own
    dtypes (nested)."""
    tensors = {}
    for layer, (A, B) in (factors or {}).items():
        if A is not None:
            tensors[f"A/{layer}"] = A
        if B is not None and not without_B:
            tensors[f"B/{layer}"] = B
    tensors.update({f"head/{k}": v for k, v in (head or {}).items()})
    tensors.update({f"W/{k}": v for k, v in (base or {}).items()})
    tensors.update({f"C/{k}": v for k, v in (core or {}).items()})
    out = {k: v.detach().float().cpu().contiguous().numpy() for k, v in tensors.items()}
    return out | nested_arrays("P", coded or {}) | nested_arrays("F", feedback or {})


def nested_arrays(kind: str, tensors: dict[str, dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """{name: {field: tensor}} (a codec's payloads, its error-feedback state) as numpy arrays
    under "<kind>/<name>/<field>/<torch dtype>", each at its own dtype: every field travels,
    whatever the codec put in it (values, scales, indices, shape, a variance). A dtype numpy
    lacks (bfloat16) travels as its bits (int16) and is viewed back by the dtype in the key."""
    out = {}
    for name, fields in tensors.items():
        for field, t in fields.items():
            dtype = str(t.dtype).removeprefix("torch.")
            t = t.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            out[f"{kind}/{name}/{field}/{dtype}"] = t.numpy()
    return out


def to_record(factors: dict | None = None, head: dict | None = None, base: dict | None = None,
              without_B: bool = False, core: dict | None = None,
              feedback: dict | None = None) -> ArrayRecord:
    """to_arrays as one packed ArrayRecord (packing.py: two objects for Flower to move)."""
    return packing.pack(to_arrays(factors, head, base, without_B, core, feedback=feedback))


def split(arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    """{"A": {layer: A}, "B": {layer: B}, "head": {parameter: tensor}, "W": {layer: W},
    "C": {layer: A0}, "P": {name: payload}, "F": {name: state}} as torch tensors from to_arrays' numpy arrays
    (missing kinds are empty)."""
    out: dict[str, dict] = {"A": {}, "B": {}, "head": {}, "W": {}, "C": {}, "P": {}, "F": {}}
    for key, array in arrays.items():
        kind, name = key.split("/", 1)
        if kind not in out:
            raise ValueError(f"unexpected array {key!r}: expected A/, B/, head/, W/, C/, P/ or F/ "
                             f"keys")
        tensor = torch.from_numpy(array)
        if kind in ("P", "F"):
            parts = name.rsplit("/", 2)
            if len(parts) != 3 or not isinstance(getattr(torch, parts[2], None), torch.dtype):
                raise ValueError(f"array {key!r}: expected {kind}/<name>/<field>/<torch dtype>")
            name, field, dtype = parts
            out[kind].setdefault(name, {})[field] = tensor.view(getattr(torch, dtype))
        else:
            out[kind][name] = tensor
    return out


def from_record(record: ArrayRecord) -> dict[str, dict]:
    """split() of an ArrayRecord made by packing.pack(to_arrays(...)) or to_record."""
    return split(packing.unpack(record))
