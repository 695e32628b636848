"""The mixed-ranks section (reproduce.sh stage 7): clients of different LoRA ranks, every
mixed-rank aggregator and the equal-rank references, and the divergence of each update sent."""
from __future__ import annotations

import math
import os

from evidence.report_common import (NOT_RUN, Names, Run, curve, describe, fmt_ms, load_runs,
                                    majority_note, mean_majority, mean_std, nanmean, plt, savefig,
                                    table)


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
              f"one rank. Seeds {seeds}{majority_note(runs, metric, seeds)}.\n")
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
    mean_div = lambda xs, k: nanmean([nanmean([d.get(k, math.nan) for d in x["div"]])  # noqa: E731
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
                     f"{nanmean([x['mb'] for x in xs]):.2f}", fmt("aggregate"), fmt("naive"),
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
    majority = mean_majority(runs)  # the mean over seeds of each dev subset's majority class
    if majority is not None:
        ax_acc.axvline(majority, color="gray", ls=":", label="majority class")
    ax_acc.set_xlabel(f"best dev {metric} (mean ± std over seeds)")
    ax_acc.invert_yaxis()
    ax_acc.legend(fontsize=8)
    for kind, agg in (k for k in order if k[0] == 0):
        xs = cells[(kind, agg)]
        n = min(len(x["div"]) for x in xs)
        series = [nanmean([x["div"][i].get("aggregate", math.nan) for x in xs]) for i in range(n)]
        ax_div.plot(range(1, n + 1), series, label=names.display(agg, bold=False),
                    **names.style(agg))
    mixed_cells = [x for (kind, _), xs in cells.items() if kind == 0 for x in xs]
    if mixed_cells:
        n = min(len(x["div"]) for x in mixed_cells)
        for k, ls, text in (("bound", "--", "rank-R bound"),
                            (f"bound_r{small}", ":", f"rank-{small} bound")):
            ax_div.plot(range(1, n + 1), [nanmean([x["div"][i].get(k, math.nan)
                                                    for x in mixed_cells]) for i in range(n)],
                        color="tab:gray", ls=ls, label=text)
    ax_div.set_xlabel("round")
    ax_div.set_ylabel("mean rel. divergence of the update sent")
    ax_div.set_yscale("symlog", linthresh=1e-3)
    ax_div.grid(alpha=0.3)
    ax_div.legend(fontsize=8)
    md.append(f"![mixed ranks]({savefig(fig, out_dir, 'mixed_ranks.png')})\n")
    return "\n".join(md)
