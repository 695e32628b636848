"""Tables and figures from reproduce.sh's results: REPORT.md, PNGs, RESULTS.md, README's headline.

    python -m evidence.report results/ --method flora_na --baseline fedit
    python -m evidence.report results/ --method flora_na --baseline fedit \\
        --page RESULTS.md --readme README.md     # also the results page and README's headline

Reads run files only, never training code: runs/<stage>/<run>/{config.json, metrics.jsonl,
provenance.jsonl} written by train.py (stages regime, glue, generation,
mixed_ranks, compression, privacy),
runs/bench/bench_solver.json written by bench_solver.py, and pipeline.json / stage_times.tsv
written by reproduce.sh. What a table needs beyond the metrics comes from the "facts" that
train.py writes into config.json: the task's display name and main metric, the majority-class
baseline, the trained head's size, and every registered aggregator's display name in registry
order (which fixes the rows' order and the figures' colours). Which aggregator is the method and
which the baseline is the caller's choice (--method, --baseline); no aggregator is named here.

Every section stands alone, in its own module, and says so when its stage did not run, failed
(with the first error reproduce.sh recorded) or is still running, instead of failing. Sections, in order (SECTIONS lists them with their stage):
report_regime (aggregation error by local steps, lr, heterogeneity, rank and clients),
report_glue (the GLUE table), report_bench (solver benchmark), report_generation,
report_mixed_ranks, report_codecs (compressed uploads) and report_privacy (client-level DP:
accuracy against epsilon); report_common holds what they share (runs, names, curves, formatting),
report_provenance where each came from. This file is the driver; REPORT.md adds how it was run.
Each section carries a provenance line under its heading (reproduce.sh command, mode, commit,
machine, date). On the results page each sits between its own markers
<!-- results:KEY:start --> / <!-- results:KEY:end -->, and only the sections whose stage has
results in this folder are rewritten, so rerunning one stage leaves the others' numbers as they
are. README's headline is rewritten only when the GLUE stage has runs. A run of some
aggregators only (--aggregators, reproduce.sh's AGGREGATORS) publishes one block of its own
instead (report_subset) and no headline, leaving every other block and README as they are.
A smoke run's report
(TINY) marks every table and figure "smoke test: numbers are not results", draws no conclusion
(no bold, verdicts or targets) and is never published.
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import re
import shutil
import textwrap
from dataclasses import dataclass
from typing import Annotated, Callable

import tyro

from evidence.report_bench import bench_section
from evidence.report_codecs import codecs_section
from evidence.report_common import FIG, PERSONAL, Names, Run, describe, load_runs, plt, table
from evidence.report_generation import generation_section
from evidence.report_glue import Glue, glue_section, personal_text
from evidence.report_mixed_ranks import mixed_ranks_section
from evidence.report_privacy import privacy_section
from evidence.report_provenance import failed_line, provenance_line, stage_provenance, stage_times
from evidence.report_regime import regime_verdict, regime_section, regime_settings
from evidence.report_subset import parse_aggregators, subset_key, subset_section
from harness import provenance

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
    aggregators: str | None = None
    """a run of these aggregators only (comma-separated): the page gets their block alone"""


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
            Section("mixed_ranks", "7", "mixed_ranks", mixed_ranks_section),
            Section("compression", "9", "compression", codecs_section),
            Section("privacy", "10", "privacy", privacy_section)]

QUICK_NOTE = ("QUICK mode is a CPU-sized stand-in for the paper's experiments: a 6-layer MiniLM "
              "instead of RoBERTa-large, a few rounds of a few local steps, capped train and dev "
              "sets. It checks that every method runs and shows the divergence effect, but its "
              "accuracy numbers are not comparable with the paper's, and differences smaller "
              "than the std over seeds are noise. `MODE=FULL bash reproduce.sh` runs the "
              "paper-scale commands on a GPU.\n")
SMOKE = "smoke test: numbers are not results"
SMOKE_NOTE = (f"**{SMOKE}.** A TINY run trains every code path on a few dozen examples for a "
              "round or two: it checks that the pipeline runs end to end, and this report draws "
              "no conclusion from it (no best value marked, no verdicts, no targets). "
              "`bash reproduce.sh` runs QUICK, the CPU-sized experiments.\n")


@dataclass
class Report:
    """The whole report (markdown, figure links as {FIG}name.png); the blocks of the sections
    whose stage has results, for the results page; README's headline (None without GLUE runs).
    A smoke run's report has neither blocks nor headline: it is never published."""
    body: str
    blocks: dict[str, str]                 # section key -> its markdown, heading first
    headline: str | None
    smoke: bool = False


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
    for stage in sorted(set(latest) | set(folders), key=lambda s: (len(s), s)):   # 9 before 10
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
                  + regime_verdict(settings, names).strip())
    return wrap("\n".join(md) + "\n")


def wrap(markdown: str, width: int = 100) -> str:
    """Prose lines (paragraphs, "- " bullets) wrapped at `width` for the README; table rows and
    blank lines as they are. Markdown renders the result exactly as the unwrapped text."""
    out = []
    for line in markdown.split("\n"):
        if not line.strip() or line.startswith("|"):
            out.append(line)
        else:
            out.append(textwrap.fill(line, width, subsequent_indent="  " * line.startswith("- "),
                                     break_long_words=False, break_on_hyphens=False))
    return "\n".join(out)


def build_report(results: str, out_dir: str, method: str | None = None,
                 baseline: str | None = None, page: str = "RESULTS.md",
                 aggregators: list[str] | None = None) -> Report:
    """Every section of the report, each with its provenance line under the heading, its PNGs
    written to out_dir, and the headline; for a run of some `aggregators` only, their block
    last, and it alone for the results page (no headline)."""
    pipeline = _pipeline(results)
    smoke = bool(pipeline.get("tiny"))
    names = Names.of(all_runs(results), method, baseline, smoke)
    texts, blocks = [], {}
    for s in SECTIONS:
        heading, rest = s.write(results, out_dir, names).split("\n", 1)
        failed = failed_line(results, s.stage, s.folder)
        if not s.present(results) and failed:
            rest = failed
        if s.present(results):
            rest = "\n" + provenance_line(results, s.stage, s.folder, pipeline) + "\n" + rest
            blocks[s.key] = heading + "\n" + rest
        texts.append(heading + "\n" + rest)
    if aggregators:
        block = subset_section(results, out_dir, names, aggregators, pipeline)
        texts.append(block)
        blocks = {subset_key(aggregators): block}
    mode = pipeline.get("mode", "unknown") + (" / TINY" if pipeline.get("tiny") else "")
    head = [f"# FLoRA-NA reproduction report ({mode})\n"]
    texts.append(run_section(results, pipeline))
    if smoke:
        head.append(SMOKE_NOTE)
        texts = [mark_smoke(t, out_dir) for t in texts]
    elif pipeline.get("mode") == "QUICK":
        head.append(QUICK_NOTE)
    if smoke:
        return Report("\n".join(head + texts), {}, None, smoke=True)
    return Report("\n".join(head + texts), blocks,
                  None if aggregators else headline(results, names, page))


def mark_smoke(markdown: str, out_dir: str) -> str:
    """A smoke run's section: no bold anywhere, the SMOKE line above every table and under every
    figure, and the figures' PNGs (in out_dir) stamped with it across their face."""
    lines, out = markdown.replace("**", "").split("\n"), []
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            out += [f"_{SMOKE}:_", ""]
        out.append(line)
        for png in re.findall(re.escape(FIG) + r"([\w.-]+\.png)", line):
            stamp(os.path.join(out_dir, png))
            out[-1] += f" _{SMOKE}_"
    return "\n".join(out)


def stamp(png: str) -> None:
    """Write SMOKE across a PNG, in place, at its own size."""
    image = plt.imread(png)
    height, width = image.shape[:2]
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    fig.figimage(image)
    fig.text(0.5, 0.5, SMOKE, color="red", alpha=0.35, fontsize=max(12, width // 40),
             rotation=15, ha="center", va="center", weight="bold")
    fig.text(0.01, 0.99, SMOKE, color="red", fontsize=10, ha="left", va="top")
    fig.savefig(png, dpi=100)
    plt.close(fig)


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
        i = order.index(key) if key in order else len(order)   # a subset's block: last
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
    aggregators = parse_aggregators(args.aggregators) if args.aggregators else None
    report = build_report(args.results, args.results, args.method, args.baseline,
                          os.path.relpath(page, os.path.dirname(os.path.abspath(args.readme)))
                          if args.readme else page, aggregators)
    path = os.path.join(args.results, "REPORT.md")
    with open(path, "w") as f:
        f.write(report.body.replace(FIG, ""))
    print(f"wrote {path} and its figures in {args.results}/")
    if report.smoke and (args.page or args.readme):
        kept = " and ".join(p for p in (args.page, args.readme) if p)
        print(f"{args.results} holds a smoke run (TINY), never published: {kept} left as is")
        return
    if args.page:
        figures = os.path.join(os.path.dirname(os.path.abspath(args.page)), "figures")
        os.makedirs(figures, exist_ok=True)
        blocks = {k: demote(v).replace(FIG, "figures/") for k, v in report.blocks.items()}
        for png in re.findall(re.escape(FIG) + r"([\w.-]+\.png)", "".join(report.blocks.values())):
            shutil.copy(os.path.join(args.results, png), figures)
        skipped = [s.key for s in SECTIONS if s.key not in blocks]
        if aggregators:
            skipped = [s.key for s in SECTIONS]                  # all of them: not this run's
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
