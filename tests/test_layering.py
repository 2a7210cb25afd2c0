"""Import direction: routes → services → models/db → config; trainer ⟂ app; no torch in app."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from app.config import ROOT

LAYER = {
    "config": 0,
    "errors": 0,
    "ranking": 0,
    "exporting": 0,
    "metrics": 0,
    "charts": 0,
    "security": 0,
    "db": 1,
    "models": 2,
    "importer": 2,
    "schemas": 3,
    "services": 4,
    "deps": 5,
    "routes": 6,
    "main": 7,
    "cli": 7,
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def py_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_trainer_never_imports_app():
    for path in py_files("trainer"):
        bad = {m for m in imports_of(path) if m == "app" or m.startswith("app.")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


WORKER_ONLY = {"app/generation/hf.py"}
"""Modules that may import torch: loaded only by the worker, through ``load_backend``."""


def test_app_never_imports_torch_or_transformers_at_module_level():
    for path in py_files("app"):
        if path.relative_to(ROOT).as_posix() in WORKER_ONLY:
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                for m in mods:
                    assert m.split(".")[0] not in {"torch", "transformers"}, path


def test_web_app_and_cli_start_without_torch():
    code = (
        "import sys, app.main, app.cli, app.worker\n"
        "app.main.create_app\n"
        "heavy = sorted({'torch', 'transformers', 'httpx'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_services_never_import_fastapi_or_routes():
    for path in [*py_files("app/services"), ROOT / "app/importer.py", ROOT / "app/models.py"]:
        for m in imports_of(path):
            top = m.split(".")[0]
            assert top not in {"fastapi", "starlette"}, f"{path.name} imports {m}"
            assert not m.startswith(("app.routes", "app.deps", "app.main")), f"{path.name}: {m}"


def test_imports_point_down_the_layers():
    for path in py_files("app"):
        rel = path.relative_to(ROOT / "app")
        own = rel.parts[0].removesuffix(".py")
        if own not in LAYER:
            continue
        for m in imports_of(path):
            parts = m.split(".")
            if parts[0] != "app" or len(parts) < 2 or parts[1] not in LAYER:
                continue
            assert LAYER[parts[1]] <= LAYER[own], f"app/{rel} ({own}) imports {m}"


def test_models_never_import_schemas():
    assert not any(m.startswith("app.schemas") for m in imports_of(ROOT / "app/models.py"))


def test_only_services_commit():
    for path in py_files("app"):
        rel = path.relative_to(ROOT / "app").as_posix()
        if rel.startswith("services/"):
            continue
        assert ".commit()" not in path.read_text(), f"app/{rel} commits; only services may"
