import numpy as np
import pytest
import torch

from d3sr_core.models.configs import bundled_config
from d3sr_core.models.schedule import (
    add_noise,
    alphas_cumprod,
    alphas_cumprod_from_config,
    predict_x0,
)


def reference_alphas_cumprod() -> np.ndarray:
    """Straight from the definition, in float64: betas on a sqrt-linear grid, cumulative product."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    out, acc = [], 1.0
    for beta in betas:
        acc *= 1.0 - beta
        out.append(acc)
    return np.array(out)


def test_sd21_schedule_matches_definition_and_known_values():
    a = alphas_cumprod_from_config(bundled_config("sd21-base", "scheduler"))
    assert a.shape == (1000,) and a.dtype == torch.float32
    np.testing.assert_allclose(a.numpy(), reference_alphas_cumprod(), rtol=2e-5)
    assert a[999].item() == pytest.approx(0.0046601, abs=2e-7)
    assert (1 / a[999].sqrt()).item() == pytest.approx(14.6488, abs=1e-3)


def test_schedule_matches_diffusers_scheduler():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(alphas_cumprod(), sched.alphas_cumprod.float(), rtol=0, atol=0)


def test_epsilon_x0_with_zero_noise_is_scaled_input():
    z = torch.randn(2, 4, 8, 8)
    a = alphas_cumprod()[999]
    x0 = predict_x0(z, torch.zeros_like(z), a, "epsilon")
    torch.testing.assert_close(x0, z * 14.6488, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [0, 399, 999])
def test_x0_inverts_forward_noising(t):
    """Noise a known x0 with known eps (or v), then recover x0 from the exact model output."""
    g = torch.Generator().manual_seed(t)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    a = alphas_cumprod()[t]
    zt = add_noise(x0, eps, a)
    torch.testing.assert_close(
        predict_x0(zt, eps, a, "epsilon"), x0, atol=2e-3 if t == 999 else 1e-5, rtol=1e-4
    )
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(predict_x0(zt, v, a, "v_prediction"), x0, atol=1e-5, rtol=1e-4)


def test_add_noise_per_sample_levels():
    x0 = torch.ones(2, 1, 2, 2)
    noise = torch.zeros_like(x0)
    out = add_noise(x0, noise, torch.tensor([1.0, 0.25]))
    assert out.shape == x0.shape
    assert predict_x0(x0, noise, torch.tensor([1.0, 0.25]), "epsilon").shape == x0.shape
    assert out[0].eq(1).all() and torch.allclose(out[1], torch.full_like(out[1], 0.5))


def test_unknown_prediction_type_rejected():
    with pytest.raises(ValueError, match="prediction_type"):
        predict_x0(torch.zeros(1), torch.zeros(1), 0.5, "flow")


def test_linear_and_trained_betas_match_diffusers():
    from diffusers import DDPMScheduler

    linear = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    config = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
    torch.testing.assert_close(alphas_cumprod_from_config(config), linear.alphas_cumprod.float())
    betas = [0.1, 0.2, 0.5]
    trained = DDPMScheduler(num_train_timesteps=3, trained_betas=betas)
    torch.testing.assert_close(
        alphas_cumprod_from_config({"trained_betas": betas}), trained.alphas_cumprod.float()
    )
    with pytest.raises(ValueError, match="beta_schedule"):
        alphas_cumprod(beta_schedule="cosine")


def test_add_noise_keeps_dtype_and_sample_prediction_is_the_output():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 4, 4, generator=g).bfloat16()
    eps = torch.randn(2, 4, 4, 4, generator=g)
    a = 0.3
    out = add_noise(x0, eps, a)
    assert out.dtype == torch.bfloat16
    expected = (a**0.5 * x0.float() + (1 - a) ** 0.5 * eps).bfloat16()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    z = torch.randn(2, 4, 4, 4, generator=g)
    assert torch.equal(predict_x0(z, eps, a, "sample"), eps)


@pytest.mark.parametrize(
    "config,expected",
    [
        ({}, {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}),
        (
            {"num_train_timesteps": 500, "beta_start": 0.001, "beta_end": 0.03},
            {
                "num_train_timesteps": 500,
                "beta_start": 0.001,
                "beta_end": 0.03,
                "beta_schedule": "scaled_linear",
            },
        ),
        (
            {"beta_schedule": "linear"},
            {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear"},
        ),
    ],
)
def test_config_keys_and_sd_defaults_match_diffusers(config, expected):
    """Each key of a scheduler config is read, and a missing key means SD's value (not
    diffusers' DDPMScheduler default of a linear 1e-4..0.02 schedule)."""
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(**expected).alphas_cumprod.float()
    torch.testing.assert_close(alphas_cumprod_from_config(config), reference)


def test_schedule_arithmetic_is_float32_whatever_the_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert alphas_cumprod().dtype == torch.float32
        assert alphas_cumprod(beta_schedule="linear").dtype == torch.float32
        assert alphas_cumprod_from_config({"trained_betas": [0.1, 0.2]}).dtype == torch.float32
        z = torch.ones(1, 1, 2, 2, dtype=torch.float32)
        assert predict_x0(z, z, 0.5, "epsilon").dtype == torch.float32
        assert predict_x0(z, z, torch.tensor([0.5]), "v_prediction").dtype == torch.float32
    finally:
        torch.set_default_dtype(previous)
