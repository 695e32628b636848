"""Benchmark (not a test): FLoRA-NA's solver, two ways, at the sizes where its cost matters.

Default mode: the Gram-space solver against the paper's AdamW done densely. The paper (arXiv
2509.26399) picks the aggregation coefficients P, Q by running AdamW on ||M - B_hat A_hat||_F^2.
Done the obvious way, that forms the ideal update M = sum_u p_u B_u A_u (d x k) once and the
product B_hat A_hat (d x k) at every step, in float32 -- a few GFLOP and several full d x k
passes per step, per layer. `solve_flora_na` (flora_na.py, section 3) writes the same objective
through r x r Gram blocks and never forms a d x k matrix. This mode times both on
LLaMA-2-7B-shaped adapters (q and v of 32 blocks = 64 layers of 4096 x 4096, rank 16, 10
clients) and checks that the fast solver reaches at least the dense baseline's divergence.

Rows of the table:
  dense AdamW (baseline)  the above in float32 (what a straightforward implementation does),
                          timed on the first --dense-layers layers, one layer at a time
  Gram AdamW              solve_flora_na(solver="adamw"): same steps, lr, decay, start and
                          best iterate, in flora_na.py's whitened coordinates (section 4), so
                          its trajectory differs: compare divergences
  Gram ALS                solve_flora_na(solver="als", bound=True): with the rank-r bound, an
                          opt-in diagnostic whose QR of the stacked factors costs more than
                          the solve
  Gram ALS, bound=False   the default call, solve_flora_na(A, B, p); the >= 1000x target is its
All rows force path="gram" (what "auto" picks at these shapes) and run all --layers layers in one
batched call; every time is reported per layer. Each method is warmed up once first (the dense
baseline for 5 steps on layer 0, the Gram rows on the dense layers); the Gram rows are then
timed up to --repeats times and report the median. Every row's (P, Q) is then evaluated densely
in float64 on the dense layers, the fair referee.

Scale mode (--scale): the cross-device question, one layer, rank --rank, U clients in
--scale-clients, d = k in --scale-dims. Both paths of solve_flora_na (path="gram": Gram blocks,
cost ~U^2; path="matrix_free": section 3b, linear in U) are timed on the same factors, with their
peak memory above the inputs; the Gram path is skipped, and the table says so, where its blocks
would need more than --gram-max-gib. Beside each: FedIT's divergence and the rank-r bound, and a
float64 referee (M formed densely, in chunks) that re-evaluates every returned (P, Q).

    python -m evidence.bench_solver --out results/bench_solver.json   # LLaMA-2-7B, minutes on CPU
    python -m evidence.bench_solver --quick                           # smoke run, seconds
    python -m evidence.bench_solver --scale --threads 1 --out runs/bench/bench_scale.json
    add --threads 1 on a busy shared CPU: oversubscribed threads inflate every time there

On a GPU (--device cuda; the solver runs there unchanged): forming M is one float64 GEMM and
each matrix-free pass streams the factors once at memory bandwidth, so the matrix-free path
becomes milliseconds per layer even at U = 3000 (~3 GiB float64 copy at d = k = 4096), bounded
by the many tiny kernels of its restricted solves (launch overhead, not arithmetic); the Gram
path's blocks must fit in device memory, which moves the U where it must be skipped, not the
U^2 growth. The dense baseline gains the most in absolute terms (its d x k products are what
GPUs are built for), so the speed-up of the default mode is smaller on a GPU than on a CPU.

Exit status 1 if a solver ends worse than the dense baseline (beyond --tol) on the layers both
ran, if its returned divergences disagree with a dense float64 evaluation, or (scale mode) if
the two paths disagree by more than 1e-6 in relative divergence; speed targets are reported.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch
import tyro
from torch import Tensor

from harness import provenance
from flora_na import solve_flora_na


@dataclass
class Args:
    device: str = "auto"
    """cpu, cuda, cuda:1, ...; auto = cuda if available"""
    layers: int | None = None
    """adapted layers L (default 64 = q, v of 32 blocks; 8 with --quick)"""
    clients: int = 10
    """clients U"""
    rank: int = 16
    """LoRA rank r"""
    d: int | None = None
    """rows of B_u = out_features (default 4096; 1024 with --quick)"""
    k: int | None = None
    """columns of A_u = in_features (default 4096; 1024 with --quick)"""
    dense_layers: int | None = None
    """layers the dense baseline is timed on (default: all on CUDA; 2 on CPU, 1 with --quick)"""
    steps: int = 200
    """AdamW steps, dense and Gram"""
    lr: float = 1e-2
    """AdamW learning rate, dense and Gram"""
    weight_decay: float = 1e-2
    """AdamW weight decay, dense and Gram (solve_flora_na's)"""
    repeats: int | None = None
    """timed runs of each solver after its warm-up, median reported (default 3; 1 with --quick
    or --scale)"""
    repeat_budget_s: float = 30.0
    """no further repeat of a solver once its timed runs took this many seconds"""
    tol: float = 1e-3
    """fail if a Gram solver's divergence exceeds the dense baseline's by more than this
    fraction of it"""
    threads: int | None = None
    """torch.set_num_threads (default or 0: torch's choice); 1 is steadier on a busy shared CPU"""
    seed: int = 0
    """seed of the synthetic factors"""
    quick: bool = False
    """smoke run: d = k = 1024, 8 layers, 1 dense layer, 1 repeat"""
    scale: bool = False
    """scale mode instead: both solver paths, one layer, over --scale-clients x --scale-dims"""
    scale_clients: tuple[int, ...] = (10, 100, 300, 1000, 3000)
    """scale mode: client counts U"""
    scale_dims: tuple[int, ...] = (1024, 4096)
    """scale mode: layer sizes d = k"""
    gram_max_gib: float = 4.0
    """scale mode: skip the Gram path where its blocks and their temporaries (about six
    (U r) x (U r) float64 matrices) would exceed this many GiB"""
    out: str | None = None
    """write every number and the machine info to this JSON"""

    def __post_init__(self):
        pick = lambda given, quick, full: given if given is not None else (   # noqa: E731
            quick if self.quick else full)
        self.layers = pick(self.layers, 8, 64)
        self.repeats = pick(self.repeats, 1, 1 if self.scale else 3)
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
        if not self.scale_clients or min(self.scale_clients) < 1 or not self.scale_dims \
                or min(self.scale_dims) < 1:
            raise ValueError(f"--scale-clients and --scale-dims must be >= 1, got "
                             f"{self.scale_clients} and {self.scale_dims}")


def parse_args(argv=None) -> Args:
    """The command line (sys.argv[1:] when argv is None) as Args; --help lists every field."""
    return tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])


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
    the device, so no per-step host sync). solve_flora_na's AdamW minimises the same loss, but
    in whitened coordinates (flora_na.py section 4), and ends at least as low. Returns P, Q (U,)
    float32."""
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


DEFAULT_CALL = "Gram ALS, bound=False"     # the row of solve_flora_na(A, B, p) at these shapes


def timing_row(method: str, options: dict, layers: int, times: list, cpu: list, mem: PeakMemory,
               per_call: bool) -> dict:
    """Seconds per layer from per-layer times (dense) or batched calls over `layers` (Gram)."""
    wall, cpu_s = ((statistics.median(times) / layers, statistics.median(cpu) / layers)
                   if per_call else (sum(times) / layers, sum(cpu) / layers))
    return {"method": method, "options": options, "layers_timed": layers, "times_s": times,
            "cpu_times_s": cpu, "s_per_layer": wall, "cpu_s_per_layer": cpu_s,
            "peak_extra_MiB": mem.extra / 2**20, "peak_MiB": mem.peak / 2**20}


def finish(args: Args, result: dict) -> int:
    """Write the result JSON (--out), report any regression; the exit status (1: failures)."""
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    if result["failures"]:
        print("\nREGRESSION:\n  " + "\n  ".join(result["failures"]), file=sys.stderr)
        return 1
    return 0


def main(args: Args) -> int:
    """Run the benchmark Args asks for (default or --scale mode); the exit status."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return scale_benchmark(args) if args.scale else default_benchmark(args)


def default_benchmark(args: Args) -> int:
    """The default mode: dense AdamW against the Gram-space solver at LLaMA-2-7B shapes."""
    t_start, load_start = time.perf_counter(), os.getloadavg()
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
    adamw = dict(solver="adamw", steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                 path="gram")
    for name, kw in [("Gram AdamW", adamw),
                     ("Gram ALS", dict(solver="als", bound=True, path="gram")),
                     (DEFAULT_CALL, dict(solver="als", bound=False, path="gram"))]:
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
    default = next(row for row in rows if row["method"] == DEFAULT_CALL)
    target = default["speedup"] >= 1000
    print(f"speed-up target (>= 1000x for the default call solve_flora_na(A, B, p), the row "
          f"'{DEFAULT_CALL}'): {'met' if target else 'NOT met'} ({default['speedup']:.0f}x)"
          + (" -- the target is for the default LLaMA shapes, not --quick" if args.quick else ""))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    cuda_peak = max(row["peak_MiB"] for row in rows) / 2**10 if device.type == "cuda" else None
    print(f"peak process RSS: {peak_rss:.2f} GiB" + ("" if cuda_peak is None else
          f"; peak CUDA memory allocated in a timed region: {cuda_peak:.2f} GiB"))
    total, load_end = time.perf_counter() - t_start, os.getloadavg()
    print(f"total runtime: {total:.1f} s; load average (1 min) {load_start[0]:.1f} at the start, "
          f"{load_end[0]:.1f} at the end, on {os.cpu_count()} CPUs")

    return finish(args, {"args": asdict(args), "machine": machine, "rows": rows,
                         "speedup_target_met": target, "peak_rss_GiB": peak_rss,
                         "cuda_peak_GiB": cuda_peak, "total_runtime_s": total,
                         "load_average_1_5_15min": {"start": load_start, "end": load_end},
                         "failures": failures})


# ---------------------------------------------------------------------------------------------
# Scale mode: both solver paths from 10 to 3000 clients
# ---------------------------------------------------------------------------------------------


def gram_peak_bytes(U: int, r: int) -> int:
    """The Gram path's memory beyond the inputs, one layer: G_A and G_B, (U r) x (U r) float64
    each, plus the copies gram_blocks and the einsums make, about six such matrices in all."""
    return 6 * (U * r) ** 2 * 8


def matrix_free_peak_bytes(U: int, r: int, d: int, k: int) -> int:
    """The matrix-free path's memory beyond the inputs, one layer: the float64 copy of the
    factors, M and the residual (d, k), a 32 MiB chunk; the virtual clients are small."""
    return U * r * (d + k) * 8 + 2 * d * k * 8 + 2**25


def chunked_combine(X: Tensor, c: Tensor, chunk: int = 256) -> Tensor:
    """sum_u c_u X[u] in float64 for X (U, ...) of any dtype, `chunk` clients upcast at a time."""
    out = torch.zeros(X.shape[1:], dtype=torch.float64, device=X.device)
    for u in range(0, X.shape[0], chunk):
        out += torch.tensordot(c[u:u + chunk].double(), X[u:u + chunk].double(), 1)
    return out


def referee(A: Tensor, B: Tensor, p: Tensor, coefficients: dict, chunk: int = 256) -> dict:
    """One layer, A (U, r, k), B (U, d, r) of any dtype, densely in float64 and in chunks of
    clients (memory: M and one chunk's float64 copy): ||M - B_hat A_hat||_F / ||M||_F for each
    name -> (P, Q), FedIT's, and the rank-r bound. The bound is sqrt(||M||^2 - sum of the r
    largest eigenvalues of M M^T or M^T M) -- symmetric eigenvalues, several times cheaper than an
    SVD at 4096 x 4096, and accurate to ~eps ||M||^2 / bound^2 relative (1e-9 here)."""
    U, r, k = A.shape
    p = p.double().to(A.device)
    M = torch.zeros(B.shape[1], k, dtype=torch.float64, device=A.device)      # (d, k)
    for u in range(0, U, chunk):
        B_c = B[u:u + chunk].double().permute(1, 0, 2).reshape(B.shape[1], -1)  # (d, c r)
        A_c = (A[u:u + chunk].double() * p[u:u + chunk, None, None]).reshape(-1, k)
        M.addmm_(B_c, A_c)
    norm_M = torch.linalg.matrix_norm(M)
    out = {}
    for name, (P, Q) in (coefficients | {"naive": (p, p)}).items():
        X = chunked_combine(B, P.to(A.device)) @ chunked_combine(A, Q.to(A.device))   # (d, k)
        out[name] = (torch.linalg.matrix_norm(M - X) / norm_M).item()
    gram = M @ M.mT if M.shape[0] <= M.shape[1] else M.mT @ M                  # (m, m)
    top = torch.linalg.eigvalsh(gram)[-r:].sum()
    out["bound"] = ((norm_M.square() - top).clamp_min(0).sqrt() / norm_M).item()
    return out


def scale_benchmark(args: Args) -> int:
    """--scale: time and peak memory of both paths over U x (d = k), one layer, rank r."""
    t_start, load_start = time.perf_counter(), os.getloadavg()
    device, r = torch.device(args.device), args.rank
    rows, failures = [], []
    header = ["d = k", "U", "path", "time s", "CPU s", "peak extra MiB", "iterations",
              "rel. divergence", "same, dense fp64", "FedIT rel. div.", "rank-r bound"]
    print("| " + " | ".join(header) + " |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dim in args.scale_dims:
        for U in args.scale_clients:
            A, B, p = make_factors(1, U, r, dim, dim, args.seed)
            A, B, p = A.to(device), B.to(device), p.to(device)
            results = {}
            for path in ("gram", "matrix_free"):
                need = gram_peak_bytes(U, r) if path == "gram" else \
                    matrix_free_peak_bytes(U, r, dim, dim)
                row = {"d": dim, "k": dim, "U": U, "r": r, "path": path,
                       "estimated_peak_extra_GiB": need / 2**30, "skipped": None}
                rows.append(row)
                if path == "gram" and need > args.gram_max_gib * 2**30:
                    row["skipped"] = (f"Gram blocks would need ~{need / 2**30:.1f} GiB "
                                      f"> --gram-max-gib {args.gram_max_gib}")
                    print(f"| {dim} | {U} | {path} | skipped: {row['skipped']} |")
                    continue
                small = min(U, 40)                                       # warm-up, small
                solve_flora_na(A[:, :small], B[:, :small], p[:small], path=path)
                times, cpu = [], []
                with PeakMemory(device) as mem:
                    while len(times) < args.repeats and sum(times) < args.repeat_budget_s:
                        res, sec, cpu_sec = timed(lambda: solve_flora_na(A, B, p, path=path),
                                                  device)
                        times.append(sec), cpu.append(cpu_sec)
                results[path] = res
                row |= {"times_s": times, "cpu_times_s": cpu, "time_s": statistics.median(times),
                        "cpu_s": statistics.median(cpu), "peak_extra_MiB": mem.extra / 2**20,
                        "iterations": res.iterations,
                        "rel_div": (res.divergence / res.norm_M).item(),
                        "rel_naive": (res.divergence_naive / res.norm_M).item()}
            t_ref = time.perf_counter()
            check = referee(A[0], B[0], p, {path: (res.P[0], res.Q[0])
                                            for path, res in results.items()})
            t_ref = time.perf_counter() - t_ref
            for row in rows[-2:]:
                row |= {"rel_bound": check["bound"], "rel_naive_dense_fp64": check["naive"],
                        "referee_s": t_ref}
                if row["skipped"]:
                    continue
                row["rel_div_dense_fp64"] = check[row["path"]]
                print(f"| {dim} | {U} | {row['path']} | {row['time_s']:.3f} | {row['cpu_s']:.3f} | "
                      f"{row['peak_extra_MiB']:.0f} | {row['iterations']} | {row['rel_div']:.8f} | "
                      f"{row['rel_div_dense_fp64']:.8f} | {row['rel_naive']:.6f} | "
                      f"{check['bound']:.6f} |", flush=True)
                for what, got, ref in (("divergence", row["rel_div"], check[row["path"]]),
                                       ("FedIT divergence", row["rel_naive"], check["naive"])):
                    if abs(got - ref) > 1e-6:
                        failures.append(f"d = {dim}, U = {U}, {row['path']}: returned relative "
                                        f"{what} {got:.8f}, dense float64 gives {ref:.8f}")
                if row["rel_div"] > row["rel_naive"]:
                    failures.append(f"d = {dim}, U = {U}, {row['path']}: worse than FedIT")
            if len(results) == 2:
                gap = abs(rows[-1]["rel_div"] - rows[-2]["rel_div"])
                rows[-1]["gap_to_gram"] = gap
                if gap > 1e-6:
                    failures.append(f"d = {dim}, U = {U}: the paths' relative divergences "
                                    f"differ by {gap:.2e} > 1e-6")
            del A, B, results
            release_free_memory()

    # the goals: U = 1000, d = k = 1024 under 2 s and 1 GiB; time linear in U
    timed_rows = {(row["d"], row["U"], row["path"]): row for row in rows if not row["skipped"]}
    goals = {}
    target = timed_rows.get((1024, 1000, "matrix_free"))
    if target:
        goals["U1000_d1024"] = {"time_s": target["time_s"], "cpu_s": target["cpu_s"],
                                "peak_extra_MiB": target["peak_extra_MiB"],
                                "met": target["time_s"] < 2 and target["peak_extra_MiB"] < 1024}
        print(f"\ngoal U = 1000, d = k = 1024, r = {r}: under 2 s and 1 GiB extra: "
              f"{'met' if goals['U1000_d1024']['met'] else 'NOT met'} "
              f"({target['time_s']:.2f} s wall, {target['cpu_s']:.2f} s CPU, "
              f"{target['peak_extra_MiB']:.0f} MiB)")
    for dim in args.scale_dims:
        for path in ("gram", "matrix_free"):
            pts = sorted((U, row["time_s"], row["cpu_s"]) for (d_, U, path_), row
                         in timed_rows.items() if d_ == dim and path_ == path and U >= 100)
            if len(pts) >= 2:                     # time ~ U^exponent between the ends
                (U0, t0, c0), (U1, t1, c1) = pts[0], pts[-1]
                wall, cpu = (math.log(y / x) / math.log(U1 / U0) for x, y in ((t0, t1), (c0, c1)))
                goals[f"exponent_{path}_d{dim}"] = {"wall": wall, "cpu": cpu, "from_U": U0,
                                                    "to_U": U1}
                print(f"d = k = {dim}, {path}: time grows as U^{wall:.2f} (CPU time as "
                      f"U^{cpu:.2f}) from U = {U0} to {U1}")
    machine = provenance.record(device)
    total, load_end = time.perf_counter() - t_start, os.getloadavg()
    print(f"{machine['device_name']}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; total runtime {total:.0f} s; load average (1 min) "
          f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end, on "
          f"{os.cpu_count()} CPUs"
          f"\ntime: median wall time of a solve_flora_na call (bound=False); peak extra: above "
          f"the inputs; rel. divergence: ||M - B_hat A_hat|| / ||M||, as returned, and as the "
          f"float64 referee recomputes it from the returned P, Q")
    return finish(args, {"mode": "scale", "args": asdict(args), "machine": machine,
                         "rows": rows, "goals": goals, "total_runtime_s": total,
                         "load_average_1_5_15min": {"start": load_start, "end": load_end},
                         "failures": failures})


if __name__ == "__main__":
    sys.exit(main(parse_args()))
