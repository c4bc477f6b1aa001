"""The one inference entry point used by the CLI, ComfyUI and A1111 alike."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..models.generator import D3SRGenerator

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]

LATENT_FACTOR = 8


class UpscaleCancelled(RuntimeError):
    """Raised between stages when the caller's cancel check returns True."""


class InvalidImageError(ValueError):
    """The input image or an option cannot be upscaled (empty, NaN, bad scale...)."""


@dataclass
class UpscaleOptions:
    """Options of :meth:`D3SRPipeline.upscale`.

    Attributes:
        scale: output / input size, any value > 1 (4 is what the model is trained for).
        seed: seeds the VAE posterior sample when the checkpoint's latent mode is ``sample``.
        max_output_pixels: refuse (before any work) outputs larger than this.
    """

    scale: float = 4.0
    seed: int | None = None
    max_output_pixels: int = 256 * 1024 * 1024


def output_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """``(floor(w*scale + 0.5), floor(h*scale + 0.5))``: round half up, never Python's half-to-even."""
    return math.floor(width * scale + 0.5), math.floor(height * scale + 0.5)


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
            image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
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


class D3SRPipeline:
    """Upscales images with a :class:`D3SRGenerator`.

    Args:
        generator: the loaded generator (already on its device/dtype).
    """

    def __init__(self, generator: D3SRGenerator):
        self.generator = generator

    @property
    def device(self) -> torch.device:
        return self.generator.device

    # ---- stages (overridable: tiling replaces these) ---------------------------------------
    def encode(self, image: Tensor, rng: torch.Generator | None = None) -> Tensor:
        return self.generator.encode(image, rng)

    def denoise(self, latent: Tensor) -> Tensor:
        return self.generator.denoise(latent)

    def decode(self, latent: Tensor) -> Tensor:
        return self.generator.decode(latent)

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

        Returns ``[B, C, round(H*scale), round(W*scale)]`` in [0, 1] on the input's device,
        float32. Gray input is processed as RGB and returned gray; alpha is upsampled
        bicubically and carried over.
        """
        options = options or UpscaleOptions()
        images = validate_images(images, options)
        b, c, h, w = images.shape
        out_w, out_h = output_size(w, h, options.scale)
        total = 3 * b
        done = 0

        def step() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)
            if cancel is not None and cancel():
                raise UpscaleCancelled("upscale cancelled")

        if cancel is not None and cancel():
            raise UpscaleCancelled("upscale cancelled")
        rgb = images[:, :3] if c >= 3 else images[:, :1].expand(-1, 3, -1, -1)
        upsampled = F.interpolate(rgb.float(), size=(out_h, out_w), mode="bicubic", align_corners=False).clamp(0, 1)
        rng = torch.Generator(device=self.device).manual_seed(options.seed) if options.seed is not None else None
        outputs = []
        for i in range(b):
            padded, (ph, pw) = pad_to_multiple(upsampled[i : i + 1].to(self.device), LATENT_FACTOR)
            latent = self.encode(padded * 2.0 - 1.0, rng)
            step()
            latent = self.denoise(latent)
            step()
            sr = self.decode(latent)[:, :, :ph, :pw]
            step()
            outputs.append((sr.float() + 1.0) / 2.0)
        result = torch.cat(outputs).to(images.device)
        if c == 1:
            result = result.mean(dim=1, keepdim=True)
        elif c == 4:
            alpha = F.interpolate(images[:, 3:].float(), size=(out_h, out_w), mode="bicubic", align_corners=False)
            result = torch.cat([result, alpha.clamp(0, 1)], dim=1)
        return result.clamp(0, 1)

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


def validate_images(images: Tensor, options: UpscaleOptions) -> Tensor:
    """Check shape, values and options before any work; returns ``[B, C, H, W]`` float."""
    if not isinstance(images, Tensor):
        raise InvalidImageError(f"expected a torch.Tensor [B, C, H, W], got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise InvalidImageError(f"expected an image tensor [B, C, H, W] with C in (1, 3, 4), got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    if b == 0 or h == 0 or w == 0:
        raise InvalidImageError(f"empty image (shape {tuple(images.shape)})")
    if not (isinstance(options.scale, int | float) and math.isfinite(options.scale) and options.scale > 1):
        raise InvalidImageError(f"scale must be a number > 1, got {options.scale!r}")
    out_w, out_h = output_size(w, h, options.scale)
    if out_w * out_h > options.max_output_pixels:
        raise InvalidImageError(
            f"output would be {out_w}x{out_h} = {out_w * out_h / 1e6:.1f} MP, above the limit of "
            f"{options.max_output_pixels / 1e6:.1f} MP (raise max_output_pixels to allow it)"
        )
    images = images.float()
    if not torch.isfinite(images).all():
        raise InvalidImageError("image contains NaN or infinite pixel values")
    return images
