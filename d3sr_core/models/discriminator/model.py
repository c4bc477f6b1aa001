"""``DiffusionDiscriminator``: trunk + LoRA + patch head, its config and its file format."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ...loading.files import (
    WeightsFileError,
    read_safetensors_metadata,
    read_state_dict,
)
from ..configs import bundled_config
from ..lora import DEFAULT_UNET_LORA_TARGETS
from ..schedule import add_noise, alphas_cumprod, alphas_cumprod_from_config
from .condition import DiscriminatorCondition, zero_condition
from .trunk import build_trunk, load_trunk, lora_target_names, prune_up_path, trunk_forward

FORMAT_NAME = "d3sr-discriminator"
FORMAT_VERSION = "1"

# SD2.1-VAE latents scaled by 0.18215 -> the SDXL-VAE range (scale 0.13025). Off by default:
# the paper describes no rescaling (the LoRA is expected to absorb the mismatch).
SDXL_LATENT_RESCALE = 0.13025 / 0.18215


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
