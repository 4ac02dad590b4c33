"""The build manifest: one validated pydantic tree, read from YAML, overridable with `--set a.b=value`.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key is an error that names it.
Fields that only change *how fast* a build runs (batch size, workers, unit size, output path) are kept
apart from those that change *what* it produces: only the latter enter the fingerprint that decides
whether an existing output folder may be resumed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mifa_pipeline.aus import AU_PHRASES, DISFA12, EMOTION_PROTOTYPES


class ManifestError(ValueError):
    """A build manifest (or a --set override) that cannot be used; the message names field, value and expectation."""


MAX_MANIFEST_BYTES = 256 * 1024  # a build manifest is a few kB; a bigger file is a mistake (or an attack)
EXCERPT_CHARS = 60  # the most of a value an error message quotes
MAX_WEIGHT = 1e6  # relative weights: finite, and small enough that their sum is too
MAX_TASKS = 999_999  # identity blocks / shards: names carry six digits (train-000000.tar)
MAX_PIXEL_STD = 127.5  # the largest pixel standard deviation 8-bit values can have (half 0, half 255)
MAX_ERRORS = 10  # validation errors listed; the rest are counted


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A short repr of a user's value for an error message (never the whole of a huge or deeply nested one)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlist = short.maxdict = short.maxtuple = short.maxset = 6
    short.maxlevel = 3
    text = short.repr(value)
    return text if len(text) <= 2 * limit else text[: 2 * limit] + "..."


def clip(text: str, limit: int = 300) -> str:
    """A message part cut to `limit` characters (a library's error text can quote a whole input line)."""
    return text if len(text) <= limit else text[:limit] + "..."


def _check_path(value: Path | str) -> Path | str:
    """A path the OS can take: no NUL byte, each part at most 255 bytes, the whole at most 4096 bytes."""
    text = str(value)
    if "\0" in text:
        raise ValueError("a path cannot hold a NUL byte")
    if len(os.fsencode(text)) > 4096 or any(len(os.fsencode(part)) > 255 for part in text.split("/")):
        raise ValueError("path too long (at most 255 bytes per name, 4096 in all)")
    return value


SafePath = Annotated[Path, AfterValidator(_check_path)]


def _weight_table(what: str, weights: dict[str, float]) -> dict[str, float]:
    """Relative weights: each finite, in [0, MAX_WEIGHT], named by a short name, and some positive."""
    if not weights or sum(weights.values()) <= 0:
        raise ValueError(f"{what} needs at least one value with a positive weight, got {excerpt(weights)}")
    for name, w in weights.items():
        if not 0 <= w <= MAX_WEIGHT:
            raise ValueError(f"{what}[{excerpt(name)}]: weight {w!r} is outside [0, {MAX_WEIGHT:g}]")
        if not name.strip() or len(name) > 200:
            raise ValueError(f"{what}: name {excerpt(name)} must be 1-200 characters")
    return weights


class _Section(BaseModel):
    # allow_inf_nan=False: every float (nested in dicts too) is finite, so a manifest never holds Infinity/NaN
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"  # becomes part of file names and keys: no dots, slashes or spaces


class DatasetSection(_Section):
    name: str = Field("mifa", pattern=NAME_PATTERN, max_length=64,
                      description="data set name (letters, digits, _ and -; no dots: used in keys)")
    version: str = Field("1.0.0", pattern=r"^\d{1,6}\.\d{1,6}\.\d{1,6}$", description="semantic version of this data set")
    split: str = Field("train", pattern=NAME_PATTERN, max_length=64, description="shard prefix: {split}-000000.tar")
    description: str = Field("", max_length=10_000)
    license: str = Field("unknown", pattern=r"^[A-Za-z0-9_.+-]+$", max_length=64,
                         description="licence of the data, for its card: an SPDX id (e.g. apache-2.0), 'other' or "
                                     "'unknown'; it should follow the generator's")


class ExpressionMix(_Section):
    """Relative weights of the three kinds of expression a sample can ask for."""

    prototype: float = Field(0.5, ge=0, le=MAX_WEIGHT)
    random: float = Field(0.35, ge=0, le=MAX_WEIGHT)
    neutral: float = Field(0.15, ge=0, le=MAX_WEIGHT)

    @model_validator(mode="after")
    def _some_weight(self) -> "ExpressionMix":
        if self.prototype + self.random + self.neutral <= 0:
            raise ValueError("at least one of prototype/random/neutral must have a positive weight")
        return self


class RandomAUs(_Section):
    """Random AU combinations: how many AUs, and the intensity range (FACS 1..5) of each."""

    min_aus: int = Field(1, ge=1, le=64)
    max_aus: int = Field(3, ge=1, le=64)
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
            raise ValueError(f"only must name at least one AU, each once, got {excerpt(self.only)}")
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
    negative_prompt: str = Field(
        "deformed, distorted, disfigured, cartoon, 3d render, low quality, blurry, jpeg artifacts, "
        "plastic skin, blotchy skin, exaggerated wrinkles, over-exaggerated expression", max_length=2000)

    @field_validator("au_names")
    @classmethod
    def _known_aus(cls, names: list[str]) -> list[str]:
        return _known_au_list(names)

    @field_validator("demographics")
    @classmethod
    def _weights(cls, table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        if len(table) > 64:
            raise ValueError(f"at most 64 demographic attributes, got {len(table)}")
        for attribute, values in table.items():
            if not attribute.strip() or len(attribute) > 64:
                raise ValueError(f"attribute name {excerpt(attribute)} must be 1-64 characters")
            _weight_table(f"demographics.{excerpt(attribute, 64)}", values)
        return table

    @field_validator("emotions")
    @classmethod
    def _emotions(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = [e for e in weights if e not in EMOTION_PROTOTYPES]
        if unknown:
            raise ValueError(f"unknown emotion(s) {excerpt(unknown)}; expected some of {list(EMOTION_PROTOTYPES)}")
        return _weight_table("emotions", weights)

    @property
    def random_au_pool(self) -> list[str]:
        """The AUs random combinations draw from, in au_names order (so naming them all changes nothing)."""
        only = self.random_aus.only
        return list(self.au_names) if only is None else [au for au in self.au_names if au in only]

    @model_validator(mode="after")
    def _random_aus_in_set(self) -> "PromptSection":
        only = self.random_aus.only
        if only is not None and any(au not in self.au_names for au in only):
            raise ValueError(f"random_aus.only {excerpt(only)} names AUs outside au_names {self.au_names}")
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

    count: int = Field(16, ge=1, le=100_000_000, description="number of identities")
    samples_per_identity: int = Field(8, ge=1, le=10_000)
    source: Literal["generate", "folder", "teacher"] = Field(
        "generate", description="generate: painted by the model from the identity prompt; folder: your portraits; "
        "teacher: procedural faces rendered by the teacher (diverse, described exactly in the prompts)")
    folder: SafePath | None = Field(None, description="reference images (sorted by name) when source=folder")
    non_face_references: Literal["error", "skip"] = Field(
        "error", description="source=folder with the identity judge on: a reference in which the face judge finds "
        "no face (or several) is an error ('error'), or is passed over for the next image ('skip', counted in the "
        "run manifest)")
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

    checkpoint: Annotated[str, AfterValidator(_check_path)] = Field("demo", min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


AUTO_BATCH_CPU = 16  # sampler.batch_size 'auto' off CUDA (and under batch_invariant, where memory does not grow)
MAX_BATCH = 4096


class SamplerSection(_Section):
    steps: int = Field(30, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0, le=50, description="classifier-free guidance (SD-1.5 models: 7.5)")
    resolution: int | None = Field(None, ge=16, le=2048, description="square image size; default: the model's")
    scheduler: Literal["ddim", "dpm++", "euler", "pndm"] = "ddim"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int | Literal["auto"] = Field(
        16, description="samples per model call; 'auto': on CUDA the largest batch that fits the free device memory "
        "at this resolution and dtype (found once per worker by trial steps, recorded in the run manifest), "
        f"elsewhere {AUTO_BATCH_CPU}")
    batch_invariant: bool = Field(
        True, description="true: every sample runs alone inside the batch, so results are bitwise the same for any "
        "batch_size (slower); false: full batching (GPU throughput), results then depend on batch_size and "
        "resources.identities_per_unit within float tolerance, and both enter the fingerprint")
    compile: bool = Field(False, description="torch.compile the UNet and the VAE decoder (GPU speed; the first "
                          "batch waits for compilation; outputs differ from eager within float tolerance, so it "
                          "enters the fingerprint)")
    channels_last: bool = Field(False, description="channels_last memory format for the UNet and VAE (GPU speed; "
                                "enters the fingerprint like compile)")

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_range(cls, value: Any) -> int | str:
        if value == "auto" or (type(value) is int and 1 <= value <= MAX_BATCH):
            return value
        raise ValueError(f"batch_size must be 'auto' or an integer from 1 to {MAX_BATCH}, got {value!r}")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {value}")
        return value


class FaceCheck(_Section):
    """Detection by an independent detector: exactly one face of a sensible size."""

    detector: Literal["none", "yunet", "scrfd"] = Field("none", description="'none' records the face check as not run")
    path: SafePath | None = Field(None, description="detector file; default for yunet: the offline file in models_dir")
    min_fraction: float = Field(0.05, ge=0, le=1, description="face box area / image area")


class IdentityCheck(_Section):
    """Generated face vs its identity's reference face, by an ArcFace-type embedder through insightface."""

    embedder: Literal["none", "sface", "arcface"] = "none"
    path: SafePath | None = Field(None, description="embedder ONNX; default for sface: the offline file in models_dir")
    min_cosine: float | None = Field(None, ge=-1, le=1, description="drop below this (per model: SFace ~0.3-0.4)")
    duplicate_cosine: float | None = Field(None, ge=-1, le=1,
                                           description="drop an identity whose reference is this close to an earlier one")


class AUCheck(_Section):
    """MAUGen's labels and the prompt's request vs an independent AU estimate (e.g. MediaPipe blendshapes)."""

    estimator: str = Field("none", max_length=200, pattern=r"^[A-Za-z0-9_.]+(:[A-Za-z_][A-Za-z0-9_]*)?$",
                           description="'none', 'mediapipe', or 'package.module:Class'")
    path: SafePath | None = Field(None, description="estimator model file; default for mediapipe: models_dir")
    aus: list[str] | None = Field(None, description="AUs that count in agreement; default: all the estimator covers")
    present_threshold: float = Field(0.3, ge=0, le=1, description="estimate >= this counts as the AU shown")
    min_agreement: float | None = Field(None, ge=0, le=1, description="drop when au_agreement is below this")
    max_label_mae: float | None = Field(None, ge=0, le=5, description="drop when generated vs requested MAE is above")

    @field_validator("aus")
    @classmethod
    def _known(cls, names: list[str] | None) -> list[str] | None:
        return None if names is None else _known_au_list(names)


class FilterSection(_Section):
    """Stage 4. Every score is stored; these thresholds only decide keep/drop (re-decidable by `mifa filter`)."""

    min_pixel_std: float = Field(2.0, ge=0, le=MAX_PIXEL_STD,
                                 description="an image whose pixel std is below this is 'blank' (8-bit: at most 127.5)")
    face: FaceCheck = Field(default_factory=FaceCheck)
    identity: IdentityCheck = Field(default_factory=IdentityCheck)
    au: AUCheck = Field(default_factory=AUCheck)
    models_dir: SafePath | None = Field(None, description="offline face model files; default: the per-user cache")

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


def thresholds_no_sample_passes(cfg: FilterSection) -> list[str]:
    """The filter thresholds that drop every sample whatever is generated (each at its score's best value):
    a build (or re-filter) with one of them makes an empty data set, so it is refused unless allowed."""
    found = []
    if cfg.min_pixel_std >= MAX_PIXEL_STD:
        found.append(f"filter.min_pixel_std={cfg.min_pixel_std:g} (only a half-black, half-white image has a pixel "
                     f"std of {MAX_PIXEL_STD}, no face does)")
    if cfg.face.detector != "none" and cfg.face.min_fraction >= 1:
        found.append(f"filter.face.min_fraction={cfg.face.min_fraction:g} (a face box as large as the whole image)")
    if cfg.identity.embedder != "none" and cfg.identity.min_cosine is not None and cfg.identity.min_cosine >= 1:
        found.append(f"filter.identity.min_cosine={cfg.identity.min_cosine:g} (a face identical to its reference)")
    return found


class WriterSection(_Section):
    samples_per_shard: int = Field(1000, ge=1, le=1_000_000)
    image_format: Literal["png", "jpg", "webp"] = "png"
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality")


class ResourceSection(_Section):
    generation_workers: int = Field(1, ge=1, le=100_000)
    gpus_per_worker: float = Field(0.0, ge=0, le=64)
    cpus_per_worker: float = Field(1.0, gt=0, le=4096)
    filter_cpus: float = Field(0.5, gt=0, le=4096, description="CPUs each filter task asks Ray for")
    identities_per_unit: int = Field(4, ge=1, le=100_000,
                                     description="identities whose reference faces one task makes (identity phase)")
    torch_threads: int = Field(0, ge=0, le=4096, description="torch threads per generation worker; 0 = ceil(cpus_per_worker)")


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
    output: Annotated[str, AfterValidator(_check_path)] = Field("out/mifa", min_length=1, description="a folder, or an fsspec URL (s3://bucket/prefix, gs://, az://, memory://)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description=(
        "options for the output's fsspec filesystem (endpoint_url, region_name, ...); never credentials"))

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        from mifa_pipeline.storage import check_storage_options

        check_storage_options(value)
        return value

    @property
    def total_samples(self) -> int:
        return self.identities.count * self.identities.samples_per_identity

    @model_validator(mode="after")
    def _plan_fits(self) -> "BuildManifest":
        blocks = math.ceil(self.identities.count / self.resources.identities_per_unit)
        if blocks > MAX_TASKS:
            raise ValueError(f"identities.count {self.identities.count} / resources.identities_per_unit "
                             f"{self.resources.identities_per_unit} makes {blocks} identity blocks, at most {MAX_TASKS}; "
                             "raise resources.identities_per_unit")
        shards = math.ceil(self.total_samples / self.writer.samples_per_shard)
        if shards > MAX_TASKS:
            raise ValueError(f"{self.total_samples} planned samples / writer.samples_per_shard "
                             f"{self.writer.samples_per_shard} makes {shards} shards, at most {MAX_TASKS}; "
                             "raise writer.samples_per_shard")
        return self


# Fields that change how a build runs, never what it writes. Everything else is output-determining.
RUNTIME_ONLY_FIELDS = {
    ("sampler", "batch_size"),
    ("resources",),
    ("output",),
    ("storage_options",),
    ("model", "device"),
}

# Options added after builds existed, with the value that means "as before": left at it, they are left out
# of the output-determining config, so builds made before the option keep their fingerprints (and resume).
LATER_OPTIONS_AT_DEFAULT = {
    ("prompts", "random_aus", "only"): None,
    ("identities", "non_face_references"): "error",
    ("dataset", "license"): "unknown",
    ("sampler", "compile"): False,
    ("sampler", "channels_last"): False,
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
    return int(re.sub(r"\D", "", name)[:6] or 0)


def _known_au_list(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in AU_PHRASES]
    if unknown:
        raise ValueError(f"unknown AU name(s) {excerpt(unknown)}; expected names from {sorted(AU_PHRASES, key=_au_number)}")
    if len(set(names)) != len(names):
        raise ValueError(f"AU names must be unique, got {excerpt(names)}")
    return names


def _format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem (at most MAX_ERRORS), each quoting only an excerpt of the value."""
    items = error.errors(include_url=False, include_context=False)
    lines = [f"{source}: invalid build manifest"]
    for item in items[:MAX_ERRORS]:
        where = ".".join(excerpt(p, 40) if not isinstance(p, str) or len(p) > 40 else p for p in item["loc"])
        got = excerpt(item.get("input"))
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where or '(top level)'}: unknown key (value {got}); check its spelling against `mifa schema`")
        else:
            lines.append(f"  {where or '(top level)'}: {clip(item['msg'])} (got {got})")
    if len(items) > MAX_ERRORS:
        lines.append(f"  ... and {len(items) - MAX_ERRORS} more")
    return "\n".join(lines)


class _BoundedLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a manifest's size on disk bounds its size in memory (no alias bombs)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&name, *name, <<) are not allowed "
                                              "in a build manifest; write the values out", event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str) -> Any:
    """YAML -> Python with the bounded loader; raises yaml.YAMLError (too deep nesting included)."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML, so numbers, booleans and lists work)."""
    if "=" not in text:
        raise ManifestError(f"--set {excerpt(text)}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(re.fullmatch(r"[A-Za-z0-9_]+", p) for p in parts):
        raise ManifestError(f"--set {excerpt(text)}: {excerpt(key)} is not a dotted key like sampler.steps")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ManifestError(f"--set {excerpt(text)}: value is not valid YAML ({clip(str(exc), 200)})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ManifestError(f"--set {excerpt(text)}: {part!r} is a value, not a section")
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
        data = read_manifest_file(p)
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


def read_manifest_file(path: Path) -> dict[str, Any]:
    """The mapping a manifest file holds: bounded in size (MAX_MANIFEST_BYTES), UTF-8, no aliases, not empty."""
    source = str(path)
    try:
        if not path.is_file():
            raise ManifestError(f"{source}: build manifest not found")
        with path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(f"{source}: cannot read the build manifest ({exc.strerror or exc})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{source}: larger than {MAX_MANIFEST_BYTES // 1024} KiB; a build manifest is a few kB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{source}: not UTF-8 text (byte {exc.start}); a build manifest is YAML") from None
    try:
        loaded = parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: not valid YAML: {clip(str(exc))}") from None
    if loaded is None or loaded == {}:
        raise ManifestError(f"{source}: the build manifest is empty; give at least one setting (see manifests/demo.yaml "
                            "or `mifa schema`), or omit the file to build on the built-in defaults")
    if not isinstance(loaded, dict):
        raise ManifestError(f"{source}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def _resolve_relative(manifest: BuildManifest, base: Path, output_given: bool) -> BuildManifest:
    """Paths written in a manifest file are relative to it; --out is relative to the caller's cwd."""
    update: dict[str, Any] = {}
    if not output_given and "://" not in manifest.output and not Path(manifest.output).is_absolute():
        update["output"] = str(Path.cwd() / manifest.output)
    folder = manifest.identities.folder
    if folder is not None and not folder.is_absolute():
        manifest.identities.folder = base / folder
    ckpt = manifest.model.checkpoint
    if ckpt not in BUILTIN_GENERATORS and not Path(ckpt).is_absolute() and (base / ckpt).exists():
        manifest.model.checkpoint = str(base / ckpt)
    return manifest.model_copy(update=update) if update else manifest


def json_schema() -> dict[str, Any]:
    return BuildManifest.model_json_schema()
