"""GAN losses over patch logits: values, signs, R1 penalties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from d3sr_core.losses.gan import (
    approximate_r1_penalty,
    discriminator_loss,
    generator_loss,
    r1_penalty,
)


def test_non_saturating_values_are_softplus_means():
    real = torch.tensor([[[[2.0, -1.0], [0.5, 0.0]]]])
    fake = torch.tensor([[[[-3.0, 1.0], [0.0, 0.2]]]])
    expected_d = F.softplus(-real).mean() + F.softplus(fake).mean()
    assert torch.allclose(discriminator_loss(real, fake), expected_d)
    assert torch.allclose(generator_loss(fake), F.softplus(-fake).mean())
    zeros = torch.zeros(2, 1, 4, 4)
    assert math.isclose(discriminator_loss(zeros, zeros).item(), 2 * math.log(2), rel_tol=1e-6)
    # softplus(-x) = -log(sigmoid(x)): the paper's probability form
    assert torch.allclose(generator_loss(fake), -torch.log(torch.sigmoid(fake)).mean())


def test_hinge_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    d = discriminator_loss(real, fake, kind="hinge")
    assert math.isclose(d.item(), (0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3, rel_tol=1e-6)
    assert math.isclose(generator_loss(fake, kind="hinge").item(), 1 / 3, rel_tol=1e-6)
    with pytest.raises(ValueError, match="GAN loss must be one of .*'wgan'"):
        generator_loss(fake, kind="wgan")


@pytest.mark.parametrize("kind", ["non_saturating", "hinge"])
def test_signs(kind):
    """D's loss falls as real logits rise and fake logits fall; G's falls as fake logits rise."""
    real = torch.zeros(2, 1, 4, 4, requires_grad=True)
    fake = torch.zeros(2, 1, 4, 4, requires_grad=True)
    discriminator_loss(real, fake, kind).backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()
    fake_g = torch.zeros(2, 1, 4, 4, requires_grad=True)
    generator_loss(fake_g, kind).backward()
    assert (fake_g.grad < 0).all()
    lo = discriminator_loss(torch.full((4,), 3.0), torch.full((4,), -3.0), kind)
    hi = discriminator_loss(torch.full((4,), -3.0), torch.full((4,), 3.0), kind)
    assert lo < hi


def test_bf16_logits_give_float32_loss():
    logits = torch.randn(2, 1, 4, 4).to(torch.bfloat16)
    assert discriminator_loss(logits, logits).dtype == torch.float32
    assert generator_loss(logits).dtype == torch.float32


def test_r1_penalty_of_a_linear_discriminator():
    """D(x) = sum(w * x) per sample: the penalty is ||w||^2 whatever x is."""
    w = torch.randn(1, 4, 3, 3, requires_grad=True)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    logits = (w * x).sum(dim=(1, 2, 3))
    penalty = r1_penalty(logits, x)
    assert torch.allclose(penalty, w.pow(2).sum())
    penalty.backward()  # create_graph: the penalty trains the discriminator's weights
    assert torch.allclose(w.grad, 2 * w.detach())


def test_approximate_r1():
    a = torch.randn(2, 1, 4, 4)
    assert approximate_r1_penalty(a, a).item() == 0.0
    assert torch.allclose(approximate_r1_penalty(a, a + 0.5), torch.tensor(0.25))


def test_r1_penalty_keeps_the_logits_graph_for_the_discriminator_loss():
    """The discriminator step backpropagates its loss and gamma/2 * R1 through the same real
    logits in one backward. D(x)_b = sum_i w_i x_bi^2, so R1 = mean_b sum_i (2 w_i x_bi)^2 and
    d/dw_i [mean_b D(x)_b + R1] = mean_b x_bi^2 (1 + 8 w_i), written out."""
    x = torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.5, -1.0]], requires_grad=True)
    w = torch.tensor([0.5, -0.25, 2.0], requires_grad=True)
    logits = (w * x**2).sum(1)
    (logits.mean() + r1_penalty(logits, x)).backward()
    x2 = x.detach() ** 2
    torch.testing.assert_close(w.grad, (x2 * (1 + 8 * w.detach())).mean(0))
