"""UNet transformer outputs in their input's layout: the same numbers as diffusers, with no
NCHW tensor inside a channels_last UNet; the modules are put back afterwards."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from tiny_models import TINY_CONTEXT_DIM, tiny_unet

from d3sr_core.inference.unet_layout import transformer_outputs_keep_layout

CL = torch.channels_last


def _output_written_out(t: Transformer2DModel, tokens, residual, h, w):
    """The step as its formula: proj_out on the tokens (linear, or a 1x1 conv on the NCHW
    map), tokens back to ``[B, C, H, W]``, plus the residual."""
    b, _, c = tokens.shape
    if t.use_linear_projection:
        y = F.linear(tokens, t.proj_out.weight, t.proj_out.bias)
        y = y.reshape(b, h, w, -1).permute(0, 3, 1, 2)
    else:
        y = F.conv2d(
            tokens.reshape(b, h, w, c).permute(0, 3, 1, 2), t.proj_out.weight, t.proj_out.bias
        )
    return y + residual


@pytest.mark.parametrize("linear", [True, False])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_output_step_is_diffusers_in_the_residual_layout(linear, fmt):
    torch.manual_seed(0)
    t = Transformer2DModel(
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=8,
        norm_num_groups=4,
        cross_attention_dim=8,
        use_linear_projection=linear,
    ).eval()
    t = t.to(memory_format=fmt)
    b, h, w = 2, 5, 3
    tokens = torch.randn(b, h * w, 8)
    residual = torch.randn(b, 8, h, w).contiguous(memory_format=fmt)
    with torch.no_grad():
        diffusers_out = type(t)._get_output_for_continuous_inputs(t, tokens, residual, b, h, w, 8)
        with transformer_outputs_keep_layout(t):
            ours = t._get_output_for_continuous_inputs(tokens, residual, b, h, w, 8)
        expected = _output_written_out(t, tokens, residual, h, w)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours, diffusers_out, atol=1e-6, rtol=1e-5)
    assert ours.is_contiguous(memory_format=fmt)
    if linear:  # diffusers returns NCHW whatever the residual: the layout is what changed
        assert diffusers_out.is_contiguous()


def _transformer_layouts(unet, x, context):
    """The UNet's output and whether each transformer block returned channels_last."""
    seen = []
    hooks = [
        m.register_forward_hook(
            lambda m, a, out: seen.append(
                out[0].is_contiguous(memory_format=CL) and not out[0].is_contiguous()
            )
        )
        for m in unet.modules()
        if isinstance(m, Transformer2DModel)
    ]
    try:
        with torch.no_grad():
            out = unet(x, 500, encoder_hidden_states=context).sample
    finally:
        for hook in hooks:
            hook.remove()
    return out, seen


def test_channels_last_unet_stays_channels_last_with_the_same_output():
    unet = tiny_unet().to(memory_format=CL)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 16, 16, generator=g).contiguous(memory_format=CL)
    context = torch.randn(1, 77, TINY_CONTEXT_DIM, generator=g)
    before, layouts_before = _transformer_layouts(unet, x, context)
    with transformer_outputs_keep_layout(unet):
        during, layouts_during = _transformer_layouts(unet, x, context)
    after, layouts_after = _transformer_layouts(unet, x, context)
    assert len(layouts_during) == 16 and all(layouts_during)  # 6 down, 1 mid, 9 up
    assert not any(layouts_before) and not any(layouts_after)  # diffusers' own method is back
    torch.testing.assert_close(during, before, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_methods_are_restored_after_an_error_and_nested_use_changes_once():
    unet = tiny_unet()
    transformers = [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
    with pytest.raises(RuntimeError, match="boom"):
        with transformer_outputs_keep_layout(unet):
            with transformer_outputs_keep_layout(unet):
                swapped = [t._get_output_for_continuous_inputs for t in transformers]
            # the inner exit left the outer's methods in place
            assert [t._get_output_for_continuous_inputs for t in transformers] == swapped
            raise RuntimeError("boom")
    assert all("_get_output_for_continuous_inputs" not in t.__dict__ for t in transformers)


def test_pipeline_denoises_with_the_layout_kept():
    from tiny_models import tiny_generator

    from d3sr_core.inference.options import UpscaleOptions
    from d3sr_core.inference.pipeline import D3SRPipeline

    pipe = D3SRPipeline(tiny_generator())
    transformers = [m for m in pipe.generator.unet.modules() if isinstance(m, Transformer2DModel)]
    swapped = []
    for t in transformers:
        t.register_forward_pre_hook(
            lambda m, a: swapped.append("_get_output_for_continuous_inputs" in m.__dict__)
        )
    pipe.upscale_tensor(torch.rand(1, 3, 16, 16), UpscaleOptions(scale=2))
    assert len(swapped) == len(transformers) and all(swapped)
    assert all("_get_output_for_continuous_inputs" not in t.__dict__ for t in transformers)
