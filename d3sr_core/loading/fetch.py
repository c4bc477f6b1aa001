"""Getting weights onto disk: explicit downloads and the one-time OSEDiff conversion.

Nothing here runs unless a user asks for it (``d3sr ... --download``, ``d3sr convert``):
loading never touches the network. Downloads are written to a temporary name and renamed,
so an interrupted download never leaves a file that looks complete.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from torch import Tensor

from .base import DEFAULT_HUB_ID
from .checkpoint import is_d3sr_checkpoint, save_checkpoint
from .files import WeightsFileError, read_state_dict
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

__all__ = [
    "BASE_HUB_PATTERNS",
    "convert_osediff",
    "download_base",
    "download_file",
    "ensure_d3sr_weights",
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


def convert_osediff(
    pickle_path: str | Path,
    out: str | Path,
    *,
    base: str | Path | None = None,
    prompt_embeds: Tensor | None = None,
) -> Path:
    """Convert OSEDiff's ``osediff.pkl`` to a D3SR ``.safetensors`` checkpoint.

    The empty-prompt embedding comes from ``prompt_embeds`` or is computed from ``base``'s
    text encoder (an SD2.1 diffusers folder or single file).
    """
    if prompt_embeds is None:
        if base is None:
            raise WeightsFileError(
                pickle_path,
                "converting OSEDiff weights needs the SD2.1 base (for its text encoder) or a prompt embedding",
            )
        from .prompt import empty_prompt_embeds

        prompt_embeds = empty_prompt_embeds(base)
    ckpt = osediff_to_checkpoint(read_osediff(pickle_path), prompt_embeds, pickle_path)
    return save_checkpoint(ckpt, out)


def ensure_d3sr_weights(
    weights: str | Path, base: str | Path | None, cache_dir: str | Path | None = None
) -> tuple[Path, bool]:
    """The D3SR file to load for ``weights``: itself, or the (cached) conversion of an OSEDiff pickle.

    The conversion is written beside the pickle (``osediff.safetensors``), or into
    ``cache_dir`` when that folder is not writable, and reused while it is newer than the
    pickle. Returns ``(path, converted_now)``.
    """
    weights = Path(weights)
    if weights.suffix.lower() == ".safetensors":  # D3SR already (load_checkpoint checks)
        return weights, False
    targets = [converted_path(weights)]
    if cache_dir is not None:
        targets.append(Path(cache_dir) / "converted" / converted_path(weights).name)
    mtime = weights.stat().st_mtime if weights.exists() else 0.0
    for target in targets:
        if target.is_file() and target.stat().st_mtime >= mtime and is_d3sr_checkpoint(target):
            return target, False
    for target in targets:
        if _writable_folder(target.parent):
            return convert_osediff(weights, target, base=base), True
    raise WeightsFileError(
        weights, f"cannot write its D3SR conversion to any of {[str(t.parent) for t in targets]}"
    )


def _writable_folder(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)
