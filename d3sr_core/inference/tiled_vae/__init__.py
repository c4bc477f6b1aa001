"""Tiled VAE encode/decode whose GroupNorm statistics are those of the whole image.

Why
---
An SD VAE run on independent tiles normalises every tile with its own GroupNorm statistics:
tiles then differ in brightness and colour and leave seams. The "Tiled VAE" of
multidiffusion-upscaler (reference/peers.md 1.7) fixes this by running all tiles in lock-step
and combining the per-tile GroupNorm statistics; it parks every tile's activations between
GroupNorms, i.e. it holds the whole image's activations of every layer (tens of GB at 16 MP).

How
---
The VAE is flattened into a short program of ops on a small stack of feature maps (a residual
block pushes its input, runs its branch, then adds the two). All ops are local (convolutions,
nearest upsampling, pointwise maps) except at two kinds of *sync points*:

* a GroupNorm needs the mean/variance of its input over the whole image;
* the mid-block self-attention attends over every position of the image.

The program runs in *passes*, one per sync point. A pass computes the stack just before its
sync point tile by tile, starting from the latest *checkpoint* (a whole-image state kept in
memory; initially the input), and accumulates per-group counts, means and squared deviations
over each tile's core, which are merged (Chan's parallel formula, float64) into exact
whole-image statistics. Every tile is computed *region-exactly*: it is cropped from the
checkpoint with exactly the halo the convolutions between checkpoint and sync point need,
convolutions run unpadded, and zeros are padded only where a region touches the image border.
Each tile's values are therefore those of the untiled network (up to float summation order),
so tiled output matches untiled output and carries no seam.

A pass may also keep its result as the next checkpoint. That costs one whole-image tensor at
that resolution; not keeping it means the next pass recomputes from the older checkpoint.
:func:`plan_checkpoints` chooses which to keep (a small dynamic programme: the least
recomputation such that every kept state fits the budget next to the checkpoint it is
computed from and a minimal tile working set; tiles then get what is left): low-resolution
states are small and kept, and full-resolution ones that do not fit the budget are written
to an anonymous temporary file tile by tile and read back region by region (:mod:`.spill`;
positional reads and writes, not ``mmap``, so they never count in resident memory; around
the page cache where possible, on I/O threads that overlap the computation), so
peak memory is bounded by the tile and the budget, not by the image. The planner weighs
disk traffic against recomputation (recomputing a 4096x4096 decoder's full-resolution
states from older checkpoints cost 6x its work; spilling them costs a few memory copies per
element). With a generous budget nothing is spilled or recomputed and the cost equals the
untiled network's plus thin halos. Without spilling (``spill=False``) the states that do not
fit are recomputed, and for an fp32 VAE the resolutions whose states do not fit are stored
in bfloat16 when that saves recomputation (``compact_checkpoints``; ~70 dB from the exact
output).

Attention runs on a whole-image checkpoint (it has latent resolution): keys and values are
computed for the whole image in chunks, queries in blocks, through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on
CUDA and CPU; blocks bound the math kernel's score matrix on MPS). It is global, exactly as
in diffusers, for latents up to ``attention_window`` positions per side; beyond, each query
block attends to the window around it (:func:`attention_spans`), which keeps the cost linear
in pixels (global attention over a 256x256 latent alone takes ~45 s on 2 CPU cores).

The same program also runs untiled (:func:`run_whole`, used when the image fits the
budget): GroupNorm+SiLU in place, no division by a residual scale of 1, and nearest
upsampling folded into the following 3x3 conv (:func:`upsample_conv`: four 2x2 kernels at
the low resolution, 2.25x fewer FLOPs for the decoder's most expensive convs, same values).

Only long-stable diffusers attributes are used (``Encoder``/``Decoder``: ``conv_in``,
``down_blocks``/``up_blocks``, ``mid_block``, ``conv_norm_out``, ``conv_out``; blocks:
``resnets``, ``attentions``, ``downsamplers``/``upsamplers``; ``ResnetBlock2D``: ``norm1``,
``conv1``, ``norm2``, ``conv2``, ``conv_shortcut``, ``output_scale_factor``; ``Attention``:
``group_norm``, ``to_q/k/v``, ``to_out``, ``heads``, ``scale``, ``residual_connection``,
``rescale_output_factor``), identical from diffusers 0.31 to 0.42. A VAE with another
structure raises :class:`UnsupportedVAEError` (callers fall back to the untiled VAE).

Everything runs under ``torch.inference_mode`` semantics (no autograd graph); it is an
inference path, not for training.

Layout
------
* :mod:`.ops` - regions and the ops of a program (what each reads and computes per tile);
* :mod:`.program` - building encoder / decoder programs from a diffusers VAE;
* :mod:`.norm` - whole-image GroupNorm statistics merged from tiles;
* :mod:`.planner` - the checkpoint planner and a tile's working-set estimate;
* :mod:`.spill` - checkpoints in temporary files;
* :mod:`.attention` - global / windowed self-attention on a latent checkpoint;
* :mod:`.runner` - the tile runner (passes, tiles, checkpoints in place);
* :mod:`.whole` - the untiled execution of the same program.
"""

from __future__ import annotations

from torch import Tensor, nn

from .attention import ATTENTION_BLOCK_DIVISOR, ATTENTION_WINDOW, _run_attention, attention_spans
from .norm import GroupStats, _apply_norm, group_moments
from .ops import (
    Attend,
    Conv,
    Norm,
    Op,
    Piece,
    Push,
    Region,
    Residual,
    UnsupportedVAEError,
    UpConv,
    Upsample,
    _backward,
    _shapes,
    subpixel_weights,
    upsample_conv,
)
from .planner import (
    MIN_WORK_BYTES,
    MIN_WORK_FRACTION,
    WORK_SET_FACTOR,
    _op_cost,
    _work_bytes,
    plan_checkpoints,
)
from .program import decoder_program, encoder_program
from .runner import RunReport, Tick, TiledVAEConfig, TiledVAERunner
from .spill import SpilledTensor, SpillError
from .whole import _program, estimate_untiled_bytes, run_whole, whole_decode, whole_encode

__all__ = [
    "ATTENTION_BLOCK_DIVISOR",
    "ATTENTION_WINDOW",
    "Attend",
    "Conv",
    "GroupStats",
    "MIN_WORK_BYTES",
    "MIN_WORK_FRACTION",
    "Norm",
    "Op",
    "Piece",
    "Push",
    "Region",
    "Residual",
    "RunReport",
    "SpillError",
    "SpilledTensor",
    "Tick",
    "TiledVAEConfig",
    "TiledVAERunner",
    "UnsupportedVAEError",
    "UpConv",
    "Upsample",
    "WORK_SET_FACTOR",
    "_apply_norm",
    "_backward",
    "_op_cost",
    "_program",
    "_run_attention",
    "_shapes",
    "_work_bytes",
    "attention_spans",
    "decoder_program",
    "encoder_program",
    "estimate_untiled_bytes",
    "group_moments",
    "is_supported",
    "plan_checkpoints",
    "run_whole",
    "subpixel_weights",
    "tiled_decode",
    "tiled_encode",
    "upsample_conv",
    "whole_decode",
    "whole_encode",
]


def tiled_encode(
    vae: nn.Module,
    image: Tensor,
    budget: int,
    tile: int | None = None,
    tick: Tick | None = None,
    attention_window: int | None = ATTENTION_WINDOW,
) -> Tensor:
    """``vae.encoder`` + ``quant_conv`` in tiles: image ``[B, 3, H, W]`` in [-1, 1] -> moments
    ``[B, 2 * latent_channels, H/8, W/8]`` (mean, logvar) in the VAE's dtype.

    Args:
        budget: activation bytes (checkpoints + one tile); ``tile``: tile side in image pixels
            (None = the largest that fits the budget).
        attention_window: see :class:`TiledVAEConfig`.
    """
    config = TiledVAEConfig(budget=budget, tile=tile, attention_window=attention_window)
    runner = TiledVAERunner(_program(vae, "encode"), config, tick)
    return runner.run(image)


def tiled_decode(
    vae: nn.Module,
    latent: Tensor,
    budget: int,
    tile: int | None = None,
    tick: Tick | None = None,
    attention_window: int | None = ATTENTION_WINDOW,
) -> Tensor:
    """``post_quant_conv`` + ``vae.decoder`` in tiles: unscaled latent ``[B, 4, h, w]`` ->
    image ``[B, 3, 8h, 8w]`` (unclamped, VAE dtype). ``tile`` is in output pixels."""
    config = TiledVAEConfig(budget=budget, tile=tile, attention_window=attention_window)
    runner = TiledVAERunner(_program(vae, "decode"), config, tick)
    return runner.run(latent)


def is_supported(vae: nn.Module) -> bool:
    """True when the tiled path understands ``vae``'s structure (else use the plain VAE)."""
    try:
        encoder_program(vae)
        decoder_program(vae)
    except (UnsupportedVAEError, AttributeError, TypeError):
        return False
    return True
