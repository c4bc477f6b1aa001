"""The tiled VAE's building blocks against independent references: GroupNorm statistics
merged from tiles vs float64 / F.group_norm, the untiled path vs diffusers' own forward with
VAE options the tiny model does not use, the programs' refusals, and each op's regions and
stack handling vs the receptive field of a written-out reference (autograd)."""

import pytest
import torch
from test_tiled_vae import _untiled_moments
from tiny_models import tiny_vae
from torch import nn

from d3sr_core.inference import tiled_vae


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def test_tile_norm_is_group_norm_with_the_merged_statistics(monkeypatch):
    """Statistics merged from two tiles applied to the image equal F.group_norm on it; the
    fused path is exactly eval-mode batch_norm with float32 statistics, and the fallback for
    backends without it (batch_norm raising) gives the same normalisation."""
    import torch.nn.functional as F

    from d3sr_core.inference.tiled_vae import norm as norm_module
    from d3sr_core.inference.tiled_vae.ops import Norm

    torch.manual_seed(0)
    gn = nn.GroupNorm(4, 8, eps=1e-3)
    nn.init.normal_(gn.weight)
    nn.init.normal_(gn.bias)
    x = torch.randn(2, 8, 5, 7) * 3 + 1
    stats = tiled_vae.GroupStats(4)
    stats.add(x[..., :3])
    stats.add(x[..., 3:])
    with torch.no_grad():
        ref = F.group_norm(x, 4, gn.weight, gn.bias, gn.eps)
        mean = stats.mean.repeat_interleave(2, dim=1).float()
        var = stats.var.repeat_interleave(2, dim=1).float()
        exact = torch.cat([
            F.batch_norm(x[i : i + 1], mean[i], var[i], gn.weight, gn.bias, False, 0.0, gn.eps)
            for i in range(2)
        ])  # fmt: skip
        got = norm_module._apply_norm(Norm(gn, act=False), stats, x)
        assert torch.equal(got, exact)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        act = norm_module._apply_norm(Norm(gn, act=True), stats, x)
        assert torch.equal(act, F.silu(exact))

        def no_batch_norm(*args, **kwargs):
            raise RuntimeError("not on this backend")

        monkeypatch.setattr(norm_module.F, "batch_norm", no_batch_norm)
        torch.testing.assert_close(
            norm_module._apply_norm(Norm(gn, act=False), stats, x), ref, atol=1e-5, rtol=0
        )
        half = norm_module._apply_norm(Norm(gn, act=False), stats, x.bfloat16())
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.float(), ref, atol=0.05, rtol=0.02)


def test_group_moments_equal_float64_statistics(monkeypatch):
    """Per-(sample, group) mean and biased variance against float64 ones written out: small
    variances (the kernel's eps is taken back out), non-square tiles, float64 tiles kept in
    float64, bf16 tiles accumulated in float32, and the path for backends without the
    mixed-precision kernel."""
    from d3sr_core.inference.tiled_vae.norm import group_moments

    def reference(x):
        flat = x.double().reshape(x.shape[0], 4, -1)
        return flat.mean(-1), flat.var(-1, unbiased=False)

    torch.manual_seed(0)
    for scale, rtol in ((1e-3, 1e-3), (1e-5, 1e-2)):
        x = 1 + scale * torch.randn(2, 8, 5, 7)
        mean, var = group_moments(x, 4)
        ref_mean, ref_var = reference(x)
        torch.testing.assert_close(mean, ref_mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(var, ref_var, atol=0, rtol=rtol)
    x64 = torch.randn(2, 8, 5, 7, dtype=torch.float64) + 0.5
    for got, ref in zip(group_moments(x64, 4), reference(x64), strict=True):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    xb = (torch.randn(2, 8, 5, 7) + 0.5).bfloat16()
    expected = reference(xb)
    for got, ref in zip(group_moments(xb, 4), expected, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    native = torch.native_group_norm

    def no_mixed_kernel(x, weight, *args):
        if x.dtype == torch.bfloat16 and weight is not None:
            raise RuntimeError("no mixed-precision group_norm here")
        return native(x, weight, *args)

    monkeypatch.setattr(torch, "native_group_norm", no_mixed_kernel)
    for got, ref in zip(group_moments(xb, 4), expected, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_whole_path_equals_diffusers_with_every_option():
    """Non-trivial GroupNorm affine parameters, a residual output_scale_factor, an upsampler
    without conv (plain nearest upsampling) and global attention: the untiled path against
    diffusers' own encode / decode."""
    import copy

    vae = copy.deepcopy(tiny_vae())
    g = torch.Generator().manual_seed(9)
    for m in vae.modules():
        if isinstance(m, nn.GroupNorm):
            m.weight.data = 1 + 0.3 * torch.randn(m.weight.shape, generator=g)
            m.bias.data = 0.3 * torch.randn(m.bias.shape, generator=g)
    vae.decoder.up_blocks[0].resnets[0].output_scale_factor = 2.0
    vae.encoder.down_blocks[0].resnets[0].output_scale_factor = 0.5
    up = next(m for m in vae.decoder.modules() if type(m).__name__ == "Upsample2D")
    up.use_conv = False
    x = torch.rand(1, 3, 24, 40, generator=g) * 2 - 1
    z = torch.randn(1, 4, 3, 5, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(
            tiled_vae.whole_encode(vae, x, attention_window=None), _untiled_moments(vae, x)
        )
        torch.testing.assert_close(
            tiled_vae.whole_decode(vae, z, attention_window=None),
            vae.decode(z).sample, atol=1e-5, rtol=1e-5,
        )  # fmt: skip
        half = copy.deepcopy(vae).to(torch.bfloat16)  # float32 latents are cast to the weights
        got = tiled_vae.whole_decode(half, z, attention_window=None)
        assert got.dtype == torch.bfloat16
        theirs = half.decode(z.bfloat16()).sample
        torch.testing.assert_close(got, theirs, atol=0.1, rtol=0.05)
        # fusing the residual add into the conv rounds once where diffusers rounds twice: as
        # close to the fp32 decode as diffusers' own bf16 decode is
        exact = vae.decode(z).sample
        ours_err, theirs_err = ((t.float() - exact).abs() for t in (got, theirs))
        assert ours_err.mean() <= 1.1 * theirs_err.mean()
        assert ours_err.max() <= 1.5 * theirs_err.max()
    with pytest.raises(ValueError) as err:
        tiled_vae.estimate_untiled_bytes(vae, "both", (1, 4, 8, 8), torch.float32)
    assert str(err.value) == "kind must be 'encode' or 'decode', got 'both'"


def _edit(vae, change):
    import copy

    odd = copy.deepcopy(vae)
    change(odd)
    return odd


def _set(obj, **attrs):
    for k, v in attrs.items():
        setattr(obj, k, v)


def test_programs_refuse_what_they_cannot_tile(vae):
    """Each structure the programs do not translate is refused with its reason."""
    from d3sr_core.inference.tiled_vae.ops import UnsupportedVAEError

    down = lambda v: v.encoder.down_blocks[0].downsamplers[0]  # noqa: E731
    up = lambda v: v.decoder.up_blocks[0].upsamplers[0]  # noqa: E731
    res = lambda v: v.decoder.up_blocks[0].resnets[0]  # noqa: E731
    cases = [
        ("decode", lambda v: _set(v.decoder, conv_in=nn.Identity()),
         "expected a Conv2d, got Identity"),
        ("decode", lambda v: _set(v.decoder.conv_in, padding="same"), "string padding 'same'"),
        ("decode", lambda v: v.decoder.up_blocks[0].resnets.__setitem__(0, nn.Identity()),
         "Identity is not a ResnetBlock2D"),
        ("decode", lambda v: _set(res(v), upsample=nn.Identity()),
         "resnet with built-in up/downsampling"),
        ("decode", lambda v: _set(res(v), downsample=nn.Identity()),
         "resnet with built-in up/downsampling"),
        ("encode", lambda v: _set(down(v), norm=nn.Identity()), "downsampler without a plain conv"),
        ("encode", lambda v: _set(down(v), use_conv=False), "downsampler without a plain conv"),
        ("decode", lambda v: _set(up(v), norm=nn.Identity()),
         "upsampler with a norm or transposed conv"),
        ("decode", lambda v: _set(up(v), use_conv_transpose=True),
         "upsampler with a norm or transposed conv"),
        ("decode", lambda v: _set(up(v), interpolate=False), "upsampler without interpolation"),
    ]  # fmt: skip
    for kind, change, message in cases:
        odd = _edit(vae, change)
        program = tiled_vae.encoder_program if kind == "encode" else tiled_vae.decoder_program
        with pytest.raises(UnsupportedVAEError) as err:
            program(odd)
        assert str(err.value) == message


def test_programs_follow_the_vae_layout_variants(vae):
    """Layouts the programs do translate, against diffusers' own forward: SD's padding-0
    downsampler (padded (0, 1, 0, 1) by diffusers), an upsampler conv named Conv2d_0, an
    upsampler conv that cannot be folded (1x1: upsample then conv), a conv with unequal
    row / column padding."""

    def padding0(v):
        d = v.encoder.down_blocks[0].downsamplers[0]
        d.padding, d.conv.padding = 0, (0, 0)

    def conv2d_0(v):
        u = v.decoder.up_blocks[0].upsamplers[0]
        u.name, u.Conv2d_0 = "Conv2d_0", u.conv
        del u.conv

    def one_by_one(v):
        u = v.decoder.up_blocks[0].upsamplers[0]
        c = u.conv.in_channels
        torch.manual_seed(11)
        u.conv = nn.Conv2d(c, c, 1)

    def uneven(v):
        conv = v.decoder.conv_out
        v.decoder.conv_out = nn.Conv2d(conv.in_channels, conv.out_channels, (3, 3), padding=(1, 0))

    g = torch.Generator().manual_seed(12)
    x = torch.rand(1, 3, 24, 40, generator=g) * 2 - 1
    z = torch.randn(1, 4, 3, 5, generator=g)
    with torch.inference_mode():
        odd = _edit(vae, padding0)
        torch.testing.assert_close(
            tiled_vae.whole_encode(odd, x, attention_window=None), _untiled_moments(odd, x)
        )
        for change in (conv2d_0, one_by_one, uneven):
            odd = _edit(vae, change)
            torch.testing.assert_close(
                tiled_vae.whole_decode(odd, z, attention_window=None),
                odd.decode(z).sample, atol=1e-5, rtol=1e-5,
            )  # fmt: skip


def test_programs_other_refusals_padding_and_folding(vae):
    """Activation / time-embedding refusals; both downsampler paddings on odd sizes against
    diffusers (where a wrong extra pad row would show); 3x3 upsampler convs are folded."""
    from d3sr_core.inference.tiled_vae.ops import UnsupportedVAEError, UpConv

    res = lambda v: v.decoder.up_blocks[0].resnets[0]  # noqa: E731
    for change, message in (
        (lambda v: _set(v.decoder, conv_act=nn.ReLU()), "conv_act is not SiLU"),
        (lambda v: _set(res(v), time_emb_proj=nn.Linear(2, 2)), "resnet with a time embedding"),
        (lambda v: _set(res(v), nonlinearity=nn.ReLU()), "resnet nonlinearity is not SiLU"),
    ):
        with pytest.raises(UnsupportedVAEError) as err:
            tiled_vae.decoder_program(_edit(vae, change))
        assert str(err.value) == message

    def padding1(v):
        d = v.encoder.down_blocks[0].downsamplers[0]
        d.padding, d.conv.padding = 1, (1, 1)

    x = torch.rand(1, 3, 25, 41, generator=torch.Generator().manual_seed(13)) * 2 - 1
    with torch.inference_mode():
        for odd in (vae, _edit(vae, padding1)):
            torch.testing.assert_close(
                tiled_vae.whole_encode(odd, x, attention_window=None), _untiled_moments(odd, x)
            )
    ups = [op for op in tiled_vae.decoder_program(vae) if isinstance(op, UpConv)]
    assert len(ups) == sum(len(b.upsamplers or []) for b in vae.decoder.up_blocks) > 0


def test_tiled_entry_points_pass_tile_and_tick_on(vae):
    """tiled_encode / tiled_decode give the runner their tile and tick: the same progress
    ticks as the runner built by hand, several tiles for tile 16, ending at 1."""
    from d3sr_core.inference.tiled_vae import TiledVAEConfig, TiledVAERunner

    x = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(14)) * 2 - 1
    z = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(15))
    big = 10**12
    for entry, program, inp in (
        (tiled_vae.tiled_encode, tiled_vae.encoder_program, x),
        (tiled_vae.tiled_decode, tiled_vae.decoder_program, z),
    ):
        got, ref = [], []
        with torch.inference_mode():
            out = entry(vae, inp, big, tile=16, tick=got.append, attention_window=None)
            config = TiledVAEConfig(budget=big, tile=16, attention_window=None)
            expected = TiledVAERunner(program(vae), config, ref.append).run(inp)
        assert torch.equal(out, expected)
        assert got == ref and len(got) > 1 and got[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("layout", ["no_conv", "one_by_one", "scaled_residual"])
def test_tiled_decode_with_plain_upsampling_equals_diffusers(vae, layout):
    """Upsamplers that are not folded into a conv (no conv, or a 1x1 conv) run as a separate
    nearest-upsampling op in tiles, and a resnet's output_scale_factor divides its residual
    sum: the tiled decode equals diffusers' own."""

    def change(v):
        u = v.decoder.up_blocks[0].upsamplers[0]
        if layout == "no_conv":
            u.use_conv = False
        elif layout == "scaled_residual":  # diffusers divides the residual sum by it
            v.decoder.up_blocks[0].resnets[0].output_scale_factor = 2.0
        else:
            torch.manual_seed(16)
            u.conv = nn.Conv2d(u.conv.in_channels, u.conv.out_channels, 1)

    odd = _edit(vae, change)
    z = torch.randn(1, 4, 7, 9, generator=torch.Generator().manual_seed(17))
    with torch.inference_mode():
        ref = odd.decode(z).sample
        for tile, budget in ((16, 10**12), (24, 1)):
            got = tiled_vae.tiled_decode(odd, z, budget, tile=tile, attention_window=None)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_crop_and_bias_free_folded_upsampling():
    """_crop refuses a region outside the tile with both regions named; the folded
    upsampling conv without bias equals conv(upsample(x)) and keeps the input's layout."""
    import torch.nn.functional as F

    from d3sr_core.inference.tiled_vae.ops import Region, _crop

    t = torch.arange(16.0).view(1, 1, 4, 4)
    have = Region(0, 4, 0, 4)
    assert torch.equal(_crop(t, have, Region(1, 3, 2, 4)), t[:, :, 1:3, 2:4])
    for want in (Region(1, 5, 0, 4), Region(0, 4, 1, 5), Region(-1, 2, 0, 4), Region(0, 4, -1, 2)):
        with pytest.raises(AssertionError) as err:
            _crop(t, have, want)
        assert str(err.value) == f"region {want} is not inside {have}"
    torch.manual_seed(18)
    conv = nn.Conv2d(6, 5, 3, padding=1, bias=False)
    x = torch.randn(2, 6, 5, 7)
    with torch.inference_mode():
        ref = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        weights = tiled_vae.subpixel_weights(conv.weight)
        for fmt in (torch.contiguous_format, torch.channels_last):
            xp = F.pad(x, (1, 1, 1, 1)).contiguous(memory_format=fmt)
            out = tiled_vae.upsample_conv(xp, weights, None)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            assert out.is_contiguous(memory_format=fmt)


def _nearest2x(x):
    """Nearest 2x upsampling written out: every pixel repeated twice along each axis."""
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def _window_ops():
    """(op, whole-image reference, what the op reads, ring) for convs with every geometry
    parameter (and the dilated extent) different along the two axes, the SD downsampler's
    padding, nearest upsampling and the folded upsampling conv, which reads what the nearest
    upsampling reads plus the one-pixel ring of context its 2x2 phases take at low
    resolution. "What it reads": ``x -> (output, input incl. zero padding, padding before
    row 0 / column 0)``. float64, so that no receptive-field gradient cancels by rounding."""
    import torch.nn.functional as F

    from d3sr_core.inference.tiled_vae.ops import Conv, UpConv, Upsample

    torch.manual_seed(19)
    odd = nn.Conv2d(2, 3, (3, 5), stride=(1, 2), dilation=(3, 1)).double()
    down = nn.Conv2d(2, 3, 3, stride=2).double()
    same = nn.Conv2d(2, 3, 3, padding=1).double()
    one = nn.Conv2d(2, 3, 1).double()

    def conv_reads(m, pad):  # pad = (top, bottom, left, right), zeros as pixels of their own
        def reads(x):
            xp = F.pad(x, (pad[2], pad[3], pad[0], pad[1]))
            return F.conv2d(xp, m.weight, m.bias, m.stride, 0, m.dilation), xp, (pad[0], pad[2])

        return reads

    def nearest_reads(x):
        return _nearest2x(x), x, (0, 0)

    def up_conv(x):
        return F.conv2d(_nearest2x(x), same.weight, same.bias, padding=1)

    ops = []
    geometries = (
        (odd, (3, 3, 1, 1)),
        (down, (0, 1, 0, 1)),
        (down, (2, 2, 1, 1)),  # stride 2: top and bottom edges 2 apart, padded by the conv
        (same, (1,) * 4),
        (one, (0,) * 4),
    )
    for m, pad in geometries:
        reads = conv_reads(m, pad)
        ops.append((Conv(m, pad), lambda x, reads=reads: reads(x)[0], reads, 0))
    return [
        *ops,
        (Upsample(), _nearest2x, nearest_reads, 0),
        (UpConv(same), up_conv, nearest_reads, 1),
    ]


def _spans(n):
    """Whole, first / last row, and inner spans starting and ending at odd and even rows."""
    spans = {(0, n), (0, 1), (n - 1, n), (1, 3), (2, n - 1)}
    return sorted((a, b) for a, b in spans if 0 <= a < b <= n)


def _same(got, expected):
    """The same stack: the very same objects (pieces passed through, None) in order."""
    return len(got) == len(expected) and all(a is b for a, b in zip(got, expected, strict=True))


def test_window_ops_read_their_receptive_field_and_keep_the_stack_below():
    """Each window op's output size is the reference's; the input region it asks for
    (``needed``, clipped to the image) is the bounding box of the input pixels and zero
    padding that the output region's taps reach (the gradient's support; for the folded
    upsampling conv, that of the nearest upsampling grown by its one-pixel ring); and
    ``run`` on a two-element stack, given exactly that region, gives the reference's values
    on the output region and passes the elements below through (or None for an unneeded
    top)."""
    from d3sr_core.inference.tiled_vae.ops import Piece, Region

    h, w = 9, 11
    # two elements below the top (one of them unneeded), as a resnet's branch sees them
    keep = [Region(0, 1, 0, 1), None]
    below = [Piece(torch.zeros(1, 1, 1, 1), keep[0]), None]
    for op, ref, field_ref, ring in _window_ops():
        x = torch.randn(1, 2, h, w, dtype=torch.float64, requires_grad=True)
        full, (reads, source, before) = ref(x), field_ref(x)
        out_h, out_w = full.shape[-2:]
        assert op.out_size(h, w) == (out_h, out_w)
        assert op.out_channels([5, 4, 2]) == [5, 4, full.shape[1]]
        assert op.needed([*keep, None]) == [*keep, None]
        # The dependency is separable: rows of the output read rows of the input, columns
        # columns, so the field of a region is (rows of its row span) x (cols of its col span).
        row_field, col_field = {}, {}
        for span, field, dim in ((_spans(out_h), row_field, 2), (_spans(out_w), col_field, 3)):
            for a, b in span:
                (grad,) = torch.autograd.grad(
                    reads.narrow(dim, a, b - a).sum(), source, retain_graph=True
                )
                hit = grad.abs().sum(dim=tuple(d for d in range(4) if d != dim)).nonzero()
                shift = before[dim - 2] + ring
                field[a, b] = (int(hit[0]) - shift, int(hit[-1]) + 1 - shift + 2 * ring)
        for y0, y1 in _spans(out_h):
            for x0, x1 in _spans(out_w):
                want = Region(y0, y1, x0, x1)
                field = Region(*row_field[y0, y1], *col_field[x0, x1])
                *below_need, need = op.needed([*keep, want])
                assert below_need == keep
                need = need.clip(h, w)
                assert need == field.clip(h, w), (op, want)
                with torch.no_grad():
                    top = Piece(x[:, :, need.y0 : need.y1, need.x0 : need.x1], need)
                    got = op.run([*below, top], [*keep, want], (h, w), None)
                    assert _same(got[:-1], below) and got[-1].region == want
                    torch.testing.assert_close(got[-1].tensor, full[:, :, y0:y1, x0:x1])
                    out = torch.empty_like(got[-1].tensor)
                    got = op.run([*below, top], [*keep, want], (h, w), None, out)
                    assert (got[-1].tensor is out) == op.writes_out
                    torch.testing.assert_close(got[-1].tensor, full[:, :, y0:y1, x0:x1])
                    got = op.run([*below, top], [*keep, None], (h, w), None)
                    assert _same(got, [*below, None])


def test_push_and_residual_act_on_the_top_of_a_deeper_stack():
    """Push duplicates the top as two crops (asking for their union) and Residual pops the
    branch and its input into ``(shortcut(x) + h) / scale``, each leaving the elements
    below untouched; an unneeded output is None."""
    from d3sr_core.inference.tiled_vae.ops import Piece, Push, Region, Residual

    r1, r2, both = Region(1, 4, 2, 6), Region(3, 7, 0, 3), Region(1, 7, 0, 6)
    keep = [Region(0, 1, 0, 1), None, Region(0, 2, 0, 2)]
    below = [Piece(torch.zeros(1, 1, 1, 1), keep[0]), None, Piece(torch.ones(1, 1, 2, 2), keep[2])]
    t = torch.randn(1, 2, 6, 6)
    crop1, crop2 = t[:, :, 0:3, 2:6], t[:, :, 2:6, 0:3]  # r1, r2 inside both
    push = Push()
    assert push.out_channels([5, 4, 1, 2]) == [5, 4, 1, 2, 2]
    assert push.needed([*keep, r1, r2]) == [*keep, both]
    assert push.needed([*keep, None, r2]) == [*keep, r2]
    assert push.needed([*keep, r1, None]) == [*keep, r1]
    got = push.run([*below, Piece(t, both)], [*keep, r1, r2], (8, 8), None)
    assert _same(got[:3], below) and (got[3].region, got[4].region) == (r1, r2)
    assert torch.equal(got[3].tensor, crop1) and torch.equal(got[4].tensor, crop2)
    got = push.run([*below, Piece(t, both)], [*keep, None, r2], (8, 8), None)
    assert _same(got[:4], [*below, None]) and torch.equal(got[4].tensor, crop2)

    torch.manual_seed(20)
    shortcut = nn.Conv2d(2, 3, 1)
    x2, x3, h = torch.randn(1, 2, 3, 4), torch.randn(1, 3, 3, 4), torch.randn(1, 3, 3, 4)
    with torch.no_grad():
        for residual, x, expected in (
            (Residual(shortcut, 2.0), x2, (shortcut(x2) + h) / 2),
            (Residual(None, 1.0), x3, x3 + h),
        ):
            assert residual.out_channels([5, 4, 1, x.shape[1], 3]) == [5, 4, 1, 3]
            assert residual.needed([*keep, r1]) == [*keep, r1, r1]
            stack = [*below, Piece(x, r1), Piece(h, r1)]
            got = residual.run(stack, [*keep, r1], (8, 8), None)
            assert _same(got[:3], below) and len(got) == 4 and got[3].region == r1
            torch.testing.assert_close(got[3].tensor, expected)
            out = torch.empty_like(expected)  # written in place, the same values
            got = residual.run(stack, [*keep, r1], (8, 8), None, out)
            assert got[3].tensor is out and torch.equal(
                out, residual.run(stack, [*keep, r1], (8, 8), None)[3].tensor
            )
            got = residual.run([*below, Piece(x, r1), None], [*keep, None], (8, 8), None)
            assert _same(got, [*below, None])


def test_conv_pads_rows_itself_and_keeps_nhwc_tiles_dense():
    """A tile at the top or bottom of a band (top != bottom padding, left == right): the conv
    pads both sides with the larger amount and the surplus rows are cropped - the values of
    the zero-padded input, and for an NHWC batch of one a dense tensor (no copy later)."""
    import torch.nn.functional as F

    from d3sr_core.inference.tiled_vae.ops import conv_padded

    torch.manual_seed(21)
    conv = nn.Conv2d(6, 5, 3)
    x = torch.randn(1, 6, 7, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for pad in ((1, 1, 1, 0), (1, 1, 0, 1), (0, 0, 2, 0), (1, 0, 1, 1)):
            y = conv_padded(x, conv, pad)
            torch.testing.assert_close(y, F.conv2d(F.pad(x, pad), conv.weight, conv.bias))
            assert y.is_contiguous(memory_format=torch.channels_last)


def test_folded_upsampling_refuses_other_convs_and_caches_its_phases():
    """Only a plain 3x3 / stride 1 / padding 1 zero-padded conv is folded (each other
    geometry alone is refused); the folded weights are cached while the conv's weight is
    unchanged and recomputed after an in-place change or a dtype change, and never cached
    for weights made under inference_mode (no version counter to notice a change)."""
    from d3sr_core.inference.tiled_vae.ops import UnsupportedVAEError, UpConv

    for conv in (
        nn.Conv2d(4, 4, 1),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Conv2d(4, 4, 3, padding=0),
        nn.Conv2d(4, 4, 3, padding=1, dilation=2),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.ConvTranspose2d(4, 4, 3, padding=1),
    ):
        with pytest.raises(UnsupportedVAEError) as err:
            UpConv(conv)
        assert str(err.value) == f"unsupported upsampler conv {conv}"

    torch.manual_seed(21)
    conv = nn.Conv2d(4, 3, 3, padding=1)
    up = UpConv(conv)
    first = up.phase_weight()
    assert (
        torch.equal(first, tiled_vae.subpixel_weights(conv.weight)) and up.phase_weight() is first
    )
    with torch.no_grad():
        conv.weight.mul_(-2.0)
    changed = up.phase_weight()
    assert torch.equal(changed, tiled_vae.subpixel_weights(conv.weight))
    assert up.phase_weight() is changed
    conv.double()
    assert up.phase_weight().dtype == torch.float64
    with torch.inference_mode():
        made = nn.Conv2d(4, 3, 3, padding=1)
        up = UpConv(made)
        up.phase_weight()
        made.weight.mul_(-2.0)
        assert torch.equal(up.phase_weight(), tiled_vae.subpixel_weights(made.weight))


def test_ops_refuse_unsupported_modules(vae):
    """Convs that are not plain zero-padded ungrouped Conv2d, GroupNorms without affine
    parameters and attentions without a plain GroupNorm or with q/k norms are refused."""
    import copy

    from d3sr_core.inference.tiled_vae.ops import Attend, Conv, Norm, UnsupportedVAEError

    for module in (
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.ConvTranspose2d(4, 4, 3, padding=1),
    ):
        with pytest.raises(UnsupportedVAEError) as err:
            Conv(module, (1, 1, 1, 1))
        assert str(err.value) == f"unsupported conv {module}"
    for module in (nn.GroupNorm(2, 4, affine=False), nn.BatchNorm2d(4)):
        with pytest.raises(UnsupportedVAEError) as err:
            Norm(module, act=True)
        assert str(err.value) == f"unsupported norm {module}"

    attention = vae.decoder.mid_block.attentions[0]
    assert Attend(attention).norm.module is attention.group_norm
    assert not Attend(attention).norm.act
    with pytest.raises(UnsupportedVAEError) as err:
        Attend(nn.Identity())
    assert str(err.value) == "VAE attention without a plain GroupNorm"
    for change, message in (
        (dict(group_norm=None), "VAE attention without a plain GroupNorm"),
        (dict(spatial_norm=nn.Identity()), "VAE attention without a plain GroupNorm"),
        (dict(norm_q=nn.Identity()), "VAE attention with q/k norms"),
        (dict(norm_k=nn.Identity()), "VAE attention with q/k norms"),
    ):
        odd = copy.deepcopy(attention)
        _set(odd, **change)
        with pytest.raises(UnsupportedVAEError) as err:
            Attend(odd)
        assert str(err.value) == message


def test_memory_layout_helpers_and_interior_tile():
    """is_channels_last: 4-d, several channels, channels innermost (crops included); dense
    packs a crop in its own layout and returns a packed tensor itself; the interior tile is
    the tile-sized (or image-sized) core with margins differing by at most one."""
    from d3sr_core.inference.tiled_vae.ops import _interior_tile, dense, is_channels_last

    nchw = torch.randn(1, 3, 6, 7)
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    one = nhwc[:, :1]  # one channel with stride 1: either layout, taken as NCHW
    three_d = torch.randn(2, 4, 3).permute(0, 2, 1)  # stride 1 along dim 1, but 3-d
    two = torch.randn(1, 2, 6, 7).contiguous(memory_format=torch.channels_last)
    cases = [(nchw, False), (nhwc, True), (nhwc[:, :, 1:4, 2:6], True), (one, False)]
    cases += [(three_d, False), (two, True)]
    assert [is_channels_last(t) for t, _ in cases] == [expected for _, expected in cases]
    for t, fmt in ((nchw, torch.contiguous_format), (nhwc, torch.channels_last)):
        assert dense(t) is t
        crop = t[:, :, 1:4, 2:6]
        packed = dense(crop)
        assert packed.is_contiguous(memory_format=fmt) and torch.equal(packed, crop)

    for h, w, tile in ((11, 9, 4), (12, 10, 4), (3, 20, 8), (8, 8, 8), (13, 6, 5)):
        core = _interior_tile(h, w, tile)
        assert (core.h, core.w) == (min(tile, h), min(tile, w))
        for start, end, length in ((core.y0, core.y1, h), (core.x0, core.x1, w)):
            assert isinstance(start, int) and 0 <= (length - end) - start <= 1


def test_stack_ids_follow_push_and_residual(vae):
    """_ids through the decoder and encoder programs, op by op and in one call: Push
    duplicates the top's id, Residual pops two and every other op replaces the top; each
    new id is one never seen before. On a deeper stack the elements below keep their ids."""
    from d3sr_core.inference.tiled_vae.ops import Conv, Push, Residual, _ids

    for ops in (tiled_vae.decoder_program(vae), tiled_vae.encoder_program(vae)):
        ids, counter, seen = [0], [0], {0}
        for i, op in enumerate(ops):
            new = _ids(ops, i, i + 1, ids, counter)
            if isinstance(op, Push):
                assert new == [*ids, ids[-1]]
            else:
                kept = ids[:-2] if isinstance(op, Residual) else ids[:-1]
                assert new[:-1] == kept and new[-1] not in seen
                seen.add(new[-1])
            ids = new
        assert ids == _ids(ops, 0, len(ops), [0], [0]) and len(ids) == 1
    conv = Conv(nn.Conv2d(1, 1, 1), (0, 0, 0, 0))
    ops = [Push(), conv, Residual(None, 1.0), conv]
    *below, top = _ids(ops, 0, 4, [5, 6, 7], [10])
    assert below == [5, 6] and top not in (5, 6, 7, 10)
