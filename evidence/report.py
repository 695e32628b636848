"""Tables and figures from reproduce.sh's results folder: REPORT.md, PNGs, README's results section.

    python report.py results/                      # writes results/REPORT.md and results/*.png
    python report.py results/ --readme README.md   # also fills README between the result markers

Reads what reproduce.sh leaves under <results>/: runs/<stage>/<run>/{config.json,metrics.jsonl}
written by train.py (stages divergence, glue, sensitivity, generation), runs/bench/bench_solver.json
written by bench_solver.py, and pipeline.json / stage_times.tsv written by reproduce.sh. Every
section stands alone: a stage that did not run (or is still running) says so instead of failing.
Sections, in the order they appear: divergence study, GLUE table, sensitivity, solver benchmark,
generation, how it was run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import math
import os
import re
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402

from harness import provenance  # noqa: E402

FIG = "{FIG}"   # stands for the figures' folder as seen from the markdown file; filled in at the end
AGG_ORDER = ["fedit", "ffa", "fedsa", "fedsa (personalised)", "fedex", "flora", "flexlora",
             "lora_fair", "flora_na", "centralised"]
AGG_NAMES = {"fedit": "FedIT", "ffa": "FFA-LoRA", "fedsa": "FedSA-LoRA (global)",
             "fedsa (personalised)": "FedSA-LoRA (personalised)", "fedex": "FedEx-LoRA",
             "flora": "FLoRA", "flexlora": "FlexLoRA", "lora_fair": "LoRA-FAIR",
             "flora_na": "**FLoRA-NA**", "centralised": "centralised (1 client, IID)"}
TASK_NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "stsb": "STS-B", "cola": "CoLA",
              "mnli": "MNLI", "qnli": "QNLI", "qqp": "QQP", "gsm8k": "GSM8K", "mbpp": "MBPP"}
NOT_RUN = "\n_Not run: nothing under `{}` yet._\n"


# ---------------------------------------------------------------------------------------------
# Loading runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One train.py run directory: its config and its metrics rows (all aggregators)."""
    path: str
    config: dict
    rows: list[dict]

    def by_aggregator(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for r in self.rows:
            out.setdefault(r["aggregator"], []).append(r)
        return {k: sorted(v, key=lambda r: r["round"]) for k, v in out.items()}

    def finished(self, aggregator: str) -> bool:
        rows = self.by_aggregator().get(aggregator, [])
        return bool(rows) and rows[-1]["round"] >= self.config.get("rounds", math.inf)

    def unfinished(self) -> list[str]:
        """Aggregators of this run's config that have not done all their rounds (or none)."""
        names = [a.strip() for a in str(self.config.get("aggregator", "")).split(",") if a.strip()]
        return [a for a in names or self.by_aggregator() if not self.finished(a)]


def load_runs(results: str, stage: str) -> list[Run]:
    """Every run under <results>/runs/<stage>/ that has written at least one metrics row."""
    root = os.path.join(results, "runs", stage)
    runs = []
    if not os.path.isdir(root):
        return runs
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        mpath, cpath = os.path.join(path, "metrics.jsonl"), os.path.join(path, "config.json")
        if not (os.path.isfile(mpath) and os.path.isfile(cpath)):
            continue
        with open(mpath) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if rows:
            runs.append(Run(path, json.load(open(cpath)), rows))
    return runs


def main_metric(task: str) -> str:
    """The task's headline metric (tasks.main_metric), without importing torch when it fails."""
    try:
        import tasks
        return tasks.main_metric(task)
    except Exception:                                   # noqa: BLE001 - any failure: fall back
        return {"stsb": "pearson", "cola": "matthews"}.get(task, "accuracy")


def metric_value(metrics: dict | None, name: str) -> float | None:
    """metrics[name], or the first split-prefixed variant (mnli: matched_accuracy)."""
    if not metrics:
        return None
    if name in metrics:
        return metrics[name]
    return next((v for k, v in metrics.items() if k.endswith("_" + name)), None)


# ---------------------------------------------------------------------------------------------
# Small formatting helpers
# ---------------------------------------------------------------------------------------------


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def fmt_ms(xs: list[float], n_expected: int, digits: int = 3, bold: bool = False) -> str:
    if not xs:
        return "—"
    m, s = mean_std(xs)
    text = f"{m:.{digits}f} ± {s:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"
    if bold:
        text = f"**{text}**"
    return text + (f" (n={len(xs)})" if len(xs) != n_expected else "")


def describe(c: dict) -> str:
    """A run's setting in one line."""
    parts = [f"model `{c.get('model')}`", f"{c.get('clients')} client(s)",
             "IID" if not c.get("dirichlet_alpha") else f"Dirichlet alpha {c.get('dirichlet_alpha')}",
             f"{c.get('rounds')} rounds x {c.get('local_steps')} local steps "
             f"(batch {c.get('batch_size')}, {c.get('optimizer')} lr {c.get('lr')})",
             f"LoRA r {c.get('rank')} alpha {c.get('lora_alpha')}",
             f"max length {c.get('max_length')}"]
    if c.get("max_train_examples"):
        parts.append(f"train subset {c['max_train_examples']}")
    if c.get("max_eval_examples"):
        parts.append(f"dev subset {c['max_eval_examples']}")
    parts.append(f"evaluated every {c.get('eval_every')} rounds")
    return ", ".join(parts)


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def savefig(fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return f"{FIG}{name}"


COLORS = {"fedit": "tab:blue", "ffa": "tab:orange", "fedsa": "tab:green", "fedex": "tab:red",
          "flora": "tab:purple", "flexlora": "tab:brown", "lora_fair": "tab:pink",
          "flora_na": "black", "centralised": "tab:gray"}


def style(name: str) -> dict:
    return {"color": COLORS.get(name, None), "lw": 2.4 if name == "flora_na" else 1.4,
            "ls": "--" if name == "centralised" else "-"}


# ---------------------------------------------------------------------------------------------
# Divergence study (stage 2)
# ---------------------------------------------------------------------------------------------

DIV_METHODS = [("naive", "FedIT (naive average)", "tab:blue"),
               ("flora_na_als", "FLoRA-NA, ALS solver (ours, default)", "black"),
               ("flora_na_adamw", "FLoRA-NA, AdamW solver (paper's)", "tab:orange"),
               ("bound", "rank-r bound (best any rank-r update can do)", "tab:green")]
DIV_LINE = {"flora_na_als": {"lw": 2.6}, "flora_na_adamw": {"ls": "--", "lw": 1.4}}


NEGLIGIBLE = 1e-4   # FedIT relative divergence below this: reductions are numerical noise


def divergence_series(run: Run) -> tuple[list[int], dict[str, list[list[float]]]]:
    """Rounds and, per method, a (rounds x layers) list of relative divergences."""
    rows = [r for r in run.rows if "flora_na_als" in r["divergence"]["relative_mean"]]
    rows.sort(key=lambda r: r["round"])
    layers = sorted(rows[0]["divergence"]["relative_per_layer"]) if rows else []
    series = {m: [[r["divergence"]["relative_per_layer"][l].get(m, math.nan) for l in layers]
                  for r in rows] for m, _, _ in DIV_METHODS}
    return [r["round"] for r in rows], series


def divergence_section(results: str, out_dir: str) -> tuple[str, dict]:
    """Per round and layer, ||M - B_hat A_hat|| / ||M|| for FedIT, both FLoRA-NA solvers, bound."""
    runs = [r for r in load_runs(results, "divergence")
            if any("flora_na_als" in row["divergence"]["relative_mean"] for row in r.rows)]
    md = ["## Divergence study: how close each server update gets to the ideal update\n"]
    if not runs:
        return "\n".join(md) + NOT_RUN.format("runs/divergence/ (with --track-solvers)"), {}
    run = runs[0]
    rounds, s = divergence_series(run)
    L = len(s["naive"][0])
    md.append(f"One federated run on {TASK_NAMES.get(run.config['task'], run.config['task'])} "
              f"({describe(run.config)}; global model trained with "
              f"`{run.config['aggregator']}`). Every round the server also solved FLoRA-NA on "
              f"the same client uploads with both solvers, so all numbers below share one "
              f"trajectory. Divergence is normalised: ||M - B̂Â||_F / ||M||_F with "
              f"M = Σ_u p_u B_u A_u, per layer ({L} LoRA layers), rounds {rounds[0]}–{rounds[-1]}"
              + ("" if run.finished(run.config["aggregator"]) else " (run not finished)") + ".\n")

    # figure: mean over layers (line) and min-max band; right: reduction over FedIT
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m, label, color in DIV_METHODS:
        vals = s[m]
        line = DIV_LINE.get(m, {"lw": 1.4})
        ax1.plot(rounds, [sum(v) / len(v) for v in vals], color=color, label=label, marker=".",
                 **line)
        ax1.fill_between(rounds, [min(v) for v in vals], [max(v) for v in vals], color=color,
                         alpha=0.15)
        if m == "naive":
            continue
        red = [[1 - x / n if n > NEGLIGIBLE else math.nan for x, n in zip(v, nv)]
               for v, nv in zip(vals, s["naive"])]
        ax2.plot(rounds, [_nanmean(r) for r in red], color=color, label=label, marker=".",
                 **line)
        ax2.fill_between(rounds, [_nanmin(r) for r in red], [_nanmax(r) for r in red],
                         color=color, alpha=0.15)
    ax1.set(xlabel="round", ylabel="||M - B̂Â|| / ||M||", ylim=(0, None),
            title="relative divergence (line: mean over layers;\nband: min–max over layers)")
    ax2.set(xlabel="round", ylabel="1 - divergence / FedIT's divergence",
            title="reduction of FedIT's divergence\n(line: mean over layers; band: min–max)")
    ax1.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    png = savefig(fig, out_dir, "divergence.png")

    rows, summary = [], {}
    naive_flat = [x for v in s["naive"] for x in v]
    bound_flat = [x for v in s["bound"] for x in v]
    for m, label, _ in DIV_METHODS:
        flat = [x for v in s[m] for x in v]
        red = [1 - x / n for x, n in zip(flat, naive_flat) if n > NEGLIGIBLE]
        gap = [(n - x) / (n - b) for x, n, b in zip(flat, naive_flat, bound_flat)
               if n > NEGLIGIBLE and n - b > 1e-6 * n]
        summary[m] = _nanmean(red)
        rows.append([label, f"{_nanmean(flat):.4f}", f"{_nanmean(s[m][0]):.4f}",
                     f"{_nanmean(s[m][-1]):.4f}",
                     "—" if m == "naive" else f"{100 * _nanmean(red):.1f}%",
                     "—" if m == "naive" else f"{100 * _nanmin(red):.1f}% / {100 * _nanmax(red):.1f}%",
                     "—" if m == "naive" else f"{100 * _nanmean(gap):.0f}%"])
    md.append(table(["server update", "mean rel. divergence", f"round {rounds[0]}",
                     f"round {rounds[-1]}", "mean reduction vs FedIT",
                     "min / max reduction", "FedIT→bound gap closed"], rows))
    skipped = sum(n <= NEGLIGIBLE for n in naive_flat)
    md.append("Means are over rounds and layers; the reduction is 1 - div / div_FedIT per "
              "(round, layer); the gap closed is (div_FedIT - div) / (div_FedIT - div_bound)"
              + (f"; {skipped} of {len(naive_flat)} (round, layer) pairs where FedIT's relative "
                 f"divergence is below {NEGLIGIBLE:g} (typically round 1, when every client "
                 f"starts from B = 0) are left out of the ratios" if skipped else "") + ".\n")
    md.append(f"![divergence per round]({png})\n")
    als, adamw, bound = summary["flora_na_als"], summary["flora_na_adamw"], summary["bound"]
    md.append(f"FLoRA-NA's ALS solver removes {100 * als:.1f}% of FedIT's divergence on average "
              f"and the paper's AdamW solver {100 * adamw:.1f}%; no rank-r update can remove more "
              f"than {100 * bound:.1f}% (the bound). "
              + ("Both solvers reach the same divergence (within 0.1 point). "
                 if abs(adamw - als) < 1e-3 else
                 "AdamW does better than ALS here. " if adamw > als else
                 "AdamW (fixed steps and learning rate) stays behind ALS. ")
              + ("The remaining gap to the bound is the price of restricting B̂, Â to "
                 "combinations of the clients' factors.\n" if bound - als > 0.01 else "\n"))
    return "\n".join(md), {"divergence_reduction": summary}


def _nanmean(xs) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else math.nan


def _nanmin(xs) -> float:
    xs = [x for x in xs if x == x]
    return min(xs) if xs else math.nan


def _nanmax(xs) -> float:
    xs = [x for x in xs if x == x]
    return max(xs) if xs else math.nan


# ---------------------------------------------------------------------------------------------
# GLUE table (stage 3)
# ---------------------------------------------------------------------------------------------


@dataclass
class Curve:
    """One aggregator in one run: eval rounds, metric values, cumulative bytes, best, final."""
    rounds: list[int]
    values: list[float]
    mbytes: list[float]                # cumulative MiB up + down at those rounds
    best: float
    final: float
    mb_per_round: float                # (up + down) / round, MiB, all clients together
    finished: bool


def curve(rows: list[dict], metric: str, key: str = "metrics", total_rounds: int = 0) -> Curve | None:
    evals = [(r["round"], metric_value(r.get(key), metric), r) for r in rows]
    evals = [(rnd, v, r) for rnd, v, r in evals if v is not None]
    if not evals:
        return None
    last = rows[-1]
    return Curve([e[0] for e in evals], [e[1] for e in evals],
                 [(e[2]["bytes_up"] + e[2]["bytes_down"]) / 2**20 for e in evals],
                 max(e[1] for e in evals), evals[-1][1],
                 (last["bytes_up"] + last["bytes_down"]) / 2**20 / last["round"],
                 last["round"] >= total_rounds)


def glue_curves(runs: list[Run]) -> dict[str, dict[str, list[Curve]]]:
    """task -> label -> one Curve per seed. Centralised runs (1 client) get the label
    'centralised'; FedSA-LoRA's personal models 'fedsa (personalised)'."""
    out: dict[str, dict[str, list[Curve]]] = {}
    for run in runs:
        task, metric = run.config["task"], main_metric(run.config["task"])
        for agg, rows in run.by_aggregator().items():
            label = "centralised" if run.config.get("clients") == 1 else agg
            c = curve(rows, metric, total_rounds=run.config.get("rounds", 0))
            if c:
                out.setdefault(task, {}).setdefault(label, []).append(c)
            if agg == "fedsa" and label != "centralised":
                c = curve(rows, metric, "personal_metrics", run.config.get("rounds", 0))
                if c:
                    out[task].setdefault("fedsa (personalised)", []).append(c)
    return out


def _mean_curve(curves: list[Curve], x: str) -> tuple[list[float], list[float]]:
    """Mean over seeds at the rounds every seed has."""
    common = sorted(set.intersection(*(set(c.rounds) for c in curves)))
    xs, ys = [], []
    for rnd in common:
        pts = [(getattr(c, x)[c.rounds.index(rnd)] if x != "rounds" else rnd,
                c.values[c.rounds.index(rnd)]) for c in curves]
        xs.append(sum(p[0] for p in pts) / len(pts))
        ys.append(sum(p[1] for p in pts) / len(pts))
    return xs, ys


def head_mb(runs: list[Run]) -> tuple[float, list[str]] | None:
    """Size in MB of the trained non-LoRA head as a client sends it, and its modules (e.g.
    classifier and BERT's pooler), read from a saved adapter: every method averages it."""
    from safetensors import safe_open
    for run in runs:
        for f in sorted(glob.glob(os.path.join(run.path, "*", "adapter", "adapter_model.safetensors"))):
            config = json.load(open(os.path.join(os.path.dirname(f), "adapter_config.json")))
            with safe_open(f, "pt") as st:
                keys = [k for k in st.keys() if "lora_" not in k]
                mb = sum(st.get_tensor(k).nbytes for k in keys) / 2**20
            names = [n for n in config.get("modules_to_save") or []
                     if any(f".{n}." in f".{k}" for k in keys)]
            return mb, names
    return None


def majority_baseline(run: Run) -> float | None:
    """The main metric of always predicting the commonest label of this run's dev subset: what
    a model that learned nothing scores (0 correlation for STS-B). None without the data."""
    from harness import tasks
    import train
    task = run.config["task"]
    if task not in tasks.GLUE_TASKS:
        return None
    fields = {f.name for f in dataclasses.fields(train.Args)}
    try:
        data = train.load_task(train.Args(**{k: v for k, v in run.config.items() if k in fields}))
    except (OSError, ValueError, SystemExit):          # the data is not at hand here
        return None
    labels = [e.label for e in next(iter(data.evals.values()))]
    if isinstance(labels[0], float):
        return 0.0
    top = max(set(labels), key=labels.count)
    return metric_value(tasks.glue_metrics(task, [top] * len(labels), labels), main_metric(task))


def glue_section(results: str, out_dir: str) -> tuple[str, dict]:
    """Best-over-rounds and final dev metric, mean ± std over seeds, and communication."""
    runs = load_runs(results, "glue")
    md = ["## GLUE: every aggregator, mean ± std over seeds\n"]
    if not runs:
        return "\n".join(md) + NOT_RUN.format("runs/glue/"), {}
    curves = glue_curves(runs)
    tasks_ = [t for t in ["sst2", "mrpc", "rte", "stsb", "cola", "mnli", "qnli", "qqp"]
              if t in curves] + sorted(t for t in curves if t not in TASK_NAMES)
    labels = [a for a in AGG_ORDER if any(a in curves[t] for t in tasks_)]
    seeds = sorted({r.config.get("seed") for r in runs})
    n_seeds = len(seeds)
    fed = next((r for r in runs if r.config.get("clients", 1) > 1), runs[0])
    central = next((r for r in runs if r.config.get("clients") == 1), None)
    text = f"Federated setting: {describe(fed.config)}; seeds {seeds}."
    if central:
        text += (f" Centralised reference: {describe(central.config)} — one client holding "
                 f"all the training data, seeing as many examples per round as all federated "
                 f"clients together.")
    md.append(text)
    partial = [f"{os.path.basename(r.path)} ({', '.join(r.unfinished())})"
               for r in runs if r.unfinished()]
    md.append("\n" + (f"\n**Unfinished runs** (missing or partly done aggregators; the tables "
                      f"use what exists): {'; '.join(partial)}\n" if partial else ""))
    heads = [f"{TASK_NAMES.get(t, t)} ({main_metric(t)})" for t in tasks_]
    majority: dict[str, list[float]] = {}                # per task, one value per seed
    for r in runs:
        m = majority_baseline(r) if r.config.get("clients", 1) > 1 else None
        if m is not None:
            majority.setdefault(r.config["task"], []).append(m)

    def block(what: str) -> tuple[str, dict]:
        means = {t: {a: mean_std([getattr(c, what) for c in curves[t][a]])[0]
                     for a in curves[t]} for t in tasks_}
        fed_vals = {t: [v for a, v in means[t].items()
                        if a not in ("centralised", "fedsa (personalised)")] for t in tasks_}
        # bold the best federated value, unless every federated method has the same value
        best_fed = {t: max(v) if v and max(v) - min(v) > 1e-9 else None
                    for t, v in fed_vals.items()}
        rows = []
        for a in labels:
            cells = [fmt_ms([getattr(c, what) for c in curves[t].get(a, [])], n_seeds,
                            bold=best_fed[t] is not None and a in means[t]
                            and means[t][a] == best_fed[t]
                            and a not in ("centralised", "fedsa (personalised)"))
                     for t in tasks_]
            avg = [means[t][a] for t in tasks_ if a in means[t]]
            cells.append(f"{sum(avg) / len(avg):.3f}" if len(avg) == len(tasks_) else "—")
            mb = [c.mb_per_round for t in tasks_ for c in curves[t].get(a, [])]
            cells.append("—" if a in ("fedsa (personalised)", "centralised") or not mb
                         else f"{sum(mb) / len(mb):.2f}")
            rows.append([AGG_NAMES.get(a, a)] + cells)
        if majority:
            rows.append(["majority class (constant prediction)"]
                        + [fmt_ms(majority[t], n_seeds) if t in majority else "—" for t in tasks_]
                        + ["—", "—"])
        return table(["aggregator"] + heads + ["task average", "MB / round (up + down)"],
                     rows), means

    best_md, best = block("best")
    final_md, final = block("final")
    md.append("**Best dev metric over rounds** (what the authors report):\n")
    md.append(best_md)
    md.append("\n**Final-round dev metric:**\n")
    md.append(final_md)
    head = head_mb(runs)
    head_text = (f"the trained head ({' and '.join(head[1])}, {head[0]:.2f} MB per client each "
                 f"way), averaged alike by every method, is not counted" if head is not None else
                 "the trained head, averaged alike by every method, is not counted")
    md.append("\nBold: the best federated global model per column. MB / round: LoRA factors "
              "sent by all clients to the server plus the server's reply, per round, as "
              f"train.py counts them ({head_text}); FedEx-LoRA sends the full residual down, "
              "FLoRA the stacked factors. FedSA-LoRA (personalised): each client's own B with "
              "the shared A, averaged over clients — not a single global model.\n")

    md.append(_glue_verdict(tasks_, curves, best, final, majority))
    md.append(_glue_figures(tasks_, curves, out_dir))
    return "\n".join(md), {"glue_best": best, "glue_final": final}


def _glue_verdict(tasks_, curves, best, final, majority) -> str:
    """Plain sentences: FLoRA-NA against FedIT, and whether federated training learned."""
    lines = []
    federated = lambda t: {a: v for a, v in best[t].items()          # noqa: E731
                           if a not in ("centralised", "fedsa (personalised)")}
    both = [t for t in tasks_ if "flora_na" in curves[t] and "fedit" in curves[t]]
    if both:
        wins, ties, losses = [], [], []
        n_min = min(len(curves[t][a]) for t in both for a in ("flora_na", "fedit"))
        for t in both:
            a = [c.best for c in curves[t]["flora_na"]]
            b = [c.best for c in curves[t]["fedit"]]
            d = mean_std(a)[0] - mean_std(b)[0]
            noise = max(mean_std(a)[1], mean_std(b)[1], 1e-9) if n_min >= 2 else 1e-9
            item = f"{TASK_NAMES.get(t, t)} {d:+.4f}"
            (ties if abs(d) <= noise else wins if d > 0 else losses).append(item)
        if n_min >= 2:
            lines.append(f"- **FLoRA-NA vs FedIT** (best over rounds, difference of means over "
                         f"seeds): ahead by more than one std on {len(wins)} task(s) "
                         f"({', '.join(wins) or '—'}), behind by more than one std on "
                         f"{len(losses)} ({', '.join(losses) or '—'}), within one std on "
                         f"{len(ties)} ({', '.join(ties) or '—'}).")
        else:
            lines.append(f"- **FLoRA-NA vs FedIT** (best over rounds, one seed, so no std): "
                         f"ahead on {len(wins)} task(s) ({', '.join(wins) or '—'}), behind on "
                         f"{len(losses)} ({', '.join(losses) or '—'}), equal on {len(ties)} "
                         f"({', '.join(ties) or '—'}).")
        rank = []
        for t in both:
            vals, x = federated(t), best[t]["flora_na"]
            better = sum(v > x + 1e-9 for v in vals.values())
            tied = sum(abs(v - x) <= 1e-9 for v in vals.values()) - 1
            rank.append(f"{TASK_NAMES.get(t, t)} {better + 1}/{len(vals)}"
                        + (f" (tied with {tied})" if tied else ""))
        lines.append(f"- FLoRA-NA's rank among the federated global models (best over rounds, "
                     f"mean over seeds): {', '.join(rank)}.")
    flat = [TASK_NAMES.get(t, t) for t in tasks_
            if len(federated(t)) > 1 and max(federated(t).values()) - min(federated(t).values()) < 1e-9]
    if flat:
        lines.append(f"- On {', '.join(flat)} every federated aggregator scores exactly the same: "
                     f"the global models most likely still predict a constant (the majority "
                     f"class), so this budget cannot rank the aggregators there.")
    near = []
    for t in tasks_:
        if t not in majority or not federated(t):
            continue
        top, base = max(federated(t).values()), mean_std(majority[t])[0]
        if top - base < 0.02:
            central = (f", centralised {best[t]['centralised']:.3f}"
                       if "centralised" in best[t] else "")
            near.append(f"{TASK_NAMES.get(t, t)} (best federated {top:.3f}{central}, "
                        f"majority {base:.3f})")
    if near:
        lines.append(f"- Within 0.02 of the majority-class baseline, so not learned at this "
                     f"budget and not a ranking of the aggregators: {'; '.join(near)}.")
    central = [t for t in tasks_ if "centralised" in curves[t] and federated(t)]
    if central:
        gaps = [f"{TASK_NAMES.get(t, t)} {best[t]['centralised']:.3f} vs "
                f"{max(federated(t).values()):.3f}" for t in central]
        lines.append(f"- Centralised reference vs the best federated global model (best over "
                     f"rounds): {', '.join(gaps)}. Where the federated numbers sit at chance "
                     f"(0.5 accuracy, 0 correlation) or at the majority class while the "
                     f"centralised one does not, the federated budget is too small to learn "
                     f"the task and differences between aggregators are noise.")
    return "\n".join(lines) + "\n"


def _glue_figures(tasks_, curves, out_dir) -> str:
    out = []
    for x, name, xlabel in (("rounds", "glue_metric_vs_round.png", "round"),
                            ("mbytes", "glue_metric_vs_bytes.png",
                             "cumulative MB sent (up + down, all clients)")):
        fig, axes = plt.subplots(1, len(tasks_), figsize=(4 * len(tasks_), 3.6), squeeze=False)
        for ax, t in zip(axes[0], tasks_):
            for a in AGG_ORDER:
                if a not in curves[t] or a == "fedsa (personalised)":
                    continue
                if x == "mbytes" and a == "centralised":
                    continue                               # nothing is communicated
                xs, ys = _mean_curve(curves[t][a], x)
                ax.plot(xs, ys, label=AGG_NAMES[a].strip("*"), marker=".", **style(a))
            ax.set(title=f"{TASK_NAMES.get(t, t)}", xlabel=xlabel, ylabel=main_metric(t))
            if x == "mbytes":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
        fig.suptitle(f"dev metric (mean over seeds) vs {xlabel.split(' (')[0]}")
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        out.append(f"![dev metric vs {xlabel}]({FIG}{name})")
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Sensitivity (stage 4)
# ---------------------------------------------------------------------------------------------


SENS_ALPHAS, SENS_CLIENTS = (0.1, 0.5, 1.0), (3, 10, 20)   # what reproduce.sh's stage 4 runs


def sensitivity_section(results: str, out_dir: str) -> tuple[str, dict]:
    """FLoRA-NA vs FedIT across Dirichlet alpha and client counts."""
    runs = load_runs(results, "sensitivity")
    md = ["## Sensitivity: data heterogeneity and number of clients\n"]
    if not runs:
        return "\n".join(md) + NOT_RUN.format("runs/sensitivity/"), {}
    task = runs[0].config["task"]
    metric = main_metric(task)
    # (alpha, clients) -> aggregator -> list over seeds of (best, final, mean rel. divergence)
    cells: dict[tuple[float, int], dict[str, list[tuple]]] = {}
    for run in runs:
        key = (float(run.config["dirichlet_alpha"]), int(run.config["clients"]))
        for agg, rows in run.by_aggregator().items():
            c = curve(rows, metric, total_rounds=run.config.get("rounds", 0))
            if not c:
                continue
            div = _nanmean([r["divergence"]["relative_mean"].get(agg, math.nan) for r in rows])
            naive = _nanmean([r["divergence"]["relative_mean"].get("naive", math.nan) for r in rows])
            cells.setdefault(key, {}).setdefault(agg, []).append((c.best, c.final, div, naive))
    seeds = sorted({r.config.get("seed") for r in runs})
    partial = [f"{os.path.basename(r.path)} ({', '.join(r.unfinished())})"
               for r in runs if r.unfinished()]
    if partial:
        md.append(f"**Unfinished runs** (the table uses what exists): {'; '.join(partial)}\n")
    md.append(f"{TASK_NAMES.get(task, task)}, {metric}; {describe(runs[0].config)} (clients and "
              f"alpha varied as listed); seeds {seeds}. Divergence: mean over rounds of the "
              f"mean relative divergence over layers of the update the aggregator sent.\n")

    def ms(key, agg, i):
        xs = [v[i] for v in cells.get(key, {}).get(agg, [])]
        return mean_std(xs) if xs else (math.nan, math.nan)

    rows, verdict = [], []
    for sweep, keys in (("alpha", sorted({k for k in cells if k[1] == 10}
                                         | {(a, 10) for a in SENS_ALPHAS})),
                        ("clients", sorted({k for k in cells if k[0] == 0.5}
                                           | {(0.5, u) for u in SENS_CLIENTS},
                                           key=lambda k: k[1]))):
        for key in keys:
            if key not in cells:
                rows.append([sweep, f"{key[0]:g}", str(key[1])] + ["not run"] + [""] * 6)
                continue
            fb, nb = ms(key, "fedit", 0), ms(key, "flora_na", 0)
            ff, nf = ms(key, "fedit", 1), ms(key, "flora_na", 1)
            fd, nd = ms(key, "fedit", 2), ms(key, "flora_na", 2)
            rows.append([sweep, f"{key[0]:g}", str(key[1]),
                         _pm(fb), _pm(nb), f"{nb[0] - fb[0]:+.3f}", _pm(ff), _pm(nf),
                         f"{fd[0]:.3f}", f"{nd[0]:.3f}"])
            if nb[0] == nb[0] and fb[0] == fb[0]:
                verdict.append(nb[0] - fb[0])
    md.append(table(["sweep", "Dirichlet alpha", "clients", "FedIT best", "FLoRA-NA best",
                     "Δ best", "FedIT final", "FLoRA-NA final", "FedIT rel. div.",
                     "FLoRA-NA rel. div."], rows, "lrr" + "r" * 7))
    n_up = sum(d > 0 for d in verdict)
    md.append(f"\nFLoRA-NA's best dev {metric} is higher than FedIT's in {n_up} of "
              f"{len(verdict)} rows and lower or equal in {len(verdict) - n_up}"
              + (" (one seed per setting: differences of a point or two are within run-to-run "
                 "noise)" if len(seeds) == 1 else "") + ". Lower divergence does not by itself "
              "guarantee a better model at this budget.\n")

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex="col")
    for col, (sweep, pick, xlabel, logx) in enumerate(
            (("alpha", lambda k: k[1] == 10, "Dirichlet alpha (10 clients)", True),
             ("clients", lambda k: k[0] == 0.5, "clients (alpha 0.5)", False))):
        keys = sorted((k for k in cells if pick(k)), key=lambda k: k[col])
        xs = [k[col] for k in keys]
        for agg, label, marker in (("fedit", "FedIT", "o"), ("flora_na", "FLoRA-NA", "s")):
            for row, i, ylabel in ((0, 0, f"best dev {metric}"), (1, 2, "mean rel. divergence")):
                ys = [ms(k, agg, i) for k in keys]
                axes[row][col].errorbar(xs, [y[0] for y in ys], yerr=[y[1] for y in ys],
                                        marker=marker, capsize=3, label=label,
                                        **{k: v for k, v in style(agg).items() if k != "ls"})
                axes[row][col].set_ylabel(ylabel)
                axes[row][col].grid(alpha=0.3)
        axes[1][col].set_xlabel(xlabel)
        if logx:
            axes[1][col].set_xscale("log")
        if xs:
            axes[1][col].set_xticks(xs, [f"{x:g}" for x in xs])
            axes[1][col].xaxis.set_minor_formatter(NullFormatter())
        axes[0][col].set_title(f"vs {sweep}")
    axes[0][0].legend()
    png = savefig(fig, out_dir, "sensitivity.png")
    md.append(f"![sensitivity]({png})\n")
    return "\n".join(md), {}


def _pm(ms: tuple[float, float]) -> str:
    m, s = ms
    return "—" if m != m else (f"{m:.3f} ± {s:.3f}" if s else f"{m:.3f}")


# ---------------------------------------------------------------------------------------------
# Solver benchmark (stage 5) and generation (stage 6)
# ---------------------------------------------------------------------------------------------


def bench_section(results: str) -> tuple[str, dict]:
    """bench_solver.py's JSON as a table."""
    path = os.path.join(results, "runs", "bench", "bench_solver.json")
    md = ["## Solver benchmark: Gram-space solver vs the paper's AdamW done densely\n"]
    if not os.path.isfile(path):
        return "\n".join(md) + NOT_RUN.format("runs/bench/bench_solver.json"), {}
    b = json.load(open(path))
    a, m = b.get("args", {}), b.get("machine", {})
    md.append(f"{a.get('layers')} layers of {a.get('d')} x {a.get('k')}, rank {a.get('rank')}, "
              f"{a.get('clients')} clients (LLaMA-2-7B q/v shapes unless --quick), "
              f"{a.get('steps')} AdamW steps at lr {a.get('lr')}; on {m.get('device_name')} "
              f"({m.get('device')}, {m.get('torch_threads')} torch thread(s), torch "
              f"{m.get('torch')}). Synthetic factors; the dense baseline is timed on "
              f"{a.get('dense_layers')} layer(s).\n")
    mean = lambda xs: _nanmean(xs) if xs else math.nan       # noqa: E731
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
                    + ["speed-up", "rel. divergence",
                     "same, dense fp64 check", "FedIT rel. div.", "rank-r bound",
                     "peak extra MiB"], rows))
    md.append(f"\nSpeed-up target (>= 100x for the default Gram ALS): "
              f"{'met' if b.get('speedup_target_met') else 'NOT met'}. Total runtime "
              f"{b.get('total_runtime_s', math.nan):.0f} s."
              + _load_text(b.get("load_average_1_5_15min")) + "\n")
    if b.get("failures"):
        md.append("**Regressions reported by the benchmark:**\n\n"
                  + "\n".join(f"- {f}" for f in b["failures"]) + "\n")
    return "\n".join(md), {}


def _load_text(load) -> str:
    """The machine's 1-minute load average at the start and end of the benchmark, if recorded."""
    try:
        return (f" 1-minute load average {load['start'][0]:.1f} at the start, "
                f"{load['end'][0]:.1f} at the end (the benchmark itself accounts for about 1; "
                f"above that, other processes shared the CPU and wall times overstate the cost).")
    except (TypeError, KeyError, IndexError):
        return f" Load average: {load}." if load else ""


def generation_section(results: str) -> tuple[str, dict]:
    """Federated GSM8K / MBPP: final accuracy with the size of the evaluated subset."""
    runs = load_runs(results, "generation")
    md = ["## Generation: federated GSM8K\n"]
    if not runs:
        return "\n".join(md) + NOT_RUN.format("runs/generation/"), {}
    md.append(f"{describe(runs[0].config)}; greedy decoding, at most "
              f"{runs[0].config.get('max_new_tokens')} new tokens, scored by exact match of "
              f"the final number.\n")
    rows, n_evals = [], []
    for run in runs:
        for agg, rws in run.by_aggregator().items():
            ev = [r for r in rws if r.get("metrics")]
            if not ev:
                rows.append([AGG_NAMES.get(agg, agg), run.config["task"], "not evaluated yet",
                             f"{rws[-1]['round']}", f"{rws[-1]['train_loss']:.3f}"])
                continue
            m = ev[-1]["metrics"]
            key = "accuracy" if "accuracy" in m else next(k for k in m if not k.endswith("n_eval"))
            n = int(m.get("n_eval", 0))
            n_evals.append(n)
            rows.append([AGG_NAMES.get(agg, agg), TASK_NAMES.get(run.config["task"]),
                         f"{m[key]:.3f} ({round(m[key] * n)}/{n})", f"{ev[-1]['round']}",
                         f"{rws[0]['train_loss']:.3f} → {rws[-1]['train_loss']:.3f}"])
    md.append(table(["aggregator", "task", "accuracy (correct / evaluated)", "after round",
                     "train loss first → last round"], rows))
    if n_evals and min(n_evals) < 200:
        md.append(f"\nWith {min(n_evals)} test problems one problem is "
                  f"{100 / max(1, min(n_evals)):.1f} points: this stage shows the generation "
                  f"pipeline works end to end; it is not evidence for or against the paper's "
                  f"GSM8K claim (LLaMA-2-7B: FLoRA-NA 42.89%, FedIT 35.68%, FedSA-LoRA 28.82%).\n")
    return "\n".join(md), {}


# ---------------------------------------------------------------------------------------------
# How it was run, the whole report, README
# ---------------------------------------------------------------------------------------------


STAGE_DIRS = {"2": "divergence", "3": "glue", "4": "sensitivity", "5": "bench", "6": "generation"}


def stage_provenance(results: str, stage: str) -> tuple[str, str]:
    """(commits, machines) that produced a stage's results, from each run's provenance.jsonl
    (a line per start and resume) or the benchmark's JSON; runs from before provenance was
    recorded are counted as such."""
    folder = os.path.join(results, "runs", STAGE_DIRS[stage])
    records, unrecorded = [], 0
    if stage == "5":
        for path in glob.glob(os.path.join(folder, "*.json")):
            records.append(json.load(open(path)).get("machine", {}))
    else:
        for run in sorted(glob.glob(os.path.join(folder, "*", "config.json"))):
            path = os.path.join(os.path.dirname(run), "provenance.jsonl")
            if os.path.isfile(path):
                records += [json.loads(line) for line in open(path) if line.strip()]
            else:
                unrecorded += 1
    commits = sorted({provenance.describe_commit(r.get("git_commit"), r.get("git_dirty", False))
                      for r in records})
    machines = sorted({f"{r.get('device_name', '?')} ({r.get('cpu_count', '?')} cores)"
                       for r in records})
    cells = [f"`{c}`" for c in commits] + [f"not recorded for {unrecorded} run(s)"] * bool(unrecorded)
    return ", ".join(cells) or "—", "; ".join(machines) or "—"


def run_section(results: str, pipeline: dict) -> str:
    info = provenance.record()
    md = ["## How this was run\n",
          f"- mode: **{pipeline.get('mode', 'unknown')}**"
          + (" (TINY plumbing check: numbers are meaningless)" if pipeline.get("tiny") else "")
          + f", started {pipeline.get('started', '?')}, {pipeline.get('jobs', '?')} parallel "
            f"run(s) x {pipeline.get('threads', '?')} torch thread(s)",
          f"- report generated {datetime.datetime.now():%Y-%m-%d %H:%M} from git commit "
          f"`{provenance.describe_commit(info['git_commit'], info['git_dirty'])}`",
          f"- machine (where report.py ran): {info['cpu_name']}, {info['cpu_count']} cores, "
          f"GPU: {info['gpu'] or 'none'}, torch {info['torch']}, Python {info['python']}"]
    path = os.path.join(results, "stage_times.tsv")
    latest = {}
    if os.path.isfile(path):
        for line in open(path):
            p = line.rstrip("\n").split("\t")
            # a rerun that found every run of the stage done already takes seconds: keep the
            # latest run that did the work
            if len(p) >= 5 and (int(p[3]) >= 10 or p[0] not in latest):
                latest[p[0]] = p
    rows = []
    for stage in sorted(set(latest) | set(STAGE_DIRS)):
        commits, machines = stage_provenance(results, stage) if stage in STAGE_DIRS else ("—", "—")
        p = latest.get(stage)
        if p is None and commits == "—":
            continue
        rows.append([f"{stage} {p[1] if p else STAGE_DIRS[stage]}", p[2] if p else "—",
                     f"{int(p[3]) / 60:.1f} min" if p else "—", p[4] if p else "—",
                     commits, machines])
    if rows:
        md.append("\nEach stage: the wall time of the latest reproduce.sh run that did the work, "
                  "and the git commit(s) and machine(s) its results came from (recorded by "
                  "train.py and bench_solver.py when each run started or resumed):\n")
        md.append(table(["stage", "status", "wall time", "finished", "code (git commit)",
                         "machine"], rows, "llrlll"))
        if latest:
            md.append(f"\nSum of the stage wall times above: "
                      f"{sum(int(p[3]) for p in latest.values()) / 60:.0f} min.")
    return "\n".join(md) + "\n"


def build_report(results: str, out_dir: str) -> str:
    """The whole report as markdown (figure links as {FIG}name.png) and its PNGs in out_dir."""
    pipeline = {}
    if os.path.isfile(os.path.join(results, "pipeline.json")):
        pipeline = json.load(open(os.path.join(results, "pipeline.json")))
    sections, facts = [], {}
    for fn in (lambda: divergence_section(results, out_dir), lambda: glue_section(results, out_dir),
               lambda: sensitivity_section(results, out_dir), lambda: bench_section(results),
               lambda: generation_section(results)):
        text, f = fn()
        sections.append(text)
        facts.update(f)
    mode = pipeline.get("mode", "unknown") + (" / TINY" if pipeline.get("tiny") else "")
    head = [f"# FLoRA-NA reproduction report ({mode})\n"]
    if pipeline.get("mode") == "QUICK" or pipeline.get("tiny"):
        head.append("QUICK mode is a CPU-sized stand-in for the paper's experiments: a 6-layer "
                    "MiniLM instead of RoBERTa-large, a few rounds of a few local steps, capped "
                    "train and dev sets. It checks that every method runs and shows the "
                    "divergence effect, but its accuracy numbers are not comparable with the "
                    "paper's, and differences smaller than the std over seeds are noise. "
                    "`MODE=FULL bash reproduce.sh` runs the paper-scale commands on a GPU.\n")
    return "\n".join(head + sections + [run_section(results, pipeline)])


def write_readme(readme: str, body: str) -> bool:
    """Replace the text between the results markers; False (untouched) if they are missing."""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = open(readme).read()
    if start not in text or end not in text:
        return False
    demoted = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", body, flags=re.M)
    demoted = re.sub(r"^## FLoRA-NA reproduction report.*\n", "", demoted, count=1)
    new = text[:text.index(start) + len(start)] + "\n" + demoted.strip() + "\n" + text[text.index(end):]
    with open(readme, "w") as f:
        f.write(new)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="?", default="results",
                        help="folder reproduce.sh wrote (runs/, pipeline.json); the report and "
                             "PNGs are written here too")
    parser.add_argument("--readme", default=None,
                        help="also replace README's text between <!-- results:start --> and "
                             "<!-- results:end --> (only if both markers exist)")
    args = parser.parse_args(argv)
    os.makedirs(args.results, exist_ok=True)
    body = build_report(args.results, args.results)
    path = os.path.join(args.results, "REPORT.md")
    with open(path, "w") as f:
        f.write(body.replace(FIG, ""))
    print(f"wrote {path} and its figures in {args.results}/")
    if args.readme:
        rel = os.path.relpath(os.path.abspath(args.results),
                              os.path.dirname(os.path.abspath(args.readme)))
        if write_readme(args.readme, body.replace(FIG, rel.rstrip("/") + "/")):
            print(f"updated the results section of {args.readme}")
        else:
            print(f"{args.readme} has no results markers: left unchanged")


if __name__ == "__main__":
    main()
