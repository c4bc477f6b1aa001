"""Closed-form diffusion arithmetic: the noise schedule, x0 from a model output, forward noising.

Computed directly from the betas so that no scheduler's ``step()`` is ever involved
(its semantics changed across diffusers releases; see reference/peers.md 1.2).
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def alphas_cumprod(
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
) -> Tensor:
    """The cumulative product of ``1 - beta_t``, shape ``[num_train_timesteps]``, float32.

    Computed in float32 exactly as diffusers' DDPM/DDIM/PNDM schedulers do, so values match
    the schedule the base model was trained with (SD2.1-base: ``abar[999] = 0.0046601``).
    """
    if beta_schedule == "scaled_linear":
        betas = (
            torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32)
            ** 2
        )
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ValueError(
            f"beta_schedule must be 'scaled_linear' or 'linear', got {beta_schedule!r}"
        )
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod_from_config(config: dict) -> Tensor:
    """``alphas_cumprod`` for a diffusers scheduler config dict (``scheduler_config.json``)."""
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        return torch.cumprod(1.0 - betas, dim=0)
    return alphas_cumprod(
        beta_start=config.get("beta_start", 0.00085),
        beta_end=config.get("beta_end", 0.012),
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        beta_schedule=config.get("beta_schedule", "scaled_linear"),
    )


def _broadcast(alpha_bar: Tensor | float, like: Tensor) -> Tensor:
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float32, device=like.device)
    return alpha_bar.reshape(-1, *([1] * (like.ndim - 1))) if alpha_bar.ndim else alpha_bar


def predict_x0(
    sample: Tensor, model_output: Tensor, alpha_bar: Tensor | float, prediction_type: str
) -> Tensor:
    """The clean latent implied by one model evaluation at a noise level ``alpha_bar``.

    Args:
        sample: noisy latent ``z_t``, ``[B, C, H, W]``.
        model_output: the UNet's output for ``z_t``, same shape.
        alpha_bar: ``abar_t`` (scalar or ``[B]``).
        prediction_type: ``epsilon`` (``x0 = (z - sqrt(1-abar) eps) / sqrt(abar)``),
            ``v_prediction`` (``x0 = sqrt(abar) z - sqrt(1-abar) v``) or ``sample``.

    Returns:
        ``[B, C, H, W]`` in float32 (the division by ``sqrt(abar)`` amplifies by up to ~15x,
        so it is done at full precision whatever the model's dtype).
    """
    a = _broadcast(alpha_bar, sample)
    z = sample.float()
    out = model_output.float()
    if prediction_type == "epsilon":
        return (z - (1.0 - a).sqrt() * out) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * z - (1.0 - a).sqrt() * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def add_noise(x0: Tensor, noise: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """Forward diffusion ``F(x0, t) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    ``alpha_bar`` is a scalar or one value per sample (``[B]``); output has ``x0``'s dtype.
    """
    a = _broadcast(alpha_bar, x0)
    return (a.sqrt() * x0.float() + (1.0 - a).sqrt() * noise.float()).to(x0.dtype)
