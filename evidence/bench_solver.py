"""Benchmark (not a test): FLoRA-NA's Gram-space solver against the paper's AdamW done densely.

The paper (arXiv 2509.26399) picks the aggregation coefficients P, Q by running AdamW on
||M - B_hat A_hat||_F^2. Done the obvious way, that forms the ideal update M = sum_u p_u B_u A_u
(d x k) once and the product B_hat A_hat (d x k) at every step, in float32 -- a few GFLOP and
several full d x k passes per step, per layer. `solve_flora_na` (flora_na.py, section 3) writes
the same objective through r x r Gram blocks and never forms a d x k matrix. This script times
both on LLaMA-2-7B-shaped adapters (q and v of 32 blocks = 64 layers of 4096 x 4096, rank 16,
10 clients) and checks that the fast solver reaches at least the dense baseline's divergence.

Rows of the table:
  dense AdamW (baseline)  the above in float32 (what a straightforward implementation does),
                          timed on the first --dense-layers layers, one layer at a time
  Gram AdamW              solve_flora_na(solver="adamw"): same lr, steps, start, best iterate
  Gram ALS                solve_flora_na(solver="als"), the default call, rank-r bound included
  Gram ALS, bound=False   the same without the bound, so the cost of the bound's QR shows
Gram rows run all --layers layers in one batched call; every time is reported per layer. Each
method is warmed up once first (the dense baseline for 5 steps on layer 0, the Gram rows on the
dense layers); the Gram rows are then timed up to --repeats times and report the median. Every
row's (P, Q) is then evaluated densely in float64 on the dense layers, the fair referee.

    python bench_solver.py --out results/bench_solver.json   # LLaMA-2-7B shapes, minutes on CPU
    python bench_solver.py --quick                           # smoke run, seconds
    add --threads 1 on a busy shared CPU: oversubscribed threads inflate every time there

Exit status 1 if a Gram solver ends worse than the dense baseline (beyond --tol) on the layers
both ran, or if its returned divergences disagree with a dense float64 evaluation; the >= 100x
speed-up target is only reported.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import Tensor

from harness import provenance
from flora_na import solve_flora_na


def arg(default, help: str, kind=None):
    """A dataclass field whose help text becomes --help; kind: the argparse type if None default."""
    return field(default=default, metadata={"help": help, "kind": kind or type(default)})


@dataclass
class Args:
    device: str = arg("auto", "cpu, cuda, cuda:1, ...; auto = cuda if available")
    layers: int | None = arg(None, "adapted layers L (default 64 = q, v of 32 blocks; "
                                   "8 with --quick)", int)
    clients: int = arg(10, "clients U")
    rank: int = arg(16, "LoRA rank r")
    d: int | None = arg(None, "rows of B_u = out_features (default 4096; 1024 with --quick)", int)
    k: int | None = arg(None, "columns of A_u = in_features (default 4096; 1024 with --quick)", int)
    dense_layers: int | None = arg(None, "layers the dense baseline is timed on (default: all "
                                         "on CUDA; 2 on CPU, 1 with --quick)", int)
    steps: int = arg(200, "AdamW steps, dense and Gram")
    lr: float = arg(1e-2, "AdamW learning rate, dense and Gram")
    weight_decay: float = arg(1e-2, "AdamW weight decay, dense and Gram (solve_flora_na's)")
    repeats: int | None = arg(None, "timed runs of each Gram solver after its warm-up, median "
                                    "reported (default 3; 1 with --quick)", int)
    repeat_budget_s: float = arg(30.0, "no further repeat of a Gram solver once its timed runs "
                                       "took this many seconds")
    tol: float = arg(1e-3, "fail if a Gram solver's divergence exceeds the dense baseline's by "
                           "more than this fraction of it")
    threads: int | None = arg(None, "torch.set_num_threads (default or 0: torch's choice); 1 is "
                                    "steadier on a busy shared CPU", int)
    seed: int = arg(0, "seed of the synthetic factors")
    quick: bool = arg(False, "smoke run: d = k = 1024, 8 layers, 1 dense layer, 1 repeat")
    out: str | None = arg(None, "write every number and the machine info to this JSON", str)

    def __post_init__(self):
        pick = lambda given, quick, full: given if given is not None else (
            quick if self.quick else full)
        self.layers, self.repeats = pick(self.layers, 8, 64), pick(self.repeats, 1, 3)
        self.d, self.k = pick(self.d, 1024, 4096), pick(self.k, 1024, 4096)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dense_layers is None:
            self.dense_layers = self.layers if self.device.startswith("cuda") else pick(None, 1, 2)
        if min(self.layers, self.clients, self.rank, self.d, self.k, self.repeats) < 1:
            raise ValueError(f"layers, clients, rank, d, k and repeats must be >= 1: {self}")
        if self.threads is not None and self.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0: torch's choice), got {self.threads}")
        if not 1 <= self.dense_layers <= self.layers:
            raise ValueError(f"--dense-layers must be in [1, {self.layers}], "
                             f"got {self.dense_layers}")


def parse_args(argv=None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Args):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.metadata["kind"] is bool:
            parser.add_argument(flag, action="store_true", help=help)
        else:
            help += "" if f.default is None else f" (default: {f.default})"
            parser.add_argument(flag, type=f.metadata["kind"], default=f.default, help=help)
    return Args(**vars(parser.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# Synthetic but realistic client factors
# ---------------------------------------------------------------------------------------------


def make_factors(L: int, U: int, r: int, d: int, k: int, seed: int):
    """Factors as they arrive at the server after one round, per layer (all float32, seeded,
    drawn on the CPU so every device sees the same numbers):
      A_0 (r, k)   the global lora_A every client started from: peft's kaiming-uniform init,
                   U(-1/sqrt(k), 1/sqrt(k));
      t_u          client u's local progress, U(0.2, 1.8): non-IID data and unequal local
                   step counts move clients different distances along the same direction;
      A_u = A_0 + t_u dA + 0.3 N(0, 1/k)           dA (r, k) ~ N(0, 1/k), shared direction
      B_u =       t_u dB + 0.3 N(0, 1e-6)          dB (d, r) ~ N(0, 1e-6); lora_B starts at 0
      p_u = n_u / sum n, n_u ~ uniform integers in [50, 500).
    Naive averaging (FedIT) then misses sum_u p_u (t_u - t_bar)^2 dB dA plus the noise cross
    terms: about 12% of ||M|| at the default shapes, while a rank-r product can get to ~3%.
    Returns A (L, U, r, k), B (L, U, d, r), p (U,) float64."""
    g = torch.Generator().manual_seed(seed)
    t = 1 + 0.8 * (2 * torch.rand(1, U, 1, 1, generator=g) - 1)            # (1, U, 1, 1)
    A = (2 * torch.rand(L, 1, r, k, generator=g) - 1) / math.sqrt(k)       # A_0 (L, 1, r, k)
    A = A + t * torch.randn(L, 1, r, k, generator=g) / math.sqrt(k)
    A += 0.3 / math.sqrt(k) * torch.randn(L, U, r, k, generator=g)         # (L, U, r, k)
    B = t * (1e-3 * torch.randn(L, 1, d, r, generator=g))
    B += 0.3e-3 * torch.randn(L, U, d, r, generator=g)                     # (L, U, d, r)
    n = torch.randint(50, 500, (U,), generator=g).double()
    return A, B, n / n.sum()


# ---------------------------------------------------------------------------------------------
# The baseline: the paper's AdamW, formed densely
# ---------------------------------------------------------------------------------------------


def dense_adamw(A: Tensor, B: Tensor, p: Tensor, steps: int, lr: float, weight_decay: float):
    """One layer, A (U, r, k) and B (U, d, r) float32, the straightforward way: M formed densely
    once, B_hat A_hat (d, k) formed every step, loss ||M - B_hat A_hat||_F^2 in float32, AdamW on
    (P, Q) from P = Q = p, keeping the best iterate (as solve_flora_na's AdamW does; tracked on
    the device, so no per-step host sync). solve_flora_na's AdamW minimises the same loss divided
    by ||M||^2; Adam is invariant to a constant scale up to its eps, and the two runs end within
    ~1e-9 of each other in relative divergence. Returns P, Q (U,) float32."""
    p = p.to(A.dtype)
    M = sum(p[u] * (B[u] @ A[u]) for u in range(len(p)))                   # (d, k), once
    P, Q = p.clone().requires_grad_(True), p.clone().requires_grad_(True)  # (U,) each
    opt = torch.optim.AdamW([P, Q], lr=lr, weight_decay=weight_decay)
    best_f = torch.tensor(math.inf, device=A.device)
    best_P, best_Q = P.detach().clone(), Q.detach().clone()
    for step in range(steps + 1):
        B_hat = torch.einsum("u,udr->dr", P, B)                            # (d, r)
        A_hat = torch.einsum("u,urk->rk", Q, A)                            # (r, k)
        f = (M - B_hat @ A_hat).square().sum()                             # (d, k) every step
        with torch.no_grad():
            better = f < best_f
            best_f = torch.where(better, f, best_f)
            best_P, best_Q = torch.where(better, P, best_P), torch.where(better, Q, best_Q)
        if step == steps:
            break
        opt.zero_grad()
        f.backward()
        opt.step()
    return best_P, best_Q


def dense_relative_divergence(A: Tensor, B: Tensor, p: Tensor, coefficients: dict) -> dict:
    """One layer in float64, densely: ||M - (sum P_u B_u)(sum Q_u A_u)||_F / ||M||_F for each
    name -> (P, Q) in coefficients. The fair referee for every row, dense or Gram."""
    A, B, p = A.double(), B.double(), p.double().to(A.device)
    M = torch.einsum("u,udr,urk->dk", p, B, A)                             # (d, k)
    norm_M = torch.linalg.matrix_norm(M)
    out = {}
    for name, (P, Q) in coefficients.items():
        P, Q = P.double().to(A.device), Q.double().to(A.device)
        X = torch.einsum("u,udr->dr", P, B) @ torch.einsum("u,urk->rk", Q, A)  # (d, k)
        out[name] = (torch.linalg.matrix_norm(M - X) / norm_M).item()
    return out


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    """Resident memory of this process now (Linux), else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_memory():
    """Hand memory that glibc keeps after frees back to the OS, so RSS measures what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above the level at entry (which includes the input factors), in bytes: CUDA's
    allocator statistics on a GPU; on the CPU the process RSS, sampled every 2 ms by a thread
    (torch releases the GIL), after returning glibc's freed memory to the OS."""

    def __init__(self, device: torch.device):
        self.device, self.extra, self.peak = device, 0, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            release_free_memory()
            self.start = self.peak = rss_bytes()
            self.done = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.extra = self.peak - self.start
        else:
            self.done.set()
            self.thread.join()
            self.peak = max(self.peak, rss_bytes())
            self.extra = self.peak - self.start


def timed(fn, device: torch.device):
    """(fn(), wall seconds, CPU seconds of this process), synchronising the device around fn.
    CPU seconds sum over threads; on a shared machine they move less than wall time does."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0, time.process_time() - c0


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def timing_row(method: str, options: dict, layers: int, times: list, cpu: list, mem: PeakMemory,
               per_call: bool) -> dict:
    """Seconds per layer from per-layer times (dense) or batched calls over `layers` (Gram)."""
    wall, cpu_s = ((statistics.median(times) / layers, statistics.median(cpu) / layers)
                   if per_call else (sum(times) / layers, sum(cpu) / layers))
    return {"method": method, "options": options, "layers_timed": layers, "times_s": times,
            "cpu_times_s": cpu, "s_per_layer": wall, "cpu_s_per_layer": cpu_s,
            "peak_extra_MiB": mem.extra / 2**20, "peak_MiB": mem.peak / 2**20}


def main(args: Args) -> int:
    t_start, load_start = time.perf_counter(), os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    L, U, r, d, k, n = args.layers, args.clients, args.rank, args.d, args.k, args.dense_layers
    A, B, p = make_factors(L, U, r, d, k, args.seed)
    A, B, p = A.to(device), B.to(device), p.to(device)                     # float32, float64
    print(f"factors: L={L} layers, U={U} clients, r={r}, d={d}, k={k}: A {tuple(A.shape)}, "
          f"B {tuple(B.shape)} float32, {(A.nbytes + B.nbytes) / 2**20:.0f} MiB on {device}")

    # Dense baseline: warm up with a few steps on layer 0, then time each of the first n layers.
    opts = dict(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay)
    dense_adamw(A[0], B[0], p, **(opts | {"steps": min(args.steps, 5)}))
    coefficients, times, cpu = [], [], []
    with PeakMemory(device) as mem:
        for l in range(n):
            PQ, sec, cpu_sec = timed(lambda: dense_adamw(A[l], B[l], p, **opts), device)
            coefficients.append(PQ), times.append(sec), cpu.append(cpu_sec)
            print(f"  dense AdamW, layer {l}: {sec:.2f} s (CPU {cpu_sec:.2f} s)")
    baseline = timing_row("dense AdamW (baseline)", opts | {"dtype": "float32"}, n, times, cpu,
                          mem, per_call=False)
    baseline["P"] = torch.stack([P for P, _ in coefficients])                # (n, U)
    baseline["Q"] = torch.stack([Q for _, Q in coefficients])
    rows = [baseline]

    # Gram-space rows: one batched call on all L layers; warm-up, then the median of repeats.
    adamw = dict(solver="adamw", steps=args.steps, lr=args.lr, weight_decay=args.weight_decay)
    for name, kw in [("Gram AdamW", adamw), ("Gram ALS", dict(solver="als")),
                     ("Gram ALS, bound=False", dict(solver="als", bound=False))]:
        solve_flora_na(A[:n], B[:n], p, **kw)                              # warm-up
        times, cpu = [], []
        with PeakMemory(device) as mem:
            while len(times) < args.repeats and sum(times) < args.repeat_budget_s:
                res, sec, cpu_sec = timed(lambda: solve_flora_na(A, B, p, **kw), device)
                times.append(sec), cpu.append(cpu_sec)
        print(f"  {name}, {L} layers: {', '.join(f'{s:.3f}' for s in times)} s "
              f"(CPU {', '.join(f'{s:.3f}' for s in cpu)} s)")
        row = timing_row(name, kw, L, times, cpu, mem, per_call=True)
        bound = None if res.divergence_bound is None else res.divergence_bound / res.norm_M
        rows.append(row | {"P": res.P, "Q": res.Q, "iterations": res.iterations,
                           "rel_div": (res.divergence / res.norm_M).tolist(),
                           "rel_naive": (res.divergence_naive / res.norm_M).tolist(),
                           "rel_bound": None if bound is None else bound.tolist()})

    # Referee: every row's (P, Q) on the first n layers, densely in float64.
    checks = [dense_relative_divergence(A[l], B[l], p, {"naive": (p, p)} | {
        row["method"]: (row["P"][l], row["Q"][l]) for row in rows}) for l in range(n)]
    als = next(row for row in rows if row["method"] == "Gram ALS")
    failures = []
    for row in rows:
        row["rel_div_dense_fp64"] = [c[row["method"]] for c in checks]
        row["rel_naive_dense_fp64"] = [c["naive"] for c in checks]
        if row is baseline:
            row["rel_div"] = row["rel_div_dense_fp64"]
            row["rel_naive"] = row["rel_naive_dense_fp64"]
            row["rel_bound"] = als["rel_bound"][:n]          # a property of the data, not of P, Q
            continue
        for l, c in enumerate(checks):
            for what, got, ref in (("divergence", row["rel_div"][l], c[row["method"]]),
                                   ("divergence_naive", row["rel_naive"][l], c["naive"])):
                if abs(got - ref) > 1e-6:                                  # returned vs dense
                    failures.append(f"{row['method']}: layer {l} returned relative {what} "
                                    f"{got:.8f}, the dense float64 evaluation gives {ref:.8f}")
            base = baseline["rel_div_dense_fp64"][l]
            if c[row["method"]] > base * (1 + args.tol):                   # worse than dense
                failures.append(f"{row['method']}: layer {l} relative divergence "
                                f"{c[row['method']]:.6f} is worse than the dense baseline's "
                                f"{base:.6f} by more than --tol {args.tol}")
    for row in rows:
        row["speedup"] = baseline["s_per_layer"] / row["s_per_layer"]
        row["P"], row["Q"] = row["P"].tolist(), row["Q"].tolist()

    mean = lambda xs: sum(xs) / len(xs)
    machine = provenance.record(device)
    print(f"\n{d} x {k}, rank {r}, {U} clients, {L} layers ({n} for the dense baseline), "
          f"{args.steps} AdamW steps, lr {args.lr}; {machine['device_name']}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    columns = ["method", "layers timed", "s / layer", "CPU s / layer", "speed-up",
               "rel. divergence", f"same, dense fp64, on the {n} dense layers",
               "FedIT rel. div.", "rank-r bound", "peak extra MiB"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        bound = "-" if row["rel_bound"] is None else f"{mean(row['rel_bound']):.6f}"
        print(f"| {row['method']} | {row['layers_timed']} | {row['s_per_layer']:.4g} | "
              f"{row['cpu_s_per_layer']:.4g} | {row['speedup']:.0f}x | "
              f"{mean(row['rel_div']):.6f} | {mean(row['rel_div_dense_fp64']):.6f} | "
              f"{mean(row['rel_naive']):.6f} | {bound} | {row['peak_extra_MiB']:.0f} |")
    print("\ns / layer: wall time (Gram rows: median batched call / L); CPU s: summed over "
          "threads; speed-up: wall, vs the dense baseline.\nrel. divergence = ||M - B_hat A_hat||"
          "_F / ||M||_F, mean over the layers timed (Gram rows: the solver's returned values); "
          "FedIT = naive averaging; bound = best rank-r product; peak extra = above the inputs.")
    target = als["speedup"] >= 100
    print(f"speed-up target (>= 100x for the default solve_flora_na, Gram ALS): "
          f"{'met' if target else 'NOT met'} ({als['speedup']:.0f}x)"
          + (" -- the target is for the default LLaMA shapes, not --quick" if args.quick else ""))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    cuda_peak = max(row["peak_MiB"] for row in rows) / 2**10 if device.type == "cuda" else None
    print(f"peak process RSS: {peak_rss:.2f} GiB" + ("" if cuda_peak is None else
          f"; peak CUDA memory allocated in a timed region: {cuda_peak:.2f} GiB"))
    total, load_end = time.perf_counter() - t_start, os.getloadavg()
    print(f"total runtime: {total:.1f} s; load average (1 min) {load_start[0]:.1f} at the start, "
          f"{load_end[0]:.1f} at the end, on {os.cpu_count()} CPUs")

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": asdict(args), "machine": machine, "rows": rows,
                       "speedup_target_met": target, "peak_rss_GiB": peak_rss,
                       "cuda_peak_GiB": cuda_peak, "total_runtime_s": total,
                       "load_average_1_5_15min": {"start": load_start, "end": load_end},
                       "failures": failures}, f, indent=1)
        print(f"wrote {args.out}")
    if failures:
        print("\nREGRESSION:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
