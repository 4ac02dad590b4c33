"""The build manifest: one validated pydantic tree, read from YAML, overridable with `--set a.b=value`.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key is an error that names it.
Fields that only change *how fast* a build runs (batch size, workers, unit size, output path) are kept
apart from those that change *what* it produces: only the latter enter the fingerprint that decides
whether an existing output folder may be resumed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mifa_pipeline.aus import AU_PHRASES, DISFA12, EMOTION_PROTOTYPES


class ManifestError(ValueError):
    """A build manifest (or a --set override) that cannot be used; the message names field, value and expectation."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetSection(_Section):
    name: str = Field("mifa", pattern=r"^[A-Za-z0-9_-]+$", description="data set name (no dots: used in keys)")
    version: str = Field("1.0.0", pattern=r"^\d+\.\d+\.\d+$", description="semantic version of this data set")
    split: str = Field("train", pattern=r"^[A-Za-z0-9_-]+$", description="shard prefix: {split}-000000.tar")
    description: str = ""
    license: str = Field("unknown", pattern=r"^[A-Za-z0-9_.+-]+$",
                         description="licence of the data, for its card: an SPDX id (e.g. apache-2.0), 'other' or "
                                     "'unknown'; it should follow the generator's")


class ExpressionMix(_Section):
    """Relative weights of the three kinds of expression a sample can ask for."""

    prototype: float = Field(0.5, ge=0)
    random: float = Field(0.35, ge=0)
    neutral: float = Field(0.15, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> "ExpressionMix":
        if self.prototype + self.random + self.neutral <= 0:
            raise ValueError("at least one of prototype/random/neutral must have a positive weight")
        return self


class RandomAUs(_Section):
    """Random AU combinations: how many AUs, and the intensity range (FACS 1..5) of each."""

    min_aus: int = Field(1, ge=1)
    max_aus: int = Field(3, ge=1)
    min_intensity: int = Field(1, ge=1, le=5)
    max_intensity: int = Field(5, ge=1, le=5)
    only: list[str] | None = Field(None, description="draw the AUs only from these (e.g. the rare ones a set "
                                      "should hold more of); default: every AU of prompts.au_names")

    @model_validator(mode="after")
    def _ordered(self) -> "RandomAUs":
        if self.min_aus > self.max_aus:
            raise ValueError(f"min_aus ({self.min_aus}) must be <= max_aus ({self.max_aus})")
        if self.min_intensity > self.max_intensity:
            raise ValueError(f"min_intensity ({self.min_intensity}) must be <= max_intensity ({self.max_intensity})")
        if self.only is not None and (not self.only or len(set(self.only)) != len(self.only)):
            raise ValueError(f"only must name at least one AU, each once, got {self.only}")
        return self


DEFAULT_DEMOGRAPHICS: dict[str, dict[str, float]] = {
    "age": {"young adult": 0.3, "adult": 0.35, "middle-aged": 0.2, "elderly": 0.15},
    "gender": {"woman": 0.5, "man": 0.5},
    "ethnicity": {
        "East Asian": 1.0, "South Asian": 1.0, "Black": 1.0, "White": 1.0,
        "Hispanic": 1.0, "Middle Eastern": 1.0, "Southeast Asian": 1.0,
    },
    "hair": {
        "short black hair": 1.0, "long black hair": 1.0, "short brown hair": 1.0, "long brown hair": 1.0,
        "blond hair": 0.7, "red hair": 0.3, "grey hair": 0.5, "curly hair": 0.8, "a shaved head": 0.3,
    },
}


class PromptSection(_Section):
    """Stage 1: demographic attributes per identity, one expression and its description per sample."""

    au_names: list[str] = Field(default_factory=lambda: list(DISFA12), description="ordered AU set; must equal the model's")
    demographics: dict[str, dict[str, float]] = Field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_DEMOGRAPHICS.items()})
    expression_mix: ExpressionMix = Field(default_factory=ExpressionMix)
    emotions: dict[str, float] = Field(default_factory=lambda: {e: 1.0 for e in EMOTION_PROTOTYPES})
    random_aus: RandomAUs = Field(default_factory=RandomAUs)
    negative_prompt: str = (
        "deformed, distorted, disfigured, cartoon, 3d render, low quality, blurry, jpeg artifacts, "
        "plastic skin, blotchy skin, exaggerated wrinkles, over-exaggerated expression"
    )

    @field_validator("au_names")
    @classmethod
    def _known_aus(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in AU_PHRASES]
        if unknown:
            raise ValueError(f"unknown AU name(s) {unknown}; expected names from {sorted(AU_PHRASES, key=_au_number)}")
        if len(set(names)) != len(names):
            raise ValueError(f"AU names must be unique, got {names}")
        return names

    @field_validator("demographics")
    @classmethod
    def _weights(cls, table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for attribute, values in table.items():
            if not values or any(w < 0 for w in values.values()) or sum(values.values()) <= 0:
                raise ValueError(f"demographics.{attribute} needs at least one value with a positive weight, got {values}")
        return table

    @field_validator("emotions")
    @classmethod
    def _emotions(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = [e for e in weights if e not in EMOTION_PROTOTYPES]
        if unknown:
            raise ValueError(f"unknown emotion(s) {unknown}; expected some of {list(EMOTION_PROTOTYPES)}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"emotion weights must be >= 0 with a positive sum, got {weights}")
        return weights

    @property
    def random_au_pool(self) -> list[str]:
        """The AUs random combinations draw from, in au_names order (so naming them all changes nothing)."""
        only = self.random_aus.only
        return list(self.au_names) if only is None else [au for au in self.au_names if au in only]

    @model_validator(mode="after")
    def _random_aus_in_set(self) -> "PromptSection":
        only = self.random_aus.only
        if only is not None and any(au not in self.au_names for au in only):
            raise ValueError(f"random_aus.only {only} names AUs outside au_names {self.au_names}")
        pool = len(self.random_au_pool)
        if self.random_aus.min_aus > pool:
            raise ValueError(f"random_aus.min_aus ({self.random_aus.min_aus}) is more than the {pool} AUs it can draw from")
        return self


class EllipseMask(_Section):
    """Face+head region to regenerate, as an ellipse in fractions of the image (aligned portraits)."""

    center_x: float = Field(0.5, gt=0, lt=1)
    center_y: float = Field(0.45, gt=0, lt=1)
    radius_x: float = Field(0.3, gt=0, le=0.5)
    radius_y: float = Field(0.4, gt=0, le=0.5)


class IdentitySection(_Section):
    """Stage 2: how many identities, how many samples each, and where reference faces come from."""

    count: int = Field(16, ge=1, description="number of identities")
    samples_per_identity: int = Field(8, ge=1)
    source: Literal["generate", "folder", "teacher"] = Field(
        "generate", description="generate: painted by the model from the identity prompt; folder: your portraits; "
        "teacher: procedural faces rendered by the teacher (diverse, described exactly in the prompts)")
    folder: Path | None = Field(None, description="reference images (sorted by name) when source=folder")
    mask: EllipseMask = Field(default_factory=EllipseMask)

    @model_validator(mode="after")
    def _folder(self) -> "IdentitySection":
        if self.source == "folder" and self.folder is None:
            raise ValueError("identities.source is 'folder' but identities.folder is not set")
        return self


BUILTIN_GENERATORS = ("demo", "teacher")


def demo_model_dir() -> Path:
    """The trained demo MAUGen shipped inside the package (`mifa_pipeline/assets/demo_model`)."""
    from importlib.resources import files

    return Path(str(files("mifa_pipeline"))) / "assets" / "demo_model"


def checkpoint_dir(checkpoint: str) -> Path | None:
    """The folder a `model.checkpoint` value names: the demo model's folder for 'demo', None for 'teacher'."""
    if checkpoint == "teacher":
        return None
    return demo_model_dir() if checkpoint == "demo" else Path(checkpoint)


class ModelSection(_Section):
    """The generator: 'demo' (the built-in MAUGen), 'teacher' (the procedural renderer with exact labels,
    what `mifa teacher` uses), or a folder in mifa's MAUGen checkpoint format."""

    checkpoint: str = "demo"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class SamplerSection(_Section):
    steps: int = Field(30, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0)
    resolution: int | None = Field(None, ge=16, le=2048, description="square image size; default: the model's")
    scheduler: Literal["ddim", "dpm++", "euler", "pndm"] = "ddim"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = Field(16, ge=1, description="samples per model call")
    batch_invariant: bool = Field(
        True, description="true: every sample runs alone inside the batch, so results are bitwise the same for any "
        "batch_size (slower); false: full batching (GPU throughput), results then depend on batch_size and "
        "resources.identities_per_unit within float tolerance, and both enter the fingerprint")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {value}")
        return value


class FaceCheck(_Section):
    """Detection by an independent detector: exactly one face of a sensible size."""

    detector: Literal["none", "yunet", "scrfd"] = Field("none", description="'none' records the face check as not run")
    path: Path | None = Field(None, description="detector file; default for yunet: the offline file in models_dir")
    min_fraction: float = Field(0.05, ge=0, le=1, description="face box area / image area")


class IdentityCheck(_Section):
    """Generated face vs its identity's reference face, by an ArcFace-type embedder through insightface."""

    embedder: Literal["none", "sface", "arcface"] = "none"
    path: Path | None = Field(None, description="embedder ONNX; default for sface: the offline file in models_dir")
    min_cosine: float | None = Field(None, ge=-1, le=1, description="drop below this (per model: SFace ~0.3-0.4)")
    duplicate_cosine: float | None = Field(None, ge=-1, le=1,
                                           description="drop an identity whose reference is this close to an earlier one")


class AUCheck(_Section):
    """MAUGen's labels and the prompt's request vs an independent AU estimate (e.g. MediaPipe blendshapes)."""

    estimator: str = Field("none", description="'none', 'mediapipe', or 'package.module:Class'")
    path: Path | None = Field(None, description="estimator model file; default for mediapipe: models_dir")
    aus: list[str] | None = Field(None, description="AUs that count in agreement; default: all the estimator covers")
    present_threshold: float = Field(0.3, ge=0, le=1, description="estimate >= this counts as the AU shown")
    min_agreement: float | None = Field(None, ge=0, le=1, description="drop when au_agreement is below this")
    max_label_mae: float | None = Field(None, ge=0, le=5, description="drop when generated vs requested MAE is above")


class FilterSection(_Section):
    """Stage 4. Every score is stored; these thresholds only decide keep/drop (re-decidable by `mifa filter`)."""

    min_pixel_std: float = Field(2.0, ge=0, description="an image whose pixel std is below this is 'blank'")
    face: FaceCheck = Field(default_factory=FaceCheck)
    identity: IdentityCheck = Field(default_factory=IdentityCheck)
    au: AUCheck = Field(default_factory=AUCheck)
    models_dir: Path | None = Field(None, description="offline face model files; default: the per-user cache")

    @model_validator(mode="after")
    def _needs_faces(self) -> "FilterSection":
        if self.face.detector == "none":
            for name, on in (("identity.embedder", self.identity.embedder != "none"), ("au.estimator", self.au.estimator != "none")):
                if on:
                    raise ValueError(f"filter.{name} needs a face: set filter.face.detector (e.g. yunet)")
        if self.identity.embedder == "arcface" and self.identity.path is None:
            raise ValueError("filter.identity.embedder 'arcface' needs filter.identity.path (your model's ONNX)")
        if self.face.detector == "scrfd" and self.face.path is None:
            raise ValueError("filter.face.detector 'scrfd' needs filter.face.path (e.g. det_10g.onnx)")
        return self


class WriterSection(_Section):
    samples_per_shard: int = Field(1000, ge=1)
    image_format: Literal["png", "jpg", "webp"] = "png"
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality")


class ResourceSection(_Section):
    generation_workers: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    filter_cpus: float = Field(0.5, gt=0, description="CPUs each filter task asks Ray for")
    identities_per_unit: int = Field(4, ge=1, description="identities whose reference faces one task makes (identity phase)")
    torch_threads: int = Field(0, ge=0, description="torch threads per generation worker; 0 = ceil(cpus_per_worker)")


class BuildManifest(_Section):
    """A whole build: what to generate, with which model, how to filter and write it, and where."""

    schema_version: Literal[1] = 1
    dataset: DatasetSection = Field(default_factory=DatasetSection)
    seed: int = Field(0, ge=0, lt=2**63)
    identities: IdentitySection = Field(default_factory=IdentitySection)
    prompts: PromptSection = Field(default_factory=PromptSection)
    model: ModelSection = Field(default_factory=ModelSection)
    sampler: SamplerSection = Field(default_factory=SamplerSection)
    filter: FilterSection = Field(default_factory=FilterSection)
    writer: WriterSection = Field(default_factory=WriterSection)
    resources: ResourceSection = Field(default_factory=ResourceSection)
    output: Path = Path("out/mifa")

    @property
    def total_samples(self) -> int:
        return self.identities.count * self.identities.samples_per_identity


# Fields that change how a build runs, never what it writes. Everything else is output-determining.
RUNTIME_ONLY_FIELDS = {
    ("sampler", "batch_size"),
    ("resources",),
    ("output",),
    ("model", "device"),
}

# Options added after builds existed, with the value that means "as before": left at it, they are left out
# of the output-determining config, so builds made before the option keep their fingerprints (and resume).
LATER_OPTIONS_AT_DEFAULT = {
    ("prompts", "random_aus", "only"): None,
    ("dataset", "license"): "unknown",
}


def output_determining(manifest: BuildManifest) -> dict[str, Any]:
    """The manifest as JSON without runtime-only fields: equal dicts mean byte-identical outputs."""
    data = manifest.model_dump(mode="json")
    runtime = set(RUNTIME_ONLY_FIELDS)
    if not manifest.sampler.batch_invariant:  # batching then shows in the bits: it must match to resume
        runtime.discard(("sampler", "batch_size"))
        data["batching"] = {"identities_per_unit": manifest.resources.identities_per_unit}
    for path in runtime:
        _parent(data, path).pop(path[-1], None)
    for path, default in LATER_OPTIONS_AT_DEFAULT.items():
        if _parent(data, path).get(path[-1]) == default:
            _parent(data, path).pop(path[-1])
    return data


def _parent(data: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """The dict holding the field at ``path`` (the keys from the top) of a dumped manifest."""
    for part in path[:-1]:
        data = data[part]
    return data


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- loading and overrides


def _au_number(name: str) -> int:
    return int(re.sub(r"\D", "", name) or 0)


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid build manifest"]
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (value {item['input']!r}); check its spelling against `mifa schema`")
        else:
            lines.append(f"  {where}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML, so numbers, booleans and lists work)."""
    if "=" not in text:
        raise ManifestError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(re.fullmatch(r"[A-Za-z0-9_]+", p) for p in parts):
        raise ManifestError(f"--set {text!r}: {key!r} is not a dotted key like sampler.steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ManifestError(f"--set {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ManifestError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_manifest(path: str | Path | None, overrides: list[str] = (), output: str | Path | None = None) -> BuildManifest:
    """Read YAML (or start from defaults), apply --set overrides and --out, validate once."""
    source = "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ManifestError(f"{source}: build manifest not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ManifestError(f"{source}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ManifestError(f"{source}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
        # relative paths in a manifest are relative to the manifest's folder
        base = p.resolve().parent
    else:
        base = Path.cwd()
    data = apply_overrides(data, list(overrides))
    if output is not None:
        data["output"] = str(output)
    try:
        manifest = BuildManifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(_format_validation_error(exc, source)) from None
    if path is not None:
        manifest = _resolve_relative(manifest, base, output_given=output is not None)
    return manifest


def _resolve_relative(manifest: BuildManifest, base: Path, output_given: bool) -> BuildManifest:
    """Paths written in a manifest file are relative to it; --out is relative to the caller's cwd."""
    update: dict[str, Any] = {}
    if not output_given and not manifest.output.is_absolute():
        update["output"] = Path.cwd() / manifest.output
    folder = manifest.identities.folder
    if folder is not None and not folder.is_absolute():
        manifest.identities.folder = base / folder
    ckpt = manifest.model.checkpoint
    if ckpt not in BUILTIN_GENERATORS and not Path(ckpt).is_absolute() and (base / ckpt).exists():
        manifest.model.checkpoint = str(base / ckpt)
    return manifest.model_copy(update=update) if update else manifest


def json_schema() -> dict[str, Any]:
    return BuildManifest.model_json_schema()
