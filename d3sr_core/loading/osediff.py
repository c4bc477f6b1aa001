"""Import OSEDiff's published ``osediff.pkl`` (reference/peers.md 1.3) as a D3SR checkpoint.

The pickle holds peft-named LoRA tensors for the UNet (adapters ``default_encoder``,
``default_decoder``, ``default_others``; rank 4, peft's default alpha 8 -> scale 2.0), a fully
trained UNet ``conv_in`` and LoRA on the VAE encoder + ``quant_conv``. It is read with
``torch.load(weights_only=True)`` only. OSEDiff conditions on per-image DAPE prompts; D3SR runs it
with one fixed embedding (the empty prompt, computed from the base model's text encoder).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..models.generator import GeneratorConfig
from ..models.lora import LoraAdapter, split_peft_state_dict
from .checkpoint import D3SRCheckpoint
from .files import WeightsFileError, read_state_dict
from .validate import check_factors, check_rank, check_tensors, listing, tensor_problem

OSEDIFF_KEYS = ("state_dict_unet", "state_dict_vae", "rank_unet", "rank_vae")
OSEDIFF_MODULE_LISTS = (
    "unet_lora_encoder_modules",
    "unet_lora_decoder_modules",
    "unet_lora_others_modules",
    "vae_lora_encoder_modules",
)
PEFT_DEFAULT_ALPHA = 8.0  # OSEDiff never sets lora_alpha
OSEDIFF_TIMESTEP = 999
OSEDIFF_UNET_TARGETS = [
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in",
    "conv_shortcut", "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj",
]  # fmt: skip


def is_osediff_state(state: object) -> bool:
    return isinstance(state, dict) and all(k in state for k in ("state_dict_unet", "rank_unet"))


def osediff_to_checkpoint(
    state: dict, prompt_embeds: Tensor, path: str | Path = "<osediff>"
) -> D3SRCheckpoint:
    """Convert the dict inside ``osediff.pkl`` (already loaded) to a :class:`D3SRCheckpoint`."""
    missing = [k for k in OSEDIFF_KEYS if k not in state]
    if missing:
        raise WeightsFileError(
            path,
            f"not an OSEDiff checkpoint: missing top-level keys {missing} (expected {list(OSEDIFF_KEYS)})",
        )
    rank_unet = check_rank(state["rank_unet"], path, "rank_unet")
    rank_vae = check_rank(state["rank_vae"], path, "rank_vae")
    unet_sd = _tensor_dict(state["state_dict_unet"], path, "state_dict_unet")
    vae_sd = _tensor_dict(state["state_dict_vae"], path, "state_dict_vae")
    lists = {k: _string_list(state[k], path, k) for k in OSEDIFF_MODULE_LISTS if k in state}

    replaced: dict[str, Tensor] = {}
    lora_sd: dict[str, Tensor] = {}
    for key, tensor in unet_sd.items():
        if ".lora_" in key:
            lora_sd[key] = tensor
        elif key.startswith("conv_in.") and key.endswith(("weight", "bias")):
            replaced["conv_in." + key.rsplit(".", 1)[1]] = tensor
        else:
            raise WeightsFileError(
                path, f"unexpected UNet tensor {key!r} (OSEDiff stores only LoRA and conv_in)"
            )
    try:
        unet_factors = split_peft_state_dict(lora_sd)
        vae_factors = split_peft_state_dict(vae_sd)
    except KeyError as err:
        raise WeightsFileError(path, f"OSEDiff LoRA: {err.args[0]}") from None
    check_factors(unet_factors, path, "UNet", rank_unet)
    check_factors(vae_factors, path, "VAE", rank_vae)
    check_tensors(replaced, path, "UNet conv_in")
    if not unet_factors:
        raise WeightsFileError(path, "OSEDiff checkpoint holds no UNet LoRA tensors")
    for key, modules in lists.items():
        have = vae_factors if key.startswith("vae") else unet_factors
        absent = [m for m in modules if m.removesuffix(".base_layer") not in have]
        if absent:
            raise WeightsFileError(
                path, f"{key} lists modules without LoRA tensors: {listing(absent)}"
            )

    config = GeneratorConfig(
        base="sd21-base",
        timestep=OSEDIFF_TIMESTEP,
        prediction_type="epsilon",
        lora_rank=rank_unet,
        lora_alpha=PEFT_DEFAULT_ALPHA,
        lora_targets=list(OSEDIFF_UNET_TARGETS),
    )
    adapters = {"unet": LoraAdapter(unet_factors, PEFT_DEFAULT_ALPHA / rank_unet, replaced)}
    if vae_factors:
        adapters["vae"] = LoraAdapter(vae_factors, PEFT_DEFAULT_ALPHA / rank_vae)
    return D3SRCheckpoint(
        config=config, prompt_embeds=prompt_embeds.detach().float().cpu(), adapters=adapters
    )


def _tensor_dict(value: object, path: str | Path, field: str) -> dict[str, Tensor]:
    """A dict of name -> tensor, every tensor's type and size checked before its values."""
    if not isinstance(value, dict):
        raise WeightsFileError(path, f"{field} is a {type(value).__name__}, expected a dict")
    problems = []
    for key, tensor in value.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r:.40} is not a string")
        elif problem := tensor_problem(tensor, finite=False):
            problems.append(f"{key} {problem}")
    if problems:
        raise WeightsFileError(path, f"{field}: {listing(problems)}")
    return value


def _string_list(value: object, path: str | Path, field: str) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise WeightsFileError(
            path,
            f"{field} is {type(value).__name__} {value!r:.60}, expected a list of module names",
        )
    return list(value)


def read_osediff(path: str | Path) -> dict:
    """Load ``osediff.pkl`` safely (no code execution) and check it is one."""
    state = read_state_dict(path)
    if not is_osediff_state(state):
        keys = list(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise WeightsFileError(
            path, f"not an OSEDiff checkpoint: expected keys {list(OSEDIFF_KEYS)}, found {keys}"
        )
    return state
