"""``validate_options`` / ``validate_images``: each option's accepted edge values and the
exact message of each refusal (no model is built: these run before any work)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from d3sr_core.inference.options import (
    InvalidImageError,
    UpscaleOptions,
    validate_images,
    validate_options,
)

TILE = "tile_size must be 'auto', None/0 (no tiling) or an int >= 64, got {}"
VAE_TILE = "vae_tile_size must be 'auto', None/0 (no tiling) or an int >= 32, got {}"
OVERLAP = "tile_overlap must be an int >= 0 (output pixels), got {}"
WINDOW = "{} must be an int >= 0 (output pixels; 0 = global) or None, got {}"
SIZE = "size must be None or (width, height) ints >= 1, got {}"
BUDGET = "memory_budget_bytes must be a positive int or None, got {}"
PIXELS = "max_output_pixels must be a positive int, got {}"

ACCEPTED = [
    {"scale": 1.0001},
    {"scale": 2},
    {"tile_size": None, "vae_tile_size": None},
    {"tile_size": 0, "vae_tile_size": 0},
    {"tile_size": "auto", "vae_tile_size": "auto"},
    {"tile_size": 64, "vae_tile_size": 32},
    {"tile_size": 72, "vae_tile_size": 33},  # VAE tiles need not be multiples of 8
    {"tile_overlap": 0},
    {"tile_overlap": 7},
    {"vae_attention_window": None, "unet_attention_window": None},
    {"vae_attention_window": 0, "unet_attention_window": 0},
    {"vae_attention_window": 1, "unet_attention_window": 1},
    {"color_fix": "none"},
    {"color_fix": "adain"},
    {"color_fix": "wavelet"},
    {"prompt_embeds": torch.zeros(1, 4, 8)},
    {"prompt_embeds": torch.zeros(4, 8)},
    {"prompt_embeds": torch.zeros(1, 4, 8, dtype=torch.float16)},
    {"size": (1, 1)},
    {"size": [40, 16]},
    {"memory_budget_bytes": 1},
    {"memory_budget_bytes": None},
    {"max_output_pixels": 1},
]


@pytest.mark.parametrize(
    "options", ACCEPTED, ids=[f"{next(iter(o))}-{i}" for i, o in enumerate(ACCEPTED)]
)
def test_valid_options_pass(options):
    validate_options(UpscaleOptions(**options))


REFUSED = [
    ({"scale": 1}, "scale must be a number > 1, got 1"),
    ({"scale": 1.0}, "scale must be a number > 1, got 1.0"),
    ({"scale": 0.5}, "scale must be a number > 1, got 0.5"),
    ({"scale": True}, "scale must be a number > 1, got True"),
    ({"scale": "4"}, "scale must be a number > 1, got '4'"),
    ({"scale": math.inf}, "scale must be a number > 1, got inf"),
    ({"scale": math.nan}, "scale must be a number > 1, got nan"),
    ({"tile_size": 56}, TILE.format(56)),
    ({"tile_size": 63}, TILE.format(63)),
    ({"tile_size": 64.0}, TILE.format(64.0)),
    ({"tile_size": True}, TILE.format(True)),
    ({"tile_size": False}, TILE.format(False)),
    ({"tile_size": "big"}, TILE.format("'big'")),
    ({"tile_size": 68}, "tile_size must be a multiple of 8 output pixels, got 68"),
    ({"vae_tile_size": 31}, VAE_TILE.format(31)),
    ({"vae_tile_size": False}, VAE_TILE.format(False)),
    ({"vae_tile_size": 32.0}, VAE_TILE.format(32.0)),
    ({"tile_overlap": -1}, OVERLAP.format(-1)),
    ({"tile_overlap": 8.0}, OVERLAP.format(8.0)),
    ({"tile_overlap": True}, OVERLAP.format(True)),
    ({"tile_overlap": None}, OVERLAP.format(None)),
    ({"vae_attention_window": -1}, WINDOW.format("vae_attention_window", -1)),
    ({"vae_attention_window": True}, WINDOW.format("vae_attention_window", True)),
    ({"vae_attention_window": 64.0}, WINDOW.format("vae_attention_window", 64.0)),
    ({"unet_attention_window": -1}, WINDOW.format("unet_attention_window", -1)),
    ({"unet_attention_window": False}, WINDOW.format("unet_attention_window", False)),
    ({"unet_attention_window": "64"}, WINDOW.format("unet_attention_window", "'64'")),
    ({"color_fix": "lab"}, "color_fix must be one of ('none', 'adain', 'wavelet'), got 'lab'"),
    ({"color_fix": None}, "color_fix must be one of ('none', 'adain', 'wavelet'), got None"),
    (
        {"prompt_embeds": [[0.0]]},
        "prompt_embeds must be a float tensor [1, N, C] or None, got list",
    ),
    (
        {"prompt_embeds": torch.zeros(8)},
        "prompt_embeds must be a float tensor [1, N, C] or None, got (8,)",
    ),
    (
        {"prompt_embeds": torch.zeros(1, 1, 4, 8)},
        "prompt_embeds must be a float tensor [1, N, C] or None, got (1, 1, 4, 8)",
    ),
    (
        {"prompt_embeds": torch.zeros(1, 4, 8, dtype=torch.long)},
        "prompt_embeds must be a float tensor [1, N, C] or None, got (1, 4, 8)",
    ),
    ({"size": (0, 10)}, SIZE.format((0, 10))),
    ({"size": (10, 0)}, SIZE.format((10, 0))),
    ({"size": (10,)}, SIZE.format((10,))),
    ({"size": (10, 5, 1)}, SIZE.format((10, 5, 1))),
    ({"size": (10.0, 5)}, SIZE.format((10.0, 5))),
    ({"size": (10, True)}, SIZE.format((10, True))),
    ({"size": "40x16"}, SIZE.format("'40x16'")),
    ({"memory_budget_bytes": 0}, BUDGET.format(0)),
    ({"memory_budget_bytes": -5}, BUDGET.format(-5)),
    ({"memory_budget_bytes": 1e9}, BUDGET.format(1e9)),
    ({"memory_budget_bytes": True}, BUDGET.format(True)),
    ({"max_output_pixels": 0}, PIXELS.format(0)),
    ({"max_output_pixels": 1e6}, PIXELS.format(1e6)),
    ({"max_output_pixels": True}, PIXELS.format(True)),
]


@pytest.mark.parametrize(
    "options,message", REFUSED, ids=[f"{next(iter(o))}-{i}" for i, (o, _) in enumerate(REFUSED)]
)
def test_invalid_options_are_refused_with_their_message(options, message):
    with pytest.raises(InvalidImageError, match=f"^{re.escape(message)}$"):
        validate_options(UpscaleOptions(**options))


def test_images_are_checked_before_the_options_and_returned_as_float_4d():
    x = torch.randint(0, 2, (3, 5, 6), dtype=torch.uint8)
    out = validate_images(x, UpscaleOptions(scale=2))
    assert out.shape == (1, 3, 5, 6) and out.dtype == torch.float32
    assert torch.equal(out[0], x.float())
    for c in (1, 3, 4):
        assert validate_images(torch.rand(2, c, 3, 3), UpscaleOptions()).shape == (2, c, 3, 3)
    # the image's own problems are reported even when an option is also wrong
    with pytest.raises(InvalidImageError, match=r"^empty image \(shape \(1, 3, 0, 4\)\)$"):
        validate_images(torch.rand(1, 3, 0, 4), UpscaleOptions(scale=0.5))


@pytest.mark.parametrize(
    "images,message",
    [
        ([[0.5]], "expected a torch.Tensor [B, C, H, W], got list"),
        (
            torch.rand(4, 4),
            "expected an image tensor [B, C, H, W] with C in (1, 3, 4), got shape (4, 4)",
        ),
        (
            torch.rand(1, 1, 3, 4, 4),
            "expected an image tensor [B, C, H, W] with C in (1, 3, 4), got shape (1, 1, 3, 4, 4)",
        ),
        (
            torch.rand(1, 2, 4, 4),
            "expected an image tensor [B, C, H, W] with C in (1, 3, 4), got shape (1, 2, 4, 4)",
        ),
        (
            torch.rand(5, 4, 4),
            "expected an image tensor [B, C, H, W] with C in (1, 3, 4), got shape (1, 5, 4, 4)",
        ),
        (torch.rand(0, 3, 4, 4), "empty image (shape (0, 3, 4, 4))"),
        (torch.rand(1, 3, 0, 4), "empty image (shape (1, 3, 0, 4))"),
        (torch.rand(1, 3, 4, 0), "empty image (shape (1, 3, 4, 0))"),
        (torch.zeros(1, 3, 2, 2, dtype=torch.complex64), "expected real-valued pixels, got dtype torch.complex64"),
        (torch.zeros(1, 3, 2, 2, dtype=torch.bool), "expected real-valued pixels, got dtype torch.bool"),
        (torch.tensor([[[[0.5, math.nan]]] * 3]), "image contains NaN or infinite pixel values"),
        (torch.tensor([[[[-math.inf, 0.5]]] * 3]), "image contains NaN or infinite pixel values"),
    ],
    ids=["list", "2d", "5d", "2-channels", "5-channels", "no-batch", "no-rows", "no-columns",
         "complex", "bool", "nan", "inf"],
)  # fmt: skip
def test_invalid_images_are_refused_with_their_message(images, message):
    with pytest.raises(InvalidImageError, match=f"^{re.escape(message)}$"):
        validate_images(images, UpscaleOptions(scale=2))


def test_output_limit_is_inclusive_and_reported_in_megapixels():
    """An output of exactly ``max_output_pixels`` is allowed, one pixel more is not."""
    x = torch.rand(1, 3, 250, 400)
    assert validate_images(x, UpscaleOptions(scale=2, max_output_pixels=400_000)) is not None
    message = (
        "output would be 800x500 = 0.4 MP, above the limit of 0.4 MP (raise "
        "max_output_pixels to allow it)"
    )
    with pytest.raises(InvalidImageError, match=f"^{re.escape(message)}$"):
        validate_images(x, UpscaleOptions(scale=2, max_output_pixels=399_999))
    sized = UpscaleOptions(scale=2, size=(3000, 1000), max_output_pixels=2_500_000)
    message = (
        "output would be 3000x1000 = 3.0 MP, above the limit of 2.5 MP (raise "
        "max_output_pixels to allow it)"
    )
    with pytest.raises(InvalidImageError, match=f"^{re.escape(message)}$"):
        validate_images(x, sized)


def test_megapixels_are_millions_of_pixels():
    """1,050,000 pixels are 1.1 MP (rounded from 1.05), 1,049,999 are 1.0 MP."""
    x = torch.rand(1, 3, 4, 4)
    for size, limit, message in (
        ((1050, 1000), 1_049_999, "output would be 1050x1000 = 1.1 MP, above the limit of 1.0 MP"),
        ((1050, 1001), 1_050_000, "output would be 1050x1001 = 1.1 MP, above the limit of 1.1 MP"),
    ):
        options = UpscaleOptions(scale=2, size=size, max_output_pixels=limit)
        with pytest.raises(InvalidImageError, match=f"^{re.escape(message)} "):
            validate_images(x, options)
