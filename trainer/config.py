"""Trainer configuration: nested dataclasses, YAML files and ``--section.field VALUE`` overrides.

Every field carries its help text (``metadata["help"]``); ``train.py --help`` prints them all,
so the config reference and the code cannot drift apart.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from d3sr_core.data.degradation import DegradationConfig
from d3sr_core.models.lora import DEFAULT_UNET_LORA_TARGETS


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field."""


def _f(default: Any, help: str, **kw) -> Any:  # noqa: A002 - mirrors argparse's name
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    base: str | None = _f(
        None,
        "SD2.1-base model: diffusers folder, single .safetensors/.ckpt file, or hub id "
        "(hub ids need allow_download). Required.",
    )
    vae: str | None = _f(None, "optional replacement VAE (file or diffusers vae folder)")
    allow_download: bool = _f(False, "allow fetching hub ids / VGG16 / DISTS weights")
    prompt_embeds: str | None = _f(
        None,
        "file with the fixed condition [1, 77, 1024] (e.g. a D3SR checkpoint); default: the "
        "empty prompt encoded by the base's own text encoder",
    )
    learn_prompt: bool = _f(False, "train the prompt embedding too (saved in the export)")
    init_from: str | None = _f(
        None,
        "start from a D3SR .safetensors (its LoRA, prompt and timestep; rank/alpha/targets "
        "must match the lora_* fields)",
    )
    timestep: int = _f(399, "the generator's fixed UNet timestep T_L (0..999)")
    lora_rank: int = _f(16, "generator UNet LoRA rank")
    lora_alpha: float = _f(16.0, "generator UNet LoRA alpha (scale = alpha / rank)")
    lora_targets: list = _f(list(DEFAULT_UNET_LORA_TARGETS), "UNet module names LoRA adapts")


@dataclass
class DiscriminatorSection:
    base: str = _f(
        "sdxl-base",
        "backbone config: sdxl-base (paper), sd21-base (ablation), sdxl-tiny / sd21-tiny (tests)",
    )
    weights: str | None = _f(
        None,
        "pre-trained backbone: SDXL-base diffusers folder or single file (required unless the "
        "base is a *-tiny test config)",
    )
    lora_rank: int = _f(16, "discriminator trunk LoRA rank (0 = head only)")
    lora_alpha: float = _f(16.0, "discriminator trunk LoRA alpha")
    head_hidden: int = _f(256, "patch head width")
    head_groups: int = _f(32, "patch head GroupNorm groups")
    latent_rescale: float = _f(1.0, "multiply SD2.1 latents before noising (0.7151 = SDXL range)")
    t_min: int = _f(0, "discriminator timesteps are drawn from [t_min, t_max)")
    t_max: int = _f(1000, "see t_min")
    gan_loss: str = _f("non_saturating", "non_saturating (paper) or hinge")
    r1_gamma: float = _f(0.0, "approximate R1 penalty weight (0 = off)")
    r1_sigma: float = _f(0.1, "latent perturbation std of the approximate R1 penalty")


@dataclass
class LossConfig:
    mse_weight: float = _f(1.0, "weight of the pixel MSE")
    ea_dists_weight: float = _f(1.0, "lambda2: weight of EA-DISTS")
    adv_weight: float = _f(5e-3, "lambda1: weight of the adversarial generator loss")
    edge_mode: str = _f("rgb", "EA-DISTS Sobel on rgb channels or gray (luma)")
    edge_weight: float = _f(1.0, "weight of the edge term inside EA-DISTS")
    vgg_weights: str | None = _f(
        None, "torchvision vgg16-397923af.pth (default: the torch hub cache)"
    )
    dists_weights: str | None = _f(
        None, "DISTS alpha/beta weights.pt (default: pip install dists-pytorch==0.1)"
    )
    random_dists: bool = _f(
        False, "use a randomly initialised VGG/DISTS (smoke tests only: not a perceptual loss)"
    )


@dataclass
class DataConfig:
    hr_dir: str | None = _f(None, "folder of HR training images (recursive). Required.")
    lr_dir: str | None = _f(
        None, "paired LR folder (same relative names); unset = LR made by the degradation"
    )
    crop_size: int = _f(512, "HR crop size (multiple of 8 * scale)")
    scale: int = _f(4, "SR factor")
    small: str = _f("skip", "images smaller than the crop: skip or pad")
    flip: bool = _f(True, "random horizontal flips")
    rotate: bool = _f(False, "random vertical flips + 90-degree rotations")
    workers: int = _f(4, "data-loader worker processes (0 = in the training process)")
    degrade_on: str = _f(
        "workers", "where LR images are made: workers (CPU, per image) or device (batched)"
    )
    degradation: dict = _f(
        {},
        "Real-ESRGAN degradation overrides (see d3sr_core.data.DegradationConfig), e.g. "
        "{noise_range: [1, 20], stages: [blur1, resize1, ...]}",
    )
    val_hr_dir: str | None = _f(None, "held-out HR folder for validation (unset = none)")
    val_lr_dir: str | None = _f(
        None, "paired LR folder for validation; unset = LR degraded with a fixed seed"
    )
    val_crop: int = _f(512, "validation centre crop of the HR image (0 = whole image)")
    val_max_images: int = _f(8, "validate on at most this many images")


@dataclass
class OptimConfig:
    lr_g: float = _f(5e-5, "generator AdamW learning rate")
    lr_d: float = _f(5e-5, "discriminator AdamW learning rate")
    betas: list = _f([0.9, 0.999], "AdamW betas")
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "max gradient norm per network (0 = off)")
    scheduler: str = _f("constant", "LR schedule: constant, constant_with_warmup, linear or cosine")
    warmup_steps: int = _f(0, "LR warm-up steps")


@dataclass
class TrainSection:
    output_dir: str = _f("runs/d3sr", "run folder: checkpoints/, logs/, val/, export")
    seed: int = _f(0, "seed of data order, crops, degradations, timesteps and noise")
    max_steps: int = _f(100_000, "optimizer steps to train")
    batch_size: int = _f(8, "images per process per micro-step")
    grad_accum: int = _f(1, "micro-steps per optimizer step")
    mixed_precision: str = _f("no", "no, bf16 or fp16 (frozen weights stored in that dtype)")
    grad_checkpointing: bool = _f(False, "recompute UNet, VAE-decoder and trunk activations")
    ema_decay: float = _f(0.0, "EMA of the generator LoRA (0 = off, e.g. 0.999)")
    log_every: int = _f(10, "log losses every N steps")
    val_every: int = _f(1000, "validate every N steps (0 = only at the end)")
    ckpt_every: int = _f(1000, "write a training checkpoint every N steps")
    keep_last: int = _f(3, "keep the N newest checkpoints")
    tensorboard: bool = _f(True, "log to TensorBoard (if installed)")
    threads: int = _f(0, "torch CPU threads per process (0 = torch's default)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    discriminator: DiscriminatorSection = field(default_factory=DiscriminatorSection)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict:
        return asdict(self)

    def degradation(self) -> DegradationConfig:
        try:
            return DegradationConfig.from_dict({"scale": self.data.scale, **self.data.degradation})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"data.degradation: {err}") from None

    def validate(self) -> None:
        """Checks that need no files: choices, ranges, required fields."""
        c = self
        if not c.model.base:
            raise ConfigError("model.base is required (SD2.1-base folder, single file or hub id)")
        if not c.data.hr_dir:
            raise ConfigError("data.hr_dir is required (a folder of HR training images)")
        choices = {
            "data.small": (c.data.small, ("skip", "pad")),
            "data.degrade_on": (c.data.degrade_on, ("workers", "device")),
            "train.mixed_precision": (c.train.mixed_precision, ("no", "bf16", "fp16")),
            "discriminator.gan_loss": (c.discriminator.gan_loss, ("non_saturating", "hinge")),
            "loss.edge_mode": (c.loss.edge_mode, ("rgb", "gray")),
            "optim.scheduler": (
                c.optim.scheduler,
                ("constant", "constant_with_warmup", "linear", "cosine"),
            ),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")
        multiple = 8 * c.data.scale
        if c.data.crop_size <= 0 or c.data.crop_size % multiple:
            raise ConfigError(
                f"data.crop_size {c.data.crop_size} must be a positive multiple of 8 x scale = {multiple}"
            )
        if c.data.val_crop % multiple:
            raise ConfigError(f"data.val_crop must be 0 or a multiple of {multiple}")
        positive = {
            "train.max_steps": c.train.max_steps,
            "train.batch_size": c.train.batch_size,
            "train.grad_accum": c.train.grad_accum,
            "train.ckpt_every": c.train.ckpt_every,
            "train.keep_last": c.train.keep_last,
            "train.log_every": c.train.log_every,
            "model.lora_rank": c.model.lora_rank,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if not 0 <= c.model.timestep < 1000:
            raise ConfigError(f"model.timestep must be in 0..999, got {c.model.timestep}")
        if not 0 <= c.train.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {c.train.ema_decay}")
        disc = c.discriminator
        if disc.weights is None and not disc.base.endswith("-tiny"):
            raise ConfigError(
                f"discriminator.weights is required for the {disc.base!r} backbone (an SDXL-base "
                "diffusers folder or single file); only *-tiny test backbones may start random"
            )
        self.degradation()


SECTIONS = {f.name: f.type for f in fields(Config)}


def _coerce(value: Any, current: Any, name: str) -> Any:
    """Check a value's type against the field's default (YAML gives ints, floats, lists...)."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, float) and isinstance(value, str):
        try:  # PyYAML reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} expects a number, got {value!r}") from None
    if isinstance(current, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if type(current) in (int, float, str, list, dict) and not isinstance(value, type(current)):
        raise ConfigError(f"{name} expects a {type(current).__name__}, got {value!r}")
    return value


def apply(config: Config, data: dict, source: str) -> None:
    """Set fields from a nested dict (a YAML file's content)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r}; known: {list(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        obj = getattr(config, section)
        names = {f.name for f in fields(obj)}
        for key, value in values.items():
            if key not in names:
                raise ConfigError(
                    f"{source}: unknown field {section}.{key}; known: {sorted(names)}"
                )
            setattr(obj, key, _coerce(value, getattr(obj, key), f"{section}.{key}"))


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({err})") from None
    return data


def add_field_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--section.field VALUE`` option per config field, with the field's help."""
    defaults = Config()
    for section in fields(Config):
        group = parser.add_argument_group(f"{section.name} (YAML section '{section.name}:')")
        obj = getattr(defaults, section.name)
        for f in fields(obj):
            default = getattr(obj, f.name)
            group.add_argument(
                f"--{section.name}.{f.name}",
                dest=f"cfg__{section.name}__{f.name}",
                metavar=_metavar(default),
                default=argparse.SUPPRESS,
                help=f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%"),
            )


def _metavar(default: Any) -> str:
    if isinstance(default, bool):
        return "BOOL"
    if isinstance(default, int):
        return "INT"
    if isinstance(default, float):
        return "FLOAT"
    if isinstance(default, list):
        return "[A, B, ...]"
    if isinstance(default, dict):
        return "{K: V, ...}"
    return "VALUE"


def overrides_from_args(args: argparse.Namespace) -> dict:
    """``--section.field`` options given on the command line, YAML-parsed, as a nested dict."""
    import yaml

    out: dict = {}
    for key, text in vars(args).items():
        if not key.startswith("cfg__"):
            continue
        _, section, name = key.split("__", 2)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--{section}.{name}: cannot parse {text!r} ({err})") from None
        out.setdefault(section, {})[name] = value
    return out


def build_config(config_file: str | Path | None, overrides: dict) -> Config:
    config = Config()
    if config_file is not None:
        apply(config, load_yaml(config_file), str(config_file))
    apply(config, overrides, "command line")
    config.validate()
    return config


def config_from_dict(data: dict) -> Config:
    config = Config()
    apply(config, data, "saved config")
    return config


__all__ = [
    "Config",
    "ConfigError",
    "add_field_arguments",
    "build_config",
    "config_from_dict",
    "overrides_from_args",
]
