"""The default memory budget and the untiled-VAE estimate follow the precision: half-precision
states take half the bytes, so bf16 runs are not pushed into tiling that fp32 would need."""

import torch
from tiny_models import tiny_generator, tiny_vae

from d3sr_core.inference import memory, tiled_vae
from d3sr_core.inference.memory import resolve_budget
from d3sr_core.inference.pipeline import D3SRPipeline


def test_cpu_budget_cap_follows_the_dtype(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 64 * 2**30)
    fp32_cap = resolve_budget(None, "cpu", torch.float32)
    assert fp32_cap == resolve_budget(None, "cpu") == memory.CPU_BUDGET_CAP_BYTES
    for half in (torch.bfloat16, torch.float16):
        assert resolve_budget(None, "cpu", half) == memory.CPU_BUDGET_CAP_BYTES_HALF > fp32_cap
    # below the caps the budget is a share of the free RAM, whatever the dtype
    monkeypatch.setattr(memory, "available_memory", lambda device: 4 * 2**30)
    assert resolve_budget(None, "cpu", torch.bfloat16) == resolve_budget(None, "cpu") == 2**30
    assert resolve_budget(12345, "cpu", torch.bfloat16) == 12345


def test_untiled_estimate_of_half_precision_is_half_of_fp32():
    vae = tiny_vae()
    for kind, shape in (("encode", (1, 3, 64, 48)), ("decode", (1, 4, 8, 6))):
        fp32 = tiled_vae.estimate_untiled_bytes(vae, kind, shape, torch.float32)
        bf16 = tiled_vae.estimate_untiled_bytes(vae, kind, shape, torch.bfloat16)
        assert abs(2 * bf16 - fp32) <= 2, (kind, fp32, bf16)


def test_pipeline_budget_uses_the_widest_activation_dtype(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 64 * 2**30)
    g = tiny_generator()
    pipe = D3SRPipeline(g)
    assert pipe._budget(None) == memory.CPU_BUDGET_CAP_BYTES  # fp32
    g.unet.to(torch.bfloat16)
    assert pipe._budget(None) == memory.CPU_BUDGET_CAP_BYTES, "the VAE is still fp32"
    g.vae.to(torch.bfloat16)
    assert pipe._budget(None) == memory.CPU_BUDGET_CAP_BYTES_HALF
    assert pipe._budget(4096) == 4096
