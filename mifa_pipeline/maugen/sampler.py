"""Batched classifier-free-guidance inpainting with joint AU-label read-out (reference §4).

Design for throughput: both CFG halves go through one UNet call; the label branch runs on the conditional
half only (the official code ran it on both and kept the conditional half); the label read-out is
accumulated on the device with weights known before the loop; timesteps are moved to the device once, so
the loop has no host syncs with deterministic schedulers.

Per-sample determinism: each sample draws its initial latents, then its VAE posterior sample, then any
scheduler noise from its own generator, so a sample's result does not depend on its batch or position.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import diffusers
import torch
import torch.nn.functional as F

from . import configs
from .label_branch import sigmoid_rows

if TYPE_CHECKING:
    from .model import MAUGen

SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}


def make_scheduler(name: str, base_config: dict):
    """A fresh scheduler of family ``name`` (or a diffusers class name) on the checkpoint's noise schedule."""
    key = name.lower().replace("-", "_").replace("dpmpp", "dpm++")
    if key in SCHEDULERS:
        cls_name, extra = SCHEDULERS[key]
    elif name.endswith("Scheduler") and hasattr(diffusers, name):
        cls_name, extra = name, {}
    else:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)} or a diffusers class name")
    cfg = {k: v for k, v in base_config.items() if not k.startswith("_")}
    return getattr(diffusers, cls_name).from_config({**cfg, **extra})


@dataclass
class MAUGenOutput:
    images: torch.Tensor             # [B,3,H,W] float32 in [0,1], CPU
    occurrence_prob: torch.Tensor    # [B,A] float32, sigmoid of the step-averaged occurrence logit
    intensity: torch.Tensor          # [B,A] float32 in [0,5]
    intensity_rounded: torch.Tensor  # [B,A] int64 in 0..5, round half to even (NumPy's rule, reference §4.8)


class LabelReadout:
    """Step average of the conditional labels with weights 1/(t+1), normalised to sum 1 (reference §4.6).

    Raw occurrence logits and the sigmoid intensity outputs are averaged (not probabilities).
    """

    def __init__(self, timesteps: torch.Tensor):
        w = 1.0 / (timesteps.detach().to("cpu", torch.float64) + 1.0)
        self.weights = (w / w.sum()).tolist()
        self.det: torch.Tensor | None = None
        self.reg: torch.Tensor | None = None

    def add(self, step: int, det: torch.Tensor, reg: torch.Tensor) -> None:
        w = self.weights[step]
        det, reg = det.float() * w, reg.float() * w
        self.det = det if self.det is None else self.det + det
        self.reg = reg if self.reg is None else self.reg + reg

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(occurrence_prob, intensity, intensity_rounded) on the CPU."""
        prob = sigmoid_rows(self.det.cpu())
        intensity = (5.0 * self.reg).clamp(0.0, 5.0).cpu()
        return prob, intensity, torch.round(intensity).to(torch.int64)  # torch.round: half to even


def _per_sample_randn(shape: tuple[int, ...], generators: list[torch.Generator], device) -> torch.Tensor:
    """One [1, *shape] float32 draw per generator, on the generator's device, then moved to ``device``."""
    return torch.cat([torch.randn((1, *shape), generator=g, device=g.device, dtype=torch.float32) for g in generators]).to(device)


def _check_inputs(model: "MAUGen", prompts, masked_images, masks, identity_embeds, generators) -> None:
    b = len(prompts)
    if b == 0:
        raise ValueError("no prompts")
    if masked_images.ndim != 4 or masked_images.shape[:2] != (b, 3):
        raise ValueError(f"masked_images must be [{b},3,H,W], got {tuple(masked_images.shape)}")
    if masks.shape != (b, 1, *masked_images.shape[2:]):
        raise ValueError(f"masks must be [{b},1,H,W] matching the images, got {tuple(masks.shape)}")
    if len(generators) != b:
        raise ValueError(f"need one generator per sample: {len(generators)} generators for {b} prompts")
    multiple = configs.required_multiple(model.config)
    if masked_images.shape[2] % multiple or masked_images.shape[3] % multiple:
        raise ValueError(f"image sides must be multiples of {multiple}, got {tuple(masked_images.shape[2:])}")
    if identity_embeds is not None and (
        identity_embeds.ndim != 3 or identity_embeds.shape[0] not in (1, b) or identity_embeds.shape[1:] != (2, model.token_dim)
    ):
        raise ValueError(f"identity_embeds must be [{b} or 1, 2, {model.token_dim}], got {tuple(identity_embeds.shape)}")


@torch.no_grad()
def sample(
    model: "MAUGen",
    prompts: list[str],
    masked_images: torch.Tensor,
    masks: torch.Tensor,
    identity_embeds: torch.Tensor | None,
    generators: list[torch.Generator],
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    negative_prompt: str = "",
    scheduler: str = "ddim",
) -> MAUGenOutput:
    """Generate ``len(prompts)`` samples; see ``MAUGen.sample`` for the argument contract.

    With ``model.micro_batch_size = k`` every model call holds exactly k samples: the batch is cut into
    chunks of k and the last chunk is padded with throw-away copies (own dummy generators, so no caller
    generator is consumed twice); identities are expanded per sample. All calls then have the same shapes
    whatever the caller's batch size, and since no op mixes samples, a sample's bits do not depend on its
    batch (CPU kernels choose algorithms by shape, so different batch sizes differ in the last bits;
    README, "Batch invariance").
    """
    _check_inputs(model, prompts, masked_images, masks, identity_embeds, generators)
    n = len(prompts)
    k = model.micro_batch_size
    if not k:
        return _sample_batch(model, prompts, masked_images, masks, identity_embeds, generators,
                             num_inference_steps, guidance_scale, negative_prompt, scheduler)
    ident = None if identity_embeds is None else identity_embeds.expand(n, -1, -1)
    outs = []
    for lo in range(0, n, k):
        idx = list(range(lo, min(lo + k, n)))
        pad = k - len(idx)
        rows = idx + [idx[-1]] * pad
        gens = [generators[i] for i in idx] + [_dummy_generator(generators[idx[-1]]) for _ in range(pad)]
        out = _sample_batch(model, [prompts[i] for i in rows], masked_images[rows], masks[rows],
                            None if ident is None else ident[rows], gens,
                            num_inference_steps, guidance_scale, negative_prompt, scheduler)
        outs.append([getattr(out, f)[: len(idx)] for f in _FIELDS])
    return MAUGenOutput(*(torch.cat([o[j] for o in outs]) for j in range(len(_FIELDS))))


_FIELDS = ("images", "occurrence_prob", "intensity", "intensity_rounded")


def _dummy_generator(like: torch.Generator) -> torch.Generator:
    return torch.Generator(device=like.device).manual_seed(0)


def _sample_batch(model, prompts, masked_images, masks, identity_embeds, generators,
                  num_inference_steps, guidance_scale, negative_prompt, scheduler) -> MAUGenOutput:
    device, dtype = model.device, model.dtype
    b = len(prompts)
    cfg = guidance_scale > 1.0

    # Text: conditional prompts (with the <ID> splice) and the plain negative prompt, unconditional first.
    ident = None if identity_embeds is None else identity_embeds.to(device, dtype)
    text = model.text.encode(list(prompts), ident).to(dtype)
    if cfg:
        text = torch.cat([model.text.encode([negative_prompt]).to(dtype).expand(b, -1, -1), text])
    au_cue = model.au_cue.to(dtype).expand(text.shape[0], -1, -1)  # both halves get the cue (reference §4.5)
    # No identity: the IDM still needs one; a zero identity vector stands in (the official code has no such path).
    label_ident = ident if ident is not None else torch.zeros(1, 2, model.token_dim, device=device, dtype=dtype)

    sched = make_scheduler(scheduler, model.scheduler_config)
    sched.set_timesteps(num_inference_steps)
    timesteps = sched.timesteps                      # stays on the CPU for scheduler.step
    timesteps_dev = timesteps.to(device)             # one copy for the UNet: no per-step host sync
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(sched.step).parameters else {}

    # Generator order per sample: initial latents, then VAE posterior sample (reference §4.4).
    h, w = (s // configs.vae_scale_factor(model.config) for s in masked_images.shape[2:])
    channels = model.vae.config.latent_channels
    latents = _per_sample_randn((channels, h, w), generators, device) * sched.init_noise_sigma

    mask = (masks.float() > 0.5).float()             # binarised (the official code did not, reference §7 item 10)
    image = (masked_images.float() * (1.0 - mask)) * 2.0 - 1.0   # masked region -> -1, as in the official input
    posterior = model.vae.encode(image.to(device, dtype)).latent_dist
    noise = _per_sample_randn(tuple(posterior.mean.shape[1:]), generators, device)
    masked_latents = (posterior.mean.float() + posterior.std.float() * noise) * model.vae.config.scaling_factor
    mask_latents = F.interpolate(mask, size=(h, w), mode="nearest").to(device)
    extra = torch.cat([mask_latents, masked_latents], dim=1).to(dtype)   # [mask 1 | masked latent 4]
    if cfg:
        extra = torch.cat([extra, extra])
    label_rows = slice(b, 2 * b) if cfg else None

    readout = LabelReadout(timesteps)
    latents = _denoise(model, sched, timesteps, timesteps_dev, latents, extra, text, au_cue, label_ident, label_rows,
                       guidance_scale, step_kwargs, readout)
    decoded = model.vae.decode((latents / model.vae.config.scaling_factor).to(dtype)).sample
    images = (decoded.float() / 2 + 0.5).clamp(0, 1).cpu()
    prob, intensity, rounded = readout.result()
    return MAUGenOutput(images=images, occurrence_prob=prob, intensity=intensity, intensity_rounded=rounded)


def _denoise(model, sched, timesteps, timesteps_dev, latents, extra, text, au_cue, label_ident, label_rows,
             guidance_scale, step_kwargs, readout) -> torch.Tensor:
    """The step loop: device work only, nothing here waits for the device (tests count host syncs in it)."""
    dtype = model.dtype
    cfg = label_rows is not None
    for i, t in enumerate(timesteps):
        x = torch.cat([latents, latents]) if cfg else latents
        x = torch.cat([sched.scale_model_input(x, t).to(dtype), extra], dim=1)  # [noisy 4 | mask 1 | masked 4]
        eps, det, reg, _ = model.dig(x, timesteps_dev[i], text, au_cue, label_ident, label_rows=label_rows)
        eps = eps.float()
        if cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        latents = sched.step(eps, t, latents, **step_kwargs).prev_sample
        readout.add(i, det, reg)
    return latents
