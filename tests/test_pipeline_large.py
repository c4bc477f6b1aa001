"""The pipeline on "large" images (tiny models, tiny budgets): tiling is invisible, the memory
budget drives it, out-of-memory retries with smaller tiles, progress/cancel per tile, bad input."""

import logging
import math

import pytest
import torch
from test_tiling import LocalDenoiser
from tiny_models import tiny_generator

from d3sr_core.inference import memory, tiled_vae
from d3sr_core.inference.memory import is_oom_error, resolve_budget, run_with_oom_retry
from d3sr_core.inference.options import InvalidImageError, UpscaleOptions
from d3sr_core.inference.pipeline import D3SRPipeline, UpscaleCancelled


def psnr(a, b):
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.fixture(scope="module")
def pipe():
    return D3SRPipeline(tiny_generator())


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=g)


def test_small_budget_tiles_the_vae_and_changes_nothing(pipe, monkeypatch):
    x = _image(27, 41)
    base = dict(scale=3, tile_size=None, color_fix="none")
    whole = pipe.upscale_tensor(x, UpscaleOptions(vae_tile_size=None, **base))
    calls = []
    real = tiled_vae.TiledVAERunner.run

    def spy(self, t):
        out = real(self, t)
        calls.append(self.report)
        return out

    monkeypatch.setattr(tiled_vae.TiledVAERunner, "run", spy)
    tiled = pipe.upscale_tensor(x, UpscaleOptions(memory_budget_bytes=300_000, **base))
    assert len(calls) == 2, "auto: encoder and decoder both tiled under a small budget"
    assert all(r.tiles > r.passes for r in calls)
    assert psnr(tiled, whole) >= 40.0
    roomy = pipe.upscale_tensor(x, UpscaleOptions(memory_budget_bytes=2**34, **base))
    assert len(calls) == 2, "auto with room: the plain VAE"
    assert torch.equal(roomy, whole)


def test_everything_tiled_matches_untiled_with_a_local_unet():
    g = tiny_generator()
    g.unet = LocalDenoiser(seed=1).eval()
    pipe = D3SRPipeline(g)
    x = _image(33, 50, 1)
    whole = pipe.upscale_tensor(x, UpscaleOptions(scale=4, tile_size=None, vae_tile_size=None))
    tiled = pipe.upscale_tensor(
        x, UpscaleOptions(scale=4, tile_size=96, tile_overlap=32, vae_tile_size=48)
    )
    assert psnr(tiled, whole) >= 40.0


def test_out_of_memory_retries_with_smaller_tiles(pipe, monkeypatch, caplog):
    x = _image(20, 26)
    seen = []
    real_predict = pipe.generator.predict

    def flaky_predict(latent):
        seen.append(tuple(latent.shape[-2:]))
        if len(seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_predict(latent)

    real_decode = tiled_vae.tiled_decode
    budgets = []

    def flaky_decode(vae, latent, budget, tile=None, **kwargs):
        budgets.append((budget, tile))
        if len(budgets) == 1:
            raise RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)")
        return real_decode(vae, latent, budget, tile, **kwargs)

    monkeypatch.setattr(pipe.generator, "predict", flaky_predict)
    monkeypatch.setattr(tiled_vae, "tiled_decode", flaky_decode)
    opts = UpscaleOptions(
        scale=4, tile_size=128, tile_overlap=32, vae_tile_size=64, color_fix="none"
    )
    with caplog.at_level(logging.WARNING, logger="d3sr"):
        out = pipe.upscale_tensor(x, opts)
    assert out.shape == (1, 3, 80, 104) and torch.isfinite(out).all()
    assert "UNet ran out of memory" in caplog.text and "retrying with smaller tiles" in caplog.text
    assert "VAE decode ran out of memory" in caplog.text
    first, retry = seen[0], seen[1]
    assert retry[0] * retry[1] < first[0] * first[1], "the UNet retry used smaller tiles"
    assert budgets[1][0] < budgets[0][0] and budgets[1][1] < budgets[0][1]


def test_oom_gives_up_with_a_clear_error():
    def always(_shrink):
        raise MemoryError("cannot allocate")

    with pytest.raises(memory.OutOfMemoryAfterRetries, match="out of memory even with tiles"):
        run_with_oom_retry(always, what="VAE decode", device="cpu", max_retries=2)

    def other(_shrink):
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        run_with_oom_retry(other, what="x", device="cpu")


def test_oom_detection():
    assert is_oom_error(torch.OutOfMemoryError("x"))
    assert is_oom_error(MemoryError())
    assert is_oom_error(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert is_oom_error(
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        )
    )
    assert not is_oom_error(RuntimeError("shape mismatch"))


def test_budget_defaults_and_validation(monkeypatch):
    assert resolve_budget(None, "cpu") >= memory.MIN_BUDGET_BYTES
    # a quarter of the free RAM, but never more than the cap on CPU
    monkeypatch.setattr(memory, "available_memory", lambda device: 64 * 2**30)
    assert resolve_budget(None, "cpu") == memory.CPU_BUDGET_CAP_BYTES
    monkeypatch.setattr(memory, "available_memory", lambda device: 4 * 2**30)
    assert resolve_budget(None, "cpu") == 2**30
    assert resolve_budget(12345, "cpu") == 12345
    with pytest.raises(ValueError):
        resolve_budget(-1, "cpu")


def test_progress_advances_per_tile_and_cancel_stops_between_tiles(pipe):
    x = _image(24, 30)
    opts = UpscaleOptions(
        scale=4, tile_size=64, tile_overlap=16, vae_tile_size=32, color_fix="none"
    )
    seen = []
    pipe.upscale_tensor(x, opts, progress=lambda d, t: seen.append((d, t)))
    done = [d for d, _ in seen]
    assert len(seen) > 20, "many updates, not one per stage"
    assert done == sorted(done) and seen[-1][0] == seen[-1][1]
    calls = [0]

    def cancel_later():
        calls[0] += 1
        return calls[0] > 10

    with pytest.raises(UpscaleCancelled):
        pipe.upscale_tensor(x, opts, cancel=cancel_later)
    assert calls[0] == 11, "checked between tiles, raised at the first True"


def test_one_pixel_image_works(pipe):
    out = pipe.upscale_tensor(torch.rand(1, 3, 1, 1), UpscaleOptions(scale=4))
    assert out.shape == (1, 3, 4, 4) and torch.isfinite(out).all()
    out = pipe.upscale_tensor(torch.rand(1, 1, 1, 1), UpscaleOptions(scale=1.2))
    assert out.shape == (1, 1, 1, 1)


@pytest.mark.parametrize(
    "images,opts,match",
    [
        (torch.rand(1, 3, 5, 0), {}, "empty"),
        (torch.tensor([[[[0.5, math.inf]]] * 3]), {}, "NaN or infinite"),
        (torch.rand(1, 3, 4, 4), {"scale": 1}, "scale"),
        (torch.rand(1, 3, 4, 4), {"scale": float("nan")}, "scale"),
        (torch.rand(1, 3, 4, 4), {"scale": 4, "max_output_pixels": 100}, "above the limit"),
        (torch.rand(1, 3, 4, 4), {"tile_size": 100}, "multiple of 8"),
        (torch.rand(1, 3, 4, 4), {"tile_size": 32}, "tile_size"),
        (torch.rand(1, 3, 4, 4), {"vae_tile_size": "big"}, "vae_tile_size"),
        (torch.rand(1, 3, 4, 4), {"tile_overlap": -8}, "tile_overlap"),
        (torch.rand(1, 3, 4, 4), {"color_fix": "lab"}, "color_fix"),
        (torch.rand(1, 3, 4, 4), {"vae_attention_window": -8}, "vae_attention_window"),
        (torch.rand(1, 3, 4, 4), {"vae_attention_window": 1.5}, "vae_attention_window"),
        (torch.rand(1, 3, 4, 4), {"unet_attention_window": -8}, "unet_attention_window"),
        (torch.rand(1, 3, 4, 4), {"unet_attention_window": "64"}, "unet_attention_window"),
        (torch.rand(1, 3, 4, 4), {"memory_budget_bytes": 0}, "memory_budget_bytes"),
    ],
)
def test_bad_input_is_refused_before_any_work(pipe, monkeypatch, images, opts, match):
    def boom(*a, **k):
        raise AssertionError("model called")

    monkeypatch.setattr(pipe, "encode", boom)
    with pytest.raises(InvalidImageError, match=match):
        pipe.upscale_tensor(images, UpscaleOptions(**opts))


def test_odd_non_square_sizes_through_all_tiling(pipe):
    for h, w in [(13, 29), (31, 9)]:
        out = pipe.upscale_tensor(
            _image(h, w, 3),
            UpscaleOptions(scale=3.5, tile_size=64, tile_overlap=24, vae_tile_size=32),
        )
        assert out.shape == (1, 3, math.floor(h * 3.5 + 0.5), math.floor(w * 3.5 + 0.5))


def test_vae_attention_window_reaches_both_vae_paths(pipe, monkeypatch):
    """The option (output pixels) arrives in latent positions at the whole and tiled VAE;
    0 means global; the tiled result equals the whole one for the same window."""
    seen = []
    for name in ("whole_encode", "whole_decode", "tiled_encode", "tiled_decode"):
        real = getattr(tiled_vae, name)

        def spy(*a, _real=real, _name=name, **k):
            window = k["attention_window"] if "attention_window" in k else a[2]
            seen.append((_name, window))
            return _real(*a, **k)

        monkeypatch.setattr(tiled_vae, name, spy)
    x = _image(20, 28)
    base = dict(scale=4, tile_size=None, color_fix="none", vae_attention_window=64)
    whole = pipe.upscale_tensor(x, UpscaleOptions(vae_tile_size=None, **base))
    tiled = pipe.upscale_tensor(x, UpscaleOptions(vae_tile_size=32, **base))
    assert seen == [
        ("whole_encode", 8),
        ("whole_decode", 8),
        ("tiled_encode", 8),
        ("tiled_decode", 8),
    ]
    assert psnr(tiled, whole) >= 40.0
    seen.clear()
    glob = pipe.upscale_tensor(
        x, UpscaleOptions(vae_tile_size=None, **{**base, "vae_attention_window": 0})
    )
    assert seen == [("whole_encode", None), ("whole_decode", None)]
    assert not torch.equal(glob, whole), "a window smaller than the 10x14 latent changes it"


def test_default_vae_attention_window_is_512_px(pipe, monkeypatch):
    """Default options window the VAE attention at 512 px (64 latents): a 528x544 output
    equals the explicit 512 px window and differs from the former 1024 px default (global
    there)."""
    seen = []
    for name in ("whole_encode", "whole_decode"):
        real = getattr(tiled_vae, name)

        def spy(*a, _real=real, **k):
            seen.append(a[2])
            return _real(*a, **k)

        monkeypatch.setattr(tiled_vae, name, spy)
    x = _image(132, 136)
    base = dict(scale=4, tile_size=None, vae_tile_size=None, color_fix="none")
    default = pipe.upscale_tensor(x, UpscaleOptions(**base))
    assert seen == [64, 64]
    assert torch.equal(
        pipe.upscale_tensor(x, UpscaleOptions(vae_attention_window=512, **base)), default
    )
    former = pipe.upscale_tensor(x, UpscaleOptions(vae_attention_window=1024, **base))
    assert seen[-2:] == [128, 128]
    assert not torch.equal(former, default)


def test_unet_attention_window_only_beyond_the_window(pipe):
    """Default on: a window covering the UNet tile changes nothing (bit for bit), a smaller
    one windows the self-attention; the UNet is restored after each call."""
    x = _image(12, 20)  # x4 -> a 6x10 latent
    base = dict(scale=4, tile_size=None, color_fix="none")
    glob = pipe.upscale_tensor(x, UpscaleOptions(unet_attention_window=0, **base))
    assert UpscaleOptions().unet_attention_window == 512
    assert torch.equal(pipe.upscale_tensor(x, UpscaleOptions(**base)), glob)
    covering = UpscaleOptions(unet_attention_window=80, **base)  # 10 latents: covers 6x10
    assert torch.equal(pipe.upscale_tensor(x, covering), glob)
    windowed = pipe.upscale_tensor(x, UpscaleOptions(unet_attention_window=64, **base))
    assert torch.isfinite(windowed).all() and not torch.equal(windowed, glob)
    assert not hasattr(pipe.generator.unet, "_d3sr_window"), "processors restored"


def test_windowed_unet_attention_lifts_the_unet_tile_cap(pipe, monkeypatch):
    """With the window (default) "auto" UNet tiles are limited by the budget alone; with
    global attention by AUTO_MAX_TILE (128 latents) as well."""
    from d3sr_core.inference import pipeline as pipeline_module
    from d3sr_core.inference.tiling import AUTO_MAX_TILE

    seen = []
    real = pipeline_module.plan_latent_tiles

    def spy(*a, **k):
        seen.append(k["max_tile"])
        return real(*a, **k)

    monkeypatch.setattr(pipeline_module, "plan_latent_tiles", spy)
    x = _image(8, 8)
    pipe.upscale_tensor(x, UpscaleOptions(scale=4, color_fix="none"))
    pipe.upscale_tensor(x, UpscaleOptions(scale=4, color_fix="none", unet_attention_window=0))
    assert seen == [None, AUTO_MAX_TILE]


def test_no_full_size_image_copy_lives_through_the_model_stages(monkeypatch):
    """The stages' memory budgets are all the activations: the pipeline itself holds no
    full-size image during the UNet and the VAE decode (the bicubic reference is computed
    again for the colour fix; at 4096x4096 an fp32 copy is 0.2 GB), only the encoder's input
    in the VAE dtype during the encode - and the output matches the colour fix of that
    reference."""
    import gc
    import warnings

    pipe = D3SRPipeline(tiny_generator())
    x = _image(10, 12)
    out_shape = (1, 3, 40, 48)
    seen: dict[str, list] = {}

    def full_size_images() -> list:
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on deprecated lazy objects warns
            warnings.simplefilter("ignore")
            return [
                (t.dtype, t.shape)
                for t in gc.get_objects()
                if isinstance(t, torch.Tensor) and tuple(t.shape[-2:]) == out_shape[-2:]
            ]

    for name in ("encode", "denoise", "decode"):
        real = getattr(pipe, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen[_name] = full_size_images()
            return _real(*args, **kwargs)

        monkeypatch.setattr(pipe, name, spy)
    out = pipe.upscale_tensor(x, UpscaleOptions(scale=4, color_fix="wavelet"))
    vae_dtype = next(pipe.generator.vae.parameters()).dtype
    assert seen["encode"] == [(vae_dtype, out_shape)], "only the encoder's input"
    assert seen["denoise"] == [] and seen["decode"] == []
    assert out.shape == out_shape
