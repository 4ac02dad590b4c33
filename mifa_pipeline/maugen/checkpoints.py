"""Checkpoints: the official MAUGen files (strict, pickle-free) and our diffusers-style folder format.

Our folder::

    maugen_config.json                 the whole MAUGen.config (au_names, resolution, component configs)
    unet/  vae/                         diffusers save_pretrained (config.json + safetensors)
    text_encoder/  tokenizer/           transformers save_pretrained (with <ID>/<ID2> added)
    scheduler/scheduler_config.json
    label_branch/ au_cue/ identity_encoder/ mapping/    config.json + model.safetensors each

Official files (reference §5) are loaded with explicit key accounting: any missing, unexpected or
mis-shaped key is an error that lists them (the official code loaded the main file with strict=False).
Nothing is ever unpickled: ``torch.load(weights_only=True)`` for the official .pt/.bin/.pth/.ckpt files,
safetensors otherwise; a library component (unet, vae, text_encoder) is read from safetensors only, and a
folder that holds only a pickled ``.bin`` is refused with one line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from . import configs
from .identity import IdentityEncoder, IdentityMapping
from .model import MAUGen
from .text import TextSide
from .unet import MAUGenUNet

CONFIG_NAME = "maugen_config.json"
WEIGHTS_NAME = "model.safetensors"
OWN_COMPONENTS = ("label_branch", "au_cue", "identity_encoder", "mapping")
_TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
_LIST_LIMIT = 20


# diffusers warns on every load when accelerate is missing and low_cpu_mem_usage is left at its default.
_LOW_MEM = {"low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be loaded; the message names the file and the problem."""


# --------------------------------------------------------------------------- reading files
def read_tensors(path: str | Path) -> dict[str, torch.Tensor] | torch.Tensor:
    """A state dict (or a bare tensor) from ``path`` without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if path.suffix not in _TORCH_SUFFIXES:
            raise CheckpointError(f"{path}: unknown file type {path.suffix!r} (expected .safetensors or {sorted(_TORCH_SUFFIXES)})")
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load, it holds pickled objects other than tensors"
                              f"{_unsupported_global(str(exc))}") from None
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt or truncated files
        raise CheckpointError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None


def _unsupported_global(message: str) -> str:
    """The object torch's safe loader met (its message goes on to advise loading unsafely, which we never do)."""
    import re

    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return f" (it names {found.group(1)})" if found else ""


def library_weights(folder: Path) -> Path:
    """`folder`, once it is seen to hold safetensors weights: a pickled .bin alone is refused, never loaded."""
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        if pickled:
            raise CheckpointError(f"{folder}: holds only pickled weights ({', '.join(pickled)}); mifa reads library "
                                  "weights from .safetensors only: use the safetensors files of that model")
    return folder


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    obj = read_tensors(path)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a state dict (str -> tensor), got {type(obj).__name__}")
    return obj


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_LIST_LIMIT]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {k}" for k in shown) + more


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path, what: str,
                skip_prefix: str | None = None) -> None:
    """``load_state_dict`` with every missing / unexpected / mis-shaped key reported in one error.

    ``skip_prefix``: module keys under it are already loaded and are left out of the accounting.
    """
    expected = {k: v for k, v in module.state_dict().items() if not (skip_prefix and k.startswith(skip_prefix))}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"{source}: does not match the {what} ({len(state)} keys in file, {len(expected)} expected)"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatches", mismatched))
        raise CheckpointError("\n".join(parts))
    module.load_state_dict(state, strict=skip_prefix is None)


def read_au_cue(path: str | Path, num_aus: int, dim: int) -> torch.Tensor:
    """The official AU cue: a bare tensor [1, A, D] (a [A, D] tensor or a one-tensor safetensors file also work)."""
    obj = read_tensors(path)
    if isinstance(obj, dict):
        if len(obj) != 1:
            raise CheckpointError(f"{path}: expected a single AU-cue tensor, found keys {sorted(obj)}")
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor):
        raise CheckpointError(f"{path}: expected a tensor, got {type(obj).__name__}")
    cue = obj[None] if obj.ndim == 2 else obj
    if tuple(cue.shape) != (1, num_aus, dim):
        raise CheckpointError(f"{path}: AU cue has shape {list(obj.shape)}, expected [1, {num_aus}, {dim}] ({num_aus} AUs)")
    return cue.float()


# --------------------------------------------------------------------------- official import
def _library_config(config) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def load_base(base: str | Path) -> dict[str, Any]:
    """The components of a diffusers SD-1.5 inpainting folder (unet, vae, text_encoder, tokenizer, scheduler)."""
    base = Path(base)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (base / sub).is_dir():
            raise CheckpointError(f"{base}: not a diffusers SD-inpainting folder, missing sub-folder {sub!r}")
    sched_file = base / "scheduler" / "scheduler_config.json"
    try:
        unet = UNet2DConditionModel.from_pretrained(library_weights(base / "unet"), local_files_only=True,
                                                    use_safetensors=True, **_LOW_MEM)
        vae = AutoencoderKL.from_pretrained(library_weights(base / "vae"), local_files_only=True, use_safetensors=True,
                                            **_LOW_MEM)
        text_encoder = CLIPTextModel.from_pretrained(library_weights(base / "text_encoder"), local_files_only=True,
                                                     use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
        scheduler = json.loads(sched_file.read_text())
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{base}: cannot load the base model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    expected = configs.inpainting_channels(int(vae.config.latent_channels))
    if unet.config.in_channels != expected["in_channels"]:
        raise CheckpointError(f"{base / 'unet'}: in_channels is {unet.config.in_channels}, an inpainting UNet for "
                              f"this VAE has {expected['in_channels']}")
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def import_official(
    base: str | Path,
    unet_state: str | Path,
    au_cue: str | Path,
    msid: str | Path,
    mapping: str | Path,
    au_names: list[str] | None = None,
    preset: str = "full",
) -> MAUGen:
    """Build MAUGen from an SD-inpainting folder and the four official files, all strictly checked.

    UNet, VAE, text encoder and scheduler configs come from ``base``; the label-branch, identity and
    mapping sizes (which the files' shapes do not fully determine, e.g. head counts) from ``preset``:
    "full" for the official checkpoints, "tiny" for test files.
    """
    presets = {"full": configs.full_config, "tiny": configs.tiny_config}
    if preset not in presets:
        raise CheckpointError(f"unknown preset {preset!r}, choose one of {sorted(presets)}")
    parts = load_base(base)
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    cfg = presets[preset](au_names)
    cfg["unet"] = _library_config(unet.config)
    cfg["vae"] = _library_config(vae.config)
    cfg["text_encoder"] = _text_config(text_encoder)
    cfg["scheduler"] = parts["scheduler"]
    cfg["resolution"] = int(unet.config.sample_size) * configs.vae_scale_factor(cfg)
    try:
        configs.validate(cfg)
    except ValueError as exc:
        raise CheckpointError(f"{base}: {exc}") from None

    dig = MAUGenUNet(cfg, unet=unet)
    load_strict(dig, read_state_dict(unet_state), unet_state, "MAUGen CustomUNet (unet.* + label branch)")
    cue = read_au_cue(au_cue, len(cfg["au_names"]), configs.token_dim(cfg))
    identity_encoder = IdentityEncoder(cfg["identity_encoder"])
    load_strict(identity_encoder, read_state_dict(msid), msid, "MSID identity encoder")
    mapper = IdentityMapping(identity_encoder.out_dim, configs.token_dim(cfg), cfg["mapping"])
    load_strict(mapper, read_state_dict(mapping), mapping, "IMG2TEXTwithEXP mapping")
    text = TextSide(parts["tokenizer"], text_encoder, cfg["max_text_tokens"])
    cfg["text_encoder"] = _text_config(text_encoder)  # vocabulary grew by <ID>, <ID2>
    return MAUGen(cfg, dig, vae, text, identity_encoder, mapper, cue)


def _text_config(text_encoder: CLIPTextModel) -> dict[str, Any]:
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim",
            "bos_token_id", "eos_token_id", "pad_token_id")
    d = text_encoder.config.to_dict()
    return {k: d[k] for k in keep if k in d}


# --------------------------------------------------------------------------- our folder format
def _save_component(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / WEIGHTS_NAME))


def save_folder(model: MAUGen, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    model.dig.unet.save_pretrained(path / "unet", safe_serialization=True)
    model.vae.save_pretrained(path / "vae", safe_serialization=True)
    model.text.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    model.text.tokenizer.save_pretrained(path / "tokenizer")
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg["scheduler"], indent=2))
    label = {k: v for k, v in model.dig.state_dict().items() if not k.startswith("unet.")}
    _save_component(path / "label_branch", cfg["label_branch"], label)
    _save_component(path / "au_cue", {"au_names": cfg["au_names"]}, {"au_cue": model.au_cue.data})
    _save_component(path / "identity_encoder", cfg["identity_encoder"], model.identity_encoder.state_dict())
    _save_component(path / "mapping", cfg["mapping"], model.mapping.state_dict())


def _rewrite_weights(src: Path, dst: Path, rewrite: Callable[[Path, dict[str, torch.Tensor]], dict]) -> None:
    """Copy the folder `src` to `dst` with each safetensors file's tensors replaced by
    `rewrite(path relative to src, tensors)` (its metadata kept), every other file as it is. Refuses an
    existing, non-empty `dst`; writes beside it and renames at the end, so a failure leaves no
    half-written model."""
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst}: exists and is not empty")
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel in _files(src):
            file, target = src / rel, tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if file.suffix != ".safetensors":
                shutil.copyfile(file, target)
                continue
            with safe_open(file, framework="pt") as f:
                metadata = f.metadata()
            save_file(rewrite(rel, load_file(file)), target, metadata=metadata)
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _files(root: Path, pattern: str = "**/*") -> list[Path]:
    """The files under `root` matching `pattern`, as sorted paths relative to it."""
    return sorted(p.relative_to(root) for p in root.glob(pattern) if p.is_file())


def _folder_bytes(path: Path) -> int:
    return sum((path / rel).stat().st_size for rel in _files(path))


def store_half(src: str | Path, dst: str | Path) -> dict[str, int]:
    """Copy a MAUGen folder with every float32 tensor stored as float16: half the bytes for a model that
    ships inside a package (the demo model); `load_folder` casts back to the dtype asked for. Returns the
    bytes before and after. Refuses a tensor that float16 cannot hold and an existing, non-empty `dst`."""
    src, dst = Path(src), Path(dst)
    read_config(src)

    def to_half(rel: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, t in tensors.items():
            if t.dtype == torch.float32:
                half = t.to(torch.float16)
                if not torch.isfinite(half).all() and torch.isfinite(t).all():
                    raise CheckpointError(f"{src / rel}: {name} has values beyond float16's range "
                                          f"(max |x| {t.abs().max().item():.3g} > 65504)")
                tensors[name] = half
        return tensors

    _rewrite_weights(src, dst, to_half)
    return {"bytes_before": _folder_bytes(src), "bytes_after": _folder_bytes(dst)}


def average_folders(a: str | Path, b: str | Path, dst: str | Path, weight: float = 0.5) -> int:
    """Write `(1 - weight) * a + weight * b`, tensor by tensor, for two MAUGen folders of one architecture
    (a "model soup": a fine-tuned model averaged with the model it started from keeps much of both). The
    floating tensors that differ are averaged in float32 and stored in `a`'s dtype; equal tensors, integer
    tensors (batch-norm counters) and every other file are `a`'s, so a component both share (a frozen VAE)
    stays byte for byte the same. Refuses folders whose configs, weight files, tensor names or shapes
    differ, or whose tokenizers differ (their text embeddings would not mean the same words). Returns the
    number of tensors averaged."""
    a, b, dst = Path(a), Path(b), Path(dst)
    if not 0.0 <= weight <= 1.0:
        raise CheckpointError(f"weight: {weight} is not in [0, 1]")
    if read_config(a) != read_config(b):
        raise CheckpointError(f"{a} and {b}: {CONFIG_NAME} differ (not one architecture)")
    for pattern in ("**/*.safetensors", "tokenizer/*"):
        files_a, files_b = _files(a, pattern), _files(b, pattern)
        if files_a != files_b:
            raise CheckpointError(f"{a} and {b}: different {pattern} files ({[str(p) for p in files_a]} vs "
                                  f"{[str(p) for p in files_b]})")
    for tok in _files(a, "tokenizer/*"):
        if (a / tok).read_bytes() != (b / tok).read_bytes():
            raise CheckpointError(f"{a} and {b}: {tok} differs (the tokenizers must be the same)")
    averaged = 0

    def mix(rel: Path, ta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        nonlocal averaged
        tb = load_file(b / rel)
        if ta.keys() != tb.keys():
            raise CheckpointError(f"{rel}: tensor names differ ({sorted(set(ta) ^ set(tb))[:5]})")
        for name, x in ta.items():
            y = tb[name]
            if x.shape != y.shape:
                raise CheckpointError(f"{rel}: {name} has shape {tuple(x.shape)} vs {tuple(y.shape)}")
            if x.is_floating_point() and not torch.equal(x, y):
                ta[name] = ((1 - weight) * x.float() + weight * y.float()).to(x.dtype)
                averaged += 1
        return ta

    _rewrite_weights(a, dst, mix)
    return averaged


def read_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{path}: not a MAUGen folder ({CONFIG_NAME} not found)")
    try:
        cfg = json.loads(file.read_text())
        configs.validate(cfg)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file}: invalid config ({type(exc).__name__}: {exc})") from None
    return cfg


def load_folder(path: str | Path) -> MAUGen:
    """Load our format; own components strictly, library components with their own loaders."""
    path = Path(path)
    cfg = read_config(path)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", *OWN_COMPONENTS):
        if not (path / sub).is_dir():
            raise CheckpointError(f"{path}: missing component folder {sub!r}")
    try:
        unet = UNet2DConditionModel.from_pretrained(library_weights(path / "unet"), local_files_only=True,
                                                    use_safetensors=True, **_LOW_MEM)
        vae = AutoencoderKL.from_pretrained(library_weights(path / "vae"), local_files_only=True, use_safetensors=True,
                                            **_LOW_MEM)
        text_encoder = CLIPTextModel.from_pretrained(library_weights(path / "text_encoder"), local_files_only=True,
                                                     use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    except CheckpointError:
        raise
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: cannot load a library component ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    dig = MAUGenUNet(cfg, unet=unet)
    label_file = path / "label_branch" / WEIGHTS_NAME
    label_state = read_state_dict(label_file)
    load_strict(dig, label_state, label_file, "MAUGen label branch", skip_prefix="unet.")
    cue_file = path / "au_cue" / WEIGHTS_NAME
    cue = read_au_cue(cue_file, len(cfg["au_names"]), configs.token_dim(cfg))
    identity_encoder = IdentityEncoder(cfg["identity_encoder"])
    load_strict(identity_encoder, read_state_dict(path / "identity_encoder" / WEIGHTS_NAME),
                path / "identity_encoder" / WEIGHTS_NAME, "identity encoder")
    mapper = IdentityMapping(identity_encoder.out_dim, configs.token_dim(cfg), cfg["mapping"])
    load_strict(mapper, read_state_dict(path / "mapping" / WEIGHTS_NAME), path / "mapping" / WEIGHTS_NAME, "mapping")
    text = TextSide(tokenizer, text_encoder, cfg["max_text_tokens"])
    return MAUGen(cfg, dig, vae, text, identity_encoder, mapper, cue)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_info(path: str | Path) -> dict[str, Any]:
    """What ``mifa model info`` prints: components, AU list, parameter counts, sha256 of every file."""
    path = Path(path)
    cfg = read_config(path)
    counts: dict[str, int] = {}
    files: dict[str, str] = {}
    for relpath in _files(path):
        file, rel = path / relpath, relpath.as_posix()
        files[rel] = sha256_file(file)
        if file.suffix == ".safetensors":
            comp = rel.split("/")[0]
            with safe_open(str(file), framework="pt") as f:
                n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
            counts[comp] = counts.get(comp, 0) + n
    return {
        "path": str(path),
        "format": f"{cfg['format']} v{cfg['format_version']}",
        "resolution": cfg["resolution"],
        "au_names": cfg["au_names"],
        "components": sorted({rel.split("/")[0] for rel in files if "/" in rel}),
        "parameters": counts,  # stored tensor elements per component (buffers such as the PE included)
        "total_parameters": sum(counts.values()),
        "sha256": files,
    }
