"""The D3SR checkpoint: one ``.safetensors`` with LoRA tensors, the prompt embedding and a JSON header.

Layout (format ``d3sr``, version 1)::

    prompt_embeds                          [1, 77, 1024]
    unet.<module path>.lora_A.weight       [r, in] or [r, in, kh, kw]
    unet.<module path>.lora_B.weight       [out, r] or [out, r, 1, 1]
    vae.<module path>.lora_{A,B}.weight    (optional; OSEDiff imports have VAE-encoder LoRA)
    replace.<unet|vae>.<parameter path>    (optional; full trained tensors, e.g. OSEDiff's conv_in)

Header metadata: ``format`` = ``"d3sr"``, ``format_version``, ``config`` (JSON of
:class:`~d3sr_core.models.GeneratorConfig`) and ``adapters`` (JSON: per model, its LoRA scale).
Tensors are written as they are (dtype included), so save-then-load is bit-exact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from ..models.generator import GeneratorConfig
from ..models.lora import LoraAdapter, split_peft_state_dict
from .files import WeightsFileError, read_safetensors_metadata, read_state_dict
from .validate import check_config_types, check_factors, check_scale, check_tensors

FORMAT_NAME = "d3sr"
FORMAT_VERSION = 1
ADAPTED_MODELS = ("unet", "vae")


@dataclass
class D3SRCheckpoint:
    """Everything a D3SR weights file holds besides the base model.

    Attributes:
        config: timestep, prediction type, scaling factor, LoRA rank/alpha/targets.
        prompt_embeds: the fixed condition ``[1, 77, C]``.
        adapters: ``"unet"`` (always) and optionally ``"vae"`` -> :class:`LoraAdapter`.
    """

    config: GeneratorConfig
    prompt_embeds: Tensor
    adapters: dict[str, LoraAdapter] = field(default_factory=dict)

    def num_parameters(self) -> int:
        return self.prompt_embeds.numel() + sum(a.num_parameters() for a in self.adapters.values())


def checkpoint_state_dict(ckpt: D3SRCheckpoint) -> dict[str, Tensor]:
    """Flatten a checkpoint into the file's tensor names (see module docstring)."""
    tensors = {"prompt_embeds": ckpt.prompt_embeds}
    for model, adapter in ckpt.adapters.items():
        if model not in ADAPTED_MODELS:
            raise ValueError(
                f"adapter for unknown model {model!r}; expected one of {ADAPTED_MODELS}"
            )
        for path, (down, up) in adapter.factors.items():
            tensors[f"{model}.{path}.lora_A.weight"] = down
            tensors[f"{model}.{path}.lora_B.weight"] = up
        for path, tensor in adapter.replaced.items():
            tensors[f"replace.{model}.{path}"] = tensor
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_checkpoint(
    ckpt: D3SRCheckpoint, path: str | Path, extra_metadata: dict[str, str] | None = None
) -> Path:
    """Write ``ckpt`` as a D3SR ``.safetensors`` file (written to a temp name, then renamed).

    ``extra_metadata`` adds header entries (e.g. where a conversion came from).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: D3SR checkpoints are .safetensors files")
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(ckpt.config.to_dict()),
        "adapters": json.dumps({m: {"scale": a.scale} for m, a in ckpt.adapters.items()}),
        **(extra_metadata or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file(checkpoint_state_dict(ckpt), str(tmp), metadata=metadata)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def is_d3sr_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return False
    try:
        return read_safetensors_metadata(path).get("format") == FORMAT_NAME
    except WeightsFileError:
        return False


def load_checkpoint(path: str | Path) -> D3SRCheckpoint:
    """Read a D3SR ``.safetensors`` checkpoint.

    Raises:
        WeightsFileError: not a D3SR file, a newer format version, missing ``prompt_embeds``,
            incomplete LoRA pairs, unknown tensor names or unreadable metadata.
    """
    path = Path(path)
    meta = read_safetensors_metadata(path)
    if meta.get("format") != FORMAT_NAME:
        raise WeightsFileError(
            path,
            f"not a D3SR checkpoint: its header has no 'format: {FORMAT_NAME}' entry "
            "(run `d3sr info` on it to see what it is; OSEDiff .pkl files are imported with `d3sr convert`)",
        )
    try:
        version = int(meta.get("format_version", "0"))
        config_dict = json.loads(meta["config"])
        adapters_dict = json.loads(meta.get("adapters", "{}"))
        if not isinstance(config_dict, dict) or not isinstance(adapters_dict, dict):
            raise TypeError("'config' and 'adapters' must be JSON objects")
        check_config_types(config_dict, path)
        config = GeneratorConfig.from_dict(config_dict)
        scales = {
            m: check_scale(v.get("scale") if isinstance(v, dict) else v, path, f"{m} LoRA scale")
            for m, v in adapters_dict.items()
        }
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        if isinstance(err, WeightsFileError):
            raise
        detail = f"missing {err}" if isinstance(err, KeyError) else str(err)
        raise WeightsFileError(
            path, f"D3SR header metadata is incomplete or invalid ({detail})"
        ) from None
    if version < 1 or version > FORMAT_VERSION:
        raise WeightsFileError(
            path,
            f"D3SR format version {version}; this d3sr reads versions 1..{FORMAT_VERSION} (update d3sr)",
        )
    tensors = read_state_dict(path)
    if "prompt_embeds" not in tensors:
        raise WeightsFileError(path, "D3SR checkpoint lacks the 'prompt_embeds' tensor [1, 77, C]")
    prompt_embeds = tensors.pop("prompt_embeds")
    check_tensors({"prompt_embeds": prompt_embeds}, path, "D3SR checkpoint")
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1:
        raise WeightsFileError(
            path, f"'prompt_embeds' has shape {tuple(prompt_embeds.shape)}, expected [1, 77, C]"
        )

    grouped: dict[str, dict[str, Tensor]] = {m: {} for m in ADAPTED_MODELS}
    replaced: dict[str, dict[str, Tensor]] = {m: {} for m in ADAPTED_MODELS}
    for key, tensor in tensors.items():
        head, _, rest = key.partition(".")
        if head == "replace":
            model, _, param = rest.partition(".")
            if model in replaced and param:
                replaced[model][param] = tensor
                continue
        elif head in grouped and (".lora_A." in key or ".lora_B." in key):
            grouped[head][rest] = tensor
            continue
        raise WeightsFileError(path, f"unexpected tensor {key!r} in a D3SR checkpoint")

    adapters: dict[str, LoraAdapter] = {}
    for model in ADAPTED_MODELS:
        if not grouped[model] and not replaced[model]:
            continue
        try:
            factors = split_peft_state_dict(grouped[model])
        except KeyError as err:
            raise WeightsFileError(path, f"{model} LoRA: {err.args[0]}") from None
        if model not in scales:
            raise WeightsFileError(path, f"header gives no LoRA scale for the {model} adapter")
        check_factors(factors, path, model)
        check_tensors(replaced[model], path, f"{model} replacement tensors")
        adapters[model] = LoraAdapter(
            factors=factors, scale=scales[model], replaced=replaced[model]
        )
    if "unet" not in adapters:
        raise WeightsFileError(
            path, "D3SR checkpoint holds no UNet LoRA tensors ('unet.*.lora_A.weight')"
        )
    return D3SRCheckpoint(config=config, prompt_embeds=prompt_embeds, adapters=adapters)
