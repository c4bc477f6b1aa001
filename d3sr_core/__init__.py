"""D3SR engine: one-step diffusion super-resolution.

Typical use::

    from d3sr_core import load_generator, D3SRPipeline, UpscaleOptions
    generator = load_generator("d3sr.safetensors", "v2-1_512-ema-pruned.safetensors")
    image = D3SRPipeline(generator).upscale(pil_image, UpscaleOptions(scale=4))
"""

from .inference.options import UpscaleOptions, output_size
from .inference.pipeline import D3SRPipeline, UpscaleCancelled
from .loading.checkpoint import D3SRCheckpoint, load_checkpoint, save_checkpoint
from .loading.files import WeightsFileError
from .loading.generator import build_generator, load_generator, read_weights
from .models.generator import D3SRGenerator, GeneratorConfig

__version__ = "0.1.0"

__all__ = [
    "D3SRCheckpoint",
    "D3SRGenerator",
    "D3SRPipeline",
    "GeneratorConfig",
    "UpscaleCancelled",
    "UpscaleOptions",
    "WeightsFileError",
    "build_generator",
    "load_checkpoint",
    "load_generator",
    "output_size",
    "read_weights",
    "save_checkpoint",
]
