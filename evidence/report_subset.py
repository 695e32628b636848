"""The block of a run of some aggregators only (reproduce.sh with AGGREGATORS=a,b): those
aggregators beside the references trained in the same runs (the method and the baseline, at
REF_SEEDS), from whichever of stages 2, 3 and 7 ran: the GLUE rows with their bytes and the
divergence of every update sent, accuracy over seeds at the regime study's picked settings,
and the mixed-ranks table. It is the only block such a run publishes, under its own markers,
so that the results page's other blocks, from a run of every aggregator, stay as they are.
Reads run files only; no aggregator is named here."""
from __future__ import annotations

import os
import re
import shutil

from evidence.report_common import (CENTRAL, FIG, Names, Run, fmt_ms, load_runs,
                                    mean_std, table)
from evidence.report_glue import Glue, _glue_figures, global_model, head_text
from evidence.report_mixed_ranks import mixed_ranks_section
from evidence.report_provenance import provenance_line
from evidence.report_regime import FACTORS, factor_value, regime_seed_runs, regime_settings

# (stage, folder under runs/) of the stages this block draws on, in its order
STAGES = (("3", "glue"), ("2", "regime"), ("7", "mixed_ranks"))


def subset_key(aggregators: list[str]) -> str:
    """The block's marker name on the results page: one per set of aggregators."""
    return "aggregators_" + "_".join(aggregators)


def parse_aggregators(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names or len(set(names)) < len(names):
        raise ValueError(f"--aggregators {text!r}: give distinct registry names, comma-separated")
    return names


def divergence(rows: list[dict]) -> tuple[float, float]:
    """(mean over rounds of the mean over layers, max over rounds and layers) of the relative
    divergence ||M - update|| / ||M|| of the update the aggregator sent."""
    means = [r["divergence"]["relative_mean"]["aggregate"] for r in rows]
    worst = max(v["aggregate"] for r in rows for v in r["divergence"]["relative_per_layer"].values())
    return sum(means) / len(means), worst


def fmt_div(x: float) -> str:
    return "0" if x == 0 else f"{x:.3f}" if x >= 1e-3 else f"{x:.1e}"


def _copy_figures(markdown: str, out_dir: str, prefix: str) -> str:
    """The block's figures under names of their own (prefix + name), so that publishing them
    never overwrites the figures of the page's other blocks."""
    def rename(m):
        shutil.copy(os.path.join(out_dir, m.group(1)), os.path.join(out_dir, prefix + m.group(1)))
        return FIG + prefix + m.group(1)
    return re.sub(re.escape(FIG) + r"([\w.-]+\.png)", rename, markdown)


def _demote(markdown: str) -> str:
    return re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", markdown, flags=re.M)


def _glue_part(runs: list[Run], names: Names, added: list[str], out_dir: str) -> list[str]:
    g = Glue.of(runs, names)
    md = ["### GLUE\n", "**Best dev metric over rounds**, mean ± std over seeds (n: the seeds a "
          "row has, where fewer than the table's):\n", g.table("best"),
          "\n**Final-round dev metric:**\n", g.table("final")]
    # the divergence of each update sent, and FedIT's on the same uploads
    cells: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for run in runs:
        if run.centralised:
            continue
        for agg, rows in run.by_aggregator().items():
            naive = sum(r["divergence"]["relative_mean"]["naive"] for r in rows) / len(rows)
            cells.setdefault((run.task, agg), []).append((*divergence(rows), naive))
    keys = [k for k in g.keys if global_model(k)]
    header = ["aggregator"] + [f"{g.task_names[t].split(' (')[0]}: {what}" for t in g.tasks
                               for what in ("rel. div. mean (max)", "naive average's")]
    rows = []
    for k in keys:
        row = [names.display(k)]
        for t in g.tasks:
            xs = cells.get((t, k), [])
            if not xs:
                row += ["—", "—"]
                continue
            row += [f"{fmt_div(sum(x[0] for x in xs) / len(xs))} ({fmt_div(max(x[1] for x in xs))})",
                    fmt_div(sum(x[2] for x in xs) / len(xs))]
        rows.append(row)
    md += ["\n**Aggregation error**: the relative divergence ||M - update|| / ||M|| of the update "
           "each aggregator sent, M = Σ_u p_u B_u A_u of that round's uploads, mean over rounds, "
           "layers and seeds (max: the largest of any round and layer); beside it, FedIT's "
           "average of the same uploads:\n", table(header, rows)]
    md.append(f"\nMB / round: LoRA factors (or cores) sent by all clients plus the server's "
              f"reply, as train.py counts them ({head_text(runs)}).\n")
    if not names.smoke:                  # a smoke run draws no conclusion
        md.append(_checks(g, names, added, cells))
    md.append(_glue_figures(g, out_dir))
    return md


def _checks(g: Glue, names: Names, added: list[str],
            cells: dict[tuple[str, str], list[tuple[float, float, float]]]) -> str:
    """Plain sentences: how far each added aggregator's update is from M at worst, and whether
    each federated model learned (against the majority class and the centralised reference)."""
    lines = []
    for a in added:
        worst = [x[1] for (t, k), xs in cells.items() if k == a for x in xs]
        if worst:
            lines.append(f"- {names.display(a, bold=False)}: the largest relative divergence of "
                         f"its update over every round and layer of its runs is "
                         f"{fmt_div(max(worst))}.")
    best = g.means["best"]
    for t in g.tasks:
        fed = g.federated("best", t)
        short = g.task_names[t].split(" (")[0]
        base = mean_std(g.majority[t])[0] if g.majority.get(t) else None
        central = best[t].get(CENTRAL)
        flat = [names.display(k, bold=False) for k, v in fed.items()
                if base is not None and v - base < 0.02]
        text = (f"- {short}: best federated "
                + ", ".join(f"{names.display(k, bold=False)} {v:.3f}" for k, v in fed.items())
                + (f"; majority class {base:.3f}" if base is not None else "")
                + (f"; centralised {central:.3f}" if central is not None else "") + ". ")
        text += (f"Within 0.02 of the majority class (not learned at this budget): "
                 f"{', '.join(flat)}." if flat else "Every federated model is above the majority "
                 "class by more than 0.02." if base is not None else "")
        lines.append(text.rstrip())
    return "\n".join(lines) + "\n"


def _regime_part(results: str, names: Names) -> list[str]:
    """At the settings stage 2 picked: every aggregator's best and final dev metric over seeds
    and the divergence of its updates, beside the baseline's tracked divergence there."""
    settings = regime_settings(results)
    cells: dict[str, dict[str, list[tuple]]] = {}
    for name, agg, rows, c in regime_seed_runs(results, settings):
        cells.setdefault(name, {}).setdefault(agg, []).append((c, *divergence(rows)))
    compared = {k: v for k, v in cells.items() if len(v) > 1}
    if not compared:
        return ["### Regime study\n", "_No comparison over seeds yet (it follows the sweep in "
                "stage 2)._\n"]
    metric = settings[0].run.metric
    rows = []
    for name, aggs in sorted(compared.items(), key=lambda kv: -next(
            s.naive for s in settings if s.name == kv[0])):
        s = next(s for s in settings if s.name == name)
        label = "base" if s.factor is None else f"{FACTORS[s.factor]} {factor_value(s.factor, s.value)}"
        n = max(len(xs) for xs in aggs.values())
        for agg in names.order(aggs):
            xs = aggs[agg]
            rows.append([label, f"{s.naive:.3f}", names.display(agg),
                         fmt_ms([x[0].best for x in xs], n), fmt_ms([x[0].final for x in xs], n),
                         f"{fmt_div(sum(x[1] for x in xs) / len(xs))} "
                         f"({fmt_div(max(x[2] for x in xs))})"])
    B = names.display(names.baseline, bold=False) if names.baseline else "the baseline"
    return ["### Regime study: accuracy where the aggregation error is largest\n",
            f"At the setting(s) stage 2 picked by {B}'s divergence (its seed-0 run, tracked, is "
            f"the sweep's); {metric}, mean ± std over seeds; the divergence of each update sent, "
            f"mean (max) over rounds, layers and seeds:\n",
            table(["setting", f"{B} rel. div.", "aggregator", f"best {metric}",
                   f"final {metric}", "rel. div. of the update"], rows, "lrlrrr")]


def subset_section(results: str, out_dir: str, names: Names, aggregators: list[str],
                   pipeline: dict) -> str:
    """The block: heading, one provenance line per stage that has runs, then its parts."""
    unknown = [a for a in aggregators if a not in names.registry]
    if unknown:
        raise ValueError(f"--aggregators: {', '.join(unknown)} not among these runs' "
                         f"aggregators ({', '.join(names.registry)})")
    present = [(stage, folder) for stage, folder in STAGES if load_runs(results, folder)]
    trained = {a for _, folder in present for r in load_runs(results, folder)
               for a in r.by_aggregator()}
    refs = [names.display(k, bold=False) for k in names.order(trained - set(aggregators))]
    added = [names.display(a, bold=False) for a in aggregators]
    md = [f"## {' and '.join(added)}, beside {' and '.join(refs) or 'no reference'} in the "
          f"same runs\n"]
    md += [provenance_line(results, stage, folder, pipeline) for stage, folder in present]
    md.append(f"\nA run of {', '.join(added)} only (reproduce.sh with AGGREGATORS), with "
              f"{' and '.join(refs) or 'no reference'} trained beside them at some seeds: their "
              f"rows check these runs against the page's other blocks, from a run of every "
              f"aggregator at other commits.\n")
    for stage, folder in present:
        if folder == "glue":
            md += _glue_part(load_runs(results, "glue"), names, aggregators, out_dir)
        elif folder == "regime":
            md += _regime_part(results, names)
        else:
            md.append(_demote(mixed_ranks_section(results, out_dir, names)))
    return _copy_figures("\n".join(md), out_dir, subset_key(aggregators) + "_")
