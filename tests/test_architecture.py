"""The walls the architecture note promises, checked on the source, and the packaging of stages/."""

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "mifa_pipeline"


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def sources(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"mifa_pipeline." + ".".join(p.parent.relative_to(PKG).parts) if p.parent != PKG else "mifa_pipeline"
             for p in PKG.rglob("__init__.py")}
    found.add("mifa_pipeline.stages")
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


@pytest.mark.parametrize("path", sources(PKG / "maugen"), ids=lambda p: p.name)
def test_model_package_imports_nothing_of_the_pipeline_or_ray(path):
    bad = {m for m in imports_of(path) if m.split(".")[0] == "ray"
           or (m.startswith("mifa_pipeline") and not m.startswith("mifa_pipeline.maugen"))}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", sources(ROOT / "stages"), ids=lambda p: p.name)
def test_stages_never_import_the_runner_or_ray(path):
    bad = {m for m in imports_of(path) if m.split(".")[0] == "ray" or m.endswith(("runner", "executors", "ray_executor", ".work"))}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", sources(PKG / "faces") + sources(PKG / "teacher"), ids=lambda p: p.name)
def test_judges_and_teacher_share_no_code_with_the_model(path):
    assert not {m for m in imports_of(path) if m.startswith("mifa_pipeline.maugen")}


def test_the_loader_imports_nothing_of_the_pipeline():
    """`mifa_pipeline.data` is what downstream teams import: torch, webdataset, wids, numpy, PIL only."""
    imports = imports_of(PKG / "data.py")
    assert not {m for m in imports if m.startswith("mifa_pipeline") or m.split(".")[0] in ("ray", "diffusers", "transformers")}


def test_only_the_ray_executor_imports_ray_and_shards_know_no_model():
    for path in sources(PKG):
        if path.name != "ray_executor.py":
            assert not {m for m in imports_of(path) if m.split(".")[0] == "ray"}, path
    shard_imports = imports_of(PKG / "shards.py")
    assert not {m for m in shard_imports if m.split(".")[0] in ("torch", "diffusers", "transformers")
                or m.startswith(("mifa_pipeline.maugen", "mifa_pipeline.stages"))}


def test_commands_that_run_no_model_load_no_torch():
    """`mifa filter` (threshold-only), `verify` and `inspect` run no model: importing them must not wait about a
    second for torch, which a curator would feel on every re-filter."""
    import subprocess
    import sys

    code = ("import sys, mifa_pipeline.cli, mifa_pipeline.refilter, mifa_pipeline.verify, mifa_pipeline.inspect; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'ray') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"imported by a command that runs no model: {loaded}"


def test_a_teacher_build_loads_no_torch(tmp_path):
    """The teacher renderer and the judges run on OpenCV: a teacher build (the demo of `mifa teacher`, the
    scale benchmark's generator) does not wait a second for torch either."""
    import subprocess
    import sys

    code = ("import sys; from mifa_pipeline.config import load_manifest; "
            "from mifa_pipeline.runner import build_data, prepare; "
            "m = load_manifest(None, ['model.checkpoint=teacher', 'sampler.resolution=64', 'identities.count=4', "
            "'identities.samples_per_identity=2', 'filter.au.estimator=none'], output=sys.argv[1]); "
            "build_data(prepare(m), 'local', progress=False); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]", f"a teacher build imported {run.stdout.strip()}"
