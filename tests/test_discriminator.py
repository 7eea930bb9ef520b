"""The latent discriminator: a switchable LoRA delta on the frozen teacher, and where its gradients go."""
import copy

import torch

from lora import use_adapters

from discriminator import DISC_ADAPTERS, Discriminator, DiscriminatorConfig, d_hinge_loss, g_hinge_loss
from unet import UNet, UNetConfig, make_student


T0 = torch.zeros(2, dtype=torch.long)  # clean latents are scored at t = 0


def setup():
    torch.manual_seed(0)
    teacher = UNet(UNetConfig.tiny()).requires_grad_(False).eval()
    disc = Discriminator(teacher, DiscriminatorConfig(lora_rank=4))
    for lora in disc.lora.values():  # B starts at zero; perturb it so the delta is visible in these tests
        torch.nn.init.normal_(lora.up.weight, std=0.1)
    x = torch.randn(2, 4, 16, 16)
    ctx = torch.randn(2, 77, UNetConfig.tiny().cross_attention_dim)
    return teacher, disc, x, ctx


def test_lora_is_a_switchable_delta_on_the_teacher():
    teacher, disc, x, ctx = setup()
    t = torch.tensor([10, 500])
    before = teacher(x, t, ctx)
    with use_adapters(teacher, DISC_ADAPTERS):
        during = teacher(x, t, ctx)
        features = teacher(x, t, ctx, decoder_features=True)
    assert not torch.allclose(before, during)  # the adapters change the decoder ...
    assert torch.equal(teacher(x, t, ctx), before)  # ... and only while on: the teacher is the teacher again
    assert features.shape[-2:] == x.shape[-2:] and not any(m._forward_hooks for m in teacher.modules())
    torch.testing.assert_close(disc(teacher, x, t, ctx), disc.head(features))  # the head reads those features
    assert not any(name.startswith("backbone") for name, _ in disc.named_parameters())  # no second UNet inside D


def test_logits_are_patch_logits_that_depend_on_the_timestep():
    teacher, disc, x, ctx = setup()
    logits = disc(teacher, x, T0, ctx)
    assert logits.shape == (2, 1, 16, 16)
    assert not torch.allclose(disc(teacher, x, torch.tensor([3, 900]), ctx), logits)  # D is conditioned on t


def test_generator_loss_reaches_the_student_through_the_frozen_backbone():
    teacher, disc, x, ctx = setup()
    student = make_student(teacher).train().requires_grad_(True)
    teacher_state = copy.deepcopy(teacher.state_dict())
    w = torch.full((2,), 4.0)
    fake = student(x, torch.tensor([999, 999]), ctx, w=w)  # stands in for the student's x̂0
    disc.requires_grad_(False)
    g_hinge_loss(disc(teacher, fake, T0, ctx)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in disc.parameters())
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def test_discriminator_step_leaves_student_and_teacher_untouched():
    teacher, disc, x, ctx = setup()
    student = make_student(teacher).train().requires_grad_(True)
    student_state = copy.deepcopy(student.state_dict())
    teacher_state = copy.deepcopy(teacher.state_dict())
    opt = torch.optim.AdamW(disc.parameters(), lr=1e-2, betas=(0.0, 0.999))
    fake = student(x, torch.tensor([999, 999]), ctx, w=torch.full((2,), 4.0))
    loss = d_hinge_loss(disc(teacher, x, T0, ctx), disc(teacher, fake.detach(), T0, ctx))
    loss.backward()
    assert all(p.grad is None for p in student.parameters())
    assert sum(p.grad.abs().sum() for p in disc.parameters()) > 0
    lora_before = copy.deepcopy(disc.state_dict())
    opt.step()
    assert any(not torch.equal(v, lora_before[k]) for k, v in disc.state_dict().items())
    assert all(torch.equal(v, student_state[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert d_hinge_loss(real, fake).item() == (0 + 0.5) / 2 + (0 + 1.5) / 2
    assert g_hinge_loss(fake).item() == 0.75


def test_trainable_fraction_on_sd15_is_near_the_papers():
    with torch.device("meta"):  # the full SD1.5 UNet's shapes without allocating 3.4 GB
        unet = UNet(UNetConfig.sd15())
        disc = Discriminator(unet, DiscriminatorConfig())
    fraction = disc.trainable_fraction(unet)
    print(f"SD1.5 discriminator: {len(disc.targets)} LoRA layers, trainable fraction {100 * fraction:.2f}%")
    assert 0.025 < fraction < 0.05  # paper: ≈3.6 %
