"""Model definitions: generator, LoRA merging, noise schedule, bundled configs."""

from .generator import D3SRGenerator, GeneratorConfig
from .lora import DEFAULT_UNET_LORA_TARGETS, LoraAdapter

__all__ = ["D3SRGenerator", "GeneratorConfig", "LoraAdapter", "DEFAULT_UNET_LORA_TARGETS"]
