"""Getting weights onto disk: explicit downloads and the one-time OSEDiff conversion.

Nothing here runs unless a user asks for it (``d3sr ... --download``, ``d3sr convert``):
loading never touches the network. Downloads are written to a temporary name and renamed,
so an interrupted download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

from torch import Tensor

from ..models.generator import D3SRGenerator
from .base import DEFAULT_HUB_ID
from .checkpoint import D3SRCheckpoint, load_checkpoint, save_checkpoint
from .files import WeightsFileError, read_safetensors_metadata, read_state_dict
from .locate import BASE_FOLDER_NAME, converted_path
from .osediff import osediff_to_checkpoint, read_osediff

# Only what D3SR reads: fp32 UNet + VAE, the (fp16) text encoder for the prompt embedding
# (read once, for OSEDiff import), configs. Not the .bin / duplicate variants (~8 GB more).
BASE_HUB_PATTERNS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
]

# Header entries of a converted OSEDiff file: what it was made from.
CONVERTED_FROM = "converted_from"
SOURCE_SHA256 = "source_sha256"
PROMPT_SOURCE = "prompt_embeds_from"

__all__ = [
    "BASE_HUB_PATTERNS",
    "convert_osediff",
    "download_base",
    "download_file",
    "find_conversion",
    "load_converting",
    "read_prompt_embeds",
]


def download_file(
    url: str, dest: str | Path, *, progress: bool = True, timeout: float = 60.0
) -> Path:
    """Fetch ``url`` (http(s) or ``file://``) to ``dest`` with a progress bar, atomically.

    Raises:
        OSError: network or file errors (the message names the URL); no partial file is left.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.download")
    request = urllib.request.Request(url, headers={"User-Agent": "d3sr"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, tmp.open("wb") as out:
            total = response.headers.get("Content-Length")
            with tqdm(
                total=int(total) if total else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=not progress,
            ) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        if total and tmp.stat().st_size != int(total):
            raise OSError(f"download incomplete: {tmp.stat().st_size} of {total} bytes")
        os.replace(tmp, dest)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(f"could not download {url}: {err}") from None
        raise
    return dest


def download_base(dest_dir: str | Path, repo_id: str = DEFAULT_HUB_ID) -> Path:
    """Download the SD2.1-base diffusers folder (only the files D3SR reads) into ``dest_dir``.

    Returns the folder ``dest_dir/stable-diffusion-2-1-base`` (a name :mod:`.locate` finds;
    another ``repo_id`` goes to ``dest_dir/<owner>--<name>``).
    """
    from huggingface_hub import snapshot_download

    name = BASE_FOLDER_NAME if repo_id == DEFAULT_HUB_ID else repo_id.replace("/", "--")
    folder = Path(dest_dir) / name
    snapshot_download(repo_id, allow_patterns=BASE_HUB_PATTERNS, local_dir=str(folder))
    return folder


def read_prompt_embeds(path: str | Path) -> Tensor:
    """A prompt embedding ``[1, 77, C]`` from a file holding a ``prompt_embeds`` tensor (or one tensor).

    D3SR checkpoints qualify too, so one converted file can supply the embedding of the next.
    """
    state = read_state_dict(path)
    if isinstance(state, Tensor):
        tensor = state
    elif isinstance(state, dict) and isinstance(state.get("prompt_embeds"), Tensor):
        tensor = state["prompt_embeds"]
    elif (
        isinstance(state, dict)
        and len(state) == 1
        and isinstance(next(iter(state.values())), Tensor)
    ):
        tensor = next(iter(state.values()))
    else:
        keys = list(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise WeightsFileError(path, f"no 'prompt_embeds' tensor (found {keys})")
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3 or tensor.shape[0] != 1:
        raise WeightsFileError(
            path, f"'prompt_embeds' has shape {tuple(tensor.shape)}, expected [1, 77, C]"
        )
    return tensor.float()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (osediff.pkl is ~18 MB: well under a second)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def text_encoder_id(base: str | Path) -> str:
    """Identity of the text encoder a base provides: resolved path, size and modification
    time of its files (a diffusers folder's ``text_encoder/``, or the single file), hashed.

    Cheap (no weights read), and it changes whenever another base, or a changed file, is
    used - which is when a cached conversion's prompt embedding may no longer be right.
    """
    src = Path(base).expanduser()
    if src.is_dir():
        folder = src / "text_encoder" if (src / "text_encoder").is_dir() else src
        files = sorted(p for p in folder.iterdir() if p.is_file())
    else:
        files = [src]
    parts = []
    for f in files:
        st = f.stat()
        parts.append(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return "base:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _embeds_id(prompt_embeds: Tensor) -> str:
    data = prompt_embeds.detach().float().cpu().contiguous().numpy().tobytes()
    return "prompt_embeds:" + hashlib.sha256(data).hexdigest()[:32]


def conversion_metadata(pickle_path: str | Path, source: str) -> dict[str, str]:
    """Header entries recording what a conversion was made from (see :func:`find_conversion`)."""
    return {
        CONVERTED_FROM: "osediff",
        SOURCE_SHA256: file_sha256(pickle_path),
        PROMPT_SOURCE: source,
    }


def convert_osediff(
    pickle_path: str | Path,
    out: str | Path,
    *,
    base: str | Path | None = None,
    prompt_embeds: Tensor | None = None,
) -> Path:
    """Convert OSEDiff's ``osediff.pkl`` to a D3SR ``.safetensors`` checkpoint.

    The empty-prompt embedding comes from ``prompt_embeds`` or is computed from ``base``'s
    text encoder (an SD2.1 diffusers folder or single file). The pickle is fully checked
    (:func:`.osediff.osediff_to_checkpoint`) and, with ``base``, merged into it once, before
    anything is written; the header records the pickle's hash and where the embedding
    came from.
    """
    if prompt_embeds is None:
        if base is None:
            raise WeightsFileError(
                pickle_path,
                "converting OSEDiff weights needs the SD2.1 base (for its text encoder) or a prompt embedding",
            )
        from .prompt import empty_prompt_embeds

        source = text_encoder_id(base)
        prompt_embeds = empty_prompt_embeds(base)
    else:
        source = _embeds_id(prompt_embeds)
    ckpt = osediff_to_checkpoint(read_osediff(pickle_path), prompt_embeds, pickle_path)
    if base is not None:  # merge once into the base: every module and shape must fit
        from .generator import generator_from_checkpoint

        generator_from_checkpoint(ckpt, base, weights_name=str(pickle_path))
    return save_checkpoint(ckpt, out, conversion_metadata(pickle_path, source))


def conversion_targets(pickle_path: str | Path, cache_dir: str | Path | None) -> list[Path]:
    """Where the conversion of ``pickle_path`` is cached: beside it, else in ``cache_dir``."""
    beside = converted_path(Path(pickle_path))
    targets = [beside]
    if cache_dir is not None:
        targets.append(Path(cache_dir) / "converted" / beside.name)
    return targets


def find_conversion(
    pickle_path: str | Path, base: str | Path, cache_dir: str | Path | None = None
) -> Path | None:
    """A cached conversion made from this very pickle (same SHA-256) with this base's text
    encoder (:func:`text_encoder_id`), or ``None`` (then it must be rebuilt)."""
    wanted = {
        CONVERTED_FROM: "osediff",
        SOURCE_SHA256: None,  # hashed only when a candidate exists
        PROMPT_SOURCE: text_encoder_id(base),
    }
    for target in conversion_targets(pickle_path, cache_dir):
        if not target.is_file():
            continue
        try:
            meta = read_safetensors_metadata(target)
        except WeightsFileError:
            continue  # damaged cache: rebuilt
        if meta.get("format") != "d3sr" or meta.get(CONVERTED_FROM) != "osediff":
            continue
        if meta.get(PROMPT_SOURCE) != wanted[PROMPT_SOURCE]:
            continue
        if wanted[SOURCE_SHA256] is None:
            wanted[SOURCE_SHA256] = file_sha256(pickle_path)
        if meta.get(SOURCE_SHA256) == wanted[SOURCE_SHA256]:
            return target
    return None


def save_conversion(
    ckpt: D3SRCheckpoint,
    pickle_path: str | Path,
    base: str | Path,
    cache_dir: str | Path | None = None,
) -> Path:
    """Write a validated conversion where :func:`find_conversion` looks (first writable place).

    Raises:
        WeightsFileError: no writable place (naming the pickle).
    """
    meta = conversion_metadata(pickle_path, text_encoder_id(base))
    for target in conversion_targets(pickle_path, cache_dir):
        if _writable_folder(target.parent):
            try:
                return save_checkpoint(ckpt, target, meta)
            except OSError:
                continue
    places = [str(t.parent) for t in conversion_targets(pickle_path, cache_dir)]
    raise WeightsFileError(pickle_path, f"cannot write its D3SR conversion to any of {places}")


def load_converting(
    weights: str | Path,
    base: str | Path,
    *,
    vae: str | Path | None = None,
    strength: float = 1.0,
    cache_dir: str | Path | None = None,
    allow_download: bool = False,
    prompt_embeds: Tensor | str | Path | None = None,
) -> tuple[D3SRGenerator, Path | None]:
    """:func:`.generator.load_generator` (fp32, CPU) that converts an OSEDiff pickle once.

    A D3SR file loads as it is. For an OSEDiff pickle, a cached conversion of the same
    pickle with the same base text encoder is used; otherwise the pickle is converted in
    memory, merged into the base (which checks every tensor against the model), and only
    then written to the cache. Errors name ``weights``, the file the user gave. With an
    external ``prompt_embeds`` (see :func:`.generator.read_weights`) an OSEDiff pickle is
    used directly: the result depends on that embedding, so nothing is cached.

    Returns:
        ``(generator, path of a conversion written now or None)``.
    """
    from .generator import generator_from_checkpoint, read_weights

    weights = Path(weights)
    cached = None
    if weights.suffix.lower() == ".safetensors" or prompt_embeds is not None:
        ckpt = read_weights(weights, base, prompt_embeds)
    elif (cached := find_conversion(weights, base, cache_dir)) is not None:
        ckpt = load_checkpoint(cached)
    else:
        ckpt = read_weights(weights, base)
    generator = generator_from_checkpoint(
        ckpt,
        base,
        vae=vae,
        strength=strength,
        weights_name=str(weights),
        allow_download=allow_download,
    ).eval()
    if weights.suffix.lower() == ".safetensors" or cached is not None or prompt_embeds is not None:
        return generator, None
    return generator, save_conversion(ckpt, weights, base, cache_dir)


def _writable_folder(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)
