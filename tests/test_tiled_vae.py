"""Tiled VAE: equal to the untiled VAE (encode and decode), whole-image GroupNorm statistics,
exact attention, bounded checkpoints, unsupported structures detected."""

import math
import weakref

import pytest
import torch
from tiny_models import tiny_vae
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from d3sr_core.inference import tiled_vae
from d3sr_core.inference.tiled_vae import (
    Attend,
    TiledVAEConfig,
    TiledVAERunner,
    _run_attention,
    decoder_program,
    encoder_program,
    estimate_untiled_bytes,
    is_supported,
    tiled_decode,
    tiled_encode,
)

BIG = 10**12  # a budget that keeps every checkpoint
TINY = 1  # keeps nothing in memory: states go to disk (spill=False: every pass recomputes)


def psnr(a, b):
    peak = float(b.max() - b.min())
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def _untiled_moments(vae, x):
    h = vae.encoder(x)
    return vae.quant_conv(h) if vae.quant_conv is not None else h


@pytest.mark.parametrize("size", [(72, 104), (40, 24), (8, 8), (56, 136)])
@pytest.mark.parametrize("tile,budget", [(16, BIG), (32, BIG), (24, TINY), (None, 200_000)])
def test_tiled_encode_matches_untiled(vae, size, tile, budget):
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        ref = _untiled_moments(vae, x)
        out = tiled_encode(vae, x, budget, tile)
    assert out.shape == ref.shape
    assert psnr(out, ref) >= 40.0
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# Every size with every state kept; the recomputing budgets (TINY, auto tile at 300 kB) on the
# small sizes only: at 9x13 and 7x17 they took 10-12 s each and add no claim (odd sizes and
# many tiles are the BIG cases', recomputation over many tiles is
# test_recompute_and_keep_policies_agree's, the budget-derived tile is also the encoder's).
DECODE_CASES = [
    *((tile, BIG, size) for tile in (16, 40) for size in ((9, 13), (5, 3), (1, 1), (7, 17))),
    *(
        (tile, budget, size)
        for tile, budget in ((24, TINY), (None, 300_000))
        for size in ((5, 3), (1, 1))
    ),
]


@pytest.mark.parametrize("tile,budget,size", DECODE_CASES)
def test_tiled_decode_matches_untiled(vae, size, tile, budget):
    z = torch.randn(1, 4, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = vae.decode(z).sample
        out = tiled_decode(vae, z, budget, tile)
    assert out.shape == ref.shape
    assert psnr(out, ref) >= 40.0
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def _captured_group_stats(module, fn):
    """Whole-image mean/var of every GroupNorm input during an untiled call."""
    stats = {}

    def hook(mod, args):
        x = args[0]
        if x.ndim == 3:  # attention applies its GroupNorm on [B, C, HW]
            x = x.unsqueeze(-1)
        g = x.double().reshape(x.shape[0], mod.num_groups, -1)
        stats[mod] = (g.mean(-1), g.var(-1, unbiased=False))

    handles = [
        m.register_forward_pre_hook(hook) for m in module.modules() if isinstance(m, nn.GroupNorm)
    ]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return stats


@pytest.mark.parametrize("kind", ["encode", "decode"])
def test_group_norm_statistics_equal_untiled(vae, kind):
    g = torch.Generator().manual_seed(2)
    if kind == "encode":
        x = torch.rand(1, 3, 48, 64, generator=g) * 2 - 1
        untiled = _captured_group_stats(vae, lambda: _untiled_moments(vae, x))
        runner = TiledVAERunner(encoder_program(vae), TiledVAEConfig(budget=BIG, tile=16))
    else:
        x = torch.randn(1, 4, 6, 8, generator=g)
        untiled = _captured_group_stats(vae, lambda: vae.decode(x))
        runner = TiledVAERunner(decoder_program(vae), TiledVAEConfig(budget=BIG, tile=16))
    with torch.inference_mode():
        runner.run(x)
    assert runner.report.tiles > runner.report.passes, "more than one tile per pass"
    assert set(runner.group_stats) == set(untiled), "every GroupNorm gathered its statistics"
    for module, (mean, var) in untiled.items():
        st = runner.group_stats[module]
        torch.testing.assert_close(st.mean, mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(st.var, var, atol=1e-6, rtol=1e-5)


def test_recompute_and_keep_policies_agree(vae):
    z = torch.randn(1, 4, 8, 11, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        keep = TiledVAERunner(decoder_program(vae), TiledVAEConfig(budget=BIG, tile=16))
        lean_config = TiledVAEConfig(budget=TINY, tile=16, spill=False)
        lean = TiledVAERunner(decoder_program(vae), lean_config)
        a, b = keep.run(z), lean.run(z)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not keep.report.recomputed
    # With no budget only the forced checkpoints remain: the attention input (latent
    # resolution) and the output (plus the state right after the attention, which is the
    # attention's output pushed, no new tensor); nothing where memory grows.
    ops = decoder_program(vae)
    forced = {i for i, op in enumerate(ops) if isinstance(op, Attend)} | {len(ops)}
    after = {i + 2 for i in forced if i < len(ops) and isinstance(ops[i + 1], tiled_vae.Push)}
    assert forced <= set(lean.report.kept) <= forced | after


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages made by torch ops inside the block that are alive at
    the same time (each storage counted once, however many views share it; a weakref on the
    storage, which torch keeps for as long as the memory lives, says when it is freed)."""

    def __enter__(self):
        self.live, self.peak, self.sizes = 0, 0, {}
        return super().__enter__()

    def _freed(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key not in self.sizes and storage.nbytes():
                self.sizes[key] = storage.nbytes()
                self.live += storage.nbytes()
                weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.live)
        return out


@pytest.mark.parametrize("spill", [False, True])
def test_measured_memory_stays_within_budget(vae, monkeypatch, spill, tmp_path):
    """The budget bounds the tensors the run really holds (measured, not the runner's
    report): checkpoints + one tile's working set, plus the returned image, whether the
    states that do not fit are recomputed or spilled to disk (tiles read back from disk
    are tensors too, so they are measured).
    Keeping every state, as a generous budget does, measurably needs more than the budget."""
    # The 8 MiB working-set floor would hold this whole tiny image: let the budget decide.
    monkeypatch.setattr(tiled_vae.runner, "MIN_WORK_BYTES", 64 * 1024)
    # disk I/O priced against the full-size VAE's convs (the tiny one's are 16x cheaper)
    monkeypatch.setattr(tiled_vae.planner, "SPILL_READ_COST", 1.0)
    monkeypatch.setattr(tiled_vae.planner, "SPILL_WRITE_COST", 1.0)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    budget = 800_000
    output_bytes = 3 * 128 * 128 * 4
    with torch.inference_mode():
        config = TiledVAEConfig(budget=budget, spill=spill, spill_dir=str(tmp_path))
        runner = TiledVAERunner(decoder_program(vae), config)
        with _LiveTensorBytes() as lean:
            runner.run(z)
        keep_all = TiledVAERunner(decoder_program(vae), TiledVAEConfig(budget=BIG))
        with _LiveTensorBytes() as generous:
            keep_all.run(z)
    if spill:
        assert runner.report.spilled and not runner.report.recomputed
    else:
        assert runner.report.recomputed, "the budget forces recomputation at high resolution"
    assert lean.peak - output_bytes <= budget
    assert lean.peak >= runner.report.peak_estimate, "the checkpoints it reports were held"
    assert generous.peak - output_bytes > 2 * budget, "the measurement sees kept states"


def test_attention_is_exact_with_chunked_queries(vae):
    attn = vae.decoder.mid_block.attentions[0]
    op = Attend(attn)
    x = torch.randn(1, attn.to_q.in_features, 5, 7, generator=torch.Generator().manual_seed(5))
    stats = tiled_vae.GroupStats(attn.group_norm.num_groups)
    stats.add(x)
    with torch.inference_mode():
        ref = attn(x)
        for budget in (1, 10**9):  # one query row at a time / all at once
            torch.testing.assert_close(
                _run_attention(op, stats, x, budget), ref, atol=1e-5, rtol=1e-5
            )


def test_channels_last_bfloat16_runs_and_stays_close(vae):
    import copy

    half = copy.deepcopy(vae).to(torch.bfloat16).to(memory_format=torch.channels_last)
    z = torch.randn(1, 4, 7, 9, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        ref = vae.decode(z).sample
        out = tiled_decode(half, z, BIG, 16)
    assert out.dtype == torch.bfloat16
    assert psnr(out, ref) >= 30.0  # bf16 rounding, not tiling


def test_untiled_estimate_grows_with_the_image(vae):
    small = estimate_untiled_bytes(vae, "decode", (1, 4, 8, 8), torch.float32)
    large = estimate_untiled_bytes(vae, "decode", (1, 4, 16, 16), torch.float32)
    assert small > 0 and abs(large / small - 4) < 0.01


def test_unsupported_structure_is_detected(vae):
    import copy

    odd = copy.deepcopy(vae)
    odd.decoder.conv_act = nn.ReLU()
    assert is_supported(vae) and not is_supported(odd)


def test_whole_image_path_equals_diffusers(vae):
    g = torch.Generator().manual_seed(7)
    x = torch.rand(1, 3, 40, 56, generator=g) * 2 - 1
    z = torch.randn(1, 4, 5, 7, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(tiled_vae.whole_encode(vae, x), _untiled_moments(vae, x))
        torch.testing.assert_close(
            tiled_vae.whole_decode(vae, z), vae.decode(z).sample, atol=1e-5, rtol=1e-5
        )


def test_upsampling_folded_into_the_conv():
    torch.manual_seed(8)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, 7, 9)
    with torch.inference_mode():
        ref = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        out = tiled_vae.upsample_conv(
            torch.nn.functional.pad(x, (1, 1, 1, 1)),
            tiled_vae.subpixel_weights(conv.weight),
            conv.bias,
        )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_checkpoint_planner_under_a_tight_budget():
    """A budget where some full-resolution states can be kept and others not. The plan
    costs between keeping everything and keeping nothing, the runner follows it, and the
    result is still exact."""
    from d3sr_core.inference.tiled_vae import (
        MIN_WORK_BYTES,
        MIN_WORK_FRACTION,
        _op_cost,
        _shapes,
        plan_checkpoints,
    )

    big = tiny_vae()
    ops = decoder_program(big)
    sizes, chans = _shapes(ops, 48, 48, 4)
    full = sizes[-1][0] * sizes[-1][1] * 4
    # Room for 20 one-channel full-resolution maps besides the tiles: the tiny decoder's
    # full-resolution states are 8 (block output), 16 (input + branch) or 24 channels.
    budget = 20 * full + MIN_WORK_BYTES
    floor = max(budget * MIN_WORK_FRACTION, MIN_WORK_BYTES)
    syncs = [i for i, op in enumerate(ops) if op.sync] + [len(ops)]
    # the states before upsamplings may be kept too (a pass that only stores them)
    optional = frozenset(
        i for i, op in enumerate(ops) if isinstance(op, tiled_vae.UpConv | tiled_vae.Upsample)
    )
    assert optional and not optional & set(syncs)
    keep, cost, spilled = plan_checkpoints(ops, sizes, chans, 4, budget, floor, optional)
    assert not spilled, "nothing is spilled unless allowed"
    prefix = [0.0]
    for i, op in enumerate(ops):
        prefix.append(
            prefix[-1] + _op_cost(op, sizes[i], sizes[i + 1], chans[i][-1], chans[i + 1][-1])
        )

    def total_cost(kept):
        ck, cost = 0, 0.0
        for s in sorted({*syncs, *(kept & optional)}):
            cost += prefix[s] - prefix[ck]
            if s in kept:
                ck = s + 1 if s < len(ops) and isinstance(ops[s], Attend) else s
        return cost

    assert {i for i, op in enumerate(ops) if isinstance(op, Attend)} | {len(ops)} <= keep
    everything = set(syncs)
    nothing = {s for s in syncs if s == len(ops) or isinstance(ops[s], Attend)}
    assert total_cost(everything) <= total_cost(keep) <= total_cost(nothing)
    assert cost == pytest.approx(total_cost(keep))
    assert keep != everything, "the budget is tight"
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        config = TiledVAEConfig(budget=int(budget), compact_checkpoints=False, spill=False)
        runner = TiledVAERunner(decoder_program(big), config)
        out = runner.run(z)
        torch.testing.assert_close(out, big.decode(z).sample, atol=1e-4, rtol=1e-4)
    assert runner.report.recomputed and set(runner.report.kept) == keep


@pytest.mark.parametrize("length", [1, 7, 8, 9, 33, 100])
@pytest.mark.parametrize("window", [None, 1, 4, 8, 12])
def test_attention_spans_cover_every_query_once_inside_a_full_window(length, window):
    spans = tiled_vae.attention_spans(length, window)
    queries = [q for q0, q1, _, _ in spans for q in range(q0, q1)]
    assert queries == list(range(length)), "every query in exactly one block, in order"
    for q0, q1, k0, k1 in spans:
        assert 0 <= k0 <= q0 < q1 <= k1 <= length
        if window is None or length <= window:
            assert (k0, k1) == (0, length)
        else:
            assert k1 - k0 == window
            # the block sits in the middle of its window unless the border shifts it
            if 0 < k0 and k1 < length:
                assert abs((q0 - k0) - (k1 - q1)) <= 1


def _masked_reference(attn, x, window):
    """Brute force: full attention with a mask allowing exactly each query's key window."""
    b, c, h, w = x.shape
    heads = attn.heads
    t = attn.group_norm(x).flatten(2).transpose(1, 2)
    q, k, v = (
        m(t).view(b, -1, heads, c // heads).transpose(1, 2)
        for m in (attn.to_q, attn.to_k, attn.to_v)
    )
    allowed = torch.zeros(h, w, h, w, dtype=torch.bool)
    for qy0, qy1, ky0, ky1 in tiled_vae.attention_spans(h, window):
        for qx0, qx1, kx0, kx1 in tiled_vae.attention_spans(w, window):
            allowed[qy0:qy1, qx0:qx1, ky0:ky1, kx0:kx1] = True
    o = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed.view(h * w, h * w), scale=attn.scale
    )
    o = attn.to_out[0](o.transpose(1, 2).reshape(b, -1, c)).transpose(1, 2).view(b, c, h, w)
    return (o + x) / attn.rescale_output_factor


@pytest.mark.parametrize("shape,window", [((11, 19), 8), ((16, 16), 4), ((9, 30), 12)])
def test_windowed_attention_equals_masked_full_attention(vae, shape, window):
    attn = vae.decoder.mid_block.attentions[0]
    op = Attend(attn)
    x = torch.randn(1, attn.to_q.in_features, *shape, generator=torch.Generator().manual_seed(10))
    stats = tiled_vae.GroupStats(attn.group_norm.num_groups)
    stats.add(x)
    with torch.inference_mode():
        ref = _masked_reference(attn, x, window)
        out = _run_attention(op, stats, x, 10**9, window)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, attn(x), atol=1e-3), "a window smaller than the image"
        # a window covering the image is plain global attention
        torch.testing.assert_close(
            _run_attention(op, stats, x, 10**9, max(shape)), attn(x), atol=1e-5, rtol=1e-5
        )


def test_default_attention_window_is_64_latents(vae, monkeypatch):
    """By default (512 px, the UNet's training-crop bound) the VAE attention is global up to
    64 latents per side, exactly diffusers' decoder, and windowed beyond: equal to diffusers'
    decoder whose mid-block attention is the brute-force masked 64x64 window, whole and
    tiled alike."""
    g = torch.Generator().manual_seed(13)
    small = torch.randn(1, 4, 64, 40, generator=g)
    large = torch.randn(1, 4, 66, 70, generator=g)  # 528 x 560 px
    attn = vae.decoder.mid_block.attentions[0]
    with torch.inference_mode():
        torch.testing.assert_close(
            tiled_vae.whole_decode(vae, small), vae.decode(small).sample, atol=1e-4, rtol=1e-4
        )
        global_large = vae.decode(large).sample
        monkeypatch.setattr(attn, "forward", lambda x, *a, **k: _masked_reference(attn, x, 64))
        ref = vae.decode(large).sample
        whole = tiled_vae.whole_decode(vae, large)
        tiled = tiled_decode(vae, large, BIG, 128)
    assert not torch.allclose(ref, global_large, atol=1e-3), "the window is not global at 66"
    torch.testing.assert_close(whole, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tiled, ref, atol=1e-4, rtol=1e-4)


def test_window_applies_when_only_the_height_exceeds_it(vae, monkeypatch):
    """A latent taller than the window but narrower is windowed too (the longer side
    decides): equal to diffusers' decoder with the brute-force masked window, not global."""
    z = torch.randn(1, 4, 12, 6, generator=torch.Generator().manual_seed(17))
    attn = vae.decoder.mid_block.attentions[0]
    with torch.inference_mode():
        global_out = vae.decode(z).sample
        whole = tiled_vae.whole_decode(vae, z, attention_window=8)
        monkeypatch.setattr(attn, "forward", lambda x, *a, **k: _masked_reference(attn, x, 8))
        ref = vae.decode(z).sample
    assert not torch.allclose(ref, global_out, atol=1e-3), "a window of 8 is not global at 12"
    torch.testing.assert_close(whole, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("budget", [BIG, TINY])
def test_tiled_equals_whole_with_windowed_attention(vae, budget):
    g = torch.Generator().manual_seed(11)
    z = torch.randn(1, 4, 9, 13, generator=g)
    x = torch.rand(1, 3, 72, 104, generator=g) * 2 - 1  # latent 9 x 13 (> window 6)
    with torch.inference_mode():
        ref_dec = tiled_vae.whole_decode(vae, z, attention_window=6)
        ref_enc = tiled_vae.whole_encode(vae, x, attention_window=6)
        assert not torch.allclose(ref_dec, vae.decode(z).sample, atol=1e-3)
        out_dec = tiled_decode(vae, z, budget, 40, attention_window=6)
        out_enc = tiled_encode(vae, x, budget, 32, attention_window=6)
    torch.testing.assert_close(out_dec, ref_dec, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_enc, ref_enc, atol=1e-4, rtol=1e-4)


def test_compact_checkpoints_trade_recomputation_for_bf16_rounding():
    """fp32 states of the full resolution do not all fit; in bfloat16 they do: the compact
    plan recomputes less, and the output stays within bf16 rounding of the exact one."""
    from d3sr_core.inference.tiled_vae import MIN_WORK_BYTES, _shapes

    big = tiny_vae()
    ops = decoder_program(big)
    sizes, _ = _shapes(ops, 48, 48, 4)
    full = sizes[-1][0] * sizes[-1][1] * 4
    budget = int(20 * full + MIN_WORK_BYTES)
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(12))
    runs = {}
    with torch.inference_mode():
        ref = big.decode(z).sample
        for compact in (False, True):
            config = TiledVAEConfig(budget=budget, compact_checkpoints=compact, spill=False)
            runner = TiledVAERunner(decoder_program(big), config)
            runs[compact] = (runner.run(z), runner.report)
    (exact, exact_report), (out, report) = runs[False], runs[True]
    torch.testing.assert_close(exact, ref, atol=1e-4, rtol=1e-4)
    assert exact_report.compact == [] and report.compact == [sizes[-1]]
    assert len(report.recomputed) < len(exact_report.recomputed)
    assert out.dtype == torch.float32
    assert not torch.equal(out, exact), "bf16 checkpoints round the stored states"
    assert psnr(out, ref) >= 45.0


def test_in_place_checkpoints_are_exact(monkeypatch):
    """Room for one full-resolution state but not two: the planner keeps states by
    overwriting the previous checkpoint band by band, and the output is still exact."""
    from d3sr_core.inference.tiled_vae import _shapes

    monkeypatch.setattr(tiled_vae.runner, "MIN_WORK_BYTES", 64 * 1024)
    big = tiny_vae()
    ops = decoder_program(big)
    sizes, chans = _shapes(ops, 48, 48, 4)
    full = sizes[-1][0] * sizes[-1][1] * 4
    # full-resolution block outputs have 8 channels: 8 maps + the bands fit, 8 + 8 do not
    assert {c[0] for c, hw in zip(chans, sizes, strict=True) if hw == sizes[-1]} >= {8}
    budget = 12 * full + 3 * 64 * 1024
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(13))
    with torch.inference_mode():
        ref = big.decode(z).sample
        config = TiledVAEConfig(budget=budget, compact_checkpoints=False, spill=False)
        runner = TiledVAERunner(decoder_program(big), config)
        out = runner.run(z)
    assert runner.report.in_place, "some full-resolution state replaced its checkpoint"
    assert set(runner.report.in_place) <= set(runner.report.kept)
    assert runner.report.peak_estimate <= budget
    assert len(runner.report.tile_sizes) == runner.report.passes
    assert runner.report.tiles > 2 * runner.report.passes, "several bands per pass"
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
