"""The large-scale diffusion discriminator: SDXL-base UNet down + mid blocks, LoRA, patch head.

``D(z, t) = head(mid(down(conv_in(F(z, t)), emb(t), context)))`` where
``F(z, t) = sqrt(abar_t) z + sqrt(1 - abar_t) eps`` with ``t ~ U[t_min, t_max)`` per sample,
``z`` an SD2.1-VAE latent (scaled by 0.18215), and ``context`` / ``text_embeds`` /
``time_ids`` a fixed precomputed condition stored with the discriminator (so no text
encoder is needed while training).

The trunk is a diffusers ``UNet2DConditionModel`` whose up path (``up_blocks``,
``conv_norm_out``, ``conv_out``) is never allocated: it is built on the ``meta`` device, the
up path removed, and only then are weights materialised (random, or read from disk key by
key). State-dict keys stay diffusers', so real SDXL weights load directly. Only the LoRA
(rank 16 / alpha 16 via peft on ``DEFAULT_UNET_LORA_TARGETS`` inside ``down_blocks`` and
``mid_block``) and the randomly initialised head train.

Backbones: ``"sdxl-base"`` (default, 1.24 B parameters, 1280 x 16 x 16 features for a
64 x 64 latent), ``"sd21-base"`` (the paper's ablation; 1280 x 8 x 8) and tiny configs
(``"sdxl-tiny"``, ``"sd21-tiny"``) for tests, or any UNet config dict.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..loading.files import (
    SAFETENSORS_SUFFIXES,
    WeightsFileError,
    read_safetensors_metadata,
    read_state_dict,
)
from .configs import bundled_config
from .lora import DEFAULT_UNET_LORA_TARGETS, find_lora_targets
from .schedule import add_noise, alphas_cumprod, alphas_cumprod_from_config

FORMAT_NAME = "d3sr-discriminator"
FORMAT_VERSION = "1"

# SD2.1-VAE latents scaled by 0.18215 -> the SDXL-VAE range (scale 0.13025). Off by default:
# the paper describes no rescaling (the LoRA is expected to absorb the mismatch).
SDXL_LATENT_RESCALE = 0.13025 / 0.18215
# SDXL micro-conditioning (original_size, crop_top_left, target_size): the pipeline defaults.
DEFAULT_SDXL_TIME_IDS = (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)
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
    from ..loading.single_file import UNET_PREFIX, convert_ldm_unet, detect_family

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


# --------------------------------------------------------------------------- condition


@dataclass
class DiscriminatorCondition:
    """The fixed condition the trunk sees (batch 1; expanded to the batch in forward).

    Attributes:
        encoder_hidden_states: ``[1, 77, C]`` (SDXL 2048, SD2.1 1024).
        text_embeds: SDXL pooled text embedding ``[1, 1280]``; ``None`` for SD2.1.
        time_ids: SDXL size conditioning ``[1, 6]``; ``None`` for SD2.1.
    """

    encoder_hidden_states: Tensor
    text_embeds: Tensor | None = None
    time_ids: Tensor | None = None


def zero_condition(
    unet_config: dict, sequence_length: int = 77, time_ids: Sequence[float] = DEFAULT_SDXL_TIME_IDS
) -> DiscriminatorCondition:
    """An all-zero text condition (SDXL's ``force_zeros_for_empty_prompt`` style) with real
    size ``time_ids``; needs no text encoder."""
    context = torch.zeros(1, sequence_length, unet_config["cross_attention_dim"])
    if unet_config.get("addition_embed_type") != "text_time":
        return DiscriminatorCondition(context)
    ids = torch.tensor([list(time_ids)], dtype=torch.float32)
    pooled = (
        unet_config["projection_class_embeddings_input_dim"]
        - ids.shape[1] * unet_config["addition_time_embed_dim"]
    )
    return DiscriminatorCondition(context, torch.zeros(1, pooled), ids)


@torch.no_grad()
def encode_condition(
    tokenizers: Sequence,
    text_encoders: Sequence[nn.Module],
    prompt: str = "",
    time_ids: Sequence[float] = DEFAULT_SDXL_TIME_IDS,
) -> DiscriminatorCondition:
    """Encode a prompt (default: empty) once, as the diffusers pipelines do.

    One encoder (SD2.1): ``context = text_encoder(ids)[0]`` (last hidden state). Two (SDXL,
    ``CLIPTextModel`` + ``CLIPTextModelWithProjection``): ``context`` = both encoders'
    penultimate hidden states concatenated (768 + 1280 = 2048), ``text_embeds`` = the second
    encoder's projected pooled output, plus ``time_ids``.

    Args:
        tokenizers: callables like transformers tokenizers (``model_max_length``, ``input_ids``).
    """
    if len(tokenizers) != len(text_encoders) or len(text_encoders) not in (1, 2):
        raise ValueError("pass one (SD2.1) or two (SDXL) tokenizers and text encoders")

    def ids(tok, enc):
        device = next(enc.parameters()).device
        out = tok(
            [prompt],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return out.input_ids.to(device)

    if len(text_encoders) == 1:
        tok, enc = tokenizers[0], text_encoders[0]
        return DiscriminatorCondition(enc(ids(tok, enc))[0].float().cpu())
    contexts = []
    pooled = None
    for tok, enc in zip(tokenizers, text_encoders, strict=True):
        out = enc(ids(tok, enc), output_hidden_states=True)
        pooled = out[0]  # the last encoder's projected pooled output ("text_embeds")
        contexts.append(out.hidden_states[-2])
    context = torch.cat(contexts, dim=-1)
    ids_t = torch.tensor([list(time_ids)], dtype=torch.float32)
    return DiscriminatorCondition(context.float().cpu(), pooled.float().cpu(), ids_t)


# --------------------------------------------------------------------------- head + module


class PatchHead(nn.Module):
    """Per-location MLP on the mid-block features: 1x1 conv -> GroupNorm -> SiLU -> 1x1 conv.

    ``[B, in_channels, h, w]`` -> ``[B, 1, h, w]`` realism logits (one per patch).
    """

    def __init__(self, in_channels: int = 1280, hidden: int = 256, groups: int = 32):
        super().__init__()
        self.proj_in = nn.Conv2d(in_channels, hidden, kernel_size=1)
        self.norm = nn.GroupNorm(groups, hidden)
        self.act = nn.SiLU()
        self.proj_out = nn.Conv2d(hidden, 1, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.proj_in.weight.dtype)
        return self.proj_out(self.act(self.norm(self.proj_in(x))))


@dataclass
class DiscriminatorConfig:
    """Everything besides weights that defines a discriminator; saved with its state.

    Attributes:
        base: backbone (``sdxl-base``, ``sd21-base``, ``sdxl-tiny``, ``sd21-tiny``); for
            ``from_pretrained`` the folder's own config wins, ``base`` is then a label.
        lora_rank, lora_alpha, lora_targets: LoRA on the trunk's down and mid blocks
            (rank 0 disables it).
        head_hidden, head_groups: the patch head's width and GroupNorm groups.
        latent_rescale: multiplies input latents before noising (1.0 = off; use
            ``SDXL_LATENT_RESCALE`` to move SD2.1 latents into SDXL's range).
        t_min, t_max: timesteps are drawn uniformly from ``[t_min, t_max)``.
        gradient_checkpointing: recompute trunk activations in backward (saves memory).
    """

    base: str = "sdxl-base"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_UNET_LORA_TARGETS))
    head_hidden: int = 256
    head_groups: int = 32
    latent_rescale: float = 1.0
    t_min: int = 0
    t_max: int = 1000
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.t_min < self.t_max:
            raise ValueError(f"need 0 <= t_min < t_max, got {self.t_min}, {self.t_max}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DiscriminatorConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _schedule_for(base: str) -> Tensor:
    """The base's training schedule (SD2.1 and SDXL share scaled-linear 0.00085..0.012)."""
    try:
        return alphas_cumprod_from_config(bundled_config(base, "scheduler"))
    except KeyError:
        return alphas_cumprod()


class DiffusionDiscriminator(nn.Module):
    """Patch discriminator on noised latents, built on a pre-trained diffusion UNet's encoder.

    Args:
        trunk: a UNet2DConditionModel (its up path is dropped here if still present).
        config: LoRA, head, timestep range, latent rescaling, checkpointing.
        condition: the fixed text condition; default :func:`zero_condition`.
        alphas_cumprod: the noise schedule ``[num_train_timesteps]``; default: the base's.

    Only LoRA and head parameters require grad. The condition is stored as buffers
    (``condition_*``) and saved with :meth:`trainable_state_dict`.
    """

    def __init__(
        self,
        trunk: nn.Module,
        config: DiscriminatorConfig | None = None,
        condition: DiscriminatorCondition | None = None,
        alphas_cumprod: Tensor | None = None,
    ):
        super().__init__()
        self.config = config = config or DiscriminatorConfig()
        self.unet = prune_up_path(trunk)
        self.unet.requires_grad_(False)
        device = self.unet.conv_in.weight.device
        ucfg = dict(self.unet.config)
        self.lora_targets = lora_target_names(self.unet, config.lora_targets)
        if config.lora_rank > 0 and self.lora_targets:
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                target_modules=self.lora_targets,
                lora_dropout=0.0,
                init_lora_weights=True,  # B = 0: training starts from the pre-trained features
            )
            inject_adapter_in_model(lora, self.unet)
        for name, param in self.unet.named_parameters():
            param.requires_grad_("lora_" in name)
        self.head = PatchHead(
            ucfg["block_out_channels"][-1], config.head_hidden, config.head_groups
        )
        self.head.to(device=device)
        condition = condition or zero_condition(ucfg)
        self._check_condition(condition, ucfg)
        self.register_buffer("condition_context", condition.encoder_hidden_states.to(device))
        if condition.text_embeds is not None:
            self.register_buffer("condition_text_embeds", condition.text_embeds.to(device))
            self.register_buffer("condition_time_ids", condition.time_ids.to(device))
        else:
            self.condition_text_embeds = None
            self.condition_time_ids = None
        if alphas_cumprod is None:
            alphas_cumprod = _schedule_for(config.base)
        if config.t_max > alphas_cumprod.shape[0]:
            raise ValueError(
                f"t_max {config.t_max} exceeds the schedule's {alphas_cumprod.shape[0]} steps"
            )
        # A plain float32 CPU tensor, not a buffer: module.to(bf16) must not round the schedule.
        self.alphas_cumprod = alphas_cumprod.detach().float().cpu()
        self.set_gradient_checkpointing(config.gradient_checkpointing)

    @staticmethod
    def _check_condition(cond: DiscriminatorCondition, ucfg: dict) -> None:
        ctx = cond.encoder_hidden_states
        if ctx.ndim != 3 or ctx.shape[0] != 1 or ctx.shape[-1] != ucfg["cross_attention_dim"]:
            raise ValueError(
                f"condition context must be [1, L, {ucfg['cross_attention_dim']}], got {tuple(ctx.shape)}"
            )
        sdxl = ucfg.get("addition_embed_type") == "text_time"
        if sdxl and (cond.text_embeds is None or cond.time_ids is None):
            raise ValueError("an SDXL trunk needs a condition with text_embeds and time_ids")
        if sdxl:
            need = ucfg["projection_class_embeddings_input_dim"]
            got = (
                cond.text_embeds.shape[-1]
                + cond.time_ids.shape[-1] * ucfg["addition_time_embed_dim"]
            )
            if got != need:
                raise ValueError(
                    f"text_embeds {tuple(cond.text_embeds.shape)} + time_ids "
                    f"{tuple(cond.time_ids.shape)} do not give the add-embedding's {need} inputs"
                )

    # ---- construction

    @classmethod
    def from_config(
        cls,
        config: DiscriminatorConfig | None = None,
        *,
        condition: DiscriminatorCondition | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int | None = 0,
    ) -> DiffusionDiscriminator:
        """A discriminator with a randomly initialised trunk (tests, benchmarks, meta counting)."""
        config = config or DiscriminatorConfig()
        if seed is not None:
            torch.manual_seed(seed)
        trunk = build_trunk(config.base, device=device, dtype=dtype)
        return cls(trunk, config, condition).to(dtype=dtype)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        config: DiscriminatorConfig | None = None,
        *,
        condition: DiscriminatorCondition | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        variant: str | None = None,
        seed: int | None = 0,
    ) -> DiffusionDiscriminator:
        """Trunk from real SDXL-base (or SD2.1) weights (see :func:`load_trunk`), fresh LoRA
        and head (seeded). Load a trained state afterwards with :meth:`load_trainable`."""
        config = config or DiscriminatorConfig()
        trunk = load_trunk(source, device=device, dtype=dtype, variant=variant, config=config.base)
        if seed is not None:
            torch.manual_seed(seed)
        return cls(trunk, config, condition).to(dtype=dtype)

    # ---- options

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute trunk activations during backward (diffusers' per-block checkpointing;
        it is active in training mode)."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
        self.config.gradient_checkpointing = bool(enabled)

    # ---- forward

    def sample_timesteps(
        self,
        batch_size: int,
        device: str | torch.device | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``[B]`` integer timesteps ``~ U[t_min, t_max)`` (``generator`` on ``device``)."""
        device = device if device is not None else self.condition_context.device
        return torch.randint(
            self.config.t_min, self.config.t_max, (batch_size,), generator=generator, device=device
        )

    def noise_latents(
        self,
        latents: Tensor,
        timesteps: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``F(z, t) = sqrt(abar_t) s z + sqrt(1 - abar_t) eps`` with ``s = latent_rescale``.

        ``latents``: ``[B, 4, H, W]``; ``noise`` default: standard normal drawn with
        ``generator`` (which must live on ``latents.device``).
        """
        z = latents * self.config.latent_rescale if self.config.latent_rescale != 1.0 else latents
        if noise is None:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=torch.float32)
        abar = self.alphas_cumprod[timesteps.detach().long().cpu()]
        return add_noise(z, noise, abar.to(z.device))

    def logits(self, noisy_latents: Tensor, timesteps: Tensor) -> Tensor:
        """Trunk + head on already-noised latents: ``[B, 4, H, W]`` -> ``[B, 1, h, w]``."""
        dtype = self.unet.conv_in.weight.dtype
        b = noisy_latents.shape[0]
        ctx = self.condition_context.to(dtype).expand(b, -1, -1)
        text_embeds = time_ids = None
        if self.condition_text_embeds is not None:
            text_embeds = self.condition_text_embeds.to(dtype).expand(b, -1)
            time_ids = self.condition_time_ids.expand(b, -1)
        feats = trunk_forward(
            self.unet, noisy_latents.to(dtype), timesteps, ctx, text_embeds, time_ids
        )
        return self.head(feats)

    def forward(
        self,
        latents: Tensor,
        timesteps: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Patch logits for clean latents, noised at random (or given) timesteps.

        Args:
            latents: SD2.1-VAE latents ``[B, 4, H, W]`` (already multiplied by 0.18215).
            timesteps: ``[B]``; default ``~ U[t_min, t_max)`` per sample.
            noise: ``[B, 4, H, W]``; default standard normal.

        Returns:
            ``[B, 1, H / 4, W / 4]`` logits for SDXL (16 x 16 for a 64 x 64 latent),
            ``H / 8`` for SD2.1; positive = "real".
        """
        if timesteps is None:
            timesteps = self.sample_timesteps(latents.shape[0], latents.device, generator)
        timesteps = timesteps.to(latents.device)
        noisy = self.noise_latents(latents, timesteps, noise, generator)
        return self.logits(noisy, timesteps)

    # ---- state

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """LoRA + head + condition tensors (what a discriminator checkpoint holds)."""
        return {
            k: v.detach()
            for k, v in self.state_dict().items()
            if "lora_" in k or k.startswith(("head.", "condition_"))
        }

    def load_trainable_state_dict(self, state: dict[str, Tensor], source: str = "state") -> None:
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise WeightsFileError(
                source,
                "discriminator state does not match this model (different backbone, rank or "
                f"targets?): missing {missing[:3]}, unexpected {unexpected[:3]}",
            )
        wrong = [k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)]
        if wrong:
            raise WeightsFileError(source, f"shape mismatch for {wrong[:3]}")
        self.load_state_dict(state, strict=False)

    def save_trainable(self, path: str | Path) -> None:
        """Write LoRA + head + condition to ``.safetensors`` with the config in the header."""
        from safetensors.torch import save_file

        state = {k: v.contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": json.dumps(self.config.to_dict()),
        }
        save_file(state, str(path), metadata=meta)

    def load_trainable(self, path: str | Path) -> None:
        """Load what :meth:`save_trainable` wrote (checks format and shapes)."""
        meta = read_safetensors_metadata(path)
        if meta.get("format") != FORMAT_NAME:
            raise WeightsFileError(
                path, f"not a D3SR discriminator file (format {meta.get('format')!r})"
            )
        saved = DiscriminatorConfig.from_dict(json.loads(meta.get("config", "{}")))
        if (saved.lora_rank, saved.lora_alpha) != (self.config.lora_rank, self.config.lora_alpha):
            raise WeightsFileError(
                path,
                f"LoRA rank/alpha {saved.lora_rank}/{saved.lora_alpha} differ from this "
                f"model's {self.config.lora_rank}/{self.config.lora_alpha}",
            )
        state = read_state_dict(path, device=self.condition_context.device)
        self.load_trainable_state_dict(state, str(path))
