"""The solver benchmark's section (reproduce.sh stage 5): bench_solver.py's JSON as a table."""
from __future__ import annotations

import json
import math
import os

from evidence.report_common import NOT_RUN, Names, nanmean, table


def bench_section(results: str, out_dir: str, names: Names) -> str:
    """bench_solver.py's JSON as a table."""
    path = os.path.join(results, "runs", "bench", "bench_solver.json")
    md = ["## Solver benchmark: Gram-space solver vs AdamW done densely\n"]
    if not os.path.isfile(path):
        return "\n".join(md) + NOT_RUN.format("runs/bench/bench_solver.json")
    with open(path) as f:
        b = json.load(f)
    a, m = b.get("args", {}), b.get("machine", {})
    md.append(f"{a.get('layers')} layers of {a.get('d')} x {a.get('k')}, rank {a.get('rank')}, "
              f"{a.get('clients')} clients (LLaMA-2-7B q/v shapes unless --quick), "
              f"{a.get('steps')} AdamW steps at lr {a.get('lr')}; on {m.get('device_name')} "
              f"({m.get('device')}, {m.get('torch_threads')} torch thread(s), torch "
              f"{m.get('torch')}). Synthetic factors; the dense baseline is timed on "
              f"{a.get('dense_layers')} layer(s).\n")
    mean = lambda xs: nanmean(xs) if xs else math.nan       # noqa: E731
    rows = []
    cpu = any("cpu_s_per_layer" in r for r in b.get("rows", []))
    for r in b.get("rows", []):
        bound = r.get("rel_bound")
        rows.append([r.get("method", "?"), str(r.get("layers_timed", "?")),
                     f"{r.get('s_per_layer', math.nan):.4g}"]
                    + ([f"{r.get('cpu_s_per_layer', math.nan):.4g}"] if cpu else [])
                    + [f"{r.get('speedup', math.nan):.0f}x",
                       f"{mean(r.get('rel_div', [])):.6f}",
                       f"{mean(r.get('rel_div_dense_fp64', [])):.6f}",
                       f"{mean(r.get('rel_naive', [])):.6f}",
                       "—" if not bound else f"{mean(bound):.6f}",
                       f"{r.get('peak_extra_MiB', math.nan):.0f}"])
    md.append(table(["method", "layers timed", "s / layer"] + (["CPU s / layer"] if cpu else [])
                    + ["speed-up", "rel. divergence", "same, dense fp64 check",
                       "naive rel. div.", "rank-r bound", "peak extra MiB"], rows))
    target = ("" if names.smoke else "Speed-up target (>= 1000x for the default call, Gram ALS "
              f"without the bound): {'met' if b.get('speedup_target_met') else 'NOT met'}. ")
    md.append(f"\n{target}Total runtime "
              f"{b.get('total_runtime_s', math.nan):.0f} s."
              + _load_text(b.get("load_average_1_5_15min")) + "\n")
    if b.get("failures"):
        md.append("**Regressions reported by the benchmark:**\n\n"
                  + "\n".join(f"- {f}" for f in b["failures"]) + "\n")
    return "\n".join(md)


def _load_text(load) -> str:
    """The machine's 1-minute load average at the start and end of the benchmark, if recorded."""
    try:
        return (f" 1-minute load average {load['start'][0]:.1f} at the start, "
                f"{load['end'][0]:.1f} at the end (the benchmark itself accounts for about 1; "
                f"above that, other processes shared the CPU and wall times overstate the cost).")
    except (TypeError, KeyError, IndexError):
        return f" Load average: {load}." if load else ""
