"""Transparent pixels do not bleed; the OSEDiff conversion cache follows pickle and base."""

from __future__ import annotations

import shutil

import pytest
import torch
from make_tiny_weights import write_tiny_base
from tiny_models import tiny_generator

from d3sr_core.inference import pipeline as pipeline_module
from d3sr_core.inference.alpha import fill_transparent
from d3sr_core.inference.pipeline import D3SRPipeline, UpscaleOptions
from d3sr_core.loading.fetch import (
    PROMPT_SOURCE,
    SOURCE_SHA256,
    find_conversion,
    load_converting,
    text_encoder_id,
)
from d3sr_core.loading.files import WeightsFileError, read_safetensors_metadata

# --------------------------------------------------------------------------- alpha


def edge_image(hidden: tuple[float, float, float]) -> torch.Tensor:
    """Left half opaque mid-gray, right half fully transparent with colour ``hidden``."""
    image = torch.zeros(1, 4, 32, 32)
    image[:, :3, :, :16] = 0.5
    image[:, 3, :, :16] = 1.0
    image[:, :3, :, 16:] = torch.tensor(hidden).view(3, 1, 1)
    return image


def visible_fringe(pipe: D3SRPipeline, options: UpscaleOptions) -> float:
    """Largest colour difference, over pixels that end up visible (alpha > 0.5), between an
    edge hiding saturated red and the same edge hiding the visible gray."""
    red = pipe.upscale_tensor(edge_image((1.0, 0.0, 0.0)), options)
    gray = pipe.upscale_tensor(edge_image((0.5, 0.5, 0.5)), options)
    visible = red[:, 3:] > 0.5
    return float(((red[:, :3] - gray[:, :3]).abs() * visible).max())


def test_hidden_colour_does_not_bleed_into_visible_pixels(monkeypatch):
    pipe = D3SRPipeline(tiny_generator())
    options = UpscaleOptions(scale=2, color_fix="wavelet")
    assert visible_fringe(pipe, options) < 1e-6  # the hidden colour has no influence at all
    # the measurement can fail: without the fill the red shows as a fringe
    monkeypatch.setattr(pipeline_module, "fill_transparent", lambda rgb, alpha: rgb)
    assert visible_fringe(pipe, options) > 0.05


def test_fill_transparent_keeps_visible_pixels_and_uses_neighbours():
    rgb = torch.rand(1, 3, 7, 9)
    alpha = torch.ones(1, 1, 7, 9)
    alpha[..., :, 5:] = 0
    alpha[..., 2, 1] = 0.3  # partly transparent pixels keep their own colour
    filled = fill_transparent(rgb, alpha)
    assert torch.equal(filled[..., :5], rgb[..., :5])
    # a transparent pixel takes an alpha-weighted mean of visible colours around it
    visible = rgb[..., :5]
    lo = visible.amin(dim=(2, 3), keepdim=True)
    hi = visible.amax(dim=(2, 3), keepdim=True)
    assert bool(((filled[..., 5:] >= lo - 1e-6) & (filled[..., 5:] <= hi + 1e-6)).all())
    one_column = torch.zeros(1, 3, 5, 1)
    assert torch.equal(fill_transparent(one_column, torch.zeros(1, 1, 5, 1)), one_column)


# --------------------------------------------------------------------------- conversion cache


@pytest.fixture(scope="module")
def osediff(tmp_path_factory):
    from test_weights_fuzz import shared_osediff

    return shared_osediff(tmp_path_factory)


def test_conversion_cache_follows_the_pickle_and_the_base(tmp_path, osediff):
    pkl = tmp_path / "osediff.pkl"
    shutil.copy(osediff, pkl)
    base_a = write_tiny_base(tmp_path / "base-a")
    base_b = tmp_path / "base-b"
    shutil.copytree(base_a, base_b)

    _, written = load_converting(pkl, base_a)
    assert written == tmp_path / "osediff.safetensors"
    meta = read_safetensors_metadata(written)
    assert meta[PROMPT_SOURCE] == text_encoder_id(base_a) and len(meta[SOURCE_SHA256]) == 64
    assert find_conversion(pkl, base_a) == written  # what the next load reuses

    # another base's text encoder: the cache does not apply, it is rebuilt for that base
    assert find_conversion(pkl, base_b) is None
    assert load_converting(pkl, base_b)[1] == written
    assert read_safetensors_metadata(written)[PROMPT_SOURCE] == text_encoder_id(base_b)
    # another pickle under the same name: rebuilt too
    data = bytearray(pkl.read_bytes())
    pkl.write_bytes(bytes(data) + b"\0")  # same tensors, different bytes
    assert find_conversion(pkl, base_b) is None


def test_pickle_that_does_not_fit_the_base_leaves_no_conversion(tmp_path, osediff):
    state = torch.load(str(osediff), weights_only=True)
    state["state_dict_unet"] = {
        k.replace("mid_block.", "middle_block."): v for k, v in state["state_dict_unet"].items()
    }
    state["unet_lora_others_modules"] = [
        m.replace("mid_block.", "middle_block.") for m in state["unet_lora_others_modules"]
    ]
    bogus = tmp_path / "osediff.pkl"
    torch.save(state, str(bogus))
    base = write_tiny_base(tmp_path / "base")
    with pytest.raises(WeightsFileError) as info:
        load_converting(bogus, base)
    assert str(info.value).startswith(f"{bogus}: does not fit this base model")
    assert "middle_block" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "osediff.pkl"]
