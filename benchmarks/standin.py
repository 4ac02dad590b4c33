"""A stand-in generator for `benchmarks/pipeline.py --standin SECONDS`: MAUGen's sampling interface with a fixed
latency per batch, standing in for a GPU.

The latency is spent in `time.sleep`, which releases the GIL the way a thread waiting on CUDA kernels does, so
the CPU work of other shards (judging, encoding, writing) can run meanwhile, as it would beside a real GPU. The
images it returns are the identities' reference faces, so the real judges see real faces and do their full work. Never used by a build outside this benchmark.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

ENV = "MIFA_STANDIN_LATENCY"  # seconds per batch; read by `install` in each Ray worker


@dataclass
class StandInOutput:
    images: torch.Tensor
    occurrence_prob: torch.Tensor
    intensity: torch.Tensor
    intensity_rounded: torch.Tensor


class StandInGenerator(torch.nn.Module):
    def __init__(self, latency: float, au_names: list[str], resolution: int = 64):
        super().__init__()
        self.latency, self.au_names, self.resolution = latency, list(au_names), resolution
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # where "the device" is
        self.batches = 0
        self.references: list[torch.Tensor] = []

    def encode_identity(self, faces: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """An 'embedding' that is the index of the face kept here, so `sample` can return the face itself."""
        first = len(self.references)
        self.references += [f.detach().cpu() for f in faces]
        return torch.arange(first, first + len(faces), dtype=torch.float32)[:, None, None].repeat(1, 2, 4)

    def sample(self, prompts, masked_images, masks, identity_embeds, generators, num_inference_steps=30,
               guidance_scale=7.5, negative_prompt="", scheduler="ddim") -> StandInOutput:
        start = time.perf_counter()
        self.batches += 1
        if identity_embeds is None:  # painting references: the canvas as it is
            images = masked_images
        else:  # the identity's own reference face (what a perfect generator keeps), masked region included
            images = torch.stack([self.references[int(i)] for i in identity_embeds[:, 0, 0].round()]).to(masked_images)
        labels = torch.stack([torch.rand(len(self.au_names), generator=g) for g in generators])
        time.sleep(max(0.0, self.latency - (time.perf_counter() - start)))  # the "GPU": GIL released
        return StandInOutput(images, labels, labels * 5, torch.round(labels * 5).long())


def install(latency: float | None = None) -> None:
    """Route this process's generation stage to the stand-in (a Ray `worker_process_setup_hook`, or in-process
    for the local runner). Latency: the argument, else the environment variable MIFA_STANDIN_LATENCY."""
    import mifa_pipeline.stages.generate as generate
    from mifa_pipeline.aus import DISFA12

    seconds = float(os.environ[ENV]) if latency is None else latency

    def load_model(model, sampler):
        return StandInGenerator(seconds, DISFA12, sampler.resolution or 64)

    generate.load_model = load_model
