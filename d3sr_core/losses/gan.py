"""Adversarial losses over patch logits (``[B, 1, h, w]`` or any shape; mean over everything).

Non-saturating (the paper's, in logit form, as DMD2 writes it):
    D: ``softplus(-D(real)) + softplus(D(fake))``      G: ``softplus(-D(fake))``
Hinge (option):
    D: ``relu(1 - D(real)) + relu(1 + D(fake))``       G: ``-D(fake)``
Each term is averaged over patches and batch. Logits are upcast to float32 first, since a
bf16 softplus of large logits loses the loss' small gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

GAN_LOSSES = ("non_saturating", "hinge")


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"GAN loss must be one of {GAN_LOSSES}, got {kind!r}")


def discriminator_loss(
    real_logits: Tensor, fake_logits: Tensor, kind: str = "non_saturating"
) -> Tensor:
    """Discriminator loss (scalar): low when real logits are high and fake logits low.

    Args:
        real_logits: ``D(F(z_real, t))``, e.g. ``[B, 1, 16, 16]`` patch logits.
        fake_logits: ``D(F(z_fake, t'))`` (the generator's output detached).
        kind: ``"non_saturating"`` (default, the paper's) or ``"hinge"``.
    """
    _check_kind(kind)
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def generator_loss(fake_logits: Tensor, kind: str = "non_saturating") -> Tensor:
    """Generator loss (scalar): low when the discriminator calls the fakes real.

    ``fake_logits`` must keep the graph back to the generator (the discriminator's own
    parameters are usually frozen for this step).
    """
    _check_kind(kind)
    fake = fake_logits.float()
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()


def r1_penalty(real_logits: Tensor, real_inputs: Tensor) -> Tensor:
    """Exact R1 penalty ``E_b ||d sum(D(x_b)) / d x_b||^2`` (scalar, add ``gamma / 2 *`` it).

    ``real_inputs`` must have ``requires_grad=True`` before the discriminator call; the
    penalty keeps the graph (double backward). Note that flash/memory-efficient attention
    kernels have no double backward on GPU; use :func:`approximate_r1_penalty` there.
    """
    (grad,) = torch.autograd.grad(
        real_logits.float().sum(), real_inputs, create_graph=True, retain_graph=True
    )
    return grad.float().pow(2).reshape(grad.shape[0], -1).sum(1).mean()


def approximate_r1_penalty(real_logits: Tensor, perturbed_logits: Tensor) -> Tensor:
    """R1 without double backward (FastGen/LADD style): ``mean((D(x) - D(x + s * n))^2)``.

    Call the discriminator on the real input and on the same input plus small Gaussian
    noise (``s`` ~ 0.1; same timestep and diffusion noise) and pass both logit tensors.
    Penalising their difference penalises the discriminator's input gradient.
    """
    return (real_logits.float() - perturbed_logits.float()).pow(2).mean()
