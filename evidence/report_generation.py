"""The generation section (reproduce.sh stage 6): each aggregator's score on a federated
generation task (GSM8K, MBPP) with the size of the evaluated subset."""
from __future__ import annotations

from evidence.report_common import NOT_RUN, Names, describe, load_runs, metric_value, table


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
