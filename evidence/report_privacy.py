"""The privacy section (reproduce.sh stage 10): client-level DP on SST-2 (train.py --dp,
harness/privacy.py): each aggregator's accuracy without DP, with clipping alone, and under
central and local DP at each target epsilon; the epsilon the accountant reports, the noise
multiplier, the clients' change norms before clipping, the noise against the signal it hides,
the bytes per round; a figure of accuracy against epsilon; a reading by rule."""
from __future__ import annotations

import math
import statistics

from evidence.report_common import (CENTRAL, NOT_RUN, Names, Run, curve, describe, fmt_ms,
                                    load_runs, majority_note, mean_majority, mean_std, nanmean, plt,
                                    savefig, table)

LEARNED_MARGIN = 0.05   # a run "learned" when its final metric beats the majority by this
MODES = {"none": "no DP", "clip": "clip only", "central": "central", "local": "local"}  # row order


def setting(run: Run) -> tuple[str, str]:
    """(mode, target) of a run: mode one of MODES ("clip": DP on with noise multiplier 0);
    target the --dp-target-epsilon it calibrated sigma to ("" without noise; "σ <sigma>" when
    the run set --dp-noise itself)."""
    mode = run.config.get("dp", "none")
    if mode == "none":
        return "none", ""
    sigma = run.facts["dp"]["noise_multiplier"]
    if sigma == 0:
        return "clip", ""
    target = run.config.get("dp_target_epsilon")
    return mode, f"{target:g}" if target is not None else f"σ {sigma:g}"


def dp_values(run: Run, agg: str, first: dict) -> int | None:
    """d, the number of values in one client's DP vector (what train.py clips and noises):
    the factors that travel, read from round 1's bytes_up over its m clients (float32 each,
    flora_na.read_factors), plus the head's values unless the aggregator's clients keep their
    own (facts: head bytes, float32; private_head). None where the run does not tell it exactly:
    an upload codec (bytes_up counts the encoding), clients of mixed ranks (d differs by client),
    a first row after round 1, a run without the head's size."""
    head = run.facts.get("head", {}).get("bytes")
    if (first["round"] != 1 or run.config.get("upload_codec", "none") != "none"
            or run.mixed_ranks or head is None):
        return None
    own_head = run.facts["aggregators"].get(agg, {}).get("private_head", False)
    return first["bytes_up"] // (4 * len(first["clients"])) + (0 if own_head else head // 4)


def cell_of(run: Run, agg: str, rows: list[dict], metric: str) -> dict | None:
    """One (aggregator, DP setting, seed): final and best metric, the epsilon after the last
    round (None: no DP or no noise), sigma and C (None without DP), every client change norm
    before clipping over the rounds, d, the clients per round m, MiB per round up + down."""
    c = curve(rows, metric, total_rounds=run.config.get("rounds", 0))
    if c is None:
        return None
    dp = run.facts.get("dp", {})
    return {"final": c.final, "best": c.best, "epsilon": rows[-1].get("epsilon"),
            "majority": run.facts.get("majority_baseline"),      # of this seed's dev subset
            "lr": run.config.get("lr"),
            "sigma": dp.get("noise_multiplier"), "clip": dp.get("clip"),
            "norms": [n for r in rows for n in r.get("dp_norms") or []],
            "d": dp_values(run, agg, rows[0]), "m": len(rows[0]["clients"]),
            "mb": c.mb_per_round}


def noise_to_signal(mode: str, sigma: float, d: int | None, m: int) -> float | None:
    """Norm of the noise on the round's sum over the largest norm of the clipped sum, m C:
    central N(0, sigma^2 C^2 I_d) once, sigma C sqrt(d) / (m C) = sigma sqrt(d) / m; local m
    such draws, sigma C sqrt(d m) / (m C) = sigma sqrt(d) / sqrt(m)."""
    if d is None or sigma is None:
        return None
    return sigma * math.sqrt(d) / (m if mode == "central" else math.sqrt(m))


def _one(values: list) -> float | None:
    """The mean of the values that are not None (NaN when some but none finite), None if all are."""
    values = [v for v in values if v is not None]
    return nanmean(values) if values else None


def _fmt(x: float | None, spec: str, none: str = "—") -> str:
    return none if x is None or x != x else format(x, spec)


def privacy_section(results: str, out_dir: str, names: Names) -> str:
    """Aggregators x DP setting (no DP, clip only, central and local at each target epsilon):
    final and best metric (mean ± std over seeds), epsilon spent, sigma, C, median change norm,
    noise / signal, MB per round; a figure of the metric against epsilon."""
    runs = load_runs(results, "privacy")
    md = ["## Privacy: client-level DP, accuracy against epsilon\n"]
    if not runs:
        return "\n".join(md) + NOT_RUN.format("runs/privacy/")
    task, metric = runs[0].task_name, runs[0].metric
    majority = mean_majority(runs)              # the seeds' dev subsets differ
    seeds = sorted({r.config.get("seed") for r in runs})
    cells: dict[tuple[str, str, str], list[dict]] = {}
    for run in runs:
        mode, target = setting(run)
        for agg, rows in run.by_aggregator().items():
            cell = cell_of(run, agg, rows, metric)
            if cell is not None:    # a centralised reference (1 client, no DP): a row of its own
                cells.setdefault((CENTRAL if run.centralised else agg, mode, target),
                                 []).append(cell)
    registry = list(names.registry)
    place = lambda agg: registry.index(agg) if agg in registry else len(registry)  # noqa: E731
    keys = sorted(cells, key=lambda k: (place(k[0]), k[0], list(MODES).index(k[1]),
                                        k[2].startswith("σ"), float(k[2].lstrip("σ ") or 0)))
    dp = next((r.facts["dp"] for r in runs if "dp" in r.facts), None)
    fed = next((r for r in runs if not r.centralised), runs[0])
    md.append(f"{task}, {metric}; {describe(fed.config)}. Seeds {seeds}"
              f"{majority_note(runs, metric, seeds)}.\n")
    if dp is not None:
        md.append(f"Client-level DP (train.py `--dp`, harness/privacy.py): each client's round "
                  f"change (the LoRA factors that travel, and the head where it travels) is "
                  f"clipped to L2 norm C; central: the server adds N(0, σ²C²) to the sum of the "
                  f"m clipped uploads, for aggregators whose release is that sum (weights "
                  f"{dp.get('weights')}); local: each client adds N(0, σ²C²) to its own; clip "
                  f"only: clipping with σ = 0 (no finite ε). σ is calibrated to spend the target "
                  f"ε over the planned rounds at δ = {dp.get('delta'):g} ({dp.get('accountant')}; "
                  f"local DP counts a client's replace-one sensitivity 2C, so its σ is twice "
                  f"central's for the same ε).\n")
    partial = [r.path.rsplit("/", 1)[-1] for r in runs if r.unfinished()]
    if partial:
        md.append(f"**Unfinished runs** (the table uses what exists): {', '.join(partial)}\n")
    rows = []
    for key in keys:
        agg, mode, target = key
        xs = cells[key]
        sigma, clip = _one([x["sigma"] for x in xs]), _one([x["clip"] for x in xs])
        eps = _one([x["epsilon"] for x in xs])
        norms = [n for x in xs for n in x["norms"]]
        ratio = _one([noise_to_signal(mode, x["sigma"], x["d"], x["m"]) for x in xs])
        rows.append([names.display(agg), MODES[mode], target or "—",
                     fmt_ms([x["final"] for x in xs], len(seeds)),
                     fmt_ms([x["best"] for x in xs], len(seeds)),
                     "∞" if mode == "clip" else _fmt(eps, ".2f"), _fmt(sigma, ".3g"),
                     _fmt(clip, "g"), f"{statistics.median(norms):.3g}" if norms else "—",
                     _fmt(ratio, ".3g"), "—" if agg == CENTRAL    # nothing travels
                     else f"{nanmean([x['mb'] for x in xs]):.3f}"])
    md.append(table(["aggregator", "DP", "target ε", f"final {metric}", f"best {metric}",
                     "ε after last round", "σ", "C", "median change norm", "noise / signal",
                     "MB / round"], rows, "lllrrrrrrrr"))
    md.append("Mean ± std over seeds. ε after last round: what the accountant reports after the "
              "run's last round (∞: clipping alone bounds nothing). σ: the noise multiplier "
              "(each draw's std is σC). Median change norm: the clients' round changes before "
              "clipping, over every client, round and seed (recorded where DP is on). Noise / "
              "signal: the noise's norm on the round's sum of uploads over the largest norm of "
              "the clipped sum, m C: central σ√d / m, local σ√d / √m, with m the clients per "
              "round and d the values in one client's DP vector (round 1's bytes up / m / 4, "
              "float32 factors, plus the head's values where it travels; — where the run does "
              "not give d exactly, e.g. under an upload codec). MB / round: LoRA factors up and "
              "down, all clients (train.py's bytes; a travelling head is not counted).\n")
    md.extend(reading(cells, keys, names, metric, majority))
    fig = figure(cells, keys, names, metric, majority)
    md.append(f"![privacy]({savefig(fig, out_dir, 'privacy.png')})\n")
    return "\n".join(md)


def figure(cells, keys, names: Names, metric: str, majority):
    """The metric against the epsilon spent (log x), one line per (aggregator, central or
    local) in the aggregator's colour, central solid and local dashed; no DP and clip only as
    horizontal lines in the aggregator's colour (dotted, dash-dot); the majority class grey."""
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    lines = {}
    for agg, mode, target in keys:
        xs = cells[(agg, mode, target)]
        y = mean_std([x["final"] for x in xs])
        if mode in ("none", "clip"):
            ax.axhline(y[0], color=names.style(agg)["color"], lw=1, ls=":" if mode == "none"
                       else "-.", label=f"{names.display(agg, False)}, {MODES[mode]}")
            continue
        eps = _one([x["epsilon"] for x in xs])
        if eps is not None and eps == eps and eps > 0:
            lines.setdefault((agg, mode), []).append((eps, *y))
    for (agg, mode), pts in lines.items():
        pts.sort()
        style = {**names.style(agg), "ls": "-" if mode == "central" else "--"}
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="o", ms=4, capsize=2, label=f"{names.display(agg, False)}, {mode}",
                    **style)
    if majority is not None:
        ax.axhline(majority, color="gray", lw=0.8, label="majority class")
    if lines:
        ax.set_xscale("log")
        ticks = sorted({round(p[0], 2) for pts in lines.values() for p in pts})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])   # the epsilons run, not powers of 10
        ax.minorticks_off()
    ax.set_xlabel("ε after the last round (log; δ as in the table)")
    ax.set_ylabel(f"final dev {metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def reading(cells, keys, names: Names, metric: str, majority) -> list[str]:
    """What the table says, by rule: whether the runs without DP and with clipping alone
    learned (final metric at least LEARNED_MARGIN above the majority class of its seed's dev
    subset, averaged over seeds); and under central
    DP, at each target epsilon, each aggregator against the baseline (or the first in registry
    order) when no baseline ran central: ahead or behind where the difference of the means
    exceeds the larger std over seeds, no verdict with one seed or with both near the majority
    class. A smoke run draws no conclusion."""
    if names.smoke:
        return []
    out = []
    mean = lambda key: mean_std([x["final"] for x in cells[key]])  # noqa: E731
    # above its own seed's majority class, averaged over seeds (None: no majority known)
    gain = lambda key: None if majority is None else nanmean(  # noqa: E731
        [x["final"] - x["majority"] for x in cells[key] if x["majority"] is not None])
    unlearned: list[str] = []        # without DP: their clipped rows say nothing either
    if (CENTRAL, "none", "") in cells and majority is not None:
        c, _ = mean((CENTRAL, "none", ""))
        lr = {x["lr"] for x in cells[(CENTRAL, "none", "")]}
        own = lr - {x["lr"] for k, xs in cells.items() if k[0] != CENTRAL for x in xs}
        out.append("The centralised reference (one client, the same examples"
                   + (f", lr {', '.join(f'{v:g}' for v in sorted(own))}" if own else "")
                   + f") ends at {c:.3f}"
                   + (f", within {LEARNED_MARGIN:g} of the majority class: this budget teaches "
                      f"the model nothing, with or without federation."
                      if gain((CENTRAL, "none", "")) < LEARNED_MARGIN else "."))
    for mode, what in (("none", "Without DP"), ("clip", "With clipping alone")):
        aggs = [agg for agg, m, _ in keys if m == mode and agg != CENTRAL]
        if majority is None or not aggs:
            continue
        low = [a for a in aggs if gain((a, mode, "")) < LEARNED_MARGIN]
        named = ", ".join(names.display(a, False) for a in low if a not in unlearned)
        if not low:
            out.append(f"{what}, every aggregator learned: final {metric} at least "
                       f"{LEARNED_MARGIN:g} above the majority class.")
        elif named:
            out.append(f"{what}, {named} stayed within {LEARNED_MARGIN:g} of the majority class"
                       + (": their DP rows say nothing about DP's price." if mode == "none" else
                          ": clipping already erases what they learn here, so their noised rows "
                          "cannot show more."))
        unlearned += low
    central = list(dict.fromkeys(agg for agg, m, _ in keys if m == "central"))
    if len(central) >= 2:
        ref = names.baseline if names.baseline in central else central[0]
        targets, pairs = list(dict.fromkeys(t for _, m, t in keys if m == "central")), []
        for agg in (a for a in central if a != ref):
            verdicts = []
            for t in targets:
                if (agg, "central", t) not in cells or (ref, "central", t) not in cells:
                    continue
                (mx, sx), (my, sy) = mean((agg, "central", t)), mean((ref, "central", t))
                n = min(len(cells[(agg, "central", t)]), len(cells[(ref, "central", t)]))
                std, diff = max(sx, sy), mx - my
                text = f"at ε {t}: {mx:.3f} vs {my:.3f}"
                if majority is not None and max(gain((agg, "central", t)),
                                                gain((ref, "central", t))) < LEARNED_MARGIN:
                    text += f", both within {LEARNED_MARGIN:g} of the majority class (no verdict)"
                elif n < 2:
                    text += " (one seed: no verdict)"
                elif abs(diff) > std:
                    text += (f", {'ahead' if diff > 0 else 'behind'} by {abs(diff):.3f}, more "
                             f"than the std over seeds ({std:.3f})")
                else:
                    text += f", a difference of {diff:+.3f} within the std over seeds ({std:.3f})"
                verdicts.append(text)
            if verdicts:
                pairs.append(f"{names.display(agg, False)} against {names.display(ref, False)} "
                             f"(final {metric}): " + "; ".join(verdicts) + ".")
        if pairs:
            out.append("Under central DP, where arXiv 2403.12313 claims that the aggregator "
                       "that freezes A keeps more accuracy (the noise enters its update "
                       "linearly): " + " ".join(pairs))
    return [" ".join(out) + "\n"] if out else []
