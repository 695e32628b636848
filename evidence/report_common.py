"""What every section of the report shares: the run files read back (Run, load_runs), the
aggregators' names, order and colours from the runs' facts (Names), a curve of one aggregator in
one run (Curve), and small formatting helpers. Reads run files only, never training code."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIG = "{FIG}"   # stands for the figures' folder as seen from the markdown file; filled in at the end
NOT_RUN = "\n_Not run: nothing under `{}` yet._\n"
NEEDS = "\n_Not shown: this section compares two aggregators; pass {}._\n"


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
    smoke: bool = False                # a smoke run (TINY): no bold, no verdicts, no targets

    @classmethod
    def of(cls, runs: list[Run], method: str | None, baseline: str | None,
           smoke: bool = False) -> Names:
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
        return cls(registry, method, baseline, smoke)

    def display(self, key: str, bold: bool = True) -> str:
        """A row key as the tables print it; the method in bold (markdown) if `bold`."""
        if key == CENTRAL:
            return "centralised (1 client, IID)"
        if key.endswith(PERSONAL):
            return self.display(key.removesuffix(PERSONAL), bold) + PERSONAL
        text = self.registry.get(key, {}).get("display_name", key)
        return f"**{text}**" if bold and key == self.method and not self.smoke else text

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


def seed_majorities(runs: list[Run]) -> list[float]:
    """The majority-class metric of each seed's dev subset, once a seed (the subsets differ by
    seed); empty where the task has none (regression)."""
    return list({r.config.get("seed"): r.facts["majority_baseline"] for r in runs
                 if r.facts.get("majority_baseline") is not None}.values())


def mean_majority(runs: list[Run]) -> float | None:
    """The mean over seeds of seed_majorities (the line figures draw), None where there is none."""
    majorities = seed_majorities(runs)
    return nanmean(majorities) if majorities else None


def majority_note(runs: list[Run], metric: str, seeds: list) -> str:
    """'; majority-class accuracy 0.512 ± 0.007 (each seed's dev subset)' for a section's
    header, or '' where the task has no majority class."""
    majorities = seed_majorities(runs)
    return (f"; majority-class {metric} {fmt_ms(majorities, len(seeds))} (each seed's dev subset)"
            if majorities else "")


def finite(xs) -> list[float]:
    return [x for x in xs if x == x]


def nanmean(xs) -> float:
    xs = finite(xs)
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
# One aggregator's dev metric over rounds in one run
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
