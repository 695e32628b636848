"""The GLUE section (reproduce.sh stage 3): every aggregator's best and final dev metric, mean
± std over seeds, the bytes each sends, the method against the baseline, and two figures."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

from evidence.report_common import (CENTRAL, FIG, NOT_RUN, PERSONAL, Curve, Names, Run, curve,
                                    describe, fmt_ms, load_runs, mean_std, personal, plt, table)


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
            best_fed[t] = max(v) if v and max(v) - min(v) > 1e-9 and not self.names.smoke else None
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
    md.append("\n" + ("" if names.smoke else "Bold: the best federated global model per column. ")
              + "MB / round: LoRA factors "
              "sent by all clients to the server plus the server's reply, per round, as "
              f"train.py counts them ({head_text(runs)}); aggregators differ in what they "
              f"send (README's aggregators table). {personal_text(runs)}; (global): the same "
              "aggregator's global model.\n")
    if not names.smoke:
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
