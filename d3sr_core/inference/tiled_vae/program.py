"""Flattening a diffusers ``AutoencoderKL`` encoder / decoder into a program of ops
(:mod:`.ops`); only long-stable diffusers attributes are read (see the package docstring)."""

from __future__ import annotations

from torch import nn

from .ops import Attend, Conv, Norm, Op, Push, Residual, UnsupportedVAEError, UpConv, Upsample


def _conv(m: nn.Module, pad: tuple[int, int, int, int] | None = None) -> Conv:
    if not isinstance(m, nn.Conv2d):
        raise UnsupportedVAEError(f"expected a Conv2d, got {type(m).__name__}")
    if pad is None:
        p = m.padding
        if isinstance(p, str):
            raise UnsupportedVAEError(f"string padding {p!r}")
        pad = (p[0], p[0], p[1], p[1])
    return Conv(m, pad)


def _is_silu(m: nn.Module | None) -> bool:
    return isinstance(m, nn.SiLU)


def _resnet(block: nn.Module) -> list[Op]:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        if not hasattr(block, name):
            raise UnsupportedVAEError(f"{type(block).__name__} is not a ResnetBlock2D")
    if (
        getattr(block, "upsample", None) is not None
        or getattr(block, "downsample", None) is not None
    ):
        raise UnsupportedVAEError("resnet with built-in up/downsampling")
    if getattr(block, "time_emb_proj", None) is not None:
        raise UnsupportedVAEError("resnet with a time embedding")
    if not _is_silu(getattr(block, "nonlinearity", None)):
        raise UnsupportedVAEError("resnet nonlinearity is not SiLU")
    return [
        Push(),
        Norm(block.norm1, act=True),
        _conv(block.conv1),
        Norm(block.norm2, act=True),
        _conv(block.conv2),
        Residual(
            getattr(block, "conv_shortcut", None), float(getattr(block, "output_scale_factor", 1.0))
        ),
    ]


def _mid_block(mid: nn.Module) -> list[Op]:
    ops = _resnet(mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            ops.append(Attend(attn))
        ops += _resnet(resnet)
    return ops


def _downsampler(d: nn.Module) -> list[Op]:
    if getattr(d, "norm", None) is not None or not getattr(d, "use_conv", False):
        raise UnsupportedVAEError("downsampler without a plain conv")
    conv = d.conv
    if getattr(d, "padding", 1) == 0:  # diffusers pads (0, 1, 0, 1) itself before a padding-0 conv
        return [_conv(conv, (0, 1, 0, 1))]
    return [_conv(conv)]


def _upsampler(u: nn.Module) -> list[Op]:
    if getattr(u, "norm", None) is not None or getattr(u, "use_conv_transpose", False):
        raise UnsupportedVAEError("upsampler with a norm or transposed conv")
    if not getattr(u, "interpolate", True):
        raise UnsupportedVAEError("upsampler without interpolation")
    if not getattr(u, "use_conv", False):
        return [Upsample()]
    conv = u.conv if getattr(u, "name", "conv") == "conv" else u.Conv2d_0
    try:
        return [UpConv(conv)]
    except UnsupportedVAEError:
        return [Upsample(), _conv(conv)]


def _head(encoder_or_decoder: nn.Module) -> list[Op]:
    if not _is_silu(getattr(encoder_or_decoder, "conv_act", None)):
        raise UnsupportedVAEError("conv_act is not SiLU")
    return [Norm(encoder_or_decoder.conv_norm_out, act=True), _conv(encoder_or_decoder.conv_out)]


def encoder_program(vae: nn.Module) -> list[Op]:
    """Ops of ``vae.encoder`` followed by ``vae.quant_conv`` (image -> moments)."""
    enc = vae.encoder
    ops: list[Op] = [_conv(enc.conv_in)]
    for block in enc.down_blocks:
        for resnet in block.resnets:
            ops += _resnet(resnet)
        for d in getattr(block, "downsamplers", None) or []:
            ops += _downsampler(d)
    ops += _mid_block(enc.mid_block)
    ops += _head(enc)
    if getattr(vae, "quant_conv", None) is not None:
        ops.append(_conv(vae.quant_conv))
    return ops


def decoder_program(vae: nn.Module) -> list[Op]:
    """Ops of ``vae.post_quant_conv`` followed by ``vae.decoder`` (latent -> image)."""
    dec = vae.decoder
    ops: list[Op] = []
    if getattr(vae, "post_quant_conv", None) is not None:
        ops.append(_conv(vae.post_quant_conv))
    ops.append(_conv(dec.conv_in))
    ops += _mid_block(dec.mid_block)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            ops += _resnet(resnet)
        for u in getattr(block, "upsamplers", None) or []:
            ops += _upsampler(u)
    ops += _head(dec)
    return ops
