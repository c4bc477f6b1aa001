"""The D3SR generator: SD2.1 VAE encoder -> UNet at one fixed timestep -> VAE decoder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from .lora import DEFAULT_UNET_LORA_TARGETS, LoraAdapter, MergedLora
from .schedule import PREDICTION_TYPES, predict_x0


@dataclass
class GeneratorConfig:
    """Everything besides weights that defines a D3SR generator; stored in each checkpoint.

    Attributes:
        base: which base model the LoRA belongs to (``"sd21-base"``).
        timestep: the fixed UNet timestep ``T_L`` (0..num_train_timesteps-1).
        prediction_type: the base UNet's parameterisation (``epsilon`` or ``v_prediction``).
        scaling_factor: VAE latent scale (0.18215 for SD2.x).
        latent_mode: ``"mode"`` (deterministic, default) or ``"sample"`` (posterior sample, seeded).
        lora_rank, lora_alpha, lora_targets: the UNet LoRA the checkpoint was trained with.
    """

    base: str = "sd21-base"
    timestep: int = 399
    prediction_type: str = "epsilon"
    scaling_factor: float = 0.18215
    latent_mode: str = "mode"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_UNET_LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.latent_mode not in ("mode", "sample"):
            raise ValueError(f"latent_mode must be 'mode' or 'sample', got {self.latent_mode!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GeneratorConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class D3SRGenerator(nn.Module):
    """One-step SR generator. Images are ``[B, 3, H, W]`` in ``[-1, 1]``, H and W multiples of 8.

    The three stages are separate methods so callers (tiling, the latent node, the trainer)
    can run them independently: :meth:`encode`, :meth:`denoise` and :meth:`decode`.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (SD2.1-base layout).
        vae: a diffusers ``AutoencoderKL``.
        prompt_embeds: the fixed condition, ``[1, 77, cross_attention_dim]``.
        alphas_cumprod: the base model's schedule, ``[num_train_timesteps]``.
        config: timestep, prediction type, scaling factor, latent mode.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        prompt_embeds: Tensor,
        alphas_cumprod: Tensor,
        config: GeneratorConfig | None = None,
    ):
        super().__init__()
        self.config = config or GeneratorConfig()
        if not 0 <= self.config.timestep < alphas_cumprod.shape[0]:
            raise ValueError(
                f"timestep {self.config.timestep} outside the schedule's 0..{alphas_cumprod.shape[0] - 1}"
            )
        self.unet = unet
        self.vae = vae
        self.register_buffer("prompt_embeds", prompt_embeds.detach().clone(), persistent=False)
        # A plain float, not a buffer: ``.to(bfloat16)`` must never round the schedule.
        self.alpha_bar = float(alphas_cumprod[self.config.timestep])
        self._merged: dict[str, MergedLora] = {}

    # ---- adapters -----------------------------------------------------------------------
    def merge_adapters(
        self, unet: LoraAdapter | None = None, vae: LoraAdapter | None = None, strength: float = 1.0
    ) -> None:
        """Merge LoRA deltas into the UNet and/or VAE weights (plain torch, no peft)."""
        for name, adapter in (("unet", unet), ("vae", vae)):
            if adapter is None:
                continue
            if name in self._merged:
                raise RuntimeError(
                    f"an adapter is already merged into the {name}; load a fresh base to change it"
                )
            self._merged[name] = MergedLora(getattr(self, name), adapter, strength)

    @property
    def strength(self) -> float:
        """Current LoRA strength (1.0 when no adapter is merged)."""
        return next(iter(self._merged.values())).strength if self._merged else 1.0

    def set_strength(self, strength: float) -> None:
        """0 = base model, 1 = trained, >1 extrapolates. Changes weights in place, no copy."""
        for merged in self._merged.values():
            merged.set_strength(strength)

    def adapters(self) -> dict[str, LoraAdapter]:
        return {name: merged.adapter for name, merged in self._merged.items()}

    def set_prompt_embeds(self, prompt_embeds: Tensor) -> Tensor:
        """Replace the condition the UNet sees (e.g. for one run); returns the previous one.

        Args:
            prompt_embeds: ``[1, N, C]`` (or ``[N, C]``) finite floats, ``C`` = the UNet's
                ``cross_attention_dim`` (1024 for SD2.x); any token count ``N`` (77 per CLIP
                chunk). Stored on the device and in the dtype of the current one.

        Raises:
            ValueError: wrong type, shape, width or non-finite values (nothing is changed).
        """
        if not isinstance(prompt_embeds, Tensor):
            raise ValueError(
                f"prompt_embeds must be a torch.Tensor [1, N, C], got {type(prompt_embeds).__name__}"
            )
        embeds = prompt_embeds.unsqueeze(0) if prompt_embeds.ndim == 2 else prompt_embeds
        width = getattr(getattr(self.unet, "config", None), "cross_attention_dim", None)
        width = width if isinstance(width, int) else self.prompt_embeds.shape[-1]
        if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[1] == 0:
            raise ValueError(
                f"prompt_embeds must have shape [1, N, {width}], got {tuple(prompt_embeds.shape)}"
            )
        if embeds.shape[-1] != width:
            raise ValueError(
                f"prompt_embeds width {embeds.shape[-1]} does not match the UNet's context {width} "
                "(SD2.x text encoders give 1024)"
            )
        if not embeds.is_floating_point() or not torch.isfinite(embeds).all():
            raise ValueError("prompt_embeds must hold finite floating-point values")
        previous = self.prompt_embeds
        self.prompt_embeds = embeds.detach().to(device=previous.device, dtype=previous.dtype)
        return previous

    # ---- the three stages ---------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> scaled latent ``[B, 4, H/8, W/8]`` (float32)."""
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(image.to(vae_dtype)).latent_dist
        if self.config.latent_mode == "sample":
            noise = torch.randn(
                dist.mean.shape, generator=generator, device=dist.mean.device, dtype=dist.mean.dtype
            )
            latent = dist.mean + dist.std * noise
        else:
            latent = dist.mode()
        return latent.float() * self.config.scaling_factor

    def predict(self, latent: Tensor, prompt_embeds: Tensor | None = None) -> Tensor:
        """The UNet's raw output at the fixed timestep (epsilon or v), float32.

        Args:
            latent: scaled latent ``[B, 4, h, w]``.
            prompt_embeds: the condition ``[1, N, C]`` for this call instead of the stored
                one (e.g. a trainable prompt: autograd flows through it); ``None`` = stored.
        """
        b = latent.shape[0]
        embeds = self.prompt_embeds if prompt_embeds is None else prompt_embeds
        cond = embeds.to(dtype=self.dtype).expand(b, -1, -1)
        t = torch.full((b,), self.config.timestep, device=latent.device, dtype=torch.long)
        out = self.unet(latent.to(self.dtype), t, encoder_hidden_states=cond, return_dict=False)[0]
        return out.float()

    def to_x0(self, latent: Tensor, model_output: Tensor) -> Tensor:
        """Closed-form clean latent from a :meth:`predict` output (float32)."""
        return predict_x0(latent, model_output, self.alpha_bar, self.config.prediction_type)

    def denoise(self, latent: Tensor, prompt_embeds: Tensor | None = None) -> Tensor:
        """Scaled LR latent -> scaled SR latent (one UNet evaluation); ``prompt_embeds`` as
        in :meth:`predict`."""
        return self.to_x0(latent, self.predict(latent, prompt_embeds))

    def decode(self, latent: Tensor) -> Tensor:
        """Scaled latent -> image ``[B, 3, 8h, 8w]`` in [-1, 1] (clamped, float32)."""
        vae_dtype = next(self.vae.parameters()).dtype
        image = self.vae.decode(
            (latent / self.config.scaling_factor).to(vae_dtype), return_dict=False
        )[0]
        return image.float().clamp(-1.0, 1.0)

    def forward(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.decode(self.denoise(self.encode(image, generator)))
