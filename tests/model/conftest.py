"""Shared fixtures for the MAUGen model tests: a tiny model and tiny "official-format" files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread: on 2 shared cores, 2 OpenMP threads competing with other test runs were
# measured up to 50x slower (spinning barriers); 1 thread is stable and about as fast for the tiny model.
torch.set_num_threads(1)

from mifa_pipeline.maugen import MAUGen  # noqa: E402
from mifa_pipeline.maugen.text import write_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny() -> MAUGen:
    return MAUGen.tiny(seed=0)


def make_inputs(n: int, resolution: int = 64, seed: int = 123):
    """Deterministic masked images / masks: a black square to generate in the middle of random pixels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, resolution, resolution, generator=g)
    masks = torch.zeros(n, 1, resolution, resolution)
    masks[:, :, resolution // 4: 3 * resolution // 4, resolution // 4: 3 * resolution // 4] = 1
    return images * (1 - masks), masks


def write_official(model: MAUGen, root: Path, fmt: str = "pt") -> dict[str, Path]:
    """Write ``model`` the way the official release is laid out: an SD-inpainting base folder (without the
    <ID> tokens) plus the CustomUNet state dict, the bare AU-cue tensor, MSID and mapping state dicts."""
    base = root / "sd-inpaint"
    model.dig.unet.save_pretrained(base / "unet")
    model.vae.save_pretrained(base / "vae")
    te = model.text.text_encoder
    base_vocab = te.config.vocab_size - 2
    keep = te.get_input_embeddings().weight.data.clone()
    te_copy = type(te)(type(te.config)(**{**te.config.to_dict(), "vocab_size": base_vocab}))
    te_copy.load_state_dict({**te.state_dict(), _emb_key(te): keep[:base_vocab]})
    te_copy.save_pretrained(base / "text_encoder")
    write_tiny_tokenizer(base / "tokenizer")
    (base / "scheduler").mkdir(parents=True)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config))
    files = {"base": base}
    tensors = {
        "unet_state": model.dig.state_dict(),
        "au_cue": model.au_cue.data.clone(),
        "msid": model.identity_encoder.state_dict(),
        "mapping": model.mapping.state_dict(),
    }
    for name, obj in tensors.items():
        if fmt == "safetensors":
            from safetensors.torch import save_file
            path = root / f"{name}.safetensors"
            save_file({k: v.contiguous() for k, v in obj.items()} if isinstance(obj, dict) else {"au_cue": obj}, str(path))
        else:
            path = root / f"{name}.pt"
            torch.save(obj, path)
        files[name] = path
    return files


def _emb_key(te) -> str:
    return next(k for k in te.state_dict() if k.endswith("token_embedding.weight"))


@pytest.fixture(scope="session")
def official_files(tiny, tmp_path_factory) -> dict[str, Path]:
    return write_official(tiny, tmp_path_factory.mktemp("official"))
