"""The discriminator's trunk: an SDXL (or SD2.1) UNet's down + mid blocks, built without
the up path, and its weights read key by key from diffusers folders or single files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ...loading.files import (
    SAFETENSORS_SUFFIXES,
    WeightsFileError,
    read_safetensors_metadata,
    read_state_dict,
)
from ..configs import bundled_config
from ..lora import DEFAULT_UNET_LORA_TARGETS, find_lora_targets

UP_PATH_MODULES = ("up_blocks", "conv_norm_out", "conv_act", "conv_out")
TRUNK_SCOPE = ("down_blocks.", "mid_block.")

# Tiny trunks with the real block structure, for tests: SDXL's three levels (no attention
# at the first, two downsamplers, multi-layer transformers, text_time add-embedding) and
# SD2.1's four levels (three downsamplers).
TINY_TRUNK_CONFIGS: dict[str, dict] = {
    "sdxl-tiny": {
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 1, 2],
        "attention_head_dim": [2, 4, 4],
        "cross_attention_dim": 32,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 16 + 6 * 8,  # pooled text 16 + 6 time ids
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "use_linear_projection": True,
        "in_channels": 4,
        "out_channels": 4,
        "sample_size": 16,
    },
    "sd21-tiny": {
        "block_out_channels": [32, 32, 64, 64],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "attention_head_dim": [2, 2, 4, 4],
        "cross_attention_dim": 32,
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "use_linear_projection": True,
        "in_channels": 4,
        "out_channels": 4,
        "sample_size": 16,
    },
}


# --------------------------------------------------------------------------- trunk


def trunk_config(base: str | dict) -> dict:
    """The UNet config of a backbone name (``sdxl-base``, ``sd21-base``, ``*-tiny``) or a dict."""
    if isinstance(base, dict):
        return {k: v for k, v in base.items() if not k.startswith("_")}
    if base in TINY_TRUNK_CONFIGS:
        return dict(TINY_TRUNK_CONFIGS[base])
    return bundled_config(base, "unet")


def prune_up_path(unet: nn.Module) -> nn.Module:
    """Drop the decoder half of a UNet in place (``up_blocks``, ``conv_norm_out``, ``conv_out``)."""
    for name in UP_PATH_MODULES:
        if getattr(unet, name, None) is not None:
            setattr(unet, name, None)
    return unet


def _check_supported(config: dict) -> None:
    unsupported = {
        "class_embed_type": config.get("class_embed_type"),
        "num_class_embeds": config.get("num_class_embeds"),
        "encoder_hid_dim": config.get("encoder_hid_dim"),
        "time_cond_proj_dim": config.get("time_cond_proj_dim"),
    }
    bad = {k: v for k, v in unsupported.items() if v is not None}
    add = config.get("addition_embed_type")
    if add not in (None, "text_time"):
        bad["addition_embed_type"] = add
    if bad:
        raise ValueError(f"UNet config options the discriminator trunk does not support: {bad}")


def build_trunk(
    config: str | dict,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    init: bool = True,
) -> nn.Module:
    """A ``UNet2DConditionModel`` without its up path.

    Built on ``meta`` so the up path (half of SDXL's 2.57 B parameters) is never allocated.

    Args:
        config: backbone name or UNet config dict (see :func:`trunk_config`).
        device: ``"meta"`` gives a shape-only trunk (parameter counting); otherwise memory
            is allocated there.
        init: initialise weights randomly (PyTorch's defaults, which is what diffusers
            uses); with ``False`` they are left uninitialised for a loader to fill.
    """
    from diffusers import UNet2DConditionModel

    cfg = trunk_config(config)
    _check_supported(cfg)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    prune_up_path(unet)
    if torch.device(device).type != "meta":
        unet = unet.to_empty(device=device)
        if init:
            for module in unet.modules():
                if hasattr(module, "reset_parameters") and any(
                    True for _ in module.parameters(recurse=False)
                ):
                    module.reset_parameters()
    if dtype != torch.float32:
        # nn.Module.to: diffusers' own .to() warns about fp32-kept modules the trunk lacks.
        nn.Module.to(unet, dtype=dtype)
    return unet


def trunk_forward(
    unet: nn.Module,
    sample: Tensor,
    timesteps: Tensor,
    encoder_hidden_states: Tensor,
    text_embeds: Tensor | None = None,
    time_ids: Tensor | None = None,
) -> Tensor:
    """conv_in, time (+ SDXL add-) embeddings, down blocks and mid block of a diffusers UNet.

    Mirrors ``UNet2DConditionModel.forward`` up to the mid block, calling only long-stable
    module interfaces (``time_proj``, ``time_embedding``, blocks' ``forward``), so it works
    across diffusers releases.

    Args:
        sample: noisy latent ``[B, 4, H, W]``.
        timesteps: ``[B]`` integer timesteps.
        encoder_hidden_states: ``[B, 77, cross_attention_dim]``.
        text_embeds, time_ids: SDXL's ``[B, 1280]`` pooled text and ``[B, 6]`` size ids.

    Returns:
        Mid-block output ``[B, C_last, H / 2^n, W / 2^n]`` (SDXL: 1280 x H/4 x W/4).
    """
    cfg = unet.config
    dtype = sample.dtype
    t_emb = unet.time_proj(timesteps.reshape(-1)).to(dtype=dtype)
    emb = unet.time_embedding(t_emb)
    if cfg.addition_embed_type == "text_time":
        if text_embeds is None or time_ids is None:
            raise ValueError("an SDXL-style trunk needs text_embeds and time_ids")
        time_embeds = unet.add_time_proj(time_ids.reshape(-1)).reshape(text_embeds.shape[0], -1)
        add_embeds = torch.cat([text_embeds, time_embeds.to(text_embeds.dtype)], dim=-1)
        emb = emb + unet.add_embedding(add_embeds.to(emb.dtype))
    if getattr(unet, "time_embed_act", None) is not None:
        emb = unet.time_embed_act(emb)
    if cfg.center_input_sample:
        sample = 2 * sample - 1.0
    h = unet.conv_in(sample)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    if getattr(unet.mid_block, "has_cross_attention", False):
        h = unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
    else:
        h = unet.mid_block(h, emb)
    return h


def _unet_folder(path: Path) -> Path:
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    if (path / "config.json").is_file():
        return path
    raise WeightsFileError(
        path, "not a diffusers UNet folder (expected unet/config.json or config.json)"
    )


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The weight file(s) of a diffusers model folder: single or sharded, safetensors or bin."""
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        stem = "diffusion_pytorch_model" + (f".{v}" if v else "")
        for ext in (".safetensors", ".bin"):
            single = folder / (stem + ext)
            if single.is_file():
                return [single]
            index = folder / (stem + ext + ".index.json")
            if index.is_file():
                weight_map = json.loads(index.read_text()).get("weight_map", {})
                return [folder / f for f in sorted(set(weight_map.values()))]
    raise WeightsFileError(
        folder, "no diffusion_pytorch_model[.fp16].safetensors/.bin weights in this folder"
    )


def _read_keys(files: Sequence[Path], wanted: set[str]) -> dict[str, Tensor]:
    """Only the ``wanted`` tensors: safetensors are read key by key (the up path of a 10 GB
    SDXL file is never loaded); pickles are read whole (weights_only) and filtered."""
    out: dict[str, Tensor] = {}
    for f in files:
        if f.suffix in SAFETENSORS_SUFFIXES:
            from safetensors import safe_open

            read_safetensors_metadata(f)  # clear error on a damaged header
            try:
                with safe_open(str(f), framework="pt") as handle:
                    for key in handle.keys():
                        if key in wanted:
                            out[key] = handle.get_tensor(key)
            except Exception as err:  # safetensors has its own error types
                raise WeightsFileError(
                    f, f"damaged or truncated .safetensors file ({err})"
                ) from None
        else:
            state = read_state_dict(f)
            out.update({k: v for k, v in state.items() if k in wanted})
    return out


def assign_trunk_weights(
    unet: nn.Module,
    state: dict[str, Tensor],
    source: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Fill a (meta) trunk with ``state`` tensor by tensor, without a second full copy.

    Raises:
        WeightsFileError: missing trunk keys or wrong shapes (a different architecture).
    """
    expected = dict(unet.state_dict(keep_vars=True))
    missing = [k for k in expected if k not in state]
    if missing:
        raise WeightsFileError(
            source,
            f"not the expected UNet: {len(missing)} of {len(expected)} down/mid tensors missing, "
            f"e.g. {missing[:3]}",
        )
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise WeightsFileError(source, f"shape mismatch (a different UNet?): {wrong[:3]}")
    for key, current in expected.items():
        owner_path, _, name = key.rpartition(".")
        owner = unet.get_submodule(owner_path) if owner_path else unet
        value = state[key].to(device=device, dtype=dtype if current.is_floating_point() else None)
        if name in owner._parameters:
            owner._parameters[name] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[name] = value
    return unet


def load_trunk(
    source: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
    config: str | dict | None = None,
) -> nn.Module:
    """Down/mid trunk with real weights from a diffusers folder or a single LDM checkpoint.

    Args:
        source: an SDXL (or SD2.1) diffusers model folder (with ``unet/``), a ``unet``
            folder itself, or a single-file ``.safetensors`` / ``.ckpt`` checkpoint.
        variant: weight-file variant (``"fp16"``); by default the plain file, else fp16.
        config: UNet config for a single file (default: the bundled ``sdxl-base``).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        folder = _unet_folder(path)
        cfg = json.loads((folder / "config.json").read_text())
        unet = build_trunk(cfg, device="meta")
        wanted = set(unet.state_dict().keys())
        state = _read_keys(_weight_files(folder, variant), wanted)
        return assign_trunk_weights(unet, state, folder, device, dtype)
    if path.is_file():
        cfg = trunk_config(config or "sdxl-base")
        unet = build_trunk(cfg, device="meta")
        state = _convert_single_file(path, cfg)
        return assign_trunk_weights(unet, state, path, device, dtype)
    raise WeightsFileError(
        path, "no such file or folder (expected an SDXL diffusers folder or checkpoint)"
    )


# LDM block names that hold conv_in, the embeddings, the down path and the mid block.
_LDM_TRUNK_HEADS = ("input_blocks.", "middle_block.", "time_embed.", "label_emb.")


def _convert_single_file(path: Path, config: dict) -> dict[str, Tensor]:
    """LDM-layout single file -> diffusers keys of the down/mid trunk.

    Uses the shared converter (``loading.single_file.convert_ldm_unet``, config-driven, so
    SDXL's ``transformer_layers_per_block`` and ``label_emb`` -> ``add_embedding`` follow from
    the config). Only UNet down/mid keys are read: from a ``.safetensors`` key by key (the
    up path, VAE and both text encoders of a 6.9 GB SDXL file stay on disk).
    """
    from ...loading.single_file import UNET_PREFIX, convert_ldm_unet, detect_family

    def wanted(key: str) -> bool:
        return key.removeprefix(UNET_PREFIX).startswith(_LDM_TRUNK_HEADS)

    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        read_safetensors_metadata(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                state = {k: handle.get_tensor(k) for k in handle.keys() if wanted(k)}
        except Exception as err:  # safetensors has its own error types
            raise WeightsFileError(
                path, f"damaged or truncated .safetensors file ({err})"
            ) from None
    else:
        state = read_state_dict(path)
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        state = {k: v for k, v in state.items() if isinstance(v, Tensor) and wanted(k)}
    if not state:
        raise WeightsFileError(path, "no LDM UNet keys (model.diffusion_model.input_blocks...)")
    family = detect_family(state)
    expected = "sdxl" if config.get("addition_embed_type") == "text_time" else "sd21"
    if config.get("cross_attention_dim") in (1024, 2048) and family != expected:
        raise WeightsFileError(
            path, f"this is a {family} checkpoint; the discriminator backbone needs {expected}"
        )
    return convert_ldm_unet(state, config)


def lora_target_names(
    unet: nn.Module, targets: Sequence[str] = DEFAULT_UNET_LORA_TARGETS
) -> list[str]:
    """Full names of the modules LoRA adapts: ``targets`` inside ``down_blocks`` / ``mid_block``."""
    return [n for n in find_lora_targets(unet, targets) if n.startswith(TRUNK_SCOPE)]
