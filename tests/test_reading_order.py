"""flora_na.py reads top to bottom, and its marked solver block runs on its own.

* No module-level function or class of flora_na.py uses a module-level name defined below it
  (the module docstring's claim), found by walking the AST: cheap, milliseconds.
* The block between the COPYABLE SOLVER markers, copied alone into an empty folder, runs the
  README's "Copy the solver" snippet in `python -I` (no repository on the path) and gives the
  same P, Q, A_hat, B_hat and divergences as flora_na.solve_flora_na: one subprocess, ~3 s.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import torch

import flora_na as fl

ROOT = Path(__file__).resolve().parents[1]
SOURCE = (ROOT / "flora_na.py").read_text()


def _defined_at(tree: ast.Module) -> dict[str, int]:
    """Each module-level name and the line where it is first bound."""
    where: dict[str, int] = {}
    for node in tree.body:
        names = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [(a.asname or a.name).split(".")[0] for a in node.names]
        for name in names:
            where.setdefault(name, node.lineno)
    return where


def forward_references(source: str) -> list[str]:
    """'user (line) uses name (line)' for each module-level def/class using a module-level
    name bound below it."""
    tree = ast.parse(source)
    where = _defined_at(tree)
    found = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for sub in ast.walk(node):
            if (isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load)
                    and where.get(sub.id, 0) > node.lineno):
                found.append(f"{node.name} (line {node.lineno}) uses {sub.id} "
                             f"(line {where[sub.id]})")
    return found


def test_flora_na_reads_top_to_bottom():
    assert forward_references(SOURCE) == []


def test_the_check_finds_a_forward_reference():
    assert forward_references("def f():\n    return g()\n\n\ndef g():\n    return 1\n") == [
        "f (line 1) uses g (line 5)"]


def copyable_block() -> str:
    m = re.search(r"^# ----- BEGIN COPYABLE SOLVER.*?$(.*)^# ----- END COPYABLE SOLVER", SOURCE,
                  re.S | re.M)
    assert m, "flora_na.py has no COPYABLE SOLVER markers"
    return m.group(1)


def readme_snippet() -> str:
    """The README's "Copy the solver" code block."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Copy the solver"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_copyable_block_alone_runs_the_readme_snippet(tmp_path):
    block = copyable_block()
    assert block.count("\n") <= 300, "the copyable solver must stay short enough to read"
    assert set(re.findall(r"^(?:from|import) (\w+)", block, re.M)) <= {
        "math", "dataclasses", "torch"}
    (tmp_path / "flora_solver.py").write_text(block)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 5, 3, 7, generator=g)                          # (L, U, r, k)
    B = 1e-2 * torch.randn(2, 5, 6, 3, generator=g)                    # (L, U, d, r)
    n = torch.tensor([30.0, 50, 10, 80, 20])
    torch.save((A, B, n), tmp_path / "factors.pt")
    script = ("import sys\nsys.path.insert(0, '.')   # -I: only the copied block and site-packages\n"
              "import torch\nA, B, n = torch.load('factors.pt')\n" + readme_snippet() +
              "torch.save({k: getattr(res, k) for k in ('P', 'Q', 'A_hat', 'B_hat', "
              "'divergence', 'divergence_naive', 'divergence_bound', 'norm_M')}, 'out.pt')\n")
    subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, check=True,
                   capture_output=True, timeout=120)
    got = torch.load(tmp_path / "out.pt")
    want = fl.solve_flora_na(A, B, n, bound=True, path="gram")
    for key, value in got.items():
        assert torch.equal(value, getattr(want, key)), key
