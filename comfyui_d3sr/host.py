"""ComfyUI integration of the D3SR model: model folders, loading, caching, memory management.

Host modules (``folder_paths``, ``comfy.model_management``, ``comfy.model_patcher``) are
imported here only, so tests can stand them in. ``d3sr_core`` is imported lazily: importing
the node pack does no torch work.

Memory cooperation: the generator lives in a ``ModelPatcher`` (wrapped in a plain
``nn.Module``: a diffusers model cannot be patched directly, ModelPatcher assigns ``.device``),
so "Unload models", ``/free`` and other nodes' ``free_memory`` calls move it to the offload
device; each run asks ``load_models_gpu`` to bring it back. Loaded models are cached by their
files and settings with *weak* references: the D3SR_MODEL output that ComfyUI caches keeps a
model alive, and when ComfyUI drops its caches (``/free`` with ``free_memory``, or a changed
graph) the model is released. The strength is not part of the key: a new strength reuses the
loaded base and only re-merges the LoRA delta in place.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import comfy.model_management as mm
import folder_paths
import torch

logger = logging.getLogger("d3sr")

FOLDER = "d3sr"
WEIGHT_SUFFIXES = (".safetensors", ".pkl")
BASE_SUFFIXES = (".safetensors", ".ckpt", ".sft")
DIFFUSERS_PREFIX = "diffusers: "
VAE_FROM_BASE = "from base"
PRECISIONS = ["auto", "fp32", "fp16", "bf16"]
DEVICES = ["auto", "cpu"]
OSEDIFF_URL = "https://github.com/cswry/OSEDiff/raw/main/preset/models/osediff.pkl"


class D3SRNodeError(Exception):
    """A D3SR node failed for a reason the user can fix; the message says what and how."""


# ----------------------------------------------------------------------------- model folders


def register_model_folder() -> None:
    """Register ``models/d3sr`` (after any ``d3sr:`` entry from ``extra_model_paths.yaml``)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, default)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = (
            [default],
            set(folder_paths.supported_pt_extensions),
        )


def weights_options() -> list[str]:
    return [
        n for n in folder_paths.get_filename_list(FOLDER) if n.lower().endswith(WEIGHT_SUFFIXES)
    ]


def _diffusers_folders() -> list[str]:
    """Folders holding a ``model_index.json`` under the ``diffusers`` paths (like DiffusersLoader)."""
    found = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(root):
            continue
        for current, _dirs, files in os.walk(root, followlinks=True):
            if "model_index.json" in files:
                found.append(os.path.relpath(current, root).replace(os.sep, "/"))
    return sorted(set(found))


def base_options() -> list[str]:
    files = [
        n
        for n in folder_paths.get_filename_list("checkpoints")
        if n.lower().endswith(BASE_SUFFIXES)
    ]
    return files + [DIFFUSERS_PREFIX + name for name in _diffusers_folders()]


def vae_options() -> list[str]:
    return [VAE_FROM_BASE] + folder_paths.get_filename_list("vae")


def _paths(key: str) -> str:
    return "\n".join(f"  {p}" for p in folder_paths.get_folder_paths(key))


def resolve_weights(name: str) -> Path:
    path = folder_paths.get_full_path(FOLDER, name) if name else None
    if path is None:
        raise D3SRNodeError(
            f"D3SR weights {name!r} not found. Put a D3SR .safetensors checkpoint, or OSEDiff's "
            f"osediff.pkl ({OSEDIFF_URL}), into one of these folders:\n{_paths(FOLDER)}\n"
            "then refresh the node list (press R) and pick it in D3SR Model Loader."
        )
    return Path(path)


def resolve_base(name: str) -> Path:
    path = None
    if name and name.startswith(DIFFUSERS_PREFIX):
        rel = name[len(DIFFUSERS_PREFIX) :]
        for root in folder_paths.get_folder_paths("diffusers"):
            candidate = os.path.join(root, rel)
            if os.path.isfile(os.path.join(candidate, "model_index.json")):
                path = candidate
                break
    elif name:
        path = folder_paths.get_full_path("checkpoints", name)
    if path is None:
        raise D3SRNodeError(
            f"SD2.1-base model {name!r} not found. D3SR needs Stable Diffusion 2.1-base: put "
            f"v2-1_512-ema-pruned.safetensors into\n{_paths('checkpoints')}\nor the "
            f"stable-diffusion-2-1-base diffusers folder into\n{_paths('diffusers')}"
        )
    return Path(path)


def resolve_vae(name: str) -> Path | None:
    if not name or name == VAE_FROM_BASE:
        return None
    path = folder_paths.get_full_path("vae", name)
    if path is None:
        raise D3SRNodeError(f"VAE {name!r} not found in:\n{_paths('vae')}")
    return Path(path)


# ----------------------------------------------------------------------------- loaded models


class GeneratorHolder(torch.nn.Module):
    """The generator in a plain module, which ModelPatcher can move and annotate."""

    def __init__(self, generator):
        super().__init__()
        self.generator = generator


@dataclass(eq=False)
class LoadedD3SR:
    """One loaded generator and its ComfyUI ModelPatcher (shared by D3SRModel handles)."""

    key: tuple
    generator: object
    patcher: object
    description: str
    latent_families: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)


@dataclass
class D3SRModel:
    """What the D3SR_MODEL socket carries: a loaded generator and the strength to run it at."""

    loaded: LoadedD3SR
    strength: float

    def activate(self):
        """Load onto the compute device through ComfyUI (freeing others' memory as needed),
        apply this handle's strength, and return the generator."""
        mm.load_models_gpu([self.loaded.patcher], force_full_load=True)
        generator = self.loaded.generator
        if generator.strength != self.strength:
            generator.set_strength(self.strength)
        return generator

    def __repr__(self) -> str:
        return f"D3SRModel({self.loaded.description}, strength={self.strength})"


_CACHE: dict[tuple, weakref.ref] = {}
_LOCK = threading.Lock()
#: how many times a base model was loaded (tests and logs read it)
load_count = 0


def _file_key(path: Path | None) -> tuple:
    if path is None:
        return (None,)
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _devices(device: str) -> tuple[torch.device, torch.device]:
    if device == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    if device != "auto":
        raise D3SRNodeError(f"device must be one of {DEVICES}, got {device!r}")
    return mm.get_torch_device(), mm.unet_offload_device()


def load_model(
    weights: str, base: str, vae: str, strength: float, precision: str, device: str
) -> D3SRModel:
    """Resolve the files, reuse a loaded generator when files and settings match, else load."""
    global load_count
    if precision not in PRECISIONS:
        raise D3SRNodeError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    weights_path, base_path, vae_path = (
        resolve_weights(weights),
        resolve_base(base),
        resolve_vae(vae),
    )
    load_device, offload_device = _devices(device)
    key = (
        _file_key(weights_path),
        _file_key(base_path),
        _file_key(vae_path),
        precision,
        str(load_device),
    )
    with _LOCK:
        ref = _CACHE.get(key)
        loaded = ref() if ref is not None else None
        if loaded is None:
            loaded = _load(
                key, weights_path, base_path, vae_path, precision, load_device, offload_device
            )
            load_count += 1
            _CACHE[key] = weakref.ref(loaded)
    return D3SRModel(loaded, float(strength))


def _load(key, weights_path, base_path, vae_path, precision, load_device, offload_device):
    from d3sr_core.inference.precision import plan_precision, prepare_generator
    from d3sr_core.loading.fetch import load_converting

    with user_errors("D3SR Model Loader"):
        # OSEDiff's pickle is converted once (its prompt embedding needs the base's text
        # encoder) and the cached conversion is used while pickle and base are unchanged.
        # The LoRA is merged in fp32 on the CPU at strength 1; handles set their own strength.
        generator, converted = load_converting(
            weights_path,
            base_path,
            vae=vae_path,
            strength=1.0,
            cache_dir=Path(folder_paths.get_folder_paths(FOLDER)[0]),
        )
        if converted is not None:
            logger.info("D3SR: converted %s -> %s", weights_path, converted)
        force_upcast = bool(getattr(generator.vae.config, "force_upcast", True))
        plan = plan_precision(precision, load_device, force_upcast)
        # cast once on the offload device; ComfyUI moves it to the load device per run
        prepare_generator(
            generator, offload_device, plan.unet_dtype, channels_last=plan.channels_last
        )
    patcher = _patcher(GeneratorHolder(generator), load_device, offload_device)
    description = f"{weights_path.name} on {base_path.name} ({plan.describe()})"
    loaded = LoadedD3SR(key, generator, patcher, description)
    weakref.finalize(loaded, logger.info, "D3SR: released model %s", description)
    logger.info("D3SR: loaded %s", description)
    return loaded


def _patcher(module, load_device, offload_device):
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(
        module, load_device=load_device, offload_device=offload_device
    )


# ----------------------------------------------------------------------------- errors and runs


@contextmanager
def user_errors(node: str):
    """Turn engine errors into one clear :class:`D3SRNodeError` (or ComfyUI's interrupt)."""
    from d3sr_core.inference.options import InvalidImageError
    from d3sr_core.inference.pipeline import UpscaleCancelled
    from d3sr_core.loading.files import WeightsFileError

    from .convert import ConversionError

    try:
        yield
    except UpscaleCancelled:
        mm.throw_exception_if_processing_interrupted()  # raises ComfyUI's interrupt
        raise D3SRNodeError(f"{node}: cancelled") from None
    except (WeightsFileError, InvalidImageError, ConversionError) as err:
        raise D3SRNodeError(f"{node}: {err}") from None
    except mm.OOM_EXCEPTION as err:
        raise D3SRNodeError(
            f"{node}: out of memory even with the smallest tiles ({err}). Lower tile_size / "
            "vae_tile_size, pick precision fp16/bf16, or run on the CPU."
        ) from err
    except (ValueError, RuntimeError, OSError) as err:
        raise D3SRNodeError(f"{node}: {type(err).__name__}: {err}") from err


def run_callbacks(total_hint: int = 100):
    """``(progress, cancel)`` for the engine: ComfyUI's progress bar and its interrupt flag."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(total_hint)

    def progress(done: int, total: int) -> None:
        bar.update_absolute(done, total)

    return progress, mm.processing_interrupted


def same_latent_family(model: D3SRModel, pipeline, vae, encode) -> bool:
    """Whether a connected ComfyUI VAE shares D3SR's latent space (cached per VAE object)."""
    from d3sr_core.inference.latent import latent_space_matches

    cache = model.loaded.latent_families
    try:
        return cache[vae]
    except (KeyError, TypeError):
        pass
    result = latent_space_matches(pipeline, encode)
    try:
        cache[vae] = result
    except TypeError:  # not weak-referenceable: just do not cache
        pass
    return result
