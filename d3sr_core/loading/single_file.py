"""Load a Stable Diffusion base model from one checkpoint file in the original LDM layout.

This is the ``.safetensors`` / ``.ckpt`` file ComfyUI and A1111 users already have (e.g.
``v2-1_512-ema-pruned.safetensors``): UNet keys under ``model.diffusion_model.``, VAE keys
under ``first_stage_model.``, text encoder under ``cond_stage_model.`` (ignored here).

The conversion to diffusers names is our own and is driven by the diffusers config (block
types, ``layers_per_block``, ``block_out_channels``, attention blocks), so it needs no hub
access, does not depend on diffusers' single-file utilities (whose signatures change
between releases) and works for the full SD2.1 config as well as tiny test configs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from d3sr_core.loading.files import WeightsFileError, read_state_dict
from d3sr_core.models.configs import bundled_config

__all__ = [
    "UNET_PREFIX",
    "VAE_PREFIX",
    "convert_ldm_unet",
    "convert_ldm_vae",
    "detect_family",
    "detect_parts",
    "load_single_file",
    "load_single_file_vae",
    "unwrap_state_dict",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.", "text_model.")
# First key component of an LDM UNet / VAE stored without its prefix (UNet-only or VAE-only
# files, e.g. ``vae-ft-mse-840000-ema-pruned.safetensors``).
_BARE_UNET_HEADS = (
    "input_blocks",
    "middle_block",
    "output_blocks",
    "time_embed",
    "out",
    "label_emb",
)
_BARE_VAE_HEADS = ("encoder", "decoder", "quant_conv", "post_quant_conv")
# Markers of a file already in diffusers layout (not what this loader reads).
_DIFFUSERS_MARKERS = (
    "down_blocks.",
    "time_embedding.",
    "encoder.down_blocks.",
    "decoder.up_blocks.",
)

SD21_HINT = (
    "D3SR needs a Stable Diffusion 2.1(-base) checkpoint (e.g. v2-1_512-ema-pruned.safetensors)"
)
_FAMILY_NAMES = {
    "sd1": "a Stable Diffusion 1.x checkpoint (cross-attention context 768)",
    "sdxl": "an SDXL checkpoint",
    "sd21": "a Stable Diffusion 2.x checkpoint (cross-attention context 1024)",
}
_CONTEXT_TO_FAMILY = {768: "sd1", 1024: "sd21", 2048: "sdxl"}

# Sub-module renames inside one block (LDM name -> diffusers name).
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}  # norm1/conv1/norm2/conv2 keep their names
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_DOWNSAMPLE = {"op": "conv"}


@dataclass(frozen=True)
class _Block:
    """Where one LDM block lands in diffusers, and how names/tensors inside it change."""

    target: str
    renames: Mapping[str, str] = field(default_factory=dict)
    fix: Callable[[str, Tensor], Tensor] | None = None


def _as_list(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _context_dim(config: Mapping) -> int | None:
    dim = config.get("cross_attention_dim", 1280)
    if isinstance(dim, (list, tuple)):
        dim = dim[0] if dim else None
    return dim


# --------------------------------------------------------------------------- tensor fixes


def _linear_from_1x1(name: str, t: Tensor) -> Tensor:
    """A 1x1 conv kernel ``[O, I, 1, 1]`` as a Linear weight ``[O, I]`` (weights only)."""
    if name.endswith("weight") and t.ndim == 4 and t.shape[2:] == (1, 1):
        return t.reshape(t.shape[0], t.shape[1])
    return t


def _proj_fix(use_linear: bool) -> Callable[[str, Tensor], Tensor]:
    def fix(name: str, t: Tensor) -> Tensor:
        if not (name.startswith(("proj_in.", "proj_out.")) and name.endswith("weight")):
            return t
        if use_linear:
            return _linear_from_1x1(name, t)
        if t.ndim == 2:  # linear weights of an SD2-style file into a conv-projection config
            return t.reshape(*t.shape, 1, 1)
        return t

    return fix


def _vae_attn_fix(name: str, t: Tensor) -> Tensor:
    return _linear_from_1x1(name, t)


# --------------------------------------------------------------------------- block tables


def _unet_blocks(config: Mapping) -> dict[str, _Block]:
    """LDM block prefix (without ``model.diffusion_model.``) -> diffusers block."""
    down_types = list(config.get("down_block_types", ()))
    up_types = list(config.get("up_block_types", ()))
    n = len(down_types)
    layers = _as_list(config.get("layers_per_block", 2), n)
    attn = _Block("", {}, _proj_fix(bool(config.get("use_linear_projection", False))))
    res = _UNET_RESNET

    blocks: dict[str, _Block] = {
        "time_embed.0": _Block("time_embedding.linear_1"),
        "time_embed.2": _Block("time_embedding.linear_2"),
        "input_blocks.0.0": _Block("conv_in"),
        "out.0": _Block("conv_norm_out"),
        "out.2": _Block("conv_out"),
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL
        blocks["label_emb.0.0"] = _Block("add_embedding.linear_1")
        blocks["label_emb.0.2"] = _Block("add_embedding.linear_2")

    idx = 1
    for b, kind in enumerate(down_types):
        for i in range(layers[b]):
            blocks[f"input_blocks.{idx}.0"] = _Block(f"down_blocks.{b}.resnets.{i}", res)
            if "CrossAttn" in kind:
                blocks[f"input_blocks.{idx}.1"] = _Block(
                    f"down_blocks.{b}.attentions.{i}", attn.renames, attn.fix
                )
            idx += 1
        if b != n - 1:
            blocks[f"input_blocks.{idx}.0"] = _Block(f"down_blocks.{b}.downsamplers.0", _DOWNSAMPLE)
            idx += 1

    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type is not None:
        blocks["middle_block.0"] = _Block("mid_block.resnets.0", res)
        if "CrossAttn" in mid_type:
            blocks["middle_block.1"] = _Block("mid_block.attentions.0", attn.renames, attn.fix)
            blocks["middle_block.2"] = _Block("mid_block.resnets.1", res)
        else:
            blocks["middle_block.1"] = _Block("mid_block.resnets.1", res)

    up_layers = list(reversed(layers))
    idx = 0
    for u, kind in enumerate(up_types):
        for i in range(up_layers[u] + 1):
            blocks[f"output_blocks.{idx}.0"] = _Block(f"up_blocks.{u}.resnets.{i}", res)
            sub = 1
            if "CrossAttn" in kind:
                blocks[f"output_blocks.{idx}.1"] = _Block(
                    f"up_blocks.{u}.attentions.{i}", attn.renames, attn.fix
                )
                sub = 2
            if i == up_layers[u] and u != len(up_types) - 1:
                blocks[f"output_blocks.{idx}.{sub}"] = _Block(f"up_blocks.{u}.upsamplers.0")
            idx += 1
    return blocks


def _vae_blocks(config: Mapping) -> dict[str, _Block]:
    """LDM block prefix (without ``first_stage_model.``) -> diffusers block."""
    n = len(config.get("block_out_channels", (64,)))
    layers = int(config.get("layers_per_block", 1))
    res = _VAE_RESNET
    blocks: dict[str, _Block] = {}
    if config.get("use_quant_conv", True):
        blocks["quant_conv"] = _Block("quant_conv")
    if config.get("use_post_quant_conv", True):
        blocks["post_quant_conv"] = _Block("post_quant_conv")
    for part in ("encoder", "decoder"):
        blocks[f"{part}.conv_in"] = _Block(f"{part}.conv_in")
        blocks[f"{part}.norm_out"] = _Block(f"{part}.conv_norm_out")
        blocks[f"{part}.conv_out"] = _Block(f"{part}.conv_out")
        blocks[f"{part}.mid.block_1"] = _Block(f"{part}.mid_block.resnets.0", res)
        blocks[f"{part}.mid.block_2"] = _Block(f"{part}.mid_block.resnets.1", res)
        if config.get("mid_block_add_attention", True):
            blocks[f"{part}.mid.attn_1"] = _Block(
                f"{part}.mid_block.attentions.0", _VAE_ATTN, _vae_attn_fix
            )
    for i in range(n):
        for j in range(layers):
            blocks[f"encoder.down.{i}.block.{j}"] = _Block(
                f"encoder.down_blocks.{i}.resnets.{j}", res
            )
        if i != n - 1:
            blocks[f"encoder.down.{i}.downsample"] = _Block(
                f"encoder.down_blocks.{i}.downsamplers.0"
            )
        # LDM numbers decoder levels from the lowest resolution up; diffusers the other way.
        u = n - 1 - i
        for j in range(layers + 1):
            blocks[f"decoder.up.{i}.block.{j}"] = _Block(f"decoder.up_blocks.{u}.resnets.{j}", res)
        if i != 0:
            blocks[f"decoder.up.{i}.upsample"] = _Block(f"decoder.up_blocks.{u}.upsamplers.0")
    return blocks


# --------------------------------------------------------------------------- conversion


def unwrap_state_dict(obj, path: str | Path = "<state dict>") -> dict:
    """The flat ``name -> tensor`` dict inside a loaded checkpoint.

    ``.ckpt`` files nest it under ``state_dict`` (sometimes twice); non-tensor entries such
    as ``global_step`` are dropped.
    """
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsFileError(path, f"expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _section(state_dict: Mapping[str, Tensor], prefix: str, heads: tuple[str, ...]):
    """``(prefix_used, {key_without_prefix: tensor})`` of the UNet or VAE part.

    Keys carrying ``prefix`` win; otherwise bare keys whose first component is in ``heads``.
    """
    prefixed = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if prefixed:
        return prefix, prefixed
    bare = {k: v for k, v in state_dict.items() if k.split(".", 1)[0] in heads}
    return "", bare


def _unet_section(state_dict: Mapping[str, Tensor]):
    return _section(state_dict, UNET_PREFIX, _BARE_UNET_HEADS)


def _vae_section(state_dict: Mapping[str, Tensor]):
    prefix, sec = _section(state_dict, VAE_PREFIX, _BARE_VAE_HEADS)
    if not prefix and not any(k.startswith(("encoder.conv_in.", "decoder.conv_in.")) for k in sec):
        return "", {}  # e.g. a T5 text encoder's bare ``encoder.block...`` keys
    return prefix, sec


@dataclass
class _Converted:
    tensors: dict[str, Tensor]  # diffusers name -> tensor
    sources: dict[str, str]  # diffusers name -> file key (without prefix)
    file_shapes: dict[str, list[int]]  # diffusers name -> shape as stored in the file
    unmapped: list[str]  # file keys (without prefix) that have no place in the config


def _convert(
    section: dict[str, Tensor],
    blocks: Mapping[str, _Block],
    cast: Callable[[Tensor], Tensor] | None = None,
    consume: bool = False,
) -> _Converted:
    out = _Converted({}, {}, {}, [])
    for key in sorted(section):
        t = section.pop(key) if consume else section[key]
        parts = key.split(".")
        for cut in range(min(len(parts) - 1, 5), 0, -1):
            block = blocks.get(".".join(parts[:cut]))
            if block is not None:
                break
        else:
            out.unmapped.append(key)
            continue
        rest = ".".join(parts[cut:])
        for old, new in block.renames.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
        name = f"{block.target}.{rest}"
        out.file_shapes[name] = list(t.shape)
        if block.fix is not None:
            t = block.fix(rest, t)
        if cast is not None:
            t = cast(t)
        out.tensors[name] = t
        out.sources[name] = key
    return out


def convert_ldm_unet(state_dict: Mapping, unet_config: Mapping) -> dict[str, Tensor]:
    """Rename an LDM-layout UNet state dict to ``UNet2DConditionModel`` keys.

    ``state_dict`` may be a whole checkpoint (``model.diffusion_model.*`` keys are taken,
    EMA / VAE / text-encoder keys ignored, ``.ckpt`` ``state_dict`` nesting unwrapped) or
    bare UNet keys (``input_blocks...``). Keys that have no place in the architecture
    ``unet_config`` describes are left out; :func:`load_single_file` reports them.
    """
    _, sec = _unet_section(unwrap_state_dict(state_dict))
    return _convert(sec, _unet_blocks(unet_config)).tensors


def convert_ldm_vae(state_dict: Mapping, vae_config: Mapping) -> dict[str, Tensor]:
    """Rename an LDM-layout VAE state dict to ``AutoencoderKL`` keys.

    Takes ``first_stage_model.*`` keys of a whole checkpoint, or bare VAE keys
    (``encoder.down.0...``, a standalone VAE file). Mid-block attention 1x1 convs
    ``[C, C, 1, 1]`` become Linear weights ``[C, C]``.
    """
    _, sec = _vae_section(unwrap_state_dict(state_dict))
    return _convert(sec, _vae_blocks(vae_config)).tensors


# --------------------------------------------------------------------------- detection


def _file_context_dim(unet_sec: Mapping[str, Tensor]) -> int | None:
    for key in sorted(unet_sec):
        if key.endswith("attn2.to_k.weight") and unet_sec[key].ndim == 2:
            return int(unet_sec[key].shape[1])
    return None


def detect_family(state_dict: Mapping) -> str:
    """``"sd21"`` (SD2.x, context 1024), ``"sd1"`` (768), ``"sdxl"`` or ``"unknown"``."""
    sd = unwrap_state_dict(state_dict)
    if any(k.startswith("conditioner.") for k in sd):
        return "sdxl"
    _, unet = _unet_section(sd)
    if not unet:
        return "unknown"
    context = _file_context_dim(unet)
    has_label_emb = any(k.startswith("label_emb.") for k in unet)
    if context == 2048 or (has_label_emb and context not in (768, 1024)):
        return "sdxl"
    if has_label_emb:  # e.g. SD2 unCLIP: not a plain text-to-image UNet
        return "unknown"
    return _CONTEXT_TO_FAMILY.get(context, "unknown")


def detect_parts(state_dict: Mapping) -> frozenset[str]:
    """Which of ``"unet"``, ``"vae"``, ``"text_encoder"`` (LDM layout) a checkpoint holds."""
    sd = unwrap_state_dict(state_dict)
    parts = set()
    if _unet_section(sd)[1]:
        parts.add("unet")
    if _vae_section(sd)[1]:
        parts.add("vae")
    if any(k.startswith(TEXT_ENCODER_PREFIXES) for k in sd):
        parts.add("text_encoder")
    return frozenset(parts)


def _looks_like_diffusers(sd: Iterable[str]) -> bool:
    return any(k.startswith(_DIFFUSERS_MARKERS) for k in sd)


# --------------------------------------------------------------------------- loading


def _examples(items: list[str], n: int = 5) -> str:
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _check_and_assign(model, conv: _Converted, prefix: str, part: str, path: Path) -> None:
    """Strict key/shape check with errors in the file's own key names, then assign."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    reverse = {}  # diffusers name -> file key, for keys the file lacks
    missing = [k for k in expected if k not in conv.tensors]
    if missing:
        blocks = _unet_blocks(model.config) if part == "UNet" else _vae_blocks(model.config)
        for ldm, block in blocks.items():
            for k in missing:
                if k.startswith(block.target + "."):
                    rest = k[len(block.target) + 1 :]
                    for old, new in block.renames.items():
                        if rest.startswith(new + "."):
                            rest = old + rest[len(new) :]
                            break
                    reverse[k] = f"{ldm}.{rest}"
    problems = []
    if missing:
        names = [f"{prefix}{reverse.get(k, k)} (diffusers {k})" for k in missing]
        problems.append(
            f"{len(missing)} {part} tensor(s) missing from the file: {_examples(names)}"
        )
    unexpected = [f"{prefix}{k}" for k in conv.unmapped]
    unexpected += [f"{prefix}{conv.sources[k]}" for k in conv.tensors if k not in expected]
    if unexpected:
        problems.append(
            f"{len(unexpected)} {part} tensor(s) in the file have no place in the configured "
            f"architecture: {_examples(unexpected)}"
        )
    mismatched = [
        f"{prefix}{conv.sources[k]}: file shape {conv.file_shapes[k]}, expected {list(expected[k])}"
        for k, t in conv.tensors.items()
        if k in expected and t.shape != expected[k]
    ]
    if mismatched:
        problems.append(
            f"{len(mismatched)} {part} tensor(s) have the wrong shape: " + _examples(mismatched)
        )
        conv_in = conv.tensors.get("conv_in.weight")
        if (
            part == "UNet"
            and conv_in is not None
            and conv_in.shape[1] != expected["conv_in.weight"][1]
        ):
            problems.append(
                f"the UNet takes {conv_in.shape[1]} input channels instead of "
                f"{expected['conv_in.weight'][1]} (an inpainting/depth/upscaler model?)"
            )
    if problems:
        raise WeightsFileError(path, f"not a matching {part}: " + "; ".join(problems))
    model.load_state_dict(conv.tensors, strict=True, assign=True)


def _build(cls, config: Mapping):
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return cls.from_config(config)


def _check_family(sd: Mapping[str, Tensor], unet_sec, unet_config: Mapping, path) -> None:
    """Reject other model families with a message that says what is needed."""
    expected_context = _context_dim(unet_config)
    expected = _CONTEXT_TO_FAMILY.get(expected_context, "unknown")
    family = detect_family(sd)
    if family in ("sd1", "sdxl") and family != expected:
        if expected in ("sd21", "unknown"):
            need = SD21_HINT
        else:
            need = f"the configured UNet needs cross-attention context {expected_context}"
        raise WeightsFileError(path, f"this is {_FAMILY_NAMES[family]}; {need}")
    context = _file_context_dim(unet_sec)
    if context is not None and expected_context is not None and context != expected_context:
        raise WeightsFileError(
            path,
            f"the UNet's cross-attention context is {context}-dimensional, the configured "
            f"architecture expects {expected_context}; {SD21_HINT}",
        )


def _caster(device, dtype) -> Callable[[Tensor], Tensor]:
    def cast(t: Tensor) -> Tensor:
        # Always a fresh, contiguous allocation: tensors read from .safetensors are not
        # 64-byte aligned, which changes vectorised kernels' results in the last bits (and
        # speed); the originals are dropped one by one, so the copy costs no extra peak.
        target = dtype if t.is_floating_point() else t.dtype
        return t.to(device=device, dtype=target, memory_format=torch.contiguous_format, copy=True)

    return cast


_NO_VAE_IN_CHECKPOINT = (
    f"no VAE weights in this file (expected keys like '{VAE_PREFIX}encoder.conv_in.weight'); "
    "pass a separate VAE file (vae_path=..., e.g. vae-ft-mse-840000-ema-pruned.safetensors) "
    "or a full SD2.1 checkpoint"
)
_NO_VAE = (
    "no VAE weights (expected LDM keys like 'encoder.conv_in.weight' or "
    f"'{VAE_PREFIX}encoder.conv_in.weight'; a full SD2.1 checkpoint or a standalone SD VAE "
    "such as vae-ft-mse-840000-ema-pruned.safetensors)"
)


def _read(path: Path) -> dict[str, Tensor]:
    return unwrap_state_dict(read_state_dict(path), path)


def _load_vae_section(prefix: str, sec: dict, vae_config: Mapping, cast, path: Path):
    from diffusers import AutoencoderKL

    vae = _build(AutoencoderKL, vae_config)
    conv = _convert(sec, _vae_blocks(vae.config), cast=cast, consume=True)
    _check_and_assign(vae, conv, prefix, "VAE", path)
    return vae.eval()


def load_single_file(
    path: str | Path,
    base: str = "sd21-base",
    unet_config: Mapping | None = None,
    vae_config: Mapping | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_path: str | Path | None = None,
    require_vae: bool = True,
):
    """Build ``(UNet2DConditionModel, AutoencoderKL)`` from one LDM-layout checkpoint.

    Configs come from the package (``bundled_config(base, ...)``) unless given; nothing is
    fetched. The models are built on the ``meta`` device and the file's tensors assigned
    (cast to ``dtype``, moved to ``device``), so weights are not held twice. Every key and
    shape is checked. ``vae_path`` loads the VAE from a separate file (full checkpoint or a
    standalone LDM VAE such as ``vae-ft-mse-840000-ema-pruned.safetensors``) instead. With
    ``require_vae=False`` a file without VAE gives ``(unet, None)`` (the caller brings its
    own VAE). Models are returned in eval mode.

    Raises:
        WeightsFileError: unreadable/truncated file, wrong architecture (SD1.x, SDXL, other
            context width), missing or unexpected keys, shape mismatches, no VAE.
    """
    from diffusers import UNet2DConditionModel

    path = Path(path)
    if unet_config is None:
        unet_config = bundled_config(base, "unet")
    if vae_config is None:
        vae_config = bundled_config(base, "vae")
    cast = _caster(device, dtype)

    sd = _read(path)
    unet_prefix, unet_sec = _unet_section(sd)
    if not unet_sec:
        what = (
            "it is in diffusers layout"
            if _looks_like_diffusers(sd)
            else ("it holds only a VAE" if _vae_section(sd)[1] else "no known keys")
        )
        raise WeightsFileError(
            path,
            f"no UNet weights (expected keys like '{UNET_PREFIX}input_blocks.0.0.weight'; "
            f"{what}); {SD21_HINT}",
        )
    _check_family(sd, unet_sec, unet_config, path)

    vae_file = path if vae_path is None else Path(vae_path)
    vae_prefix, vae_sec = _vae_section(sd if vae_path is None else _read(vae_file))
    if not vae_sec and (require_vae or vae_path is not None):
        raise WeightsFileError(vae_file, _NO_VAE_IN_CHECKPOINT if vae_path is None else _NO_VAE)
    del sd  # only the sections stay referenced; they are consumed below

    unet = _build(UNet2DConditionModel, unet_config)
    conv = _convert(unet_sec, _unet_blocks(unet.config), cast=cast, consume=True)
    _check_and_assign(unet, conv, unet_prefix, "UNet", path)
    del conv
    vae = _load_vae_section(vae_prefix, vae_sec, vae_config, cast, vae_file) if vae_sec else None
    return unet.eval(), vae


def load_single_file_vae(
    path: str | Path,
    base: str = "sd21-base",
    vae_config: Mapping | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """An ``AutoencoderKL`` from a standalone LDM-layout VAE file or a full checkpoint's VAE.

    Raises:
        WeightsFileError: unreadable file, no VAE keys, missing/unexpected keys, shapes.
    """
    path = Path(path)
    if vae_config is None:
        vae_config = bundled_config(base, "vae")
    prefix, sec = _vae_section(_read(path))
    if not sec:
        raise WeightsFileError(path, _NO_VAE)
    return _load_vae_section(prefix, sec, vae_config, _caster(device, dtype), path)
