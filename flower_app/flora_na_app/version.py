"""The code version a federation runs: one hash of the method, the harness and this app.

The server sends it with every message; a client whose own code hashes differently refuses
the message (ValueError), so a federation never mixes two versions of flora_na.py, train.py,
harness/ or flora_na_app/. Reads the source files only: imports nothing heavy.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path


def source_files() -> list[tuple[str, Path]]:
    """(name, path) of every source file the version covers, in a fixed order."""
    files = []
    for module in ("flora_na", "train"):
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ImportError(f"cannot find {module}.py: pip install the project (README.md)")
        files.append((f"{module}.py", Path(spec.origin)))
    for package in ("harness", "flora_na_app"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"cannot find the {package} package: pip install the project")
        folder = Path(list(spec.submodule_search_locations)[0])
        files += [(f"{package}/{p.name}", p) for p in sorted(folder.glob("*.py"))]
    return files


def code_version() -> str:
    """sha256 (first 16 hex digits) of the sources, by name and content."""
    digest = hashlib.sha256()
    for name, path in source_files():
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def check(server_version: str) -> None:
    """ValueError unless this machine runs the server's code version."""
    mine = code_version()
    if server_version != mine:
        raise ValueError(f"this client runs code version {mine}, the server {server_version}: "
                         f"install the server's version of the project on this machine "
                         f"(pip install -e . in the same commit) and restart its SuperNode")
