"""The generation section (evidence/report_generation.py) on run folders written by hand
(report_runs.results: one GSM8K run of FLoRA-NA, 30 problems evaluated)."""
from __future__ import annotations

from report_runs import built, line, results  # noqa: F401


def test_generation_score_names_the_evaluated_subset(built):
    md = built[0].body
    assert line(md, "| **FLoRA-NA** | GSM8K (accuracy) |") == [
        "| **FLoRA-NA** | GSM8K (accuracy) | 0.100 (3/30) | 2 | 0.600 → 0.500 |"]
    assert "With 30 test problems one problem is 3.3 points" in md
