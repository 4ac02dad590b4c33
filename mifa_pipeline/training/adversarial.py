"""A patch discriminator and hinge losses for the decoder phase (``--decoder-adversarial-weight``).

Why: a decoder trained on L1 + MSE alone draws the average of every face a latent could stand for, so lids,
lip edges and brows come out soft. Measured on the demo VAE (64 px): the teacher's AU5, AU17 and AU25
sweeps are still linearly readable from its latents and even from its decoded images (ridge R^2 0.5-0.75,
as from the original pixels), but the independent MediaPipe judge no longer reads them from the blurred
faces, and SFace tells identities apart less well. Latent diffusion trains its VAEs with a patch
discriminator for this reason. Here a small patch critic sharpens the decoder alone, so the latent space
and the UNet trained on it stay valid. Training-only: never saved in the model folder.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

CRITIC_LR = 2e-4              # constant; Adam betas as usual for GANs: little momentum, so the critic follows
CRITIC_BETAS = (0.5, 0.9)


class PatchDiscriminator(nn.Module):
    """Real/fake logits per patch (receptive field ~22 px; a 64 px image gives a 16 x 16 map).

    Spectral norm on every convolution keeps the critic Lipschitz, so a decoder that is already good is
    sharpened rather than thrown off by a critic that wins too fast.
    """

    def __init__(self, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            spectral_norm(nn.Conv2d(in_channels, width, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(2 * width, 2 * width, 3, 1, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(2 * width, 1, 3, 1, 1)),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [-1,1] -> logits [B,1,H/4,W/4]."""
        return self.net(images)


def critic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the critic: real patches above +1, decoded ones below -1."""
    return F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the decoder: raise the critic's score of its images."""
    return -fake_logits.float().mean()
