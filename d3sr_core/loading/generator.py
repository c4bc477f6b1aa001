"""Assemble a ready-to-run :class:`D3SRGenerator` from a base model and a D3SR/OSEDiff weights file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..models.generator import D3SRGenerator
from ..models.schedule import alphas_cumprod_from_config
from .base import BaseModel, load_base
from .checkpoint import D3SRCheckpoint, is_d3sr_checkpoint, load_checkpoint
from .files import WeightsFileError
from .osediff import osediff_to_checkpoint, read_osediff
from .validate import fit_problems


def read_weights(
    path: str | Path,
    base_source: str | Path | None = None,
    prompt_embeds: Tensor | str | Path | None = None,
) -> D3SRCheckpoint:
    """Read D3SR weights: a D3SR ``.safetensors`` or OSEDiff's ``osediff.pkl``.

    OSEDiff files carry no prompt embedding; it is computed once from the base model's
    text encoder (``base_source``: the SD2.1 folder or single file) unless ``prompt_embeds``
    is given.

    Args:
        prompt_embeds: an external condition ``[1, N, C]`` (a tensor, or a file holding a
            ``prompt_embeds`` tensor, e.g. another D3SR checkpoint) that replaces the stored
            one (D3SR) or the computed one (OSEDiff, which then needs no text encoder).
    """
    path = Path(path)
    embeds = _external_prompt_embeds(prompt_embeds)
    if is_d3sr_checkpoint(path) or path.suffix.lower() == ".safetensors":
        ckpt = load_checkpoint(path)  # a non-D3SR .safetensors raises its "not a D3SR" error
        if embeds is not None:
            ckpt = replace(ckpt, prompt_embeds=embeds)
        return ckpt
    state = read_osediff(path)
    if embeds is None:
        if base_source is None:
            raise WeightsFileError(
                path,
                "OSEDiff weights need the SD2.1 base model (or a prompt embedding) for the prompt embedding",
            )
        from .prompt import empty_prompt_embeds

        embeds = empty_prompt_embeds(base_source)
    return osediff_to_checkpoint(state, embeds, path)


def _external_prompt_embeds(prompt_embeds: Tensor | str | Path | None) -> Tensor | None:
    """``prompt_embeds`` as a ``[1, N, C]`` float32 tensor (read from a file when a path)."""
    if prompt_embeds is None:
        return None
    if isinstance(prompt_embeds, (str, Path)):
        from .fetch import read_prompt_embeds

        return read_prompt_embeds(prompt_embeds).float()
    if not isinstance(prompt_embeds, Tensor):
        raise TypeError(
            f"prompt_embeds must be a tensor or a file path, got {type(prompt_embeds).__name__}"
        )
    embeds = prompt_embeds.unsqueeze(0) if prompt_embeds.ndim == 2 else prompt_embeds
    if embeds.ndim != 3 or embeds.shape[0] != 1 or not embeds.is_floating_point():
        raise ValueError(
            f"prompt_embeds must be a float tensor [1, N, C], got {tuple(prompt_embeds.shape)} {prompt_embeds.dtype}"
        )
    return embeds.detach().float().cpu()


def build_generator(
    base: BaseModel, ckpt: D3SRCheckpoint, strength: float = 1.0, weights_name: str = "weights"
) -> D3SRGenerator:
    """Merge ``ckpt``'s adapters into ``base`` (in place) and wrap them as a generator."""
    config = ckpt.config
    if base.prediction_type != config.prediction_type:
        raise WeightsFileError(
            weights_name,
            f"checkpoint was trained for a {config.prediction_type!r} base, the base model predicts {base.prediction_type!r}",
        )
    context = getattr(base.unet.config, "cross_attention_dim", None)
    if context is not None and ckpt.prompt_embeds.shape[-1] != context:
        raise WeightsFileError(
            weights_name,
            f"prompt_embeds width {ckpt.prompt_embeds.shape[-1]} does not match the UNet's context {context}",
        )
    problems = [
        problem
        for name, model in (("unet", base.unet), ("vae", base.vae))
        if name in ckpt.adapters
        for problem in fit_problems(model, ckpt.adapters[name], {"unet": "UNet"}.get(name, "VAE"))
    ]
    if problems:  # checked in full before merging, so a bad file never half-changes the base
        raise WeightsFileError(
            weights_name, "does not fit this base model: " + "; ".join(problems[:4])
        )
    generator = D3SRGenerator(
        base.unet,
        base.vae,
        ckpt.prompt_embeds,
        alphas_cumprod_from_config(base.scheduler_config),
        config,
    )
    try:
        generator.merge_adapters(ckpt.adapters.get("unet"), ckpt.adapters.get("vae"), strength)
    except (KeyError, ValueError) as err:
        raise WeightsFileError(
            weights_name, f"does not fit this base model: {err.args[0]}"
        ) from None
    return generator


def load_generator(
    weights: str | Path,
    base: str | Path,
    *,
    vae: str | Path | None = None,
    strength: float = 1.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_download: bool = False,
    prompt_embeds: Tensor | str | Path | None = None,
) -> D3SRGenerator:
    """Load base + weights, merge the LoRA (fp32) and move to ``device``/``dtype``.

    Args:
        weights: a D3SR ``.safetensors`` checkpoint or OSEDiff ``osediff.pkl``.
        base: SD2.1-base diffusers folder, LDM single file, or hub id (with ``allow_download``).
        vae: optional replacement VAE.
        strength: LoRA strength (0 = base model, 1 = trained, >1 extrapolates).
        prompt_embeds: replaces the checkpoint's condition (see :func:`read_weights`).
    """
    ckpt = read_weights(weights, base, prompt_embeds)
    generator = generator_from_checkpoint(
        ckpt,
        base,
        vae=vae,
        strength=strength,
        weights_name=str(weights),
        allow_download=allow_download,
    )
    return generator.to(device=device, dtype=dtype).eval()


def generator_from_checkpoint(
    ckpt: D3SRCheckpoint,
    base: str | Path,
    *,
    vae: str | Path | None = None,
    strength: float = 1.0,
    weights_name: str = "weights",
    allow_download: bool = False,
) -> D3SRGenerator:
    """Load the base and merge an already-read checkpoint into it (fp32, CPU).

    ``weights_name`` is the file the user gave, named in errors.
    """
    base_model = load_base(
        base,
        vae=vae,
        prediction_type=ckpt.config.prediction_type if Path(base).is_file() else None,
        allow_download=allow_download,
    )
    return build_generator(base_model, ckpt, strength, weights_name)
