"""The regime study's section (reproduce.sh stage 2): where the baseline's aggregation error
grows, one factor at a time, and how much of it the method's variants remove; then accuracy over
seeds at the settings with the largest error."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from evidence.report_common import (FIG, NEEDS, NOT_RUN, Curve, Names, Run, curve, describe,
                                    fmt_ms, load_runs, mean_std, metric_value, plt, table)


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


def regime_seed_runs(results: str, settings: list[Setting]):
    """(setting name, aggregator, its rows, its Curve) for every aggregator of every stage-2 run
    at one of `settings` that has a curve: untracked runs join the tracked run with the same
    factors; the tracked run's own aggregator (FedIT) counts as its seed."""
    by_key = {tuple(s.run.config[f] for f in FACTORS): s.name for s in settings}
    for run in load_runs(results, "regime"):
        name = by_key.get(tuple(run.config[f] for f in FACTORS))
        if name is None:
            continue
        for agg, rows in run.by_aggregator().items():
            c = curve(rows, run.metric, total_rounds=run.config.get("rounds", 0))
            if c:
                yield name, agg, rows, c


def regime_accuracy(results: str, settings: list[Setting]) -> dict[str, dict[str, list[Curve]]]:
    """Setting name -> aggregator -> one Curve per seed, for the settings that have runs of
    more than one seed (the accuracy comparison; regime_seed_runs)."""
    curves: dict[str, dict[str, list[Curve]]] = {}
    for name, agg, _, c in regime_seed_runs(results, settings):
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
    if sweeps:                           # a factor varied (not the base setting alone)
        md.append(f"![regime study]({_regime_figure(settings, out_dir, names)})\n")
    if not names.smoke:
        md.append(regime_verdict(settings, names))
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


def regime_verdict(settings: list[Setting], names: Names) -> str:
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
            + ("" if names.smoke else f"\n{M} - {B}: " + "; ".join(lines) + ".\n"))
