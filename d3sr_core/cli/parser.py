"""The ``d3sr`` argument parser: every command, option, default and help text."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .common import OUTPUT_FORMATS
from .upscale import cmd_upscale
from .weights import cmd_convert, cmd_info


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


# The engine's defaults (UpscaleOptions), spelled out so `--help` needs no torch import;
# tests/test_cli.py checks they agree with UpscaleOptions().
ENGINE_DEFAULTS = {
    "tile_size": "auto",
    "tile_overlap": 256,
    "vae_tile_size": "auto",
    "vae_attention_window": 512,
    "unet_attention_window": 512,
    "color_fix": "wavelet",
    "max_output_pixels": 256 * 1024 * 1024,
}


def _tile(text: str) -> int | str:
    if text.lower() == "auto":
        return "auto"
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto', 0 (no tiling) or a size, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d3sr",
        description="D3SR: one-step diffusion image super-resolution (SD2.1-base + LoRA).",
        epilog="Weights are looked up automatically (see `d3sr upscale --help`); "
        "`d3sr info FILE` says what a weights file is.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = sub.add_parser(
        "upscale",
        help="upscale images",
        description="Upscale image files, folders or glob patterns.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_UPSCALE_EPILOG,
    )
    up.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns"
    )
    up.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        help="output folder (created), or an output file name when there is one input file",
    )
    io = up.add_argument_group("files")
    io.add_argument(
        "-r", "--recursive", action="store_true", help="descend into sub-folders (and ** in globs)"
    )
    io.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default=None,
        help="output format (default png, or the -o file's format; 'same' keeps each input's)",
    )
    io.add_argument(
        "--suffix", default="", help="appended to each output name, e.g. _x4 (default none)"
    )
    io.add_argument(
        "--quality", type=int, default=95, help="JPEG/WebP quality, 0..100 (default 95)"
    )
    io.add_argument("--skip-existing", action="store_true", help="skip inputs whose output exists")
    opts = up.add_argument_group("upscaling")
    opts.add_argument(
        "-s", "--scale", type=float, default=4.0, help="output/input size, > 1 (default 4)"
    )
    opts.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="LoRA strength >= 0: 0 = base model, 1 = as trained (default), >1 extrapolates",
    )
    opts.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed, 0..2^64-1 (for checkpoints that sample the latent; default none)",
    )
    opts.add_argument(
        "--color-fix",
        choices=("none", "adain", "wavelet"),
        default=None,
        help=f"match the output's colours to the input (default {ENGINE_DEFAULTS['color_fix']})",
    )
    opts.add_argument(
        "--max-output-mp",
        type=_positive_float,
        default=None,
        help="refuse images whose output would exceed this many megapixels "
        f"(default {ENGINE_DEFAULTS['max_output_pixels'] / 1e6:.0f})",
    )
    perf = up.add_argument_group("device and memory")
    perf.add_argument(
        "--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="default auto"
    )
    perf.add_argument(
        "--precision",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="compute precision (default auto: bf16 on CPUs that support it, else fp32; "
        "fp16/bf16 on GPUs)",
    )
    perf.add_argument(
        "--tile",
        type=_tile,
        default=None,
        metavar="N|auto",
        help="UNet tile size in output pixels, a multiple of 8 >= 64 "
        f"(0 = no tiling; default {ENGINE_DEFAULTS['tile_size']})",
    )
    perf.add_argument(
        "--tile-overlap",
        type=int,
        default=None,
        metavar="N",
        help=f"overlap between UNet tiles, output pixels >= 0 (default {ENGINE_DEFAULTS['tile_overlap']})",
    )
    perf.add_argument(
        "--vae-tile",
        type=_tile,
        default=None,
        metavar="N|auto",
        help="VAE tile size in pixels, >= 32 "
        f"(0 = no tiling; default {ENGINE_DEFAULTS['vae_tile_size']})",
    )
    perf.add_argument(
        "--vae-attention-window",
        type=int,
        default=None,
        metavar="N",
        help="VAE attention is global up to N pixels per side, windowed beyond "
        f"(linear cost; default {ENGINE_DEFAULTS['vae_attention_window']} = the training crop, "
        "as for the UNet; 0 = always global)",
    )
    perf.add_argument(
        "--unet-attention-window",
        type=int,
        default=None,
        metavar="N",
        help="UNet self-attention is global over UNet tiles up to N pixels per side and "
        "windowed beyond (each position sees the N px around it: linear cost; default "
        f"{ENGINE_DEFAULTS['unet_attention_window']} = the training crop; 0 = always global)",
    )
    perf.add_argument(
        "--memory-budget",
        type=_positive_float,
        default=None,
        metavar="GB",
        help="memory the automatic tile sizes may use (default: from the device)",
    )
    _weights_arguments(up, with_download=True)
    up.add_argument(
        "--prompt-embeds",
        type=Path,
        default=None,
        metavar="FILE",
        help="a .safetensors holding 'prompt_embeds' [1, N, C] (e.g. another D3SR checkpoint, or a "
        "saved text-encoder output) used instead of the weights' own condition; OSEDiff weights "
        "then need no text encoder in the base",
    )
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")
    up.set_defaults(func=cmd_upscale)

    info = sub.add_parser(
        "info",
        help="say what a weights file or folder is",
        description="Describe weights: D3SR checkpoint, OSEDiff pickle, SD single file (family), "
        "VAE or diffusers folder; anything else is listed by its keys.",
    )
    info.add_argument("files", nargs="+", metavar="FILE", type=Path)
    info.add_argument(
        "--json", action="store_true", help="print JSON (one object per file, in a list)"
    )
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser(
        "convert",
        help="convert OSEDiff's osediff.pkl into a D3SR .safetensors",
        description="Convert OSEDiff weights into a D3SR checkpoint. The fixed prompt embedding is "
        "computed from the SD2.1 base's text encoder (--base, or found like `upscale` finds it) "
        "or read from --prompt-embeds.",
    )
    conv.add_argument("source", type=Path, metavar="OSEDIFF_PKL")
    conv.add_argument(
        "-o", "--output", type=Path, default=None, help="default: beside the input, .safetensors"
    )
    conv.add_argument(
        "--base",
        default=None,
        help="SD2.1-base diffusers folder or single file (for its text encoder)",
    )
    conv.add_argument(
        "--prompt-embeds",
        type=Path,
        default=None,
        metavar="FILE",
        help="a .safetensors holding 'prompt_embeds' [1, 77, C] (e.g. another D3SR checkpoint) instead of --base",
    )
    conv.add_argument("-q", "--quiet", action="store_true")
    conv.set_defaults(func=cmd_convert)

    from ..evaluate import add_eval_parser

    add_eval_parser(sub)
    return parser


_UPSCALE_EPILOG = """\
weights (when --weights / --base are not given, searched in this order):
  $D3SR_WEIGHTS, $D3SR_BASE, $D3SR_VAE
  $D3SR_MODELS_DIR, ~/.cache/d3sr, ./models           (and their d3sr/, checkpoints/ ... sub-folders)
  ComfyUI:  models/d3sr, models/upscale_models, models/checkpoints, models/vae
            under $COMFYUI_PATH, ~/ComfyUI, ...
  A1111/Forge: models/D3SR, models/Stable-diffusion, models/VAE
            under $A1111_PATH, $WEBUI_PATH, ~/stable-diffusion-webui, ...
  weights = any D3SR .safetensors, else osediff.pkl (converted once, cached beside it);
  base = v2-1_512-ema-pruned.safetensors (or .ckpt, nonema, sd21-base*) or a
         stable-diffusion-2-1-base/ diffusers folder.
  --download fetches what is missing (SD2.1-base from the Hugging Face hub, osediff.pkl
  from GitHub) into $D3SR_MODELS_DIR or ~/.cache/d3sr.

examples:
  d3sr upscale photo.jpg -o out/
  d3sr upscale photos/ -o out/ --format same --skip-existing
  d3sr upscale "scans/**/*.tif" -r -o out/ --tile 512 --precision bf16
  d3sr upscale small.png -o big.png --scale 2 --color-fix wavelet
"""


def _weights_arguments(parser: argparse.ArgumentParser, with_download: bool) -> None:
    group = parser.add_argument_group("weights")
    group.add_argument("--weights", default=None, help="D3SR .safetensors or OSEDiff osediff.pkl")
    group.add_argument(
        "--base",
        default=None,
        help="SD2.1-base: diffusers folder, single .safetensors/.ckpt, or a hub id (with --download)",
    )
    group.add_argument(
        "--vae", default=None, help="replacement VAE (single file or diffusers folder)"
    )
    group.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="D3SR's models folder (searched first, and where downloads go); default $D3SR_MODELS_DIR or ~/.cache/d3sr",
    )
    if with_download:
        from ..loading.locate import OSEDIFF_URL

        group.add_argument(
            "--download",
            action="store_true",
            help="download the missing base (Hugging Face hub) and weights (--weights-url)",
        )
        group.add_argument(
            "--weights-url",
            default=OSEDIFF_URL,
            help="where --download gets weights (default: OSEDiff's osediff.pkl)",
        )
        group.add_argument(
            "--base-repo",
            default=None,
            help="hub id --download gets the base from (default stabilityai/stable-diffusion-2-1-base)",
        )


def _version() -> str:
    from .. import __version__

    return __version__
