"""What is this weights file? A spandrel-like descriptor for D3SR's inputs.

:func:`describe_weights` reads only what it needs -- a ``.safetensors`` header, a pickle's
structure with tensors on the ``meta`` device (no tensor data, never executing code), a
diffusers folder's configs -- and says whether the file is D3SR weights, OSEDiff weights, a
Stable Diffusion base (and which family), a VAE, or something else (listing its keys).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from math import prod
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import FORMAT_NAME
from .files import SAFETENSORS_SUFFIXES, WeightsFileError, read_state_dict
from .osediff import OSEDIFF_KEYS, is_osediff_state

KINDS = ("d3sr", "osediff", "sd-checkpoint", "vae", "diffusers", "unknown")
FAMILY_NAMES = {
    "sd1": "Stable Diffusion 1.x",
    "sd21": "Stable Diffusion 2.x",
    "sdxl": "Stable Diffusion XL",
    "unknown": "unknown family",
}
_CONTEXT_TO_FAMILY = {768: "sd1", 1024: "sd21", 2048: "sdxl"}


@dataclass
class WeightsInfo:
    """Description of a weights file or folder.

    Attributes:
        kind: ``d3sr``, ``osediff``, ``sd-checkpoint`` (LDM single file), ``vae``,
            ``diffusers`` (model folder) or ``unknown``.
        architecture: human-readable name of what it holds.
        container: ``safetensors``, ``pickle`` or ``folder``.
        family: ``sd1`` / ``sd21`` / ``sdxl`` / ``unknown`` for base models, else ``None``.
        usable_as: ``weights`` (``--weights``), ``base`` (``--base``), ``vae`` (``--vae``)
            or ``None`` when D3SR cannot use it.
        details: kind-specific facts (config, ranks, parts, top-level keys...).
        notes: hints and warnings for the user.
    """

    path: str
    kind: str
    architecture: str
    container: str
    family: str | None = None
    usable_as: str | None = None
    size_bytes: int = 0
    num_tensors: int = 0
    num_parameters: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """Multi-line human-readable summary (what ``d3sr info`` prints)."""
        lines = [
            f"{self.path}",
            f"  kind:        {self.kind} ({self.architecture})",
            f"  container:   {self.container}, {_human_bytes(self.size_bytes)}",
        ]
        if self.family is not None:
            lines.append(
                f"  family:      {self.family} ({FAMILY_NAMES.get(self.family, self.family)})"
            )
        lines.append(
            f"  tensors:     {self.num_tensors}, {self.num_parameters:,} parameters"
            + (
                f" ({', '.join(f'{k} x{v}' for k, v in sorted(self.dtypes.items()))})"
                if self.dtypes
                else ""
            )
        )
        usable = {
            "weights": "D3SR weights (--weights)",
            "base": "base model (--base)",
            "vae": "VAE (--vae)",
        }
        lines.append(f"  use as:      {usable.get(self.usable_as, 'not usable by D3SR')}")
        for key, value in self.details.items():
            if isinstance(value, dict):
                lines.append(f"  {key}:")
                lines += [f"    {k}: {_short(v)}" for k, v in value.items()]
            else:
                lines.append(f"  {key}: {_short(value)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _short(value, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------- reading


@dataclass
class _Header:
    """Tensor shapes (as ``meta`` tensors) and metadata, without tensor data."""

    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    top: object  # the file's top-level object (pickles); the tensor dict for safetensors


def _read_header(path: Path) -> _Header:
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        from .files import read_safetensors_metadata

        metadata = read_safetensors_metadata(path)  # clear error for a bad header
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                tensors = {}
                for key in f.keys():
                    piece = f.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype(), torch.uint8)
                    tensors[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
        except Exception as err:  # safetensors raises its own error types
            raise WeightsFileError(
                path, f"damaged or truncated .safetensors file ({err})"
            ) from None
        return _Header(tensors, metadata, tensors)
    top = read_state_dict(path, device="meta")
    return _Header(_flatten(top), {}, top)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _flatten(obj, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor in nested dicts, named by its dotted path."""
    out: dict[str, Tensor] = {}
    if isinstance(obj, Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _counts(tensors: Mapping[str, Tensor]) -> tuple[int, int, dict[str, int]]:
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in tensors.values())
    return len(tensors), sum(prod(t.shape) for t in tensors.values()), dict(dtypes)


# --------------------------------------------------------------------------- files


def describe_weights(path: str | Path) -> WeightsInfo:
    """Describe a D3SR/OSEDiff weights file, an SD checkpoint, a VAE or a diffusers folder.

    Raises:
        WeightsFileError: missing, empty, damaged or unsafe (code-executing pickle) files.
    """
    path = Path(path)
    if path.is_dir():
        return _describe_folder(path)
    if not path.exists():
        raise WeightsFileError(path, "no such file or folder")
    header = _read_header(path)
    container = "safetensors" if path.suffix.lower() in SAFETENSORS_SUFFIXES else "pickle"
    n, params, dtypes = _counts(header.tensors)
    info = WeightsInfo(
        str(path),
        "unknown",
        "unknown",
        container,
        size_bytes=path.stat().st_size,
        num_tensors=n,
        num_parameters=params,
        dtypes=dtypes,
    )
    if header.metadata.get("format") == FORMAT_NAME:
        _describe_d3sr(info, header)
    elif is_osediff_state(header.top):
        _describe_osediff(info, header.top)
    else:
        _describe_state_dict(info, header)
    return info


def _lora_modules(keys, prefix: str) -> int:
    return len({k[: k.index(".lora_A")] for k in keys if k.startswith(prefix) and ".lora_A" in k})


def _describe_d3sr(info: WeightsInfo, header: _Header) -> None:
    meta, tensors = header.metadata, header.tensors
    info.kind, info.architecture, info.usable_as = "d3sr", "D3SR one-step SR weights", "weights"
    try:
        config = json.loads(meta.get("config", "{}"))
        adapters = json.loads(meta.get("adapters", "{}"))
    except ValueError as err:
        config, adapters = {}, {}
        info.notes.append(f"header metadata is not valid JSON ({err}); the file will not load")
    info.details["format_version"] = meta.get("format_version", "?")
    info.details["config"] = config
    keys = list(tensors)
    for model in ("unet", "vae"):
        modules = _lora_modules(keys, model + ".")
        if modules or model in adapters:
            info.details[f"{model}_lora"] = {
                "modules": modules,
                "scale": adapters.get(model, {}).get("scale"),
                "replaced_tensors": sum(k.startswith(f"replace.{model}.") for k in keys),
            }
    embeds = tensors.get("prompt_embeds")
    if embeds is None:
        info.notes.append("no 'prompt_embeds' tensor: the file will not load")
    else:
        info.details["prompt_embeds"] = list(embeds.shape)
    base = config.get("base")
    if base and base != "sd21-base":
        info.notes.append(f"made for base {base!r}")


def _describe_osediff(info: WeightsInfo, state: Mapping) -> None:
    info.kind, info.architecture, info.usable_as = (
        "osediff",
        "OSEDiff weights (osediff.pkl)",
        "weights",
    )
    unet = _flatten(state.get("state_dict_unet", {}))
    vae = _flatten(state.get("state_dict_vae", {}))
    info.details.update(
        rank_unet=state.get("rank_unet"),
        rank_vae=state.get("rank_vae"),
        unet_tensors=len(unet),
        unet_lora_modules=_lora_modules(unet, ""),
        unet_conv_in_trained=any(k.startswith("conv_in.") and ".lora_" not in k for k in unet),
        vae_tensors=len(vae),
        vae_lora_modules=_lora_modules(vae, ""),
    )
    missing = [k for k in OSEDIFF_KEYS if k not in state]
    if missing:
        info.notes.append(f"missing top-level keys {missing}: the file will not load")
    info.notes.append(
        "convert it once with `d3sr convert` (needs the SD2.1 base's text encoder, or "
        "--prompt-embeds); `d3sr upscale` does this automatically and caches the result"
    )


def _describe_state_dict(info: WeightsInfo, header: _Header) -> None:
    from .single_file import detect_family, detect_parts, unwrap_state_dict

    sd = unwrap_state_dict(header.top if isinstance(header.top, Mapping) else {}, info.path)
    if not sd:
        sd = header.tensors
    parts = detect_parts(sd)
    if "unet" in parts:
        info.kind, info.family = "sd-checkpoint", detect_family(sd)
        info.architecture = f"{FAMILY_NAMES[info.family]} checkpoint (single file)"
        info.details["parts"] = sorted(parts)
        if info.family == "sd21":
            info.usable_as = "base"
            if "vae" not in parts:
                info.notes.append("no VAE inside: pass one with --vae")
            info.notes.append(
                "D3SR needs SD2.1-*base* (512, epsilon); a 768-v checkpoint loads but does not fit D3SR weights"
            )
        else:
            info.notes.append(
                "D3SR needs Stable Diffusion 2.1-base; this is not an SD2.x checkpoint"
            )
        return
    if "vae" in parts:
        info.kind, info.architecture, info.usable_as = (
            "vae",
            "Stable Diffusion VAE (LDM layout)",
            "vae",
        )
        return
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        info.kind, info.architecture, info.usable_as = "vae", "VAE (diffusers layout)", "vae"
        return
    top = header.top if isinstance(header.top, Mapping) else header.tensors
    info.details["top_level_keys"] = [str(k) for k in list(top)[:12]]
    info.details["num_top_level_keys"] = len(top)
    if any("lora" in k.lower() for k in sd):
        info.architecture = "a LoRA of another model"
        info.notes.append("this looks like a LoRA for another model, not D3SR weights")
    else:
        info.notes.append(
            "not D3SR weights, OSEDiff weights, a Stable Diffusion checkpoint or a VAE"
        )


# --------------------------------------------------------------------------- folders


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsFileError(path, f"unreadable JSON ({err})") from None


def _folder_tensors(folder: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        if ".fp16." in file.name and (folder / file.name.replace(".fp16.", ".")).is_file():
            continue  # count one variant only
        out.update({f"{file.name}:{k}": v for k, v in _read_header(file).tensors.items()})
    return out


def unet_config_family(config: Mapping) -> str:
    """``sd1`` / ``sd21`` / ``sdxl`` / ``unknown`` from a diffusers UNet ``config.json``."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    context = config.get("cross_attention_dim")
    if isinstance(context, list):
        context = context[0] if context else None
    return _CONTEXT_TO_FAMILY.get(context, "unknown")


def _describe_folder(path: Path) -> WeightsInfo:
    info = WeightsInfo(str(path), "unknown", "unknown", "folder")
    files = [p for p in path.rglob("*") if p.is_file()]
    info.size_bytes = sum(p.stat().st_size for p in files)
    if (path / "unet" / "config.json").is_file() or (path / "model_index.json").is_file():
        info.kind, info.architecture = "diffusers", "diffusers model folder"
        parts = [
            p.name
            for p in sorted(path.iterdir())
            if (p / "config.json").is_file() or p.name == "scheduler"
        ]
        info.details["parts"] = parts
        tensors: dict[str, Tensor] = {}
        for part in parts:
            tensors.update({f"{part}/{k}": v for k, v in _folder_tensors(path / part).items()})
        if (path / "unet" / "config.json").is_file():
            unet = _read_json(path / "unet" / "config.json")
            info.family = unet_config_family(unet)
            info.details["unet"] = {
                k: unet.get(k)
                for k in ("cross_attention_dim", "in_channels", "sample_size")
                if k in unet
            }
            info.architecture = f"{FAMILY_NAMES[info.family]} diffusers model folder"
        sched = path / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            info.details["prediction_type"] = _read_json(sched).get("prediction_type", "epsilon")
        if info.family == "sd21" and {"unet", "vae"} <= set(parts):
            info.usable_as = "base"
            if "text_encoder" not in parts:
                info.notes.append(
                    "no text_encoder/: fine for D3SR weights, but OSEDiff import needs it"
                )
        elif info.family not in (None, "sd21"):
            info.notes.append("D3SR needs Stable Diffusion 2.1-base")
        if not tensors and files:
            info.notes.append("no .safetensors weights (tensor counts not read from .bin files)")
    elif (path / "config.json").is_file() and _read_json(path / "config.json").get(
        "_class_name"
    ) == "AutoencoderKL":
        info.kind, info.architecture, info.usable_as = "vae", "VAE (diffusers folder)", "vae"
        tensors = _folder_tensors(path)
    else:
        tensors = {}
        info.details["entries"] = [p.name for p in sorted(path.iterdir())][:20]
        info.notes.append("not a diffusers model folder (no unet/config.json or model_index.json)")
    info.num_tensors, info.num_parameters, info.dtypes = _counts(tensors)
    return info


def base_lacks_vae(base: str | Path) -> bool:
    """Whether ``base`` is a single-file SD checkpoint without VAE weights (reads the header
    or structure only). Folders and unreadable files answer False: the loader reports those."""
    base = Path(base)
    if not base.is_file():
        return False
    try:
        info = describe_weights(base)
    except WeightsFileError:
        return False
    return info.kind == "sd-checkpoint" and "vae" not in info.details.get("parts", [])
