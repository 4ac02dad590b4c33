"""A patch discriminator and hinge losses for the decoder phase (``--decoder-adversarial-weight``).

Why: a decoder trained on L1 + MSE alone tends to draw soft lids, lip edges and brows, and latent
diffusion trains its VAEs with a patch discriminator for that reason. The critic here sharpens the decoder
alone, so the latent space and the UNet trained on it stay valid. Training-only: never saved in the model
folder. Measured on the 64 px demo (1,500 steps, weight 0.1): sharper hair and edges, but the judges'
figures moved both ways; a longer plain decoder run at a higher learning rate did better there, so the
demo model does not use the critic (its model card has both).
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
