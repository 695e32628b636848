"""The compression section (reproduce.sh stage 9): every aggregator with compressed uploads
(train.py --upload-codec): accuracy, megabytes sent up per round, and each round's divergence
against M of the uncompressed uploads (the clients' factors before encoding, which train.py
records under an upload codec), FedIT's on the same decoded uploads beside the aggregator's."""
from __future__ import annotations

import math

from evidence.report_common import (NOT_RUN, Names, Run, curve, describe, finite, fmt_ms, load_runs,
                                    majority_note, mean_majority, mean_std, nanmean, plt, savefig,
                                    table)

LEARNED_MARGIN = 0.05   # a codec-none run "learned" when its final metric beats the majority by this


def codec_label(config: dict) -> str:
    """An upload codec as the table names it: none, fp16, int4, top-k 10%, int4 (nearest)."""
    name = config.get("upload_codec", "none")
    if name == "topk":
        return f"top-k {100 * config.get('topk_fraction', 0.1):g}%"
    if name.startswith("int") and config.get("codec_rounding", "stochastic") != "stochastic":
        return f"{name} ({config['codec_rounding']})"
    return name


def row_key(run: Run, agg: str) -> str:
    """The aggregator with the options its run set for it (--agg-option), e.g.
    "flora_na [gram_correction=noise_aware]": runs of one aggregator with other options are
    rows of their own."""
    opts = [o.split(".", 1)[1] for o in run.config.get("agg_option", [])
            if o.startswith(agg + ".")]
    return agg + (f" [{', '.join(opts)}]" if opts else "")


def label(names: Names, key: str, bold: bool = True) -> str:
    agg, _, opts = key.partition(" [")
    return names.display(agg, bold) + (f" [{opts}" if opts else "")


def cell_of(run: Run, rows: list[dict], metric: str) -> dict | None:
    """One (aggregator, codec, seed): final and best metric, MiB up per round, and per round the
    mean over layers of FedIT's and the aggregate's divergence relative to the uncompressed M
    (codec none: the divergences themselves, the uploads being uncompressed)."""
    c = curve(rows, metric, total_rounds=run.config.get("rounds", 0))
    if c is None:
        return None
    div = [r["divergence"].get("uncompressed", r["divergence"])["relative_mean"] for r in rows]
    return {"final": c.final, "best": c.best, "finished": c.finished,
            "mb_up": rows[-1]["bytes_up"] / rows[-1]["round"] / 2**20,
            "naive": [d.get("naive", math.nan) for d in div],
            "aggregate": [d.get("aggregate", math.nan) for d in div]}


def removed(cells: list[dict]) -> float:
    """Share of FedIT's divergence the aggregator removes: 1 - sum(aggregate) / sum(naive)
    over rounds and seeds (relative divergences, each the mean over layers); NaN where FedIT's
    is below 1e-6 on average."""
    pairs = [(n, a) for c in cells for n, a in zip(c["naive"], c["aggregate"]) if n == n and a == a]
    total = sum(n for n, _ in pairs)       # FedIT exact (e.g. one round from B = 0): no share
    return 1 - sum(a for _, a in pairs) / total if total > 1e-6 * len(pairs) else math.nan


def codecs_section(results: str, out_dir: str, names: Names) -> str:
    """Upload codecs x aggregators: final metric (mean +- std over seeds), MiB up per round,
    FedIT's and the aggregator's divergence against the uncompressed M, the share removed; a
    figure of the metric against MiB per round, one line per aggregator."""
    runs = load_runs(results, "compression")
    md = ["## Compression: compressed uploads, every aggregator\n"]
    if not runs:
        return "\n".join(md) + NOT_RUN.format("runs/compression/")
    task, metric = runs[0].task_name, runs[0].metric
    majority = mean_majority(runs)              # the seeds' dev subsets differ
    seeds = sorted({r.config.get("seed") for r in runs})
    cells: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        for agg, rows in run.by_aggregator().items():
            cell = cell_of(run, rows, metric)
            if cell is not None:
                cells.setdefault((row_key(run, agg), codec_label(run.config)), []).append(cell)
    registry = list(names.registry)
    keys = sorted({k for k, _ in cells}, key=lambda k: (
        registry.index(k.partition(" [")[0]) if k.partition(" [")[0] in registry
        else len(registry), k))
    mb = {codec: nanmean([c["mb_up"] for (_, cd), xs in cells.items() if cd == codec
                          for c in xs]) for _, codec in cells}
    codecs = sorted(mb, key=lambda cd: -mb[cd])          # most bytes first: none leads
    md.append(f"{task}, {metric}; {describe(runs[0].config)}. Upload codecs (harness/codecs.py: "
              f"int: blockwise absmax, 64 values a scale, stochastic rounding unless marked; "
              f"top-k with error feedback); downloads uncompressed. Seeds {seeds}"
              f"{majority_note(runs, metric, seeds)}.\n")
    partial = [r.path.rsplit("/", 1)[-1] for r in runs if r.unfinished()]
    if partial:
        md.append(f"**Unfinished runs** (the table uses what exists): {', '.join(partial)}\n")
    rows = []
    for key in keys:
        for codec in codecs:
            xs = cells.get((key, codec))
            if not xs:
                continue
            naive = nanmean([nanmean(x["naive"]) for x in xs])
            agg = nanmean([nanmean(x["aggregate"]) for x in xs])
            share = removed(xs)
            rows.append([label(names, key), codec, fmt_ms([x["final"] for x in xs], len(seeds)),
                         fmt_ms([x["best"] for x in xs], len(seeds)),
                         f"{nanmean([x['mb_up'] for x in xs]):.3f}", f"{naive:.3f}",
                         f"{agg:.3f}", f"{100 * share + 0.0:.1f}%".replace("-0.0%", "0.0%")
                         if share == share else "—"])
    md.append(table(["aggregator", "upload codec", f"final {metric}", f"best {metric}",
                     "MB / round up", "FedIT rel. div.", "its rel. div.",
                     "share of FedIT's removed"], rows))
    md.append("Mean ± std over seeds. MB / round up: all clients' uploads as sent (values, "
              "scales, indices, and the variance sums where a run sends them). Divergences are "
              "||M - X|| / ||M|| against M = Σ_u p_u B_u A_u of the factors the clients trained, "
              "before encoding; X is FedIT's average of the decoded uploads (\"FedIT rel. div.\") "
              "or the aggregator's update made from them (\"its rel. div.\"); the mean over "
              "rounds and layers. Share removed: 1 - Σ its / Σ FedIT's over rounds and seeds "
              "(negative: further from M than FedIT on the same uploads). Aggregators with "
              "options in brackets ran in runs of their own.\n")
    md.extend(reading(cells, keys, codecs, names, metric, majority))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key in keys:
        pts = [(nanmean([x["mb_up"] for x in cells[(key, cd)]]),
                mean_std([x["final"] for x in cells[(key, cd)]]), cd)
               for cd in codecs if (key, cd) in cells]
        style = dict(names.style(key.partition(" [")[0]))
        if " [" in key:
            style["ls"] = ":"
        ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts],
                    marker="o", ms=4, capsize=2, label=label(names, key, bold=False), **style)
        if key.partition(" [")[0] == names.method and " [" not in key:
            for x, (y, _), cd in pts:
                ax.annotate(cd, (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
    if majority is not None:
        ax.axhline(majority, color="gray", ls=":", lw=1, label="majority class")
    ax.set_xscale("log")
    ax.set_xlabel("MB per round, uploads of all clients (log)")
    ax.set_ylabel(f"final dev {metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    md.append(f"![compression]({savefig(fig, out_dir, 'compression.png')})\n")
    return "\n".join(md)


def reading(cells, keys, codecs, names: Names, metric: str, majority) -> list[str]:
    """What the table says, by rule: whether the uncompressed runs learned, and for the method
    (if given), at which codecs it removes FedIT's divergence and where it adds to it."""
    out = []
    if names.smoke:                 # a smoke run draws no conclusion
        return out
    base = [(k, cells[(k, "none")]) for k in keys if (k, "none") in cells]
    if majority is not None and base:
        low = [label(names, k, False) for k, xs in base
               if nanmean([x["final"] for x in xs]) < majority + LEARNED_MARGIN]
        out.append(f"Uncompressed (codec none), every aggregator learned: final {metric} at "
                   f"least {LEARNED_MARGIN:g} above the majority class." if not low else
                   f"Uncompressed (codec none), {', '.join(low)} stayed within "
                   f"{LEARNED_MARGIN:g} of the majority class: their compressed rows say "
                   f"nothing about compression.")
    if names.method is not None and names.method in keys:
        shares = {cd: removed(cells[(names.method, cd)]) for cd in codecs
                  if (names.method, cd) in cells}
        worse = [cd for cd, s in shares.items() if s == s and s < 0]
        if shares:
            lo, hi = min(finite(shares.values()), default=math.nan), max(
                finite(shares.values()), default=math.nan)
            out.append(f"{names.display(names.method, False)} removes {100 * lo:.1f}% to "
                       f"{100 * hi:.1f}% of FedIT's divergence across codecs"
                       + (f"; at {', '.join(worse)} it is further from the uncompressed M than "
                          f"FedIT on the same uploads" if worse else "") + ".")
    return [" ".join(out) + "\n"] if out else []
