"""A stand-in with MAUGen's sampling interface, for testing pipeline mechanics fast.

It honours the contract the pipeline relies on: per-sample generators (results independent of batch),
the masked canvas kept outside the mask, labels in range. It is never used outside tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mifa_pipeline.aus import DISFA12


@dataclass
class FakeOutput:
    images: torch.Tensor
    occurrence_prob: torch.Tensor
    intensity: torch.Tensor
    intensity_rounded: torch.Tensor


class FakeMAUGen(torch.nn.Module):
    def __init__(self, resolution: int = 32, au_names=DISFA12):
        super().__init__()
        self.au_names = list(au_names)
        self.resolution = resolution
        self.proj = torch.nn.Linear(4, 4)
        self.calls: list[int] = []

    def encode_identity(self, faces: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        return faces.mean(dim=(2, 3)).unsqueeze(1).repeat(1, 2, 1)

    def sample(self, prompts, masked_images, masks, identity_embeds, generators, num_inference_steps=30,
               guidance_scale=7.5, negative_prompt="", scheduler="ddim"):
        self.calls.append(len(prompts))
        b, _, h, w = masked_images.shape
        noise = torch.stack([torch.rand(3, h, w, generator=g) for g in generators])
        labels = torch.stack([torch.rand(len(self.au_names), generator=g) for g in generators])
        tint = 0.0 if identity_embeds is None else identity_embeds[:, 0, :3, None, None].expand(b, 3, h, w) * 0.2
        images = masked_images * (1 - masks) + masks * (0.6 * noise + 0.2 + tint).clamp(0, 1)
        intensity = labels * 5
        return FakeOutput(images, labels, intensity, torch.round(intensity).long())


def install_in_worker() -> None:
    """Ray `worker_process_setup_hook`: route every Ray worker's generation stage to the fake."""
    import mifa_pipeline.stages.generate as generate

    model = FakeMAUGen()
    generate.load_model = lambda *args, **kwargs: model
