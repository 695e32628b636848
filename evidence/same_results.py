"""Check that two train.py run directories hold the same results: the refactoring check.

    python -m evidence.same_results RUN_BEFORE RUN_AFTER

Compares, for every aggregator, each round's dev metrics (`metrics`, `personal_metrics`) and
training loss, bytes on the wire and participating clients in metrics.jsonl, and every tensor of
the saved global adapter (`<aggregator>/adapter/adapter_model.safetensors`) and of the changed
base weights (`base_layers.safetensors`), bit for bit. Timings and the divergence diagnostics
(whose computation a refactor may change at round-off level) are reported, not compared.
Exit status 0 when everything compared is identical, 1 otherwise, with one line per difference.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass

import tyro

SAME = ("aggregator", "round", "clients", "train_loss", "bytes_up", "bytes_down", "metrics",
        "personal_metrics")


@dataclass
class Args:
    """Compare two run directories bit for bit."""
    before: tyro.conf.Positional[str]
    """the run directory made by the code before the change"""
    after: tyro.conf.Positional[str]
    """the run directory made by the code after it"""


def rows(run: str) -> dict[tuple[str, int], dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return {(r["aggregator"], r["round"]): r for r in map(json.loads, f) if r}


def tensors(path: str) -> dict:
    from safetensors.torch import load_file
    return load_file(path) if os.path.exists(path) else {}


def compare(before: str, after: str) -> list[str]:
    """Every difference between the two runs' results, as lines."""
    import torch
    diffs, a, b = [], rows(before), rows(after)
    if a.keys() != b.keys():
        diffs.append(f"rounds differ: {sorted(a.keys() ^ b.keys())}")
    largest = 0.0
    for key in sorted(a.keys() & b.keys()):
        for field in SAME:
            if a[key].get(field) != b[key].get(field):
                diffs.append(f"{key} {field}: {a[key].get(field)} != {b[key].get(field)}")
        da, db = a[key]["divergence"]["relative_mean"], b[key]["divergence"]["relative_mean"]
        largest = max([largest] + [abs(da[k] - db[k]) for k in da.keys() & db.keys()
                                   if math.isfinite(da[k]) and math.isfinite(db[k])])
    aggregators = sorted({k[0] for k in a})
    n_tensors = 0
    for name in aggregators:
        for file in ("adapter/adapter_model.safetensors", "base_layers.safetensors"):
            ta, tb = (tensors(os.path.join(run, name, file)) for run in (before, after))
            if ta.keys() != tb.keys():
                diffs.append(f"{name}/{file}: tensor names differ: {sorted(ta.keys() ^ tb.keys())}")
            for t in sorted(ta.keys() & tb.keys()):
                n_tensors += 1
                if not torch.equal(ta[t], tb[t]):
                    diffs.append(f"{name}/{file}: {t} differs")
    print(f"{len(a)} metric rows of {len(aggregators)} aggregators ({', '.join(aggregators)}) and "
          f"{n_tensors} adapter/base tensors compared; largest change of a mean relative "
          f"divergence (not compared): {largest:.2e}")
    return diffs


def main(args: Args) -> int:
    diffs = compare(args.before, args.after)
    print("\n".join(diffs) if diffs else "identical")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
