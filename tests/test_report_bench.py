"""The solver benchmark's section (evidence/report_bench.py) on bench_solver.py's JSON written by
hand (report_runs.results)."""
from __future__ import annotations

from report_runs import built, line, results  # noqa: F401


def test_bench_table_and_target(built):
    md = built[0].body
    assert line(md, "| dense AdamW (baseline) | 2 | 0.5 | 0.5 | 1x | 0.030000 | 0.030000 | "
                    "0.100000 | 0.020000 | 1 |")
    assert line(md, "| Gram ALS | 3 | 0.001 | 0.001 | 500x |")
    assert "Speed-up target (>= 1000x for the default call, Gram ALS without the bound): met." in md
    assert "1-minute load average 1.0 at the start, 1.1 at the end" in md
