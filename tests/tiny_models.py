"""Tiny versions of the real architectures, for fast CPU tests (random weights)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from d3sr_core.models import D3SRGenerator, GeneratorConfig
from d3sr_core.models.schedule import alphas_cumprod

# Same block structure as SD2.1-base (4 levels, cross-attention in the first three, linear
# projections, 2 layers per block), with tiny widths.
TINY_UNET_CONFIG = {
    "block_out_channels": [16, 32, 64, 64],
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "cross_attention_dim": 32,
    "attention_head_dim": [2, 2, 4, 4],
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 16,
}
# Same block structure as SD2.1's VAE (so the latent is 1/8 of the image and OSEDiff's
# 32 VAE-encoder LoRA modules exist), with tiny widths.
TINY_VAE_CONFIG = {
    "block_out_channels": [8, 16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "in_channels": 3,
    "out_channels": 3,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}
TINY_CONTEXT_DIM = 32


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


def tiny_vae(seed: int = 1) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE_CONFIG).eval()


def tiny_prompt_embeds(seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 77, TINY_CONTEXT_DIM, generator=g)


def tiny_generator(config: GeneratorConfig | None = None, seed: int = 0) -> D3SRGenerator:
    """A full D3SR generator with tiny random weights (no adapter merged)."""
    return D3SRGenerator(
        tiny_unet(seed),
        tiny_vae(seed + 1),
        tiny_prompt_embeds(seed + 2),
        alphas_cumprod(),
        config or GeneratorConfig(),
    ).eval()
