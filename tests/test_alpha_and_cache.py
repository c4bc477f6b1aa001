"""Transparent pixels do not bleed; the OSEDiff conversion cache follows pickle and base."""

from __future__ import annotations

import shutil

import pytest
import torch
from make_tiny_weights import write_tiny_base
from tiny_models import tiny_generator

from d3sr_core.inference import pipeline as pipeline_module
from d3sr_core.inference.alpha import fill_transparent
from d3sr_core.inference.options import UpscaleOptions
from d3sr_core.inference.pipeline import D3SRPipeline
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


def push_pull_by_hand(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The push-pull fill written out with loops (float64). Push: each coarser level halves
    every side longer than 1 (rounding up); a cell holds the plain mean of its 1, 2 or 4
    children's alpha-weighted colour and of their weight. Pull: from the 1x1 top down, a cell
    with weight takes colour / weight, a weightless one its parent's value. Hidden pixels
    (alpha <= 0) get the result; alpha is clamped to [0, 1]; with no pixel visible or none
    hidden the colours come back unchanged."""
    weight = alpha.double().clamp(0, 1)
    if bool((weight > 0).all()) or not bool((weight > 0).any()):
        return rgb.float()
    out = rgb.double().clone()
    for b in range(rgb.shape[0]):
        levels = [(rgb[b].double() * weight[b], weight[b, 0])]
        while max(levels[-1][1].shape) > 1:
            colour, w = levels[-1]
            h, wd = w.shape
            nh, nw = (h + 1) // 2 if h > 1 else 1, (wd + 1) // 2 if wd > 1 else 1
            new_c = torch.zeros(colour.shape[0], nh, nw, dtype=torch.float64)
            new_w = torch.zeros(nh, nw, dtype=torch.float64)
            for i in range(nh):
                for j in range(nw):
                    rows = [2 * i, 2 * i + 1] if h > 1 else [0]
                    cols = [2 * j, 2 * j + 1] if wd > 1 else [0]
                    kids = [(r, c) for r in rows for c in cols if r < h and c < wd]
                    new_c[:, i, j] = sum(colour[:, r, c] for r, c in kids) / len(kids)
                    new_w[i, j] = sum(w[r, c] for r, c in kids) / len(kids)
            levels.append((new_c, new_w))
        colour, w = levels[-1]
        filled = colour / w
        for colour, w in reversed(levels[:-1]):
            h, wd = w.shape
            halved_h, halved_w = h > filled.shape[1], wd > filled.shape[2]
            below = torch.zeros_like(colour)
            for i in range(h):
                for j in range(wd):
                    if w[i, j] > 0:
                        below[:, i, j] = colour[:, i, j] / w[i, j]
                    else:
                        parent = (i // 2 if halved_h else i, j // 2 if halved_w else j)
                        below[:, i, j] = filled[:, parent[0], parent[1]]
            filled = below
        hidden = alpha[b, 0] <= 0
        out[b][:, hidden] = filled[:, hidden]
    return out.float()


@pytest.mark.parametrize(
    "shape", [(2, 3, 11, 13), (1, 1, 6, 5), (1, 3, 2, 9), (1, 2, 9, 2), (1, 3, 1, 11), (1, 1, 7, 1)]
)
def test_fill_transparent_equals_push_pull_by_hand(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    batch, channels, height, width = shape
    rgb = torch.rand(shape, generator=gen)
    # visible pixels are rare and of every opacity, some alphas outside [0, 1] (clamped)
    alpha = torch.rand(batch, 1, height, width, generator=gen) * 1.6 - 0.3
    alpha = torch.where(torch.rand(alpha.shape, generator=gen) < 0.7, -0.2, alpha)
    alpha[0, 0, 0, 0] = 0.4  # at least one visible pixel, one hidden
    alpha[0, 0, -1, -1] = 0.0
    expected = push_pull_by_hand(rgb, alpha)
    torch.testing.assert_close(fill_transparent(rgb, alpha), expected, rtol=0, atol=2e-6)
    # nothing visible, or nothing hidden: the colours come back unchanged
    for a in (torch.zeros_like(alpha), torch.full_like(alpha, 0.5)):
        assert torch.equal(fill_transparent(rgb, a), rgb)


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
