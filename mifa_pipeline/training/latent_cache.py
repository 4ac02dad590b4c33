"""The main phase's VAE latents, kept on disk so that a resumed run does not encode every image again.

The VAE is frozen in the main phase, so its latents of the training images are a pure function of the
VAE's weights, the images and the device they were computed on. The cache file holds them with a key
over exactly those (sha256 of every VAE tensor, the image tensors' bytes, the device type and dtype);
a run whose key differs ignores the file and writes a new one. Written atomically (temporary name, then
rename), float32 as computed, so a run that loads it continues bit for bit like one that encoded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

CACHE_FILE = "latent_cache.safetensors"
FORMAT = "1"


def _update(h: "hashlib._Hash", tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of a large image tensor


def cache_key(vae: torch.nn.Module, images: dict[str, torch.Tensor], device: torch.device) -> str:
    """sha256 over the VAE's tensors (names included), the named image tensors and the device type."""
    h = hashlib.sha256(f"format {FORMAT} device {device.type}".encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        _update(h, tensor)
    for name, tensor in sorted(images.items()):
        h.update(name.encode())
        _update(h, tensor)
    return h.hexdigest()


def load(path: Path, key: str) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The cached tensors when the file exists and was written under ``key``; else None and why not."""
    if not path.is_file():
        return None, "none on disk"
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get("key")
        if stored != key:
            return None, "stale (the VAE, the data or the device differ)"
        return load_file(str(path)), "loaded"
    except (SafetensorError, OSError, ValueError) as err:  # a truncated or foreign file: encode again
        return None, f"unreadable ({err})"


def save(path: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write atomically: a crash mid-write leaves the old file (or none), never half a cache."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"key": key, "format": FORMAT})
    os.replace(tmp, path)
