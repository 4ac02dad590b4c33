"""ARCHITECTURE.md wall: maugen/ imports nothing of mifa_pipeline outside itself, and never Ray."""

from __future__ import annotations

import ast
from pathlib import Path

import mifa_pipeline.maugen as pkg


def test_imports_stay_inside_the_package():
    bad = []
    for file in Path(pkg.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top == "ray" or (top == "mifa_pipeline" and not name.startswith("mifa_pipeline.maugen")):
                    bad.append(f"{file.name}: {name}")
    assert not bad


def test_cli_module_is_cheap_to_import():
    """The project CLI mounts model_app at import time; that must not load torch/diffusers/transformers."""
    import subprocess
    import sys

    code = ("import sys, mifa_pipeline.maugen.cli as c; assert c.model_app; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
