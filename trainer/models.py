"""The trainer's networks: the generator with peft LoRA (+ optional learnable prompt), EMA,
and conversion of the trained generator to the D3SR checkpoint format."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from d3sr_core.loading.checkpoint import D3SRCheckpoint
from d3sr_core.loading.files import WeightsFileError
from d3sr_core.models.generator import D3SRGenerator, GeneratorConfig
from d3sr_core.models.lora import LoraAdapter, find_lora_targets, split_peft_state_dict
from d3sr_core.models.schedule import alphas_cumprod_from_config

logger = logging.getLogger(__name__)
ADAPTER = "default"


def seed_for(*parts: int) -> int:
    """A 62-bit seed derived from integers (run seed, step, rank...), stable across runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 2)


class TrainableGenerator(nn.Module):
    """A :class:`D3SRGenerator` whose UNet carries a peft LoRA (only LoRA trains; VAE frozen).

    ``forward(lr_up)`` takes the bicubically upsampled LR in ``[-1, 1]`` and returns
    ``(image, latent)``: the decoded SR image (not clamped, so the loss keeps gradients at
    the range ends) and the SR latent the discriminator judges.

    Args:
        generator: a generator without merged adapters.
        learn_prompt: make the prompt embedding a trainable parameter.
    """

    def __init__(self, generator: D3SRGenerator, learn_prompt: bool = False) -> None:
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        self.generator = generator
        cfg = generator.config
        generator.requires_grad_(False)
        targets = find_lora_targets(generator.unet, cfg.lora_targets)
        if not targets:
            raise ValueError(f"no UNet module matches the LoRA targets {cfg.lora_targets}")
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            target_modules=targets,
            lora_dropout=0.0,
            init_lora_weights=True,  # B = 0: training starts from the base model's output
        )
        inject_adapter_in_model(lora, generator.unet, adapter_name=ADAPTER)
        for name, param in generator.unet.named_parameters():
            param.requires_grad_(".lora_" in name)
        self.prompt = (
            nn.Parameter(generator.prompt_embeds.detach().clone()) if learn_prompt else None
        )

    def prompt_embeds(self) -> Tensor:
        return self.prompt if self.prompt is not None else self.generator.prompt_embeds

    def encode(self, image: Tensor) -> Tensor:
        """Frozen VAE encoder (no autograd): ``[B, 3, H, W]`` in [-1, 1] -> scaled latent."""
        with torch.no_grad():
            return self.generator.encode(image)

    def denoise(self, latent: Tensor) -> Tensor:
        return self.generator.denoise(latent, self.prompt_embeds())

    def decode(self, latent: Tensor) -> Tensor:
        vae = self.generator.vae
        scaled = (latent / self.generator.config.scaling_factor).to(next(vae.parameters()).dtype)
        return vae.decode(scaled, return_dict=False)[0].float()

    def forward(self, lr_up: Tensor) -> tuple[Tensor, Tensor]:
        latent = self.denoise(self.encode(lr_up))
        return self.decode(latent), latent

    @torch.no_grad()
    def upscale(self, lr_up: Tensor) -> Tensor:
        """Inference output as the pipeline gives it: clamped to [-1, 1]."""
        return self(lr_up)[0].clamp(-1, 1)  # __call__: ZeRO-3 gathers parameters in its hooks

    # ---- state -------------------------------------------------------------------------
    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.trainable_named_parameters()}

    def load_trainable_state_dict(self, state: dict[str, Tensor], source: str = "state") -> None:
        own = dict(self.trainable_named_parameters())
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise WeightsFileError(
                source,
                "generator state does not match this model (rank, targets or learn_prompt "
                f"differ?): missing {missing[:3]}, unexpected {unexpected[:3]}",
            )
        with torch.no_grad():
            for name, param in own.items():
                if param.shape != state[name].shape:
                    raise WeightsFileError(
                        source,
                        f"{name}: shape {tuple(state[name].shape)}, expected {tuple(param.shape)}",
                    )
                param.copy_(state[name].to(param.device, param.dtype))

    def to_checkpoint(self, state: dict[str, Tensor] | None = None) -> D3SRCheckpoint:
        """The D3SR checkpoint of the current (or the given, e.g. EMA) trainable state."""
        state = state if state is not None else self.trainable_state_dict()
        unet_state = {
            k.removeprefix("generator.unet."): v.float().cpu()
            for k, v in state.items()
            if k.startswith("generator.unet.")
        }
        factors = split_peft_state_dict(unet_state, adapter_name=ADAPTER)
        cfg = self.generator.config
        prompt = state.get("prompt", self.generator.prompt_embeds)
        return D3SRCheckpoint(
            config=GeneratorConfig.from_dict(cfg.to_dict()),
            prompt_embeds=prompt.detach().float().cpu().clone(),
            adapters={"unet": LoraAdapter(factors, cfg.lora_alpha / cfg.lora_rank)},
        )

    def load_checkpoint_lora(self, ckpt: D3SRCheckpoint, source: str) -> None:
        """Start from a D3SR checkpoint's UNet LoRA (and prompt). Rank/alpha/targets must match."""
        cfg = self.generator.config
        if "vae" in ckpt.adapters or ckpt.adapters["unet"].replaced:
            raise WeightsFileError(
                source, "has VAE LoRA or replaced tensors (an OSEDiff import); cannot fine-tune it"
            )
        adapter = ckpt.adapters["unet"]
        if abs(adapter.scale - cfg.lora_alpha / cfg.lora_rank) > 1e-9:
            raise WeightsFileError(
                source,
                f"LoRA scale {adapter.scale} differs from model.lora_alpha / model.lora_rank = "
                f"{cfg.lora_alpha / cfg.lora_rank}",
            )
        state = {}
        for path, (down, up) in adapter.factors.items():
            state[f"generator.unet.{path}.lora_A.{ADAPTER}.weight"] = down
            state[f"generator.unet.{path}.lora_B.{ADAPTER}.weight"] = up
        if self.prompt is not None:
            state["prompt"] = ckpt.prompt_embeds
        else:
            self.generator.prompt_embeds.copy_(ckpt.prompt_embeds)
        self.load_trainable_state_dict(state, source)


def build_generator_model(
    base,
    prompt_embeds: Tensor,
    config: GeneratorConfig,
    learn_prompt: bool = False,
) -> TrainableGenerator:
    """``base`` is a :class:`~d3sr_core.loading.base.BaseModel` (its weights are used in place)."""
    context = getattr(base.unet.config, "cross_attention_dim", None)
    if context is not None and prompt_embeds.shape[-1] != context:
        raise ValueError(
            f"prompt embedding width {prompt_embeds.shape[-1]} does not match the UNet's context {context}"
        )
    config.prediction_type = base.prediction_type
    config.scaling_factor = float(getattr(base.vae.config, "scaling_factor", config.scaling_factor))
    generator = D3SRGenerator(
        base.unet,
        base.vae,
        prompt_embeds,
        alphas_cumprod_from_config(base.scheduler_config),
        config,
    )
    return TrainableGenerator(generator, learn_prompt)


class EMA:
    """Exponential moving average of a set of parameters (kept in float32).

    ``decay`` warms up as ``min(decay, (1 + n) / (10 + n))`` so early averages are not
    dominated by the initial weights.
    """

    def __init__(self, named_params: dict[str, Tensor], decay: float) -> None:
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in named_params.items()}

    @torch.no_grad()
    def update(self, named_params: dict[str, Tensor]) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, v in named_params.items():
            self.shadow[k].lerp_(v.detach().float(), 1.0 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}

    @contextlib.contextmanager
    def swapped_into(self, model: TrainableGenerator, gathered=None):
        """Temporarily use the EMA weights in ``model`` (validation, export). ``gathered``:
        ``gathered(params, modify=True)`` context that makes sharded parameters writable
        (ZeRO-3, see trainer/distributed_backend.py); every process must then call this."""
        gathered = gathered or (lambda params, modify: contextlib.nullcontext())
        params = [p for _, p in model.trainable_named_parameters()]
        with gathered(params, modify=True):
            backup = {k: v.clone() for k, v in model.trainable_state_dict().items()}
            model.load_trainable_state_dict(self.shadow, "EMA")
        try:
            yield model
        finally:
            with gathered(params, modify=True):
                model.load_trainable_state_dict(backup, "backup")


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Turn off ``requires_grad`` of a module's trainable parameters for a block (the
    discriminator during the generator's step), restoring it afterwards."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)
