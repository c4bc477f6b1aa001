"""Finding D3SR weights and the SD2.1 base on disk, the way users of each host keep them.

Pure functions over paths (no model is loaded): the CLI, the ComfyUI node and the A1111
extension share them. Everything that depends on the machine -- environment variables, the
home folder, the working directory -- is a parameter, so tests run on temporary folders.

Search order (first hit wins, per file):

1. environment variables ``D3SR_WEIGHTS``, ``D3SR_BASE``, ``D3SR_VAE`` (a set variable that
   points nowhere is an error, not silently skipped);
2. D3SR's own model folders: ``$D3SR_MODELS_DIR``, ``~/.cache/d3sr``, ``./models``;
3. ComfyUI: ``models/d3sr``, ``models/upscale_models`` (weights), ``models/checkpoints``,
   ``models/diffusers`` (base), ``models/vae`` under ``$COMFYUI_PATH`` and common install places;
4. A1111 / Forge: ``models/D3SR`` (weights), ``models/Stable-diffusion`` (base),
   ``models/VAE`` under ``$A1111_PATH`` / ``$WEBUI_PATH`` and common install places;
5. for the base only: the Hugging Face hub cache (``models--stabilityai--stable-diffusion-2-1-base``).

Weights are any D3SR ``.safetensors`` (recognised by its header, whatever its name), else
OSEDiff's ``osediff*.pkl``. The base is a known SD2.1-base file name or a diffusers folder.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import is_d3sr_checkpoint
from .files import WeightsFileError

ENV_WEIGHTS = "D3SR_WEIGHTS"
ENV_BASE = "D3SR_BASE"
ENV_VAE = "D3SR_VAE"
ENV_MODELS_DIR = "D3SR_MODELS_DIR"
COMFYUI_ENV = ("COMFYUI_PATH",)
A1111_ENV = ("A1111_PATH", "WEBUI_PATH")

BASE_FOLDER_NAME = "stable-diffusion-2-1-base"
HUB_CACHE_FOLDER = "models--stabilityai--stable-diffusion-2-1-base"
OSEDIFF_URL = "https://github.com/cswry/OSEDiff/raw/main/preset/models/osediff.pkl"

# Lower-case name patterns, in order of preference. The 768-v model is deliberately absent:
# D3SR/OSEDiff weights belong to the 512 epsilon-prediction base.
BASE_FILE_PATTERNS = (
    "v2-1_512-ema-pruned.safetensors",
    "v2-1_512-ema-pruned.ckpt",
    "v2-1_512-nonema-pruned.safetensors",
    "v2-1_512-nonema-pruned.ckpt",
    "sd21-base*.safetensors",
    "sd2.1-base*.safetensors",
    "sd21_base*.safetensors",
    "sd_2-1_base*.safetensors",
    "stable-diffusion-2-1-base*.safetensors",
    "sd21-base*.ckpt",
    "stable-diffusion-2-1-base*.ckpt",
)
BASE_FOLDER_PATTERNS = (BASE_FOLDER_NAME, "stabilityai--stable-diffusion-2-1-base", "sd21-base*")
OSEDIFF_PATTERNS = ("osediff*.pkl",)
# Standalone VAEs with SD2.1's architecture (only used when the base file has no VAE).
VAE_FILE_PATTERNS = (
    "vae-ft-mse-840000-ema-pruned.safetensors",
    "vae-ft-mse-840000-ema-pruned.ckpt",
    "vae-ft-ema-560000-ema-pruned.safetensors",
    "vae-ft-ema-560000-ema-pruned.ckpt",
    "sd21*vae*.safetensors",
)

# Common install places relative to the home folder (and absolute ones), per host.
COMFYUI_PLACES = (
    "ComfyUI",
    "comfyui",
    "Documents/ComfyUI",
    "ComfyUI_windows_portable/ComfyUI",
    "/opt/ComfyUI",
    "/workspace/ComfyUI",
)
A1111_PLACES = (
    "stable-diffusion-webui",
    "stable-diffusion-webui-forge",
    "sd-webui-forge-classic",
    "stable-diffusion-webui-reForge",
    "/opt/stable-diffusion-webui",
    "/workspace/stable-diffusion-webui",
)

# Sub-folders of a models root that may hold each kind of file, per kind of root.
WEIGHTS_SUBDIRS = {
    "d3sr": ("", "d3sr", "D3SR", "upscale_models"),
    "comfyui": ("d3sr", "upscale_models"),
    "a1111": ("D3SR", "d3sr"),
}
BASE_SUBDIRS = {
    "d3sr": ("", "checkpoints", "Stable-diffusion", "diffusers"),
    "comfyui": ("checkpoints", "diffusers"),
    "a1111": ("Stable-diffusion",),
}
VAE_SUBDIRS = {"d3sr": ("", "vae", "VAE"), "comfyui": ("vae",), "a1111": ("VAE",)}


@dataclass(frozen=True)
class ModelRoot:
    """A ``models`` folder to search: ``kind`` is ``d3sr``, ``comfyui`` or ``a1111``."""

    kind: str
    path: Path
    origin: str  # what put it on the list, e.g. "$COMFYUI_PATH" or "~/ComfyUI"


@dataclass
class Located:
    """What :func:`locate_models` found. ``None`` where nothing was found.

    ``searched_weights`` / ``searched_base`` are the folders looked in, in order, for the
    "put the file here" message; ``*_candidates`` list every match, best first.
    """

    weights: Path | None = None
    base: Path | None = None
    vae: Path | None = None
    weights_candidates: list[Path] = field(default_factory=list)
    base_candidates: list[Path] = field(default_factory=list)
    searched_weights: list[Path] = field(default_factory=list)
    searched_base: list[Path] = field(default_factory=list)
    searched_vae: list[Path] = field(default_factory=list)
    download_dir: Path | None = None


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _home(home: Path | None) -> Path:
    return Path.home() if home is None else Path(home)


def _cwd(cwd: Path | None) -> Path:
    return Path.cwd() if cwd is None else Path(cwd)


def default_models_dir(env: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
    """Where downloads and conversions go: ``$D3SR_MODELS_DIR``, else ``~/.cache/d3sr``."""
    env = _env(env)
    if env.get(ENV_MODELS_DIR):
        return Path(env[ENV_MODELS_DIR]).expanduser()
    return _home(home) / ".cache" / "d3sr"


def model_roots(
    env: Mapping[str, str] | None = None, home: Path | None = None, cwd: Path | None = None
) -> list[ModelRoot]:
    """Every ``models`` folder to search, in order (existing or not; duplicates removed)."""
    env, home, cwd = _env(env), _home(home), _cwd(cwd)
    roots: list[ModelRoot] = []
    if env.get(ENV_MODELS_DIR):
        roots.append(
            ModelRoot("d3sr", Path(env[ENV_MODELS_DIR]).expanduser(), f"${ENV_MODELS_DIR}")
        )
    roots.append(ModelRoot("d3sr", home / ".cache" / "d3sr", "~/.cache/d3sr"))
    roots.append(ModelRoot("d3sr", cwd / "models", "./models"))
    for kind, names, places in (
        ("comfyui", COMFYUI_ENV, COMFYUI_PLACES),
        ("a1111", A1111_ENV, A1111_PLACES),
    ):
        for name in names:
            if env.get(name):
                roots.append(ModelRoot(kind, Path(env[name]).expanduser() / "models", f"${name}"))
        for place in places:
            base = Path(place) if place.startswith("/") else home / place
            origin = place if place.startswith("/") else f"~/{place}"
            roots.append(ModelRoot(kind, base / "models", origin))
    seen: set[Path] = set()
    unique = []
    for root in roots:
        if root.path not in seen:
            seen.add(root.path)
            unique.append(root)
    return unique


def _folders(roots: list[ModelRoot], subdirs: Mapping[str, tuple[str, ...]]) -> list[Path]:
    out: list[Path] = []
    for root in roots:
        for sub in subdirs[root.kind]:
            folder = root.path / sub if sub else root.path
            if folder not in out:
                out.append(folder)
    return out


def weights_folders(roots: list[ModelRoot]) -> list[Path]:
    return _folders(roots, WEIGHTS_SUBDIRS)


def base_folders(roots: list[ModelRoot]) -> list[Path]:
    return _folders(roots, BASE_SUBDIRS)


def vae_folders(roots: list[ModelRoot]) -> list[Path]:
    return _folders(roots, VAE_SUBDIRS)


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir(), key=lambda p: p.name.lower())
    except OSError:  # missing, not a folder, no permission
        return []


def _match(entries: list[Path], patterns: tuple[str, ...], want_dir: bool) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        for entry in entries:
            if entry not in found and fnmatch.fnmatch(entry.name.lower(), pattern.lower()):
                if entry.is_dir() if want_dir else entry.is_file():
                    found.append(entry)
    return found


def is_diffusers_base_folder(path: Path) -> bool:
    return (path / "unet" / "config.json").is_file() and (path / "vae" / "config.json").is_file()


def find_weights_in(folder: Path) -> list[Path]:
    """D3SR ``.safetensors`` checkpoints (by header) in ``folder``, then OSEDiff pickles."""
    entries = _entries(folder)
    d3sr = [
        p
        for p in entries
        if p.suffix.lower() == ".safetensors"
        and p.is_file()
        and is_d3sr_checkpoint(p)
        and not _cached_conversion(p)
    ]
    return d3sr + _match(entries, OSEDIFF_PATTERNS, want_dir=False)


def _cached_conversion(path: Path) -> bool:
    """An OSEDiff conversion cached beside its pickle: the pickle is found instead, so the
    cache is checked against the pickle and the base (:func:`.fetch.find_conversion`)."""
    from .files import read_safetensors_metadata

    if not path.with_suffix(".pkl").is_file():
        return False
    try:
        return read_safetensors_metadata(path).get("converted_from") == "osediff"
    except WeightsFileError:
        return False


def find_base_in(folder: Path) -> list[Path]:
    """Known SD2.1-base single files, then SD2.1-base diffusers folders, in ``folder``."""
    entries = _entries(folder)
    files = _match(entries, BASE_FILE_PATTERNS, want_dir=False)
    dirs = [
        d
        for d in _match(entries, BASE_FOLDER_PATTERNS, want_dir=True)
        if is_diffusers_base_folder(d)
    ]
    return files + dirs


def find_vae_in(folder: Path) -> list[Path]:
    return _match(_entries(folder), VAE_FILE_PATTERNS, want_dir=False)


def hub_cache_bases(env: Mapping[str, str] | None = None, home: Path | None = None) -> list[Path]:
    """SD2.1-base snapshots already in the Hugging Face hub cache (newest first)."""
    env, home = _env(env), _home(home)
    if env.get("HF_HUB_CACHE"):
        cache = Path(env["HF_HUB_CACHE"])
    elif env.get("HF_HOME"):
        cache = Path(env["HF_HOME"]) / "hub"
    else:
        cache = home / ".cache" / "huggingface" / "hub"
    snapshots = [
        p for p in _entries(cache / HUB_CACHE_FOLDER / "snapshots") if is_diffusers_base_folder(p)
    ]
    return sorted(snapshots, key=lambda p: p.stat().st_mtime, reverse=True)


def _from_env(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(name)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        raise WeightsFileError(path, f"set by ${name}, but no such file or folder")
    return path


def locate_models(
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
    cwd: Path | None = None,
    *,
    need_vae: bool = False,
) -> Located:
    """Search the usual places for D3SR weights, the SD2.1 base and (``need_vae``) a VAE.

    Raises:
        WeightsFileError: when ``$D3SR_WEIGHTS`` / ``$D3SR_BASE`` / ``$D3SR_VAE`` name a
            path that does not exist.
    """
    env = _env(env)
    roots = model_roots(env, home, cwd)
    found = Located(
        searched_weights=weights_folders(roots),
        searched_base=base_folders(roots),
        searched_vae=vae_folders(roots),
        download_dir=default_models_dir(env, home),
    )
    found.weights = _from_env(env, ENV_WEIGHTS)
    found.base = _from_env(env, ENV_BASE)
    found.vae = _from_env(env, ENV_VAE)
    if found.weights is None:
        for folder in found.searched_weights:
            found.weights_candidates += [
                p for p in find_weights_in(folder) if p not in found.weights_candidates
            ]
        found.weights = found.weights_candidates[0] if found.weights_candidates else None
    if found.base is None:
        for folder in found.searched_base:
            found.base_candidates += [
                p for p in find_base_in(folder) if p not in found.base_candidates
            ]
        found.base_candidates += hub_cache_bases(env, home)
        found.base = found.base_candidates[0] if found.base_candidates else None
    if found.vae is None and need_vae:
        for folder in found.searched_vae:
            hits = find_vae_in(folder)
            if hits:
                found.vae = hits[0]
                break
    return found


def converted_path(osediff_pickle: Path) -> Path:
    """Where the D3SR conversion of an OSEDiff pickle is cached: beside it, ``.safetensors``."""
    return osediff_pickle.with_suffix(".safetensors")


def missing_message(
    found: Located, *, command: str = "d3sr upscale ...", download_hint: bool = True
) -> str:
    """What to put where (and the ``--download`` alternative) when weights or base are missing."""
    lines = []

    def places(folders: list[Path], host_hint: str, limit: int = 6) -> list[str]:
        # D3SR's own folder first, then host folders that exist here, then the rest in words
        own = [found.download_dir] if found.download_dir else []
        existing = [p for p in folders if p.is_dir() and p not in own][:limit]
        return [
            "  into one of these folders:",
            *(f"      {p}" for p in own + existing),
            f"  (also searched: ./models, and {host_hint}",
            "   under $COMFYUI_PATH, $A1111_PATH, $WEBUI_PATH and the usual install folders)",
        ]

    if found.weights is None:
        lines += [
            "D3SR weights not found. Put ONE of these files:",
            "  - a D3SR checkpoint (*.safetensors, any name; `d3sr info FILE` tells what a file is), or",
            f"  - OSEDiff's published osediff.pkl ({OSEDIFF_URL})",
            *places(
                found.searched_weights,
                "ComfyUI's models/d3sr, models/upscale_models or A1111's models/D3SR",
            ),
            f"  or pass --weights FILE, or set ${ENV_WEIGHTS}=FILE.",
        ]
    if found.base is None:
        lines += [
            "Stable Diffusion 2.1-base not found. Put ONE of:",
            "  - the single file v2-1_512-ema-pruned.safetensors (or .ckpt; the file ComfyUI and",
            "    A1111 use; v2-1_512-nonema-pruned also works), or",
            f"  - a diffusers folder named {BASE_FOLDER_NAME}/ (with unet/, vae/, text_encoder/)",
            *places(
                found.searched_base,
                "ComfyUI's models/checkpoints or A1111's models/Stable-diffusion",
            ),
            f"  or pass --base PATH, or set ${ENV_BASE}=PATH.",
        ]
    if lines and download_hint:
        lines += [
            "Or let d3sr fetch what is missing (SD2.1-base from the Hugging Face hub, about 4.5 GB;",
            f"osediff.pkl from GitHub, about 18 MB) into {found.download_dir}:",
            f"  {command} --download",
        ]
    return "\n".join(lines)
