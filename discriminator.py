"""SCott's latent discriminator: the frozen pretrained UNet with trainable LoRA adapters in its decoder.

Paper (Liu et al. 2024; docs/paper.md): D is initialised from the pretrained SD1.5 UNet; only LoRA weights in the
UNet decoder are trained (≈3.6 % of the parameters); it is conditioned on the timestep and the text; real = the data
latent z0, fake = the student's prediction ẑ0; hinge loss. Open choices, and ours:
  - where the logit comes from: a small trainable head on the last decoder feature map, one logit per latent
    location (PCM-style patch logits, Wang et al. 2024);
  - the timestep: clean inputs are scored at t = 0 (DMD2's clean option); `renoise=True` makes the trainer noise real
    and fake to one shared random t with shared noise first (LADD/DMD2's "diffusion GAN"), a config switch. D itself
    scores whatever latent it is given at the timestep it is given: `D(backbone, x_t, t, context)`;
  - rank: `lora_rank` (the default puts the trainable fraction near the paper's 3.6 % on SD1.5).

Memory: D holds no second UNet. Its LoRA set (lora.Adapters) is attached to the teacher's own decoder Linear layers
under the name "discriminator" (lora.attach) and switched on only for D's forward (lora.use_adapters), so otherwise
the teacher computes exactly the teacher. The UNet returns its last decoder feature map on request
(`decoder_features=True`), which the head reads: no hooks. The LoRA weights and the head are registered in this
module (so an optimiser, a checkpoint or an all-reduce sees only them); the backbone is passed in at call time and
never registered as a submodule.

Gradients: the generator loss must reach the student *through* the frozen backbone, so D's forward never runs under
no_grad; D's own step scores `x_fake.detach()`, so it never reaches the student.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import check_settings, setting
from lora import Adapters, attach, base_parameters, use_adapters

DISC_ADAPTERS = "discriminator"  # the name of D's LoRA set in the backbone's layers (lora.attach)


@dataclass
class DiscriminatorConfig:
    lora_rank: int = setting(128, "rank of D's adapters on every decoder Linear of the teacher", at_least=1)
    lora_alpha: float = setting(128.0, "alpha of D's adapters (delta scale alpha / rank)", above=0)
    renoise: bool = setting(False, "show D real and fake noised to one shared random t (default: clean latents at "
                                   "t = 0, the paper's real z0 vs fake x̂0)")

    def __post_init__(self):
        check_settings(self)


class Discriminator(nn.Module):
    """LoRA adapters for every Linear in `backbone.up_blocks` (attention q/k/v/out, GEGLU feed-forward, and the
    ResBlocks' time-embedding projections) + a head."""

    def __init__(self, backbone: nn.Module, cfg: DiscriminatorConfig = DiscriminatorConfig()):
        super().__init__()
        self.cfg = cfg
        self.targets = [name for name, m in backbone.named_modules()
                        if name.startswith("up_blocks.") and isinstance(m, nn.Linear)]
        if not self.targets:
            raise ValueError("the backbone has no Linear layers in up_blocks: is it a UNet from unet.py?")
        self.lora = Adapters.build(backbone, self.targets, cfg.lora_rank, cfg.lora_alpha)
        attach(backbone, DISC_ADAPTERS, self.lora)
        width = backbone.up_blocks[-1].resnets[-1].conv2.out_channels  # channels of the last decoder feature map
        self.head = nn.Sequential(nn.GroupNorm(32 if width % 32 == 0 else 1, width), nn.SiLU(),
                                  nn.Conv2d(width, 1, 3, padding=1))
        self.to(next(backbone.parameters()).device)

    def forward(self, backbone, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Patch logits (B, 1, h, w) for latents x_t (B, 4, h, w) at timesteps t (B,): the backbone's decoder with
        D's LoRA set on, its last feature map read by the head. `backbone` is the UNet D was built on, or a
        torch.compile of it. The caller chooses what x_t is (train.discriminator_view)."""
        with use_adapters(backbone, DISC_ADAPTERS):
            features = backbone(x_t, t, context, decoder_features=True)
        return self.head(features)

    def trainable_fraction(self, backbone) -> float:
        """Trainable parameters of D over the backbone's parameters (the paper reports ≈3.6 % on SD1.5)."""
        return sum(p.numel() for p in self.parameters()) / sum(p.numel() for p in base_parameters(backbone))


def d_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: E[relu(1 − D(real))] + E[relu(1 + D(fake))] (Lim & Ye 2017; PCM's choice)."""
    return F.relu(1 - logits_real.float()).mean() + F.relu(1 + logits_fake.float()).mean()


def g_hinge_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: −E[D(fake)], the generator term of the hinge GAN (its gradient is never zero)."""
    return -logits_fake.float().mean()
