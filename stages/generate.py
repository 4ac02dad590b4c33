"""Stage 3, generation: MAUGen draws each sample's face and predicts its AU labels in the same pass.

The stage receives an already-loaded model (see `load_model`), so a Ray actor loads it once in its
setup and a test can hand in a tiny one. Samples are cut into batches of `sampler.batch_size`; each
sample has its own torch generator seeded from (seed, identity, sample), so results do not depend on
which batch a sample falls into.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mifa_pipeline.config import AUTO_BATCH_CPU, ModelSection, SamplerSection, checkpoint_dir
from mifa_pipeline.records import IdentityRecord, SampleRecord, StageStats

if TYPE_CHECKING:
    import torch

# torch is imported where a function needs it: the stage's name, version and `model_description` are read by
# commands that run no model (`mifa filter`, `verify`, `inspect`), which would otherwise wait a second for it


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but torch sees no CUDA device")
    return torch.device(name)


def load_model(model: ModelSection, sampler: SamplerSection) -> Any:
    """The MAUGen model of a build: the built-in demo model, or a checkpoint folder in mifa's format."""
    import torch

    from mifa_pipeline.maugen import MAUGen

    device = resolve_device(model.device)
    dtype = getattr(torch, sampler.dtype)  # float32, float16 or bfloat16 (the manifest allows no other)
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError(f"sampler.dtype {sampler.dtype!r} needs a GPU; use float32 on CPU")
    net = MAUGen.from_pretrained(checkpoint_dir(model.checkpoint))
    net = net.to(device=device, dtype=dtype)
    return net.enable_speedups(channels_last=sampler.channels_last, compile=sampler.compile)


AUTO_BATCH_LIMIT = 256  # the search for sampler.batch_size 'auto' stops here


def largest_batch(fits: Callable[[int], bool], limit: int = AUTO_BATCH_LIMIT) -> int:
    """The largest b <= limit with fits(b), for fits monotone (true up to some size): doubling from 1, then
    bisection between the last size that fitted and the first that did not; 0 when even 1 does not fit."""
    if not fits(1):
        return 0
    good = 1
    while good < limit:
        trial = min(2 * good, limit)
        if not fits(trial):
            bad = trial
            break
        good = trial
    else:
        return good
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def cuda_trial(model: Any, resolution: int, sampler: SamplerSection, negative_prompt: str = "") -> Callable[[int], bool]:
    """fits(b): one sampling step (CFG and labels as configured) plus the VAE decode of b samples at the build's
    resolution and dtype, run on the device; False on torch.cuda.OutOfMemoryError (the cache is freed after)."""
    import torch

    device = next(iter(model.parameters())).device

    def fits(b: int) -> bool:
        try:
            model.sample(prompts=["a face"] * b, masked_images=torch.zeros(b, 3, resolution, resolution, device=device),
                         masks=torch.ones(b, 1, resolution, resolution, device=device), identity_embeds=None,
                         generators=[torch.Generator(device=device).manual_seed(i) for i in range(b)],
                         num_inference_steps=1, guidance_scale=sampler.guidance_scale,
                         negative_prompt=negative_prompt, scheduler=sampler.scheduler)
            torch.cuda.synchronize(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()
    return fits


def resolve_batch_size(config: SamplerSection, model: Any, resolution: int, negative_prompt: str = "",
                       fits: Callable[[int], bool] | None = None) -> tuple[int, str]:
    """(samples per model call, how it was chosen). 'auto' searches free device memory once (per worker) on
    CUDA without batch_invariant (where a model call holds the whole batch); else AUTO_BATCH_CPU."""
    if config.batch_size != "auto":
        return int(config.batch_size), "manifest"
    device = _device_of(model)
    if fits is None and (device.type != "cuda" or config.batch_invariant):
        why = "batch_invariant: one sample per model call" if device.type == "cuda" else f"no CUDA ({device.type})"
        return AUTO_BATCH_CPU, f"auto: default {AUTO_BATCH_CPU} ({why})"
    found = largest_batch(fits or cuda_trial(model, resolution, config, negative_prompt))
    if found == 0:
        raise RuntimeError(f"sampler.batch_size 'auto': not even one sample at {resolution} px in {config.dtype} fits "
                           f"the free memory of {device}")
    return found, f"auto: largest batch that fit the free memory of {device} (limit {AUTO_BATCH_LIMIT})"


def model_description(model: ModelSection) -> str:
    builtin = {"demo": "builtin:demo", "teacher": "builtin:teacher-renderer"}
    return builtin.get(model.checkpoint, str(model.checkpoint))


def _device_of(model: Any) -> torch.device:
    import torch

    return next(iter(model.parameters())).device if hasattr(model, "parameters") else torch.device("cpu")


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 list -> float [B,3,H,W] in [0,1]."""
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0)


def _masks(masks: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxW list (255 = region to generate) -> float [B,1,H,W] in [0,1]."""
    import torch

    return torch.from_numpy(np.stack(masks)).float().div(255.0)[:, None]


def _to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    import torch

    arr = images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [a.copy() for a in arr]


class Generation:
    name = "generate"
    version = "1"

    def __init__(self, config: SamplerSection, model: Any, au_names: list[str], negative_prompt: str = ""):
        if list(model.au_names) != list(au_names):
            raise ValueError(f"prompts.au_names {au_names} differ from the model's AU list {list(model.au_names)}")
        self.config = config
        self.model = model
        self.au_names = list(au_names)
        self.negative_prompt = negative_prompt
        self.resolution = config.resolution or model.resolution
        if hasattr(model, "micro_batch_size"):
            # fixed per-sample shapes inside each model call: the same bits whatever the batch
            model.micro_batch_size = 1 if config.batch_invariant else None
        self.device = self._device()
        self.batch_size, self.batch_size_source = resolve_batch_size(config, model, self.resolution, negative_prompt)

    def _device(self) -> torch.device:
        return _device_of(self.model)

    def _generators(self, seeds: list[int]) -> list[torch.Generator]:
        import torch

        device = self._device()
        return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def _sample(self, prompts, canvases, masks, identity_embeds, seeds):
        device = self._device()
        return self.model.sample(
            prompts=prompts,
            masked_images=canvases.to(device),
            masks=masks.to(device),
            identity_embeds=None if identity_embeds is None else identity_embeds.to(device),
            generators=self._generators(seeds),
            num_inference_steps=self.config.steps,
            guidance_scale=self.config.guidance_scale,
            negative_prompt=self.negative_prompt,
            scheduler=self.config.scheduler,
        )

    def paint(self, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        """Reference faces from identity prompts: the whole frame is generated, no identity input."""
        import torch

        size = self.resolution
        images: list[np.ndarray] = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                p, s = prompts[start:start + self.batch_size], seeds[start:start + self.batch_size]
                canvases = torch.zeros(len(p), 3, size, size)
                masks = torch.ones(len(p), 1, size, size)
                images += _to_uint8(self._sample(p, canvases, masks, None, s).images)
        return images

    def run(self, samples: list[SampleRecord], people: dict[int, IdentityRecord]) -> tuple[list[SampleRecord], StageStats]:
        import torch

        with torch.no_grad():
            return self._run(samples, people)

    def _run(self, samples: list[SampleRecord], people: dict[int, IdentityRecord]) -> tuple[list[SampleRecord], StageStats]:
        import torch

        start = time.perf_counter()
        # 1. identity embeddings, once per identity, one identity per call (so they never depend on the unit)
        embed_of = {
            i: self.model.encode_identity(_to_tensor([people[i].reference]).to(self._device()), _masks([people[i].mask]).to(self._device()))
            for i in sorted({s.identity for s in samples})
        }
        # 2. batches of samples, each with its own generator
        for first in range(0, len(samples), self.batch_size):
            batch = samples[first:first + self.batch_size]
            canvases = _to_tensor([people[s.identity].canvas for s in batch])
            masks = _masks([people[s.identity].mask for s in batch])
            ids = torch.cat([embed_of[s.identity] for s in batch])
            out = self._sample([s.prompt for s in batch], canvases, masks, ids, [s.seed for s in batch])
            # 3. read out images and labels per sample
            images = _to_uint8(out.images)
            prob = out.occurrence_prob.float().cpu().numpy()
            intensity = out.intensity.float().cpu().numpy()
            for k, s in enumerate(batch):
                s.image = images[k]
                s.occurrence_prob = {au: float(prob[k, j]) for j, au in enumerate(self.au_names)}
                s.intensity = {au: float(intensity[k, j]) for j, au in enumerate(self.au_names)}
        stats = StageStats(self.name, self.version, n_in=len(samples), n_out=len(samples),
                           seconds=time.perf_counter() - start)
        return samples, stats
