"""The run manifest: what a data set version is, how it was made, and what it holds.

Written once, by an exclusive create, when a build (or re-filter) completes; never rewritten. Its fingerprint is
chained per stage as sha256(previous + stage name + stage version + stage config), like HF datasets,
so two builds with equal fingerprints produce the same shards.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from mifa_pipeline import __version__
from mifa_pipeline.config import BuildManifest, checkpoint_dir, canonical_json, output_determining, sha256_text
from mifa_pipeline.storage import Location, location
from mifa_pipeline.stages.filter import Filtering
from mifa_pipeline.stages.generate import Generation
from mifa_pipeline.stages.identities import IdentitySampling
from mifa_pipeline.stages.prompts import PromptExpansion
from mifa_pipeline.stages.write import ShardWriting

SCHEMA_VERSION = 2  # 2: shards planned by slot, identities.parquet, scores/, done records
MANIFEST_NAME = "manifest.json"
STAGES = (PromptExpansion, IdentitySampling, Generation, Filtering, ShardWriting)
REFILTER_STAGES = (Filtering, ShardWriting)  # what `mifa filter` chains onto its parent's fingerprint
PACKAGES = ("torch", "diffusers", "transformers", "ray", "pyarrow", "webdataset", "insightface",
            "onnxruntime", "pydantic", "numpy", "pillow", "opencv-python")


def model_files(checkpoint: str) -> list[dict[str, Any]]:
    """Every file of the generator's checkpoint folder with its sha256 (none for the teacher renderer)."""
    root = checkpoint_dir(checkpoint)
    if root is None or not root.exists():
        return []
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    out = []
    for p in files:
        sha, size = Location(p.parent).digest(p.name, "sha256")  # (gigabytes: no other digest)
        out.append({"role": "generator", "path": str(p), "sha256": sha, "bytes": size})
    return out


def stage_configs(manifest: BuildManifest, model_hash: str, judges: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The output-determining config of each stage: what its fingerprint covers (model files by content)."""
    m = output_determining(manifest)
    return {
        "prompts": {"seed": m["seed"], "count": m["identities"]["count"],
                    "samples_per_identity": m["identities"]["samples_per_identity"], "prompts": m["prompts"]},
        "identities": {"seed": m["seed"], "identities": m["identities"]},
        "generate": {"model": model_hash, "sampler": m["sampler"], "generator": _generator_version(manifest)},
        "filter": {"filter": filter_config(manifest), "judges": dict(sorted((judges or {}).items()))},
        "write": {"writer": m["writer"], "dataset": m["dataset"]},
    }


def filter_config(manifest: BuildManifest) -> dict[str, Any]:
    """The filter section without where model files live (their content enters through judge fingerprints)."""
    f = manifest.filter.model_dump(mode="json")
    f.pop("models_dir")
    for judge in ("face", "identity", "au"):
        f[judge].pop("path")
    return f


def _generator_version(manifest: BuildManifest) -> str:
    """The teacher fills stage 3 with its own code: its version enters the fingerprint too."""
    if manifest.model.checkpoint == "teacher":
        from mifa_pipeline.teacher import VERSION  # (the renderer's version alone: no drawing code imported)

        return VERSION
    return Generation.version


def chain_fingerprints(parent: str, configs: dict[str, dict[str, Any]], stages=STAGES) -> list[dict[str, str]]:
    chain, fp = [], parent
    for stage in stages:
        fp = sha256_text(fp + stage.name + stage.version + canonical_json(configs[stage.name]))
        chain.append({"stage": stage.name, "version": stage.version, "fingerprint": fp})
    return chain


# Files in a model folder that no loader reads (a model card, its sample grid): they stay in the manifest's
# file list, but editing them does not make the model another one, so a build made with it still resumes.
DOCUMENTATION_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".webp")


def model_hash(files: list[dict[str, Any]], checkpoint: str) -> str:
    """What the generate stage's fingerprint knows of the model: the name and content of every file it loads."""
    if not files:
        return sha256_text(f"builtin:{checkpoint}")
    loaded = [f for f in files if Path(f["path"]).suffix.lower() not in DOCUMENTATION_SUFFIXES]
    return sha256_text(canonical_json([[Path(f["path"]).name, f["sha256"]] for f in loaded]))


def code_version() -> dict[str, Any]:
    here = Path(__file__).resolve().parent.parent
    info: dict[str, Any] = {"mifa": __version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_run_manifest(out: Location, content: dict[str, Any]) -> str:
    """Create OUT/manifest.json; refused if one exists (a run manifest is never rewritten)."""
    # allow_nan=False: Infinity/NaN are not JSON; the manifest's numbers are finite by validation, and a bug
    # that let one through fails here rather than write a file JSON readers reject
    text = json.dumps(content, indent=2, allow_nan=False) + "\n"
    if not out.create(MANIFEST_NAME, text.encode("utf-8")):
        raise FileExistsError(f"{out.full_url(MANIFEST_NAME)} exists: a run manifest is never rewritten")
    return MANIFEST_NAME


def read_run_manifest(where: "Location | str | Path") -> dict[str, Any]:
    out = location(where)
    try:
        text = out.read_text(MANIFEST_NAME)
    except FileNotFoundError:
        if not out.exists():
            raise FileNotFoundError(f"{out}: does not exist") from None
        raise FileNotFoundError(f"{out}: no {MANIFEST_NAME}; is this a finished mifa build?") from None
    return json.loads(text)
