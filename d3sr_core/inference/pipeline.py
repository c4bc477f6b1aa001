"""The one inference entry point used by the CLI, ComfyUI and A1111 alike.

Per image: bicubic upsample to the output size -> VAE encode -> one UNet step -> VAE decode
-> colour fix against the upsampled input. Large images are tiled so that peak memory is
bounded by the tile, not the image:

* the UNet runs on overlapping latent tiles blended with Gaussian weights (:mod:`.tiling`);
* the VAE runs tile by tile with whole-image GroupNorm statistics and exact attention
  (:mod:`.tiled_vae`), so the result matches the untiled VAE;
* tile sizes follow a memory budget (:mod:`.memory`); an out-of-memory error retries the
  stage with smaller tiles and says so in the ``"d3sr"`` log.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..models.generator import D3SRGenerator
from . import tiled_vae
from .alpha import fill_transparent
from .color import apply_color_fix
from .memory import resolve_budget, reuse_freed_heap, run_with_oom_retry
from .options import (
    LATENT_FACTOR,
    InvalidImageError,
    UpscaleOptions,
    target_size,
    validate_images,
)
from .tiling import (
    AUTO_MAX_TILE,
    attention_bytes,
    plan_latent_tiles,
    tiled_model_output,
    unet_bytes_per_latent_pixel,
)
from .unet_attention import attention_window
from .unet_feed_forward import FEED_FORWARD_CHUNK, chunked_feed_forward
from .unet_layout import transformer_outputs_keep_layout

logger = logging.getLogger("d3sr")

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


# Share of one image's progress per stage, roughly their cost (the decoder dominates).
_STAGE_WEIGHTS = {"encode": 25, "denoise": 20, "decode": 55}


class UpscaleCancelled(RuntimeError):
    """Raised between stages or tiles when the caller's cancel check returns True."""


def pad_to_multiple(image: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int]]:
    """Reflect-pad ``[B, C, H, W]`` at the bottom/right to multiples of ``multiple``.

    Returns the padded tensor and the original ``(H, W)`` to crop back to. Falls back to
    replicate padding where the image is too small to reflect.
    """
    h, w = image.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        image = F.pad(image, (0, pw, 0, ph), mode=mode)
    return image, (h, w)


def pil_to_tensor(image: Image.Image) -> Tensor:
    """PIL image -> ``[1, C, H, W]`` float32 in [0, 1] (C = 1, 3 or 4; 16-bit modes are kept 16-bit)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32) / 65535.0
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
    else:
        if image.mode not in ("L", "RGB", "RGBA"):
            image = image.convert(
                "RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB"
            )
        array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).unsqueeze(0)


def tensor_to_pil(image: Tensor, sixteen_bit: bool = False) -> Image.Image:
    """``[C, H, W]`` or ``[1, C, H, W]`` in [0, 1] -> PIL (``L``, ``RGB``, ``RGBA``; or ``I;16`` for 16-bit gray)."""
    if image.ndim == 4:
        image = image[0]
    array = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    if array.shape[2] == 1:
        if sixteen_bit:
            return Image.fromarray((array[:, :, 0] * 65535.0 + 0.5).astype(np.uint16))  # -> "I;16"
        return Image.fromarray((array[:, :, 0] * 255.0 + 0.5).astype(np.uint8))  # -> "L"
    return Image.fromarray((array * 255.0 + 0.5).astype(np.uint8))  # -> "RGB" / "RGBA"


class _Progress:
    """Monotonic ``progress(done, total)`` over images and weighted stages; checks ``cancel``."""

    def __init__(
        self,
        images: int,
        progress: ProgressCallback | None,
        cancel: CancelCheck | None,
        per_image: int = 100,
    ):
        self.total = per_image * images
        self.progress = progress
        self.cancel = cancel
        self.done = 0
        self.base = 0

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise UpscaleCancelled("upscale cancelled")

    def stage(self, name: str) -> Callable[[float], None]:
        """A ``tick(fraction)`` for one stage of the current image."""
        start, weight = self.base, _STAGE_WEIGHTS[name]
        self.base += weight

        def tick(fraction: float) -> None:
            done = min(start + weight, start + int(weight * max(0.0, min(1.0, fraction))))
            if done > self.done:
                self.done = done
                if self.progress is not None:
                    self.progress(done, self.total)
            self.check()

        return tick


@dataclass
class _Run:
    """Per-call state the overridable stages read (options, budget, progress)."""

    options: UpscaleOptions
    budget: int
    progress: _Progress | None = None

    def tick(self, stage: str) -> Callable[[float], None] | None:
        return self.progress.stage(stage) if self.progress is not None else None


class D3SRPipeline:
    """Upscales images with a :class:`D3SRGenerator`.

    The stages :meth:`encode`, :meth:`denoise` and :meth:`decode` take and return whole
    tensors and tile internally (options of the current :meth:`upscale_tensor` call, or the
    defaults when called directly); subclasses may override them.

    Args:
        generator: the loaded generator (already on its device/dtype, e.g. through
            :func:`~d3sr_core.inference.precision.prepare_generator`).
    """

    def __init__(self, generator: D3SRGenerator):
        self.generator = generator
        self._run: _Run | None = None

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def _current(self) -> _Run:
        if self._run is not None:
            return self._run
        options = UpscaleOptions()
        return _Run(options, self._budget(None))

    def _budget(self, budget: int | None) -> int:
        # The default follows the widest activation dtype (an fp32 VAE may run next to a
        # half-precision UNet): half-precision states take half the bytes.
        g = self.generator
        params = [next(m.parameters(), None) for m in (g.unet, g.vae)]
        dtypes = [p.dtype for p in params if p is not None and p.is_floating_point()]
        widest = max(dtypes, key=lambda d: d.itemsize, default=None)
        return resolve_budget(budget, self.device, widest)

    # ---- stages (overridable) ------------------------------------------------------------------
    def encode(self, image: Tensor, rng: torch.Generator | None = None) -> Tensor:
        """``[1, 3, H, W]`` in [-1, 1] (H, W multiples of 8) -> scaled latent, float32."""
        run = self._current()
        tick = run.tick("encode")

        def attempt(shrink: float) -> Tensor:
            mode, plan = self._vae_plan("encode", image.shape, run, shrink)
            if mode == "diffusers":
                latent = self._vae_guard(lambda: self.generator.encode(image, rng), "encode")
            else:
                moments = self._own_vae("encode", image, mode, plan, run, tick)
                latent = self._latent_from_moments(moments, rng)
            if tick is not None:
                tick(1.0)
            return latent

        return self._retry(attempt, "VAE encode", run)

    def denoise(self, latent: Tensor) -> Tensor:
        """Scaled LR latent ``[1, 4, h, w]`` -> scaled SR latent (one UNet step, tiled)."""
        run = self._current()
        opts = run.options
        tick = run.tick("denoise")
        g = self.generator
        _, _, h, w = latent.shape
        tile = opts.tile_size
        overlap = max(0, int(opts.tile_overlap)) // LATENT_FACTOR
        window = _latent_window(opts.unet_attention_window)

        def attempt(shrink: float) -> Tensor:
            budget = int(run.budget * shrink)
            lt = (
                tile
                if tile in (None, 0, "auto")
                else _shrink_tile(int(tile), shrink) // LATENT_FACTOR
            )
            tiles, batch = plan_latent_tiles(
                h,
                w,
                lt,
                overlap,
                budget,
                unet_bytes_per_latent_pixel(g.unet, g.dtype),
                self._attention_cost(),
                max_batch=8 if self.device.type != "cpu" else 1,
                # windowed attention: the context no longer grows with the tile
                max_tile=None if window else AUTO_MAX_TILE,
            )
            if len(tiles) > 1:
                logger.debug(
                    "UNet: %d tiles of %dx%d latent px, batch %d",
                    len(tiles),
                    tiles[0].h,
                    tiles[0].w,
                    batch,
                )
            with (
                attention_window(g.unet, window),
                chunked_feed_forward(g.unet, FEED_FORWARD_CHUNK),
                transformer_outputs_keep_layout(g.unet),
            ):
                out = tiled_model_output(
                    self._predict_guarded,
                    latent,
                    tiles,
                    batch,
                    None if tick is None else lambda d, t: tick(d / t),
                )
            return g.to_x0(latent, out)

        return self._retry(attempt, "UNet", run)

    def decode(self, latent: Tensor) -> Tensor:
        """Scaled latent ``[1, 4, h, w]`` -> image ``[1, 3, 8h, 8w]`` in [-1, 1], float32."""
        run = self._current()
        tick = run.tick("decode")
        shape = tuple(latent.shape)

        def attempt(shrink: float) -> Tensor:
            mode, plan = self._vae_plan("decode", shape, run, shrink)
            if mode == "diffusers":
                image = self._vae_guard(lambda: self.generator.decode(latent), "decode")
            else:
                z = latent / self.generator.config.scaling_factor
                image = self._own_vae("decode", z, mode, plan, run, tick)
                image = image.float().clamp(-1.0, 1.0)
            if tick is not None:
                tick(1.0)
            return image

        return self._retry(attempt, "VAE decode", run)

    # ---- helpers -------------------------------------------------------------------------------
    def _retry(self, attempt: Callable[[float], Tensor], what: str, run: _Run) -> Tensor:
        return run_with_oom_retry(attempt, what=what, device=self.device)

    def _vae_plan(self, kind: str, shape, run: _Run, shrink: float):
        """How to run a VAE stage: ``("whole", keep_freed)`` (untiled; ``keep_freed``: reuse
        freed memory, see below), ``("tiled", (budget, tile))`` or ``("diffusers", None)``
        (the plain modules, for VAE structures the tiled path does not know).

        An untiled run whose estimated peak is at most half the budget keeps freed blocks in
        the heap for its next layers (:func:`~.memory.reuse_freed_heap`) instead of faulting
        fresh memory in for every large map; what it holds freed is at most about its live
        peak again, so it stays within the budget. Measured (512x512 output, bf16, AMX CPU,
        2 threads): 3.03-3.12 -> 2.80-2.95 s per upscale, 460 K -> 237 K page faults. Larger
        untiled runs do not (their peak rose from 2.5 to 4.0 GB at 1024x1024)."""
        vae = self.generator.vae
        tile = run.options.vae_tile_size
        if not tiled_vae.is_supported(vae):
            if tile not in (None, 0):
                logger.warning(
                    "this VAE's structure is not supported by the tiled VAE; running it whole"
                )
            return "diffusers", None
        if tile is None or tile == 0:
            return "whole", False
        budget = int(run.budget * shrink)
        if tile == "auto":
            dtype = next(vae.parameters()).dtype
            peak = tiled_vae.estimate_untiled_bytes(vae, kind, shape, dtype)
            # after an out-of-memory error, never the whole image again
            if peak <= budget and shrink == 1.0:
                return "whole", 2 * peak <= budget
            return "tiled", (budget, None)
        return "tiled", (budget, _shrink_tile(int(tile), shrink))

    def _own_vae(self, kind: str, x: Tensor, mode: str, plan, run: _Run, tick) -> Tensor:
        """``kind`` ("encode" / "decode") through :mod:`.tiled_vae`, whole or in tiles as
        :meth:`_vae_plan` decided, with the options' attention window."""
        vae = self.generator.vae
        window = _latent_window(run.options.vae_attention_window)
        if mode == "whole":
            whole = getattr(tiled_vae, f"whole_{kind}")
            with reuse_freed_heap(x.device) if plan else nullcontext():
                return self._vae_guard(lambda: whole(vae, x, window), kind)
        tiled = getattr(tiled_vae, f"tiled_{kind}")
        return self._vae_guard(
            lambda: tiled(vae, x, *plan, tick=tick, attention_window=window), kind
        )

    def _attention_cost(self) -> Callable[[int], int] | None:
        # Flash / memory-efficient SDPA kernels (CUDA, CPU) need no score matrix; MPS does.
        if self.device.type != "mps":
            return None
        heads = 8
        config = getattr(self.generator.unet, "config", None)
        head_dim = getattr(config, "attention_head_dim", None)
        if isinstance(head_dim, (list, tuple)):
            heads = max(int(h) for h in head_dim)
        itemsize = torch.empty((), dtype=self.generator.dtype).element_size()
        return lambda tokens: attention_bytes(tokens, heads, itemsize, True)

    def _predict_guarded(self, latent: Tensor) -> Tensor:
        """UNet output; if fp16 overflowed (non-finite values), redo this call in fp32."""
        g = self.generator
        out = g.predict(latent)
        if torch.isfinite(out).all() or g.dtype == torch.float32:
            return out
        logger.warning("the UNet overflowed in %s; recomputing this tile in fp32", g.dtype)
        with _upcast(g.unet):
            return g.predict(latent)

    def _vae_guard(self, fn: Callable[[], Tensor], kind: str) -> Tensor:
        """Run a VAE call; if it produced non-finite values in half precision, redo it in fp32
        (diffusers' ``force_upcast`` does this up front; this catches VAEs without it)."""
        out = fn()
        vae = self.generator.vae
        dtype = next(vae.parameters()).dtype
        if dtype == torch.float32 or torch.isfinite(out).all():
            return out
        logger.warning("the VAE %s overflowed in %s; recomputing in fp32", kind, dtype)
        with _upcast(vae):
            return fn()

    def _latent_from_moments(self, moments: Tensor, rng: torch.Generator | None) -> Tensor:
        """Scaled latent from the encoder's (mean, logvar), as ``D3SRGenerator.encode`` does."""
        g = self.generator
        mean, logvar = moments.float().chunk(2, dim=1)
        if g.config.latent_mode == "sample":
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=rng, device=mean.device, dtype=mean.dtype)
            mean = mean + std * noise
        return mean * g.config.scaling_factor

    # ---- public API --------------------------------------------------------------------------
    @torch.inference_mode()
    def upscale_tensor(
        self,
        images: Tensor,
        options: UpscaleOptions | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
    ) -> Tensor:
        """Upscale ``[B, C, H, W]`` images in [0, 1] (C = 1 gray, 3 RGB or 4 RGBA).

        Returns ``[B, C, floor(H*scale+0.5), floor(W*scale+0.5)]`` (or ``options.size``) in
        [0, 1] on the input's device, float32. Gray input is processed as RGB and returned gray;
        alpha is upsampled bicubically and carried over, and the colour under fully transparent
        pixels is first filled from visible neighbours (:func:`.alpha.fill_transparent`).
        ``progress(done, total)`` advances per tile;
        ``cancel()`` is checked between tiles and raises :class:`UpscaleCancelled`.
        """
        options = options or UpscaleOptions()
        images = validate_images(images, options)
        if images.shape[1] == 4:  # hidden colour under alpha = 0 must not bleed into edges
            images = torch.cat([fill_transparent(images[:, :3], images[:, 3:]), images[:, 3:]], 1)
        budget = self._budget(options.memory_budget_bytes)
        b, c, h, w = images.shape
        out_w, out_h = target_size(w, h, options)
        tracker = _Progress(b, progress, cancel)
        tracker.check()
        rng = (
            torch.Generator(device=self.device).manual_seed(options.seed)
            if options.seed is not None
            else None
        )
        outputs = []
        stored_embeds = self._use_prompt_embeds(options)
        previous, self._run = self._run, _Run(options, budget, tracker)
        try:
            for i in range(b):
                rgb = (
                    images[i : i + 1, :3] if c >= 3 else images[i : i + 1, :1].expand(-1, 3, -1, -1)
                )
                # The bicubic reference is the encoder's input and the colour fix's target. It
                # is computed again for the colour fix instead of being held through the three
                # stages (at 4096x4096 an fp32 copy is 0.2 GB next to their memory budget),
                # and the encoder gets it in the VAE's dtype, which every VAE path casts to.
                image, (ph, pw) = pad_to_multiple(self._reference(rgb, out_h, out_w), LATENT_FACTOR)
                vae_dtype = next(self.generator.vae.parameters()).dtype
                image = image.mul_(2.0).sub_(1.0).to(vae_dtype)
                latent = self.encode(image, rng)
                del image
                latent = self.denoise(latent)
                sr = self.decode(latent)[:, :, :ph, :pw]
                del latent
                sr = sr.float().add_(1.0).div_(2.0).clamp_(0, 1)
                if options.color_fix != "none":
                    reference = self._reference(rgb, out_h, out_w)
                    sr = apply_color_fix(sr, reference, options.color_fix)
                    del reference
                outputs.append(sr.to(images.device))
                del sr
        finally:
            self._run = previous
            if stored_embeds is not None:
                self.generator.set_prompt_embeds(stored_embeds)
        result = torch.cat(outputs)
        if c == 1:
            result = result.mean(dim=1, keepdim=True)
        elif c == 4:
            alpha = F.interpolate(
                images[:, 3:].float(), size=(out_h, out_w), mode="bicubic", align_corners=False
            )
            result = torch.cat([result, alpha.clamp(0, 1)], dim=1)
        return result.clamp(0, 1)

    def _reference(self, rgb: Tensor, out_h: int, out_w: int) -> Tensor:
        """The bicubic upsampling of ``rgb`` ``[1, 3, h, w]`` to the output size, in [0, 1]
        (a fresh tensor on the pipeline's device)."""
        up = F.interpolate(
            rgb.to(self.device), size=(out_h, out_w), mode="bicubic", align_corners=False
        )
        return up.clamp_(0, 1)

    def _use_prompt_embeds(self, options: UpscaleOptions) -> Tensor | None:
        """Install ``options.prompt_embeds`` for one call; returns the stored one to restore."""
        if options.prompt_embeds is None:
            return None
        try:
            return self.generator.set_prompt_embeds(options.prompt_embeds)
        except ValueError as err:
            raise InvalidImageError(str(err)) from None

    def upscale_latent(
        self,
        latents: Tensor,
        options: UpscaleOptions | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
        *,
        decode_input: Callable[[Tensor], Tensor] | None = None,
        encode_output: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Upscale *raw* (unscaled) VAE latents; see :func:`.latent.upscale_latent`."""
        from .latent import upscale_latent

        return upscale_latent(self, latents, options, progress, cancel, decode_input, encode_output)

    def upscale(
        self,
        image: Image.Image | Tensor,
        options: UpscaleOptions | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
    ) -> Image.Image | Tensor:
        """Upscale a PIL image (returns PIL, same mode family) or a tensor (see :meth:`upscale_tensor`)."""
        if isinstance(image, Tensor):
            return self.upscale_tensor(image, options, progress, cancel)
        sixteen_bit = image.mode.startswith("I")
        result = self.upscale_tensor(pil_to_tensor(image), options, progress, cancel)
        return tensor_to_pil(result, sixteen_bit=sixteen_bit)


class _upcast:  # noqa: N801 - used as a context manager
    """Temporarily run a module in fp32 (fp16/bf16 -> fp32 -> back is exact for the weights)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.dtype = next(module.parameters()).dtype

    def __enter__(self):
        self.module.float()
        return self.module

    def __exit__(self, *exc):
        self.module.to(self.dtype)
        return False


def _latent_window(window: int | None) -> int | None:
    """An attention window option (output pixels, None/0 = global) in latent positions."""
    return None if not window else max(1, window // LATENT_FACTOR)


def _shrink_tile(tile: int, shrink: float) -> int:
    """A retry's tile: the area scales with ``shrink``, the side stays a multiple of 8."""
    if shrink >= 1.0:
        return tile
    return max(LATENT_FACTOR * 2, int(tile * math.sqrt(shrink)) // LATENT_FACTOR * LATENT_FACTOR)
