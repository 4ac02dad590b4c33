"""Fuzz: a few hundred seeded random mutations of manifests/demo.yaml (types, values, keys, structure, raw text).

Each one is either accepted (the dry run prints a plan) or refused with exit code 2 and a one-message error;
never a traceback, never a hang, and nothing is written. It runs the CLI in-process (`build --dry-run`), which
does every check a build does before it writes anything.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mifa_pipeline.cli import app

ROOT = Path(__file__).resolve().parent.parent
MUTATIONS = 300
runner = CliRunner()

VALUES = [
    0, 1, -1, 2, 7, 64, 2**31, 2**63, 2**70, -(2**70), 0.5, -0.5, 1e-320, 1e308, -1e308, math.inf, -math.inf, math.nan,
    "", " ", "x", "none", "demo", "teacher", "folder", "yunet", "AU12", "AU99", "1e309", ".inf", "nan", "0x10",
    "a" * 300, "../../etc", "/", ".", "a/b", "a.b", "a\0b", "\u00e9\u4e2d", "${HOME}", "-rf", "yes", "~",
    None, True, False, [], {}, [1, 2], ["AU1", "AU1"], ["AU1", "AU2"], {"a": 1}, {"": 1.0}, [[[]]], {"x": {"y": {"z": 1}}},
]
KEYS = ["stepz", "", "0", "sampler", "__class__", "a" * 300, "schema_version"]


def _paths(node, prefix=()):
    """Every (path, value) of a nested dict/list, sections included."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _set(root, path, value):
    node = root
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def _numeric_twist(rng: random.Random, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return rng.choice(VALUES)
    return rng.choice([value * -1, value * 10**6, value + 0.5, value - 1, value * 1e300, float(value), str(value)])


def mutate(base: dict, rng: random.Random) -> str:
    """One manifest text: 1-3 structural/value mutations of `base`, sometimes then a raw-text one."""
    data = copy.deepcopy(base)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p, _ in _paths(data) if p]
        path = rng.choice(paths)
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        kind = rng.choice(["value", "value", "number", "delete", "add", "rename", "wrap", "nest", "section"])
        current = parent[path[-1]]
        if kind == "value":
            _set(data, path, rng.choice(VALUES))
        elif kind == "number":
            _set(data, path, _numeric_twist(rng, current))
        elif kind == "delete":
            del parent[path[-1]]
        elif kind == "add" and isinstance(parent, dict):
            parent[rng.choice(KEYS)] = rng.choice(VALUES)
        elif kind == "rename" and isinstance(parent, dict):
            parent[str(path[-1]) + rng.choice(["s", "_", "X"])] = parent.pop(path[-1])
        elif kind == "wrap":
            _set(data, path, [current])
        elif kind == "nest":
            _set(data, path, {"value": current})
        elif kind == "section" and isinstance(parent, dict):
            _set(data, path, copy.deepcopy(base[rng.choice(list(base))]))
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    raw = rng.random()
    if raw < 0.08:
        text = text[: rng.randrange(len(text) + 1)]
    elif raw < 0.16:
        i = rng.randrange(len(text) + 1)
        text = text[:i] + rng.choice([":", "[", "{", "&a ", "*a", "!!python/object:os.system", "\t", "'", "- ", "\x00"]) + text[i:]
    elif raw < 0.20:
        text = "a: &a [x, x]\nb: [*a, *a]\n" + text
    return text


@pytest.fixture(scope="module")
def base_manifest() -> dict:
    data = yaml.safe_load((ROOT / "manifests" / "demo.yaml").read_text())
    from mifa_pipeline.faces import models_available

    if not models_available():  # (CI without the judge files: keep the accepted path reachable)
        data["filter"] = {"face": {"detector": "none"}, "identity": {"embedder": "none"}, "au": {"estimator": "none"}}
    return data


def test_random_manifest_mutations_are_accepted_or_refused_cleanly(tmp_path, monkeypatch, base_manifest):
    monkeypatch.chdir(tmp_path)  # a relative output lands here, where nothing may appear
    base_manifest = {**base_manifest, "output": str(tmp_path / "out")}
    rng = random.Random(29)
    outcomes = {0: 0, 2: 0}
    for n in range(MUTATIONS):
        text = mutate(base_manifest, rng)
        path = tmp_path / "m.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        result = runner.invoke(app, ["build", str(path), "--dry-run", "--runner", "local"])
        context = f"mutation {n}:\n{text[:2000]}\n--- output:\n{result.output[-2000:]}"
        assert result.exit_code in (0, 2), context
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), context
        assert "Traceback" not in result.output, context
        if result.exit_code == 2:
            assert result.output.startswith("error: ") and len(result.output) < 4000, context
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml"], context  # nothing written
        outcomes[result.exit_code] += 1
    # both outcomes are exercised (a fuzz that only ever refuses tests little)
    assert outcomes[0] >= MUTATIONS // 20 and outcomes[2] >= MUTATIONS // 2, outcomes
