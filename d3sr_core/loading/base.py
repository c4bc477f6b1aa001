"""Loading the frozen base model (SD2.1 UNet + VAE + schedule) from a folder, a single file or the hub."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models.configs import bundled_config
from .files import WeightsFileError

DEFAULT_HUB_ID = "stabilityai/stable-diffusion-2-1-base"


@dataclass
class BaseModel:
    """A loaded base model. ``scheduler_config`` gives the betas and the prediction type."""

    unet: nn.Module
    vae: nn.Module
    scheduler_config: dict
    source: str

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")


def check_sd21_unet_config(config: dict, source: str | Path) -> None:
    """Reject UNets of other families (SD1.x, SDXL, inpainting/upscaler variants) by their config."""
    if (
        config.get("addition_embed_type") == "text_time"
        or config.get("cross_attention_dim") == 2048
    ):
        raise WeightsFileError(
            source, "this is an SDXL UNet; D3SR's generator needs Stable Diffusion 2.1(-base)"
        )
    if config.get("cross_attention_dim") == 768:
        raise WeightsFileError(
            source,
            "this is an SD 1.x UNet (text context 768); D3SR needs Stable Diffusion 2.1(-base) (context 1024)",
        )
    if config.get("in_channels", 4) != 4 or config.get("out_channels", 4) != 4:
        raise WeightsFileError(
            source,
            f"UNet has in/out channels {config.get('in_channels')}/{config.get('out_channels')}; "
            "D3SR needs the plain 4-channel SD2.1 text-to-image UNet (not an inpainting or upscaler model)",
        )


def is_diffusers_folder(path: Path) -> bool:
    return (path / "unet" / "config.json").is_file()


def load_diffusers_folder(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> BaseModel:
    """UNet, VAE and scheduler config from a diffusers model folder (``unet/``, ``vae/``, ``scheduler/``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(path)
    for sub in ("unet", "vae"):
        if not (path / sub / "config.json").is_file():
            raise WeightsFileError(
                path, f"not a diffusers model folder: {sub}/config.json is missing"
            )
    check_sd21_unet_config(_folder_json(path, "unet/config.json"), path / "unet")
    _folder_json(path, "vae/config.json")
    _check_folder_weights(path)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, AttributeError) as err:
        detail = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise WeightsFileError(path, f"could not load the diffusers UNet/VAE ({detail})") from None
    sched_file = path / "scheduler" / "scheduler_config.json"
    scheduler_config = (
        _folder_json(path, "scheduler/scheduler_config.json")
        if sched_file.is_file()
        else bundled_config("sd21-base", "scheduler")
    )
    return BaseModel(unet.to(device).eval(), vae.to(device).eval(), scheduler_config, str(path))


def _folder_json(folder: Path, name: str) -> dict:
    """A JSON object from a file in a model folder; errors name the folder and the file."""
    try:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsFileError(folder, f"{name} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise WeightsFileError(
            folder, f"{name} is a JSON {type(data).__name__}, expected an object"
        )
    return data


def _check_folder_weights(folder: Path) -> None:
    """Check the UNet/VAE ``.safetensors`` headers of a diffusers folder before diffusers reads
    them, so a damaged file is reported in words (naming the folder, then the file)."""
    from .files import read_safetensors_header

    for sub in ("unet", "vae"):
        for weights in sorted((folder / sub).glob("*.safetensors")):
            try:
                read_safetensors_header(weights)
            except WeightsFileError as err:
                raise WeightsFileError(folder, f"{sub}/{weights.name}: {err.problem}") from None


def load_base(
    source: str | Path,
    *,
    vae: str | Path | None = None,
    prediction_type: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_download: bool = False,
) -> BaseModel:
    """Load SD2.1(-base) from a diffusers folder, an LDM single file (.safetensors/.ckpt) or a hub id.

    Args:
        source: folder, single file, or hub id (e.g. ``stabilityai/stable-diffusion-2-1-base``).
        vae: optional separate VAE (single file or diffusers ``vae`` folder) replacing the base's.
        prediction_type: override (``epsilon`` / ``v_prediction``); single files carry none and
            default to the bundled SD2.1-base scheduler's ``epsilon``.
        allow_download: a hub id is fetched only when this is True.
    """
    path = Path(source)
    if path.is_dir():
        base = load_diffusers_folder(path, device, dtype)
    elif path.is_file():
        from .single_file import load_single_file

        # a separate VAE *file* is read instead of the checkpoint's own (never loaded twice)
        vae_file = Path(vae) if vae is not None and Path(vae).is_file() else None
        unet, vae_model = load_single_file(
            path, device=device, dtype=dtype, vae_path=vae_file, require_vae=vae is None
        )
        base = BaseModel(unet, vae_model, bundled_config("sd21-base", "scheduler"), str(path))
        if vae_file is not None:
            vae = None
    elif _looks_like_hub_id(str(source)):
        if not allow_download:
            raise WeightsFileError(
                source,
                "no such file or folder (it looks like a hub id: allow downloads to fetch it)",
            )
        from huggingface_hub import snapshot_download

        from .fetch import BASE_HUB_PATTERNS  # only the files D3SR reads, not every variant

        folder = snapshot_download(str(source), allow_patterns=BASE_HUB_PATTERNS)
        base = load_diffusers_folder(folder, device, dtype)
    else:
        raise WeightsFileError(
            source,
            "no such file or folder (expected an SD2.1 diffusers folder or .safetensors/.ckpt file)",
        )
    if vae is not None:
        base.vae = load_vae(vae, device=device, dtype=dtype)
    if prediction_type is not None:
        base.scheduler_config = {**base.scheduler_config, "prediction_type": prediction_type}
    return base


def load_vae(
    source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A standalone SD VAE: a diffusers folder (``config.json``, or a model folder with ``vae/``) or a single file."""
    from diffusers import AutoencoderKL

    path = Path(source)
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() else None
        try:
            return (
                AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=dtype)
                .to(device)
                .eval()
            )
        except (OSError, ValueError, RuntimeError) as err:
            raise WeightsFileError(path, f"could not load a diffusers VAE ({err})") from None
    from .single_file import load_single_file_vae

    return load_single_file_vae(path, device=device, dtype=dtype)


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return (
        len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and "\\" not in text
    )
