"""Tables and figures from reproduce.sh's results: REPORT.md, PNGs, RESULTS.md, README's headline.

    python -m evidence.report results/ --method flora_na --baseline fedit
    python -m evidence.report results/ --method flora_na --baseline fedit \\
        --page RESULTS.md --readme README.md     # also the results page and README's headline

Reads run files only, never training code: runs/<stage>/<run>/{config.json, metrics.jsonl,
provenance.jsonl} written by train.py (stages regime, glue, generation),
runs/bench/bench_solver.json written by bench_solver.py, and pipeline.json / stage_times.tsv
written by reproduce.sh. What a table needs beyond the metrics comes from the "facts" that
train.py writes into config.json: the task's display name and main metric, the majority-class
baseline, the trained head's size, and every registered aggregator's display name in registry
order (which fixes the rows' order and the figures' colours). Which aggregator is the method and
which the baseline is the caller's choice (--method, --baseline); no aggregator is named here.

Every section stands alone: a stage that did not run (or is still running) says so instead of
failing. Sections, in order (SECTIONS, at the end, lists them with their stage): regime study
(aggregation error by local steps, lr, heterogeneity, rank and clients), GLUE table, solver
benchmark, generation; REPORT.md adds how it was run.
Each section carries a provenance line under its heading (reproduce.sh command, mode, commit,
machine, date). On the results page each sits between its own markers
<!-- results:KEY:start --> / <!-- results:KEY:end -->, and only the sections whose stage has
results in this folder are rewritten, so rerunning one stage leaves the others' numbers as they
are. README's headline is rewritten only when the GLUE stage has runs.
"""
from __future__ import annotations

import datetime
import glob
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Callable

import matplotlib
import tyro

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from harness import provenance  # noqa: E402

FIG = "{FIG}"   # stands for the figures' folder as seen from the markdown file; filled in at the end
NOT_RUN = "\n_Not run: nothing under `{}` yet._\n"
NEEDS = "\n_Not shown: this section compares two aggregators; pass {}._\n"
HEADLINE_MARKERS = ("<!-- headline:start -->", "<!-- headline:end -->")


@dataclass
class Args:
    results: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RESULTS")] = "results"
    """folder reproduce.sh wrote (runs/, pipeline.json, ...); REPORT.md and the PNGs go here too"""
    method: str | None = None
    """aggregator the verdicts, the regime study and its accuracy table are about"""
    baseline: str | None = None
    """aggregator the method is compared with"""
    page: str | None = None
    """also write the report between this page's results markers, PNGs into figures/ beside it"""
    readme: str | None = None
    """also write the headline table between this README's headline markers"""


# ---------------------------------------------------------------------------------------------
# Loading runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One train.py run directory: its config (with the run's facts) and its metrics rows."""
    path: str
    config: dict
    rows: list[dict]

    @property
    def facts(self) -> dict:
        return self.config["facts"]

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def task_name(self) -> str:
        return self.facts["task"]["display_name"]

    @property
    def metric(self) -> str:
        return self.facts["task"]["main_metric"]

    @property
    def centralised(self) -> bool:
        return self.config.get("clients") == 1

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
        if names == ["all"]:           # with clients of mixed ranks: those that accept them
            names = [n for n, info in self.facts["aggregators"].items()
                     if not self.mixed_ranks or info.get("mixed_ranks", True)]
        return [a for a in names or self.by_aggregator() if not self.finished(a)]

    @property
    def mixed_ranks(self) -> bool:
        """Whether the clients' LoRA ranks differ from the global rank (or from each other)."""
        ranks = self.facts.get("client_ranks") or [self.config.get("rank")]
        return len(set(ranks)) > 1 or ranks[0] != self.config.get("rank")


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
        with open(cpath) as f:
            config = json.load(f)
        if "facts" not in config:
            raise ValueError(f"{cpath} has no 'facts' (written by a train.py from before they "
                             f"were recorded): rerun it, or move {path} out of {root}")
        if rows:
            runs.append(Run(path, config, rows))
    return runs


def metric_value(metrics: dict | None, name: str) -> float | None:
    """metrics[name], or the first split-prefixed variant (mnli: matched_accuracy)."""
    if not metrics:
        return None
    if name in metrics:
        return metrics[name]
    return next((v for k, v in metrics.items() if k.endswith("_" + name)), None)


# ---------------------------------------------------------------------------------------------
# Names, order and colours of the aggregators: from the runs' facts, never from a list here
# ---------------------------------------------------------------------------------------------

CENTRAL = "(centralised)"   # row key of centralised runs; registry names are identifiers
PERSONAL = " (personalised)"   # suffix of the row key of an aggregator's personalised models
PALETTE = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
           "tab:pink", "tab:olive", "tab:cyan"]   # by registry position; the method is black


def personal(name: str) -> str:
    """Row key of an aggregator's personalised models (rows that carry personal_metrics)."""
    return name + PERSONAL


@dataclass
class Names:
    """Every registered aggregator's display name in registry order (the union of the runs'
    facts), and which one is the method and which the baseline."""
    registry: dict[str, dict]          # name -> {"display_name", "personalised"}
    method: str | None = None
    baseline: str | None = None

    @classmethod
    def of(cls, runs: list[Run], method: str | None, baseline: str | None) -> Names:
        registry: dict[str, dict] = {}
        for run in runs:
            for name, info in run.facts["aggregators"].items():
                registry.setdefault(name, info)
        for flag, name in (("--method", method), ("--baseline", baseline)):
            if name is not None and registry and name not in registry:
                raise ValueError(f"{flag} {name!r} is not an aggregator these runs know; "
                                 f"choose from {', '.join(registry)}")
        if method is not None and method == baseline:
            raise ValueError(f"--method and --baseline are both {method!r}")
        return cls(registry, method, baseline)

    def display(self, key: str, bold: bool = True) -> str:
        """A row key as the tables print it; the method in bold (markdown) if `bold`."""
        if key == CENTRAL:
            return "centralised (1 client, IID)"
        if key.endswith(PERSONAL):
            return self.display(key.removesuffix(PERSONAL), bold) + PERSONAL
        text = self.registry.get(key, {}).get("display_name", key)
        return f"**{text}**" if bold and key == self.method else text

    def order(self, keys) -> list[str]:
        """Row keys in registry order, each aggregator followed by its personalised row, then
        names the facts do not list (first seen first), then the centralised reference."""
        keys = list(dict.fromkeys(keys))
        seen = [k.removesuffix(PERSONAL) for k in keys if k != CENTRAL]
        names = list(self.registry) + [k for k in dict.fromkeys(seen) if k not in self.registry]
        out = [k for n in names for k in (n, personal(n)) if k in keys]
        return out + [CENTRAL] * (CENTRAL in keys)

    def style(self, key: str) -> dict:
        """Line colour by registry position, the method bold and black, centralised dashed."""
        if key == CENTRAL:
            return {"color": "tab:gray", "lw": 1.4, "ls": "--"}
        if key == self.method:
            return {"color": "black", "lw": 2.4, "ls": "-"}
        names = list(self.registry) + ([key] if key not in self.registry else [])
        return {"color": PALETTE[names.index(key) % len(PALETTE)], "lw": 1.4, "ls": "-"}


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


def _finite(xs) -> list[float]:
    return [x for x in xs if x == x]


def _nanmean(xs) -> float:
    xs = _finite(xs)
    return sum(xs) / len(xs) if xs else math.nan


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
    """task -> row key -> one Curve per seed. Centralised runs (1 client) get the key CENTRAL;
    the personalised models of an aggregator whose rows carry personal_metrics get
    personal(name)."""
    out: dict[str, dict[str, list[Curve]]] = {}
    for run in runs:
        rounds = run.config.get("rounds", 0)
        for agg, rows in run.by_aggregator().items():
            fields = [(CENTRAL, "metrics")] if run.centralised else [
                (agg, "metrics"), (personal(agg), "personal_metrics")]
            for key, field in fields:
                c = curve(rows, run.metric, field, rounds)
                if c:
                    out.setdefault(run.task, {}).setdefault(key, []).append(c)
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


def global_model(key: str) -> bool:
    """A federated global model (not a personalised row, not the centralised reference)."""
    return key != CENTRAL and not key.endswith(PERSONAL)


@dataclass
class Glue:
    """The GLUE stage's runs reduced to what its tables, verdict and headline print."""
    tasks: list[str]                              # task keys, sorted
    task_names: dict[str, str]                    # task -> "SST-2 (accuracy)"
    curves: dict[str, dict[str, list[Curve]]]     # task -> row key -> one Curve per seed
    keys: list[str]                               # row keys in table order
    seeds: list
    majority: dict[str, list[float]]              # task -> one baseline per federated seed
    names: Names

    @classmethod
    def of(cls, runs: list[Run], names: Names) -> Glue:
        curves = glue_curves(runs)
        tasks_ = sorted(curves)
        task_names = {}
        for r in runs:
            task_names.setdefault(r.task, f"{r.task_name} ({r.metric})")
        majority: dict[str, list[float]] = {}
        for r in runs:
            if not r.centralised and r.facts.get("majority_baseline") is not None:
                majority.setdefault(r.task, []).append(r.facts["majority_baseline"])
        keys = names.order(k for t in tasks_ for k in curves[t])
        return cls(tasks_, task_names, curves, keys,
                   sorted({r.config.get("seed") for r in runs}), majority, names)

    @cached_property
    def means(self) -> dict[str, dict[str, dict[str, float]]]:
        """"best" or "final" -> task -> row key -> mean over seeds of that Curve field."""
        return {what: {t: {k: mean_std([getattr(c, what) for c in cs])[0]
                           for k, cs in self.curves[t].items()} for t in self.tasks}
                for what in ("best", "final")}

    def federated(self, what: str, t: str) -> dict[str, float]:
        """Row key -> mean over seeds, for the federated global models only."""
        return {k: v for k, v in self.means[what][t].items() if global_model(k)}

    def table(self, what: str) -> str:
        """Per row key, mean ± std over seeds of the best or final dev metric, the task
        average and the MB per round; then the majority-class row."""
        means, n_seeds = self.means[what], len(self.seeds)
        # bold the best federated value, unless every federated model has the same value
        best_fed = {}
        for t in self.tasks:
            v = list(self.federated(what, t).values())
            best_fed[t] = max(v) if v and max(v) - min(v) > 1e-9 else None
        personalised = {k.removesuffix(PERSONAL) for k in self.keys
                        if k.endswith(PERSONAL)}
        rows = []
        for k in self.keys:
            cells = [fmt_ms([getattr(c, what) for c in self.curves[t].get(k, [])], n_seeds,
                            bold=global_model(k) and best_fed[t] is not None
                            and means[t].get(k) == best_fed[t]) for t in self.tasks]
            avg = [means[t][k] for t in self.tasks if k in means[t]]
            cells.append(f"{sum(avg) / len(avg):.3f}" if len(avg) == len(self.tasks) else "—")
            mb = [c.mb_per_round for t in self.tasks for c in self.curves[t].get(k, [])]
            cells.append(f"{sum(mb) / len(mb):.2f}" if global_model(k) and mb else "—")
            label = self.names.display(k) + (" (global)" if k in personalised else "")
            rows.append([label] + cells)
        if self.majority:
            rows.append(["majority class (constant prediction)"]
                        + [fmt_ms(self.majority[t], n_seeds) if t in self.majority else "—"
                           for t in self.tasks] + ["—", "—"])
        return table(["aggregator"] + [self.task_names[t] for t in self.tasks]
                     + ["task average", "MB / round (up + down)"], rows)

    def versus(self) -> str | None:
        """The method against the baseline on best-over-rounds, one line; None if either is
        not given or not run."""
        m, b, names = self.names.method, self.names.baseline, self.names
        both = [t for t in self.tasks if m in self.curves[t] and b in self.curves[t]]
        if m is None or b is None or not both:
            return None
        wins, ties, losses = [], [], []
        n_min = min(len(self.curves[t][a]) for t in both for a in (m, b))
        for t in both:
            x = [c.best for c in self.curves[t][m]]
            y = [c.best for c in self.curves[t][b]]
            d = mean_std(x)[0] - mean_std(y)[0]
            noise = max(mean_std(x)[1], mean_std(y)[1], 1e-9) if n_min >= 2 else 1e-9
            item = f"{self.task_names[t].split(' (')[0]} {d:+.4f}"
            (ties if abs(d) <= noise else wins if d > 0 else losses).append(item)
        vs = f"**{names.display(m, bold=False)} vs {names.display(b, bold=False)}**"
        if n_min >= 2:
            return (f"- {vs} (best over rounds, difference of means over seeds): ahead by more "
                    f"than one std on {len(wins)} task(s) ({', '.join(wins) or '—'}), behind "
                    f"by more than one std on {len(losses)} ({', '.join(losses) or '—'}), "
                    f"within one std on {len(ties)} ({', '.join(ties) or '—'}).")
        return (f"- {vs} (best over rounds, one seed, so no std): ahead on {len(wins)} task(s) "
                f"({', '.join(wins) or '—'}), behind on {len(losses)} "
                f"({', '.join(losses) or '—'}), equal on {len(ties)} ({', '.join(ties) or '—'}).")

    def verdict(self) -> str:
        """Plain sentences: the method against the baseline, and whether federated training
        learned at all (constant predictions, the majority class, the centralised gap)."""
        lines, best, m = [], self.means["best"], self.names.method
        short = {t: self.task_names[t].split(" (")[0] for t in self.tasks}
        versus = self.versus()
        if versus is None:
            lines.append("- No comparison lines: pass --method and --baseline (two aggregators "
                         "these runs trained).")
        else:
            lines.append(versus)
            rank = []
            for t in self.tasks:
                vals = self.federated("best", t)
                if m not in vals:
                    continue
                better = sum(v > vals[m] + 1e-9 for v in vals.values())
                tied = sum(abs(v - vals[m]) <= 1e-9 for v in vals.values()) - 1
                rank.append(f"{short[t]} {better + 1}/{len(vals)}"
                            + (f" (tied with {tied})" if tied else ""))
            lines.append(f"- {self.names.display(m, bold=False)}'s rank among the federated "
                         f"global models (best over rounds, mean over seeds): {', '.join(rank)}.")
        flat = [short[t] for t in self.tasks if len(self.federated("best", t)) > 1
                and max(self.federated("best", t).values())
                - min(self.federated("best", t).values()) < 1e-9]
        if flat:
            lines.append(f"- On {', '.join(flat)} every federated aggregator scores exactly the "
                         f"same: the global models most likely still predict a constant (the "
                         f"majority class), so this budget cannot rank the aggregators there.")
        near = []
        for t in self.tasks:
            fed = self.federated("best", t)
            if t not in self.majority or not fed:
                continue
            top, base = max(fed.values()), mean_std(self.majority[t])[0]
            if top - base < 0.02:
                central = f", centralised {best[t][CENTRAL]:.3f}" if CENTRAL in best[t] else ""
                near.append(f"{short[t]} (best federated {top:.3f}{central}, majority {base:.3f})")
        if near:
            lines.append(f"- Within 0.02 of the majority-class baseline, so not learned at this "
                         f"budget and not a ranking of the aggregators: {'; '.join(near)}.")
        central = [t for t in self.tasks if CENTRAL in best[t] and self.federated("best", t)]
        if central:
            gaps = [f"{short[t]} {best[t][CENTRAL]:.3f} vs "
                    f"{max(self.federated('best', t).values()):.3f}" for t in central]
            lines.append(f"- Centralised reference vs the best federated global model (best over "
                         f"rounds): {', '.join(gaps)}. Where the federated numbers sit at chance "
                         f"(0.5 accuracy, 0 correlation) or at the majority class while the "
                         f"centralised one does not, the federated budget is too small to learn "
                         f"the task and differences between aggregators are noise.")
        return "\n".join(lines) + "\n"


def head_text(runs: list[Run]) -> str:
    """What the MB column leaves out: the trained non-LoRA head, from the runs' facts."""
    head = next((r.facts["head"] for r in runs if r.facts.get("head")), None)
    kept = sorted({a["display_name"] for r in runs for n, a in r.facts["aggregators"].items()
                   if a.get("private_head") and n in r.by_aggregator()})
    alike = (f"averaged by every method but {', '.join(kept)}, whose clients keep their own"
             if kept else "averaged alike by every method")
    if head is None:
        return f"the trained head, {alike}, is not counted"
    if not head["modules"] or not head["bytes"]:
        return "no parameter outside LoRA is trained"
    return (f"the trained head ({' and '.join(head['modules'])}, {head['bytes'] / 2**20:.2f} MB "
            f"per client each way), {alike}, is not counted")


def personal_text(runs: list[Run]) -> str:
    """What the (personalised) rows are: train.py's --personal-eval, --personal-weighting and
    --head-sharing, from each run's config and facts (a run from before they were recorded:
    each client's model, unweighted mean, averaged head), naming the runs when they differ."""
    protocols: dict[str, list[str]] = {}
    for run in runs:
        ran = run.by_aggregator()
        aggs = [a for n, a in run.facts["aggregators"].items()
                if a.get("personalised") and n in ran]
        if run.centralised or not aggs:
            continue
        if run.config.get("personal_eval", "clients") == "global":
            text = "no row, only the global model is scored (--personal-eval global)"
        else:
            head = ("its own head" if any(a.get("private_head") for a in aggs)
                    else "the averaged head")
            mean = ("mean weighted by the clients' training examples"
                    if run.config.get("personal_weighting") == "data"
                    else "unweighted mean over clients")
            text = (f"each client's own model (the shared factors with its private ones, "
                    f"{head}) on the shared dev set, {mean}, not a single global model")
        protocols.setdefault(text, []).append(os.path.basename(run.path))
    if len(protocols) <= 1:
        text = next(iter(protocols), "each client's own model, not a single global model")
    else:
        text = "; ".join(f"in {', '.join(names)}, {t}" for t, names in protocols.items())
    return f"(personalised): {text}"


def glue_section(results: str, out_dir: str, names: Names) -> str:
    """Best-over-rounds and final dev metric, mean ± std over seeds, and communication."""
    runs = load_runs(results, "glue")
    md = ["## GLUE: every aggregator, mean ± std over seeds\n"]
    if not runs:
        return "\n".join(md) + NOT_RUN.format("runs/glue/")
    g = Glue.of(runs, names)
    fed = next((r for r in runs if not r.centralised), runs[0])
    central = next((r for r in runs if r.centralised), None)
    text = f"Federated setting: {describe(fed.config)}; seeds {g.seeds}."
    if central:
        text += (f" Centralised reference: {describe(central.config)} — one client holding "
                 f"all the training data, seeing as many examples per round as all federated "
                 f"clients together.")
    md.append(text)
    partial = [f"{os.path.basename(r.path)} ({', '.join(r.unfinished())})"
               for r in runs if r.unfinished()]
    md.append("\n" + (f"\n**Unfinished runs** (missing or partly done aggregators; the tables "
                      f"use what exists): {'; '.join(partial)}\n" if partial else ""))
    md.append("**Best dev metric over rounds** (what the authors report):\n")
    md.append(g.table("best"))
    md.append("\n**Final-round dev metric:**\n")
    md.append(g.table("final"))
    md.append("\nBold: the best federated global model per column. MB / round: LoRA factors "
              "sent by all clients to the server plus the server's reply, per round, as "
              f"train.py counts them ({head_text(runs)}); aggregators differ in what they "
              f"send (README's aggregators table). {personal_text(runs)}; (global): the same "
              "aggregator's global model.\n")
    md.append(g.verdict())
    md.append(_glue_figures(g, out_dir))
    return "\n".join(md)


def _glue_figures(g: Glue, out_dir: str) -> str:
    out = []
    for x, name, xlabel in (("rounds", "glue_metric_vs_round.png", "round"),
                            ("mbytes", "glue_metric_vs_bytes.png",
                             "cumulative MB sent (up + down, all clients)")):
        fig, axes = plt.subplots(1, len(g.tasks), figsize=(4 * len(g.tasks), 3.6), squeeze=False)
        for ax, t in zip(axes[0], g.tasks):
            for k in g.keys:
                if k not in g.curves[t] or k.endswith(PERSONAL):
                    continue
                if x == "mbytes" and k == CENTRAL:
                    continue                               # nothing is communicated
                xs, ys = _mean_curve(g.curves[t][k], x)
                ax.plot(xs, ys, label=g.names.display(k, bold=False), marker=".",
                        **g.names.style(k))
            title, metric = g.task_names[t].rstrip(")").split(" (")
            ax.set(title=title, xlabel=xlabel, ylabel=metric)
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
# Regime study (stage 2): where the aggregation error grows, and how much of it the method removes
# ---------------------------------------------------------------------------------------------

# The factors the study varies one at a time around a base setting (config.json keys)
FACTORS = {"local_steps": "local steps", "lr": "client lr", "dirichlet_alpha": "Dirichlet alpha",
           "rank": "LoRA rank", "clients": "clients"}
# The method's variants that --track-solvers records (harness.federation.TRACKED_VARIANTS), in
# the table's order, with their colour and line in the figure
VARIANTS = {"solver_als": ("per-layer", "black", "-"),
            "solver_adamw": ("per-layer, AdamW", "tab:orange", ":"),
            "solver_als_tied": ("tied", "tab:purple", "-"),
            "solver_als_uniform": ("uniform target", "tab:red", "--"),
            "solver_als_tied_uniform": ("tied, uniform target", "tab:brown", "--")}


def factor_value(factor: str, value) -> str:
    return "IID" if factor == "dirichlet_alpha" and not value else f"{value:g}"


@dataclass
class Setting:
    """One tracked run of the regime study: which factor it changes from the base (None: the
    base itself), to what, and the sums over (round, layer) of each relative divergence."""
    name: str                        # the run's folder
    factor: str | None
    value: float
    run: Run
    sums: dict[str, float]           # key -> sum over (round, layer) of the relative divergence
    count: int                       # (round, layer) pairs
    worst: float                     # largest FedIT relative divergence of any (round, layer)

    @property
    def naive(self) -> float:
        """The naive average's (FedIT's update) relative divergence, mean over rounds, layers."""
        return self.sums["naive"] / self.count

    def removed(self, key: str) -> float:
        """Share of FedIT's summed divergence that `key` removes: sum(naive - div) / sum(naive)
        over (round, layer); negative where it does worse than FedIT."""
        return 1 - self.sums[key] / self.sums["naive"]

    def gap_closed(self, key: str, towards: str = "bound") -> float:
        """Share of the gap from FedIT to `towards` (the rank-r bound, or a solver's key: what
        `key` removes as a share of what that one removes) that `key` closes."""
        gap = self.sums["naive"] - self.sums[towards]
        return (self.sums["naive"] - self.sums[key]) / gap if gap > 0 else math.nan


def tracked(run: Run) -> bool:
    return bool(run.rows) and all(k in run.rows[0]["divergence"]["relative_mean"]
                                  for k in ("naive", "bound", *VARIANTS))


def regime_settings(results: str) -> list[Setting]:
    """The study's tracked runs, each placed against the base setting: that of the run in
    runs/regime/base/ (reproduce.sh's name for it), else the most common value of each factor
    among the runs. Each run may change one factor."""
    runs = [r for r in load_runs(results, "regime") if tracked(r)]
    if not runs:
        return []
    named = [r.config for r in runs if os.path.basename(r.path) == "base"]
    base = {f: named[0][f] if named else
            max((r.config[f] for r in runs), key=[r.config[f] for r in runs].count)
            for f in FACTORS}
    out = []
    for run in runs:
        changed = [f for f in FACTORS if run.config[f] != base[f]]
        if len(changed) > 1:
            raise ValueError(f"{run.path} changes {', '.join(changed)} from the base setting "
                             f"{base}: the regime study varies one factor at a time")
        factor = changed[0] if changed else None
        cells = [layer for row in run.rows
                 for layer in row["divergence"]["relative_per_layer"].values()]
        sums = {k: sum(c[k] for c in cells) for k in ("naive", "bound", *VARIANTS)}
        out.append(Setting(os.path.basename(run.path), factor,
                           run.config[factor] if factor else math.nan, run, sums, len(cells),
                           max(c["naive"] for c in cells)))
    return out


def largest_error(results: str, n: int) -> list[str]:
    """The folders of the n regime-study runs with the largest FedIT divergence (mean over
    rounds and layers): where reproduce.sh's stage 2 compares accuracy over seeds."""
    return [s.name for s in sorted(regime_settings(results), key=lambda s: -s.naive)[:n]]


def _sweeps(settings: list[Setting]) -> dict[str, list[tuple[float, Setting]]]:
    """factor -> (value, setting) along it, the base included, by value (IID last)."""
    base = [s for s in settings if s.factor is None]
    order = lambda f, v: math.inf if f == "dirichlet_alpha" and not v else v   # noqa: E731
    out = {}
    for f in FACTORS:
        along = [(s.value, s) for s in settings if s.factor == f]
        if along:
            along += [(s.run.config[f], s) for s in base]
            out[f] = sorted(along, key=lambda vs: order(f, vs[0]))
    return out


def regime_accuracy(results: str, settings: list[Setting]) -> dict[str, dict[str, list[Curve]]]:
    """Setting name -> aggregator -> one Curve per seed, for the settings that have runs of
    more than one seed (the accuracy comparison). Untracked runs join the tracked run with the
    same factors; the tracked run's own aggregator (FedIT) counts as its seed."""
    by_key = {tuple(s.run.config[f] for f in FACTORS): s.name for s in settings}
    curves: dict[str, dict[str, list[Curve]]] = {}
    for run in load_runs(results, "regime"):
        name = by_key.get(tuple(run.config[f] for f in FACTORS))
        if name is None:
            continue
        for agg, rows in run.by_aggregator().items():
            c = curve(rows, run.metric, total_rounds=run.config.get("rounds", 0))
            if c:
                curves.setdefault(name, {}).setdefault(agg, []).append(c)
    return {k: v for k, v in curves.items() if max(len(cs) for cs in v.values()) > 1}


def regime_section(results: str, out_dir: str, names: Names) -> str:
    """Per setting, FedIT's divergence, the bound, and the share each FLoRA-NA variant removes;
    one figure; at the settings with the largest error, accuracy over seeds."""
    settings = regime_settings(results)
    md = ["## Regime study: where the aggregation error grows, and how much of it is removed\n"]
    if not settings:
        return "\n".join(md) + NOT_RUN.format("runs/regime/ (with --track-solvers)")
    if names.method is None or names.baseline is None:
        return "\n".join(md) + NEEDS.format("--method and --baseline")
    M, B = names.display(names.method, bold=False), names.display(names.baseline, bold=False)
    base = next((s for s in settings if s.factor is None), None)
    if base is None:                     # the base run has not finished: describe another's
        ref = settings[0]
        described = (describe({**ref.run.config, ref.factor: "?"}) + f" (the base run itself "
                     f"has not written results yet; {FACTORS[ref.factor]} unknown)")
    else:
        ref, described = base, describe(base.run.config)
    rounds = ref.run.config["rounds"]
    L = len(ref.run.rows[0]["divergence"]["relative_per_layer"])
    sweeps = _sweeps(settings)
    varied = "; ".join(f"{FACTORS[f]} " + ", ".join(factor_value(f, v) for v, _ in along)
                       for f, along in sweeps.items())
    scalings = {s.run.config["lora_alpha"] / s.run.config["rank"] for s in settings}
    scaling = f"; LoRA alpha = {scalings.pop():g} r" if len(scalings) == 1 else ""
    md.append(f"{ref.run.task_name}, {B} trained; base setting: {described}. "
              f"Each other setting changes one factor ({varied}{scaling}). Every "
              f"round the server also solved {M} on the same client uploads (ALS solver; one "
              f"(P, Q) per layer or one tied across all {L} LoRA layers; fitted to the "
              f"data-weighted mean M = Σ_u p_u B_u A_u or, as the authors' released code does, "
              f"to the uniform mean (1/U) Σ_u B_u A_u; and per layer with the AdamW solver at "
              f"solve_flora_na's defaults) and computed the rank-r bound. Every divergence is ||M - B̂Â||_F / "
              f"||M||_F against the data-weighted M, per layer and round (rounds 1–{rounds}).\n")
    variants = list(VARIANTS)
    rows = []
    for s in [base] * bool(base) + [s for along in sweeps.values() for _, s in along if s.factor]:
        final = next((metric_value(r["metrics"], s.run.metric) for r in reversed(s.run.rows)
                      if r.get("metrics")), None)
        rows.append(["base" if s.factor is None else FACTORS[s.factor],
                     "—" if s.factor is None else factor_value(s.factor, s.value),
                     f"{s.naive:.3f} ({s.worst:.3f})", f"{s.sums['bound'] / s.count:.3f}",
                     f"{100 * s.removed('bound'):.0f}%"]
                    + [f"{100 * s.removed(k):.1f}%" for k in variants]
                    + [f"{100 * s.gap_closed('solver_als'):.0f}%",
                       "—" if final is None else f"{final:.3f}"])
    md.append(table(["factor", "value", f"{B} rel. div. mean (max)", "rank-r bound",
                     "bound removes"] + [VARIANTS[k][0] for k in variants]
                    + ["gap closed (per-layer)", f"{B} final dev {ref.run.metric}"],
                    rows, "ll" + "r" * (5 + len(variants))))
    majority = ref.run.facts.get("majority_baseline")
    md.append(f"\nMeans are over rounds and layers (max: the largest (round, layer)). The "
              f"columns from \"{VARIANTS[variants[0]][0]}\" to \"{VARIANTS[variants[-1]][0]}\" "
              f"give the share of {B}'s relative divergence, summed over (round, layer), that "
              f"each variant of {M} removes: Σ(div_{B} - div_X) / Σ div_{B}; a negative share is "
              f"an update worse than {B}'s. The gap closed is Σ(div_{B} - div_X) / Σ(div_{B} - "
              f"div_bound) for the per-layer solver. The last column checks that the runs learn"
              + (f" (majority class of the dev subset: {majority:.3f})" if majority else "")
              + ".\n")
    md.append(f"![regime study]({_regime_figure(settings, out_dir, names)})\n")
    md.append(_regime_verdict(settings, names))
    md.append(_regime_accuracy_table(results, settings, names))
    return "\n".join(md)


def _regime_figure(settings: list[Setting], out_dir: str, names: Names) -> str:
    """Top: the baseline's divergence, the method's per-layer one and the bound, per factor;
    bottom: the share of the baseline's divergence each variant removes, and of the gap."""
    sweeps = _sweeps(settings)
    M, B = names.display(names.method, bold=False), names.display(names.baseline, bold=False)
    fig, axes = plt.subplots(2, len(sweeps), figsize=(3.3 * len(sweeps), 6.4), squeeze=False,
                             sharey="row")
    for col, (f, along) in enumerate(sweeps.items()):
        xs, values, along = range(len(along)), [v for v, _ in along], [s for _, s in along]
        top, bottom = axes[0][col], axes[1][col]
        top.plot(xs, [s.naive for s in along], marker="o", color=names.style(names.baseline)[
            "color"], label=f"{B} (naive average)")
        top.plot(xs, [s.sums["solver_als"] / s.count for s in along], marker=".",
                 color="black", lw=2, label=f"{M}, per-layer")
        top.plot(xs, [s.sums["bound"] / s.count for s in along], marker=".", color="tab:green",
                 label="rank-r bound")
        for k, (label, color, ls) in VARIANTS.items():
            bottom.plot(xs, [100 * s.removed(k) for s in along], marker=".", color=color, ls=ls,
                        lw=2 if k == "solver_als" else 1.4, label=f"{M}, {label}")
        bottom.plot(xs, [100 * s.gap_closed("solver_als") for s in along], marker="x",
                    color="gray", ls="-.", label=f"{M}, per-layer: % of the gap to the bound")
        bottom.plot(xs, [100 * s.removed("bound") for s in along], marker=".", color="tab:green",
                    label="rank-r bound")
        bottom.axhline(0, color="black", lw=0.6)
        for ax in (top, bottom):
            ax.set_xticks(xs, [factor_value(f, v) + ("*" if s.factor is None else "")
                               for v, s in zip(values, along)])
            ax.grid(alpha=0.3)
        bottom.set_xlabel(FACTORS[f] + " (* base)")
    axes[0][0].set_ylabel("rel. divergence\n(mean over rounds, layers)")
    axes[1][0].set_ylabel(f"% of {B}'s divergence removed\n(below -20%: off the axis, "
                          f"see the table)")
    axes[1][0].set_ylim(max(-20, axes[1][0].get_ylim()[0]), min(100, axes[1][0].get_ylim()[1]))
    legend = {}
    for ax in (axes[0][0], axes[1][0]):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=4, fontsize=7)
    fig.suptitle(f"{B}'s aggregation error and the share {M} removes, one factor at a time")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(os.path.join(out_dir, "regime.png"), dpi=110)
    plt.close(fig)
    return f"{FIG}regime.png"


def _regime_verdict(settings: list[Setting], names: Names) -> str:
    """Plain sentences: where the baseline's error is largest and smallest, and the range of
    what the method's per-layer solver removes against what the bound allows."""
    M, B = names.display(names.method, bold=False), names.display(names.baseline, bold=False)
    label = lambda s: ("the base setting" if s.factor is None       # noqa: E731
                       else f"{FACTORS[s.factor]} {factor_value(s.factor, s.value)}")
    by_error = sorted(settings, key=lambda s: -s.naive)
    removed = [s.removed("solver_als") for s in settings]
    bound = [s.removed("bound") for s in settings]
    uniform = [s.removed("solver_als_uniform") for s in settings]
    # AdamW (the paper's optimiser family, flora_na's whitened one) against the ALS optimum
    adamw = [s.gap_closed("solver_adamw", towards="solver_als") for s in settings]
    adamw = [a for a in adamw if not math.isnan(a)]
    return (f"{B}'s relative divergence is largest at {label(by_error[0])} "
            f"({by_error[0].naive:.3f})"
            + (f" and {label(by_error[1])} ({by_error[1].naive:.3f})" if len(by_error) > 1 else "")
            + f", smallest at {label(by_error[-1])} ({by_error[-1].naive:.3f}). {M} (per-layer) "
              f"removes {100 * min(removed):.1f}% to {100 * max(removed):.1f}% of it across "
              f"settings, where the rank-r bound would allow {100 * min(bound):.0f}% to "
              f"{100 * max(bound):.0f}%; fitted to the uniform mean it removes "
              f"{100 * min(uniform):.0f}% to {100 * max(uniform):.0f}% (negative: worse than "
              f"{B})"
            + (f"; its AdamW solver (defaults) removes {100 * min(adamw):.1f}% to "
               f"{100 * max(adamw):.1f}% of what the per-layer ALS optimum removes" if adamw else "")
            + ".\n")


def _regime_accuracy_table(results: str, settings: list[Setting], names: Names) -> str:
    """At the settings with runs of several seeds: best and final dev metric of the method and
    the baseline, mean ± std over seeds, and their difference against the seeds' std."""
    acc = regime_accuracy(results, settings)
    m, b = names.method, names.baseline
    if not acc:
        return "\n_No accuracy comparison over seeds yet (it follows the sweep in stage 2)._\n"
    by_name = {s.name: s for s in settings}
    metric = settings[0].run.metric
    rows, lines = [], []
    for name, curves in sorted(acc.items(), key=lambda kv: -by_name[kv[0]].naive):
        s = by_name[name]
        label = ("base" if s.factor is None else f"{FACTORS[s.factor]} "
                 f"{factor_value(s.factor, s.value)}")
        n = max(len(cs) for cs in curves.values())
        cells = []
        for agg in (b, m):
            cs = curves.get(agg, [])
            cells += [fmt_ms([c.best for c in cs], n), fmt_ms([c.final for c in cs], n)]
        rows.append([label, f"{s.naive:.3f}"] + cells)
        if curves.get(m) and curves.get(b):
            (mb, sb), (mm, sm) = (mean_std([c.best for c in curves[x]]) for x in (b, m))
            d, noise = mm - mb, max(sb, sm)
            lines.append(f"{label}: {d:+.3f} best-over-rounds ("
                         + ("within" if abs(d) <= noise else "beyond")
                         + f" one std, {noise:.3f})")
    M, B = names.display(m, bold=False), names.display(b, bold=False)
    return ("\n**Accuracy where the error is largest** (the settings stage 2 picked with "
            f"`largest_error`; {metric}, mean ± std over seeds; {B}'s seed 0 is the tracked run "
            "above):\n\n"
            + table(["setting", f"{B} rel. div.", f"{B} best", f"{B} final", f"{M} best",
                     f"{M} final"], rows)
            + f"\n{M} - {B}: " + "; ".join(lines) + ".\n")


# ---------------------------------------------------------------------------------------------
# Solver benchmark (stage 5) and generation (stage 6)
# ---------------------------------------------------------------------------------------------


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
                    + ["speed-up", "rel. divergence", "same, dense fp64 check",
                       "naive rel. div.", "rank-r bound", "peak extra MiB"], rows))
    md.append(f"\nSpeed-up target (>= 1000x for the default call, Gram ALS without the bound): "
              f"{'met' if b.get('speedup_target_met') else 'NOT met'}. Total runtime "
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


def generation_section(results: str, out_dir: str, names: Names) -> str:
    """Federated generation tasks: final score with the size of the evaluated subset."""
    runs = load_runs(results, "generation")
    title = " / ".join(dict.fromkeys(r.task_name for r in runs)) or "GSM8K"
    md = [f"## Generation: federated {title}\n"]
    if not runs:
        return "\n".join(md) + NOT_RUN.format("runs/generation/")
    md.append(f"{describe(runs[0].config)}; greedy decoding, at most "
              f"{runs[0].config.get('max_new_tokens')} new tokens.\n")
    pairs = [(run, agg) for run in runs for agg in run.by_aggregator()]
    order = names.order(agg for _, agg in pairs)
    rows, n_evals = [], []
    for run, agg in sorted(pairs, key=lambda p: (p[0].task, order.index(p[1]))):
        rws, task = run.by_aggregator()[agg], f"{run.task_name} ({run.metric})"
        ev = [r for r in rws if metric_value(r.get("metrics"), run.metric) is not None]
        if not ev:
            rows.append([names.display(agg), task, "not evaluated yet", f"{rws[-1]['round']}",
                         f"{rws[-1]['train_loss']:.3f}"])
            continue
        value, n = metric_value(ev[-1]["metrics"], run.metric), int(ev[-1]["metrics"].get("n_eval", 0))
        n_evals.append(n)
        rows.append([names.display(agg), task, f"{value:.3f} ({round(value * n)}/{n})",
                     f"{ev[-1]['round']}",
                     f"{rws[0]['train_loss']:.3f} → {rws[-1]['train_loss']:.3f}"])
    md.append(table(["aggregator", "task", "score (correct / evaluated)", "after round",
                     "train loss first → last round"], rows))
    if n_evals and min(n_evals) < 200:
        md.append(f"\nWith {min(n_evals)} test problems one problem is "
                  f"{100 / max(1, min(n_evals)):.1f} points: this stage shows the generation "
                  f"pipeline works end to end; it is not evidence for or against the paper's "
                  f"GSM8K claim (LLaMA-2-7B: FLoRA-NA 42.89%, FedIT 35.68%, FedSA-LoRA 28.82%).\n")
    return "\n".join(md)


# ---------------------------------------------------------------------------------------------
# Mixed ranks (stage 7)
# ---------------------------------------------------------------------------------------------


def mixed_rank_key(run: Run, agg: str) -> tuple[int, str]:
    """(0, aggregator) for a run whose clients have mixed ranks, (rank, aggregator) for an
    equal-rank reference: rows sort mixed first, then references by rank."""
    return (0 if run.mixed_ranks else run.config["rank"], agg)


def mixed_ranks_section(results: str, out_dir: str, names: Names) -> str:
    """Clients of different ranks: every mixed-rank aggregator and the equal-rank references,
    mean +- std over seeds, bytes per round, and the divergence of each server update."""
    runs = load_runs(results, "mixed_ranks")
    md = ["## Mixed ranks: clients of different LoRA ranks\n"]
    if not runs:
        return "\n".join(md) + NOT_RUN.format("runs/mixed_ranks/")
    mixed = [r for r in runs if mixed_rank_key(r, "")[0] == 0]
    task, metric = runs[0].task_name, runs[0].metric
    profiles = sorted({r.config.get("rank_profile") or r.config.get("client_ranks") for r in mixed})
    ranks = sorted(r for run in mixed for r in run.facts["client_ranks"])
    counts = ", ".join(f"{ranks.count(q) / len(mixed):g} x rank {q}" for q in sorted(set(ranks)))
    seeds = sorted({r.config.get("seed") for r in runs})
    md.append(f"{task}, {metric}; {describe(runs[0].config)}; client ranks from the "
              f"{' / '.join(map(str, profiles))} profile ({counts} per run; the global model has "
              f"rank {mixed[0].config['rank'] if mixed else '—'}); references: every client at "
              f"one rank. Seeds {seeds}; majority-class {metric} "
              f"{runs[0].facts['majority_baseline']:.3f}.\n")
    partial = [f"{os.path.basename(r.path)} ({', '.join(r.unfinished())})"
               for r in runs if r.unfinished()]
    if partial:
        md.append(f"**Unfinished runs** (the table uses what exists): {'; '.join(partial)}\n")
    # (kind, aggregator) -> per seed: best, final, MB per round, and per-round mean relative
    # divergences of the update sent (and the references on the same uploads)
    cells: dict[tuple[int, str], list[dict]] = {}
    for run in runs:
        for agg, rows in run.by_aggregator().items():
            c = curve(rows, metric, total_rounds=run.config.get("rounds", 0))
            if c is None:
                continue
            div = [r["divergence"]["relative_mean"] for r in rows]
            cells.setdefault(mixed_rank_key(run, agg), []).append({
                "best": c.best, "final": c.final,
                "mb": (rows[-1]["bytes_up"] + rows[-1]["bytes_down"]) / len(rows) / 2**20,
                "div": div})
    small = min(ranks) if ranks else None
    mean_div = lambda xs, k: _nanmean([_nanmean([d.get(k, math.nan) for d in x["div"]])  # noqa: E731
                                      for x in xs])
    registry = list(names.registry)
    order = sorted(cells, key=lambda k: (k[0], registry.index(k[1]) if k[1] in registry
                                         else len(registry)))
    rows = []
    for key in order:
        xs, (kind, agg) = cells[key], key
        label = names.display(agg) + (" (mixed ranks)" if kind == 0 else f", all rank {kind}")
        fmt = lambda k: f"{mean_div(xs, k):.3f}" if mean_div(xs, k) == mean_div(xs, k) else "—"  # noqa: E731
        rows.append([label, fmt_ms([x["best"] for x in xs], len(seeds)),
                     fmt_ms([x["final"] for x in xs], len(seeds)),
                     f"{_nanmean([x['mb'] for x in xs]):.2f}", fmt("aggregate"), fmt("naive"),
                     fmt("bound"), fmt(f"client_r{small}"), fmt(f"bound_r{small}")])
    md.append(table(["aggregator", f"best {metric}", f"final {metric}", "MB / round",
                     "rel. div.", "zero-pad rel. div.", "rank-R bound",
                     f"rank-{small} client's rel. div.", f"rank-{small} bound"], rows))
    md.append(f"Mean ± std over seeds. Divergences are ||M - update|| / ||M|| with M = Σ_u p_u "
              f"s_u B_u A_u (each client's own LoRA scaling s_u = alpha / r_u), the mean over "
              f"rounds and layers: of the rank-R update the aggregator sends (FLoRA's is exact: it "
              f"merges M into W), of zero-padded FedIT on the same uploads, of the best rank-R "
              f"update, and of what a client of rank {small} applies (the first {small} "
              f"components) against the best rank-{small} update. MB / round: uploads + "
              f"downloads of all clients, each at its own rank.\n")
    fig, (ax_acc, ax_div) = plt.subplots(1, 2, figsize=(11, 4))
    best = [mean_std([x["best"] for x in cells[k]]) for k in order]
    ax_acc.barh(range(len(order)), [b[0] for b in best], xerr=[b[1] for b in best], capsize=3,
                color=[names.style(k[1])["color"] for k in order])
    ax_acc.set_yticks(range(len(order)), [r[0].replace("**", "") for r in rows], fontsize=8)
    ax_acc.axvline(runs[0].facts["majority_baseline"], color="gray", ls=":", label="majority class")
    ax_acc.set_xlabel(f"best dev {metric} (mean ± std over seeds)")
    ax_acc.invert_yaxis()
    ax_acc.legend(fontsize=8)
    for kind, agg in (k for k in order if k[0] == 0):
        xs = cells[(kind, agg)]
        n = min(len(x["div"]) for x in xs)
        series = [_nanmean([x["div"][i].get("aggregate", math.nan) for x in xs]) for i in range(n)]
        ax_div.plot(range(1, n + 1), series, label=names.display(agg, bold=False),
                    **names.style(agg))
    mixed_cells = [x for (kind, _), xs in cells.items() if kind == 0 for x in xs]
    if mixed_cells:
        n = min(len(x["div"]) for x in mixed_cells)
        for k, ls, text in (("bound", "--", "rank-R bound"),
                            (f"bound_r{small}", ":", f"rank-{small} bound")):
            ax_div.plot(range(1, n + 1), [_nanmean([x["div"][i].get(k, math.nan)
                                                    for x in mixed_cells]) for i in range(n)],
                        color="tab:gray", ls=ls, label=text)
    ax_div.set_xlabel("round")
    ax_div.set_ylabel("mean rel. divergence of the update sent")
    ax_div.set_yscale("symlog", linthresh=1e-3)
    ax_div.grid(alpha=0.3)
    ax_div.legend(fontsize=8)
    md.append(f"![mixed ranks]({savefig(fig, out_dir, 'mixed_ranks.png')})\n")
    return "\n".join(md)


# ---------------------------------------------------------------------------------------------
# Where each section came from
# ---------------------------------------------------------------------------------------------


def stage_provenance(results: str, folder: str) -> tuple[str, str]:
    """(commits, machines) that produced the results under runs/<folder>/, from each run's
    provenance.jsonl (a line per start and resume) or the "machine" of a JSON file there (the
    benchmark's); runs from before provenance was recorded are counted as such."""
    root = os.path.join(results, "runs", folder)
    records, unrecorded = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.json"))):
        with open(path) as f:
            machine = json.load(f).get("machine")
        if machine is not None:
            records.append(machine)
    for run in sorted(glob.glob(os.path.join(root, "*", "config.json"))):
        path = os.path.join(os.path.dirname(run), "provenance.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                records += [json.loads(line) for line in f if line.strip()]
        else:
            unrecorded += 1
    commits = sorted({provenance.describe_commit(r.get("git_commit"), r.get("git_dirty", False))
                      for r in records})
    machines = sorted({f"{r.get('device_name', '?')} ({r.get('cpu_count', '?')} cores)"
                       for r in records})
    cells = [f"`{c}`" for c in commits] + [f"not recorded for {unrecorded} run(s)"] * bool(unrecorded)
    return ", ".join(cells) or "—", "; ".join(machines) or "—"


def stage_times(results: str) -> dict[str, list[str]]:
    """stage -> the stage_times.tsv line of the latest reproduce.sh run of it that did the
    work (a rerun that found every run done takes seconds): [stage, name, status, seconds,
    finished] and, since reproduce.sh records them, [mode, jobs, threads, command]."""
    path, latest = os.path.join(results, "stage_times.tsv"), {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                p = line.rstrip("\n").split("\t")
                if len(p) >= 5 and (int(p[3]) >= 10 or p[0] not in latest):
                    latest[p[0]] = p
    return latest


def provenance_line(results: str, stage: str, folder: str, pipeline: dict) -> str:
    """One italic line under a section's heading: the reproduce.sh stage and command, mode,
    parallelism, git commit(s), machine(s), and when the stage finished after how long. The
    mode, parallelism and command come from the stage's own line in stage_times.tsv, or from
    pipeline.json (the latest invocation) for a line written before reproduce.sh recorded them."""
    commits, machines = stage_provenance(results, folder)
    p = stage_times(results).get(stage)
    if p is None:
        return (f"_Runs found under `runs/{folder}/` with no reproduce.sh record of stage "
                f"{stage}: code of commit {commits} on {machines}._")
    if len(p) >= 9:
        mode, jobs, threads, command = p[5:9]
    else:
        mode = pipeline.get("mode", "unknown") + (" TINY" if pipeline.get("tiny") else "")
        jobs, threads, command = pipeline.get("jobs", "?"), pipeline.get("threads", "?"), \
            "bash reproduce.sh"
    status = "" if p[2] == "ok" else f" (status: {p[2]})"
    return (f"_Stage {stage} ({p[1]}) of `{command}`, {mode} mode, {jobs} parallel run(s) x "
            f"{threads} torch thread(s): code of commit {commits} on {machines}; finished "
            f"{p[4]} after {int(p[3]) / 60:.1f} min{status}._")


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
    latest, rows = stage_times(results), []
    folders = {s.stage: s.folder for s in SECTIONS}
    for stage in sorted(set(latest) | set(folders)):
        commits, machines = stage_provenance(results, folders[stage]) if stage in folders \
            else ("—", "—")
        p = latest.get(stage)
        if p is None and commits == "—":
            continue
        rows.append([f"{stage} {p[1] if p else folders[stage]}", p[2] if p else "—",
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


# ---------------------------------------------------------------------------------------------
# The sections, the whole report, the headline, and writing them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One section of the report: its marker name on the results page, the reproduce.sh stage
    and the folder under runs/ its results come from, and the function that writes it."""
    key: str
    stage: str
    folder: str
    write: Callable[[str, str, Names], str]      # (results, out_dir, names) -> markdown

    def present(self, results: str) -> bool:
        """Whether runs/<folder>/ holds results (a run's metrics row, or a JSON file): only
        then is the section's block on the results page rewritten."""
        root = os.path.join(results, "runs", self.folder)
        return bool(glob.glob(os.path.join(root, "*.json"))) or any(
            os.path.getsize(m) > 0 for m in glob.glob(os.path.join(root, "*", "metrics.jsonl")))


# In page order. A new section: its function, and one line here.
SECTIONS = [Section("regime", "2", "regime", regime_section),
            Section("glue", "3", "glue", glue_section),
            Section("bench", "5", "bench", bench_section),
            Section("generation", "6", "generation", generation_section),
            Section("mixed_ranks", "7", "mixed_ranks", mixed_ranks_section)]

QUICK_NOTE = ("QUICK mode is a CPU-sized stand-in for the paper's experiments: a 6-layer MiniLM "
              "instead of RoBERTa-large, a few rounds of a few local steps, capped train and dev "
              "sets. It checks that every method runs and shows the divergence effect, but its "
              "accuracy numbers are not comparable with the paper's, and differences smaller "
              "than the std over seeds are noise. `MODE=FULL bash reproduce.sh` runs the "
              "paper-scale commands on a GPU.\n")


@dataclass
class Report:
    """The whole report (markdown, figure links as {FIG}name.png); the blocks of the sections
    whose stage has results, for the results page; README's headline (None without GLUE runs)."""
    body: str
    blocks: dict[str, str]                 # section key -> its markdown, heading first
    headline: str | None


def _pipeline(results: str) -> dict:
    path = os.path.join(results, "pipeline.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def all_runs(results: str) -> list[Run]:
    return [r for s in SECTIONS for r in load_runs(results, s.folder)]


def headline(results: str, names: Names, page: str = "RESULTS.md") -> str | None:
    """A few lines for the README, or None without GLUE runs: the GLUE best-over-rounds table
    with the commit and mode it came from, the method against the baseline, and the divergence
    it removes (when the divergence study has runs too)."""
    pipeline, runs = _pipeline(results), load_runs(results, "glue")
    if not runs:
        return None
    g = Glue.of(runs, names)
    fed = next((r for r in runs if not r.centralised), runs[0])
    md = [f"From `bash reproduce.sh` in {pipeline.get('mode', 'unknown')} mode"
          + (" (TINY: meaningless numbers)" if pipeline.get("tiny") else
             " (a CPU-sized stand-in for the paper's experiments, not comparable with its "
             "numbers)" if pipeline.get("mode") == "QUICK" else "")
          + f", code of commit {stage_provenance(results, 'glue')[0]}; all tables, figures, "
            f"calibration and limits in [{page}]({page}). Best dev metric over rounds, mean ± "
            f"std over seeds {g.seeds}; federated: {describe(fed.config)}.\n",
          g.table("best")]
    if any(k.endswith(PERSONAL) for k in g.keys):
        md.append(f"- {personal_text(runs)}.")
    versus = g.versus()
    if versus:
        md.append(versus)
    settings = regime_settings(results)
    if settings and names.method is not None and names.baseline is not None:
        md.append(f"- Aggregation error (stage 2, code of commit "
                  f"{stage_provenance(results, 'regime')[0]}): "
                  + _regime_verdict(settings, names).strip())
    return "\n".join(md) + "\n"


def build_report(results: str, out_dir: str, method: str | None = None,
                 baseline: str | None = None, page: str = "RESULTS.md") -> Report:
    """Every section of the report, each with its provenance line under the heading, its PNGs
    written to out_dir, and the headline."""
    names = Names.of(all_runs(results), method, baseline)
    pipeline = _pipeline(results)
    texts, blocks = [], {}
    for s in SECTIONS:
        heading, rest = s.write(results, out_dir, names).split("\n", 1)
        if s.present(results):
            rest = "\n" + provenance_line(results, s.stage, s.folder, pipeline) + "\n" + rest
            blocks[s.key] = heading + "\n" + rest
        texts.append(heading + "\n" + rest)
    mode = pipeline.get("mode", "unknown") + (" / TINY" if pipeline.get("tiny") else "")
    head = [f"# FLoRA-NA reproduction report ({mode})\n"]
    if pipeline.get("mode") == "QUICK" or pipeline.get("tiny"):
        head.append(QUICK_NOTE)
    return Report("\n".join(head + texts + [run_section(results, pipeline)]), blocks,
                  headline(results, names, page))


def write_between(path: str, text: str, markers: tuple[str, str]) -> bool:
    """Replace what lies between the two markers in the file; False (untouched) without them."""
    start, end = markers
    with open(path) as f:
        old = f.read()
    if start not in old or end not in old:
        return False
    new = old[:old.index(start) + len(start)] + "\n" + text.strip() + "\n" + old[old.index(end):]
    with open(path, "w") as f:
        f.write(new)
    return True


def section_markers(key: str) -> tuple[str, str]:
    return f"<!-- results:{key}:start -->", f"<!-- results:{key}:end -->"


def write_sections(path: str, blocks: dict[str, str]) -> list[str]:
    """Write each block between its section's markers on the results page, leaving every
    other block (a stage with no results here) as it is. A section whose markers the page
    lacks is added with them right after the nearest earlier section on the page (or before
    the nearest later one); a page with no section markers at all, or with only one marker of
    a pair, is left unchanged for that section. Returns one message per section."""
    with open(path) as f:
        page = f.read()
    order, messages = [s.key for s in SECTIONS], []
    for key, text in blocks.items():
        start, end = section_markers(key)
        block = f"{start}\n{text.strip()}\n{end}"
        found = (page.count(start), page.count(end))
        if found == (1, 1) and page.index(start) < page.index(end):
            page = page[:page.index(start)] + block + page[page.index(end) + len(end):]
            messages.append(f"updated section {key!r}")
            continue
        if found != (0, 0):
            messages.append(f"section {key!r} NOT written: {path} has {found[0]} {start} and "
                            f"{found[1]} {end} (expected one of each, start first); fix the page")
            continue
        i = order.index(key)
        before = [k for k in reversed(order[:i]) if section_markers(k)[1] in page]
        after = [k for k in order[i + 1:] if section_markers(k)[0] in page]
        if before:
            at = page.index(section_markers(before[0])[1]) + len(section_markers(before[0])[1])
            page = page[:at] + "\n\n" + block + page[at:]
            messages.append(f"added section {key!r} after section {before[0]!r}")
        elif after:
            at = page.index(section_markers(after[0])[0])
            page = page[:at] + block + "\n\n" + page[at:]
            messages.append(f"added section {key!r} before section {after[0]!r}")
        else:
            messages.append(f"section {key!r} NOT written: {path} has no results section "
                            f"markers to place it by; add {start} ... {end} where it belongs")
    with open(path, "w") as f:
        f.write(page)
    return messages


def demote(markdown: str) -> str:
    """A section as the results page holds it: one heading level down."""
    return re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", markdown, flags=re.M)


def main(args: Args) -> None:
    os.makedirs(args.results, exist_ok=True)
    page = args.page or "RESULTS.md"
    report = build_report(args.results, args.results, args.method, args.baseline,
                          os.path.relpath(page, os.path.dirname(os.path.abspath(args.readme)))
                          if args.readme else page)
    path = os.path.join(args.results, "REPORT.md")
    with open(path, "w") as f:
        f.write(report.body.replace(FIG, ""))
    print(f"wrote {path} and its figures in {args.results}/")
    if args.page:
        figures = os.path.join(os.path.dirname(os.path.abspath(args.page)), "figures")
        os.makedirs(figures, exist_ok=True)
        blocks = {k: demote(v).replace(FIG, "figures/") for k, v in report.blocks.items()}
        for png in re.findall(re.escape(FIG) + r"([\w.-]+\.png)", "".join(report.blocks.values())):
            shutil.copy(os.path.join(args.results, png), figures)
        skipped = [s.key for s in SECTIONS if s.key not in blocks]
        for message in write_sections(args.page, blocks) if blocks else []:
            print(f"{args.page}: {message}")
        if skipped:
            print(f"{args.page}: left as they are (no results for their stage here): "
                  f"{', '.join(skipped)}")
    if args.readme:
        if report.headline is None:
            print(f"{args.readme}: headline left as it is (no GLUE runs here)")
        elif write_between(args.readme, report.headline, HEADLINE_MARKERS):
            print(f"updated the headline of {args.readme}")
        else:
            print(f"{args.readme} has no {' / '.join(HEADLINE_MARKERS)} markers: left unchanged")


if __name__ == "__main__":
    main(tyro.cli(Args))
