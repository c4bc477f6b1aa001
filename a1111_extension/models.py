"""Which D3SR weights and base model to use, and the one loaded model kept between runs.

Discovery is the engine's (:mod:`d3sr_core.loading.locate`): D3SR ``.safetensors`` are
recognised by their header whatever their name, OSEDiff's ``osediff*.pkl`` are listed too
(converted once, beside the pickle, on first use).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from d3sr_core.loading.detect import base_lacks_vae
from d3sr_core.loading.files import WeightsFileError
from d3sr_core.loading.locate import (
    converted_path,
    find_base_in,
    find_vae_in,
    is_diffusers_base_folder,
    locate_models,
)

from . import host
from .settings import AUTOMATIC

SD21_FILE = "v2-1_512-ema-pruned.safetensors"


class D3SRError(RuntimeError):
    """A problem the user can fix (missing or wrong files); the message says how."""


# ---------------------------------------------------------------------------------- weights


def weights_folders(*folders: str | Path | None) -> list[Path]:
    """The given folders (``--d3sr-models-path``, ``models/D3SR``), without None/duplicates."""
    out: list[Path] = []
    for folder in folders:
        if folder and Path(folder) not in out:
            out.append(Path(folder))
    return out


def list_weights(folders: Iterable[Path]) -> list[Path]:
    """D3SR checkpoints, then OSEDiff pickles, in ``folders``; a pickle whose conversion is
    already listed is left out (the conversion is the same model)."""
    from d3sr_core.loading.locate import find_weights_in

    found: list[Path] = []
    for folder in folders:
        found += [p for p in find_weights_in(folder) if p not in found]
    return [p for p in found if not (p.suffix.lower() == ".pkl" and converted_path(p) in found)]


def display_name(path: Path) -> str:
    """The name shown in every upscaler list and taken by the API (``upscaler_1``)."""
    return f"D3SR {path.stem}"


def missing_weights_message(folders: Iterable[Path]) -> str:
    places = ", ".join(str(f) for f in folders)
    return (
        f"No D3SR weights found in {places}. Put a D3SR .safetensors file (any name) or "
        "OSEDiff's osediff.pkl there, then reload the UI (or restart the webui)."
    )


# ---------------------------------------------------------------------------------- base model


def _checkpoint_files(folder: Path) -> list[Path]:
    try:
        files = [
            p
            for p in folder.rglob("*")
            if p.suffix.lower() in (".safetensors", ".ckpt") and p.is_file()
        ]
    except OSError:
        return []
    # diffusers folders keep their weights in sub-folders; those are not checkpoints
    return [p for p in files if not any(is_diffusers_base_folder(q) for q in p.parents)]


def base_model_choices() -> list[str]:
    """Settings dropdown: Automatic, the recognised SD2.1-base files/folders, then every other
    checkpoint in ``models/Stable-diffusion`` (by path relative to it)."""
    folder = host.checkpoints_folder()
    names = [AUTOMATIC]
    for path in [*find_base_in(folder), *sorted(_checkpoint_files(folder))]:
        name = path.relative_to(folder).as_posix()
        if name not in names:
            names.append(name)
    return names


def resolve_base(choice: str) -> Path:
    """The SD2.1-base model to load for a setting value (``Automatic``, a name inside
    ``models/Stable-diffusion`` or an absolute path).

    Raises:
        D3SRError: the named model does not exist, or nothing was found automatically.
    """
    folder = host.checkpoints_folder()
    if choice and choice != AUTOMATIC:
        path = Path(choice)
        path = path if path.is_absolute() else folder / path
        if not path.exists():
            raise D3SRError(
                f"D3SR base model '{choice}' (Settings > Upscaling) does not exist in {folder}."
            )
        return path
    hits = find_base_in(folder)
    if hits:
        return hits[0]
    found = locate_models().base  # $D3SR_BASE, ~/.cache/d3sr, the Hugging Face cache, ...
    if found is not None:
        return found
    raise D3SRError(
        "D3SR needs the Stable Diffusion 2.1-base model: put "
        f"{SD21_FILE} into {folder} (or choose a file in Settings > Upscaling > D3SR base model)."
    )


def resolve_vae(base: Path) -> Path | None:
    """A VAE from ``models/VAE`` when the base file has none, else None."""
    if not base_lacks_vae(base):
        return None
    folder = host.models_path() / "VAE"
    hits = find_vae_in(folder)
    if not hits:
        raise D3SRError(
            f"{base.name} holds no VAE: put vae-ft-mse-840000-ema-pruned.safetensors into "
            f"{folder}, or choose a full SD2.1-base checkpoint in Settings > Upscaling."
        )
    return hits[0]


# ---------------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class ModelKey:
    weights: Path
    base: Path
    vae: Path | None
    dtype: torch.dtype
    device: torch.device
    strength: float


def load_pipeline(key: ModelKey, precision: str):
    """Load base + weights (LoRA merged in fp32 on the CPU), then cast and move once."""
    from d3sr_core import D3SRPipeline
    from d3sr_core.inference.precision import prepare_generator
    from d3sr_core.loading.fetch import load_converting
    from d3sr_core.loading.locate import default_models_dir

    try:
        generator, converted = load_converting(
            key.weights,
            key.base,
            vae=key.vae,
            strength=key.strength,
            cache_dir=default_models_dir(),
        )
        if converted is not None:
            host.log(f"converted {key.weights.name} -> {converted} (reused while unchanged)")
    except WeightsFileError as err:
        raise D3SRError(
            f"D3SR could not load its model: {err}. D3SR needs Stable Diffusion 2.1-base "
            "(Settings > Upscaling > D3SR base model) and a D3SR/OSEDiff weights file."
        ) from None
    generator = prepare_generator(generator, key.device, precision)
    host.log(
        f"loaded {key.weights.name} on {key.base.name} ({generator.precision_plan.describe()})"
    )
    return D3SRPipeline(generator)


class ModelCache:
    """Holds at most one loaded pipeline, keyed by :class:`ModelKey`; a different key
    releases the old one first (two SD-sized models rarely fit beside a generation model)."""

    def __init__(self) -> None:
        self.key: ModelKey | None = None
        self.pipeline = None

    def get(self, key: ModelKey, load: Callable[[], object]):
        if key != self.key:
            self.release()
            self.pipeline = load()
            self.key = key
        return self.pipeline

    def release(self) -> bool:
        """Drop the model and return its memory. Returns whether one was loaded."""
        had = self.pipeline is not None
        self.key = None
        self.pipeline = None
        if had:
            gc.collect()
            host.torch_gc()
        return had


CACHE = ModelCache()
