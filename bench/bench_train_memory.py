#!/usr/bin/env python3
"""Full-size training memory estimate on the ``meta`` device (no weights, no compute).

Builds the real architectures (SD2.1-base UNet + VAE, SDXL-base discriminator trunk, VGG16
for EA-DISTS) on ``meta``, runs the trainer's generator step and discriminator step on
512 x 512 crops, and sums the bytes of every tensor autograd saves for backward (a
``saved_tensors_hooks`` count; aliases are counted once per saving op, so this is an upper
bound of activation memory without gradient checkpointing). Weights, LoRA, gradients and
AdamW states are counted from parameter shapes.

    python bench/bench_train_memory.py --batch 2 --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from d3sr_core.losses.dists import VGG16Features  # noqa: E402
from d3sr_core.models.configs import bundled_config  # noqa: E402
from d3sr_core.models.discriminator import (  # noqa: E402
    build_trunk,
    lora_target_names,
    trunk_forward,
    zero_condition,
)
from d3sr_core.models.lora import DEFAULT_UNET_LORA_TARGETS, count_lora_parameters  # noqa: E402

GIB = 1024**3


class SavedBytes:
    """Counts the bytes of tensors saved for backward inside the context."""

    def __init__(self) -> None:
        self.bytes = 0

    def __enter__(self):
        def pack(t):
            self.bytes += t.numel() * t.element_size()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2, help="images per GPU (paper: 8 over 4 GPUs)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    b, s = args.batch, args.size
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(bundled_config("sd21-base", "unet")).to(dtype)
        vae = AutoencoderKL.from_config(bundled_config("sd21-base", "vae")).to(dtype)
        vgg = VGG16Features().to(dtype)
    trunk = build_trunk("sdxl-base", device="meta", dtype=dtype)
    for m in (unet, vae, vgg, trunk):
        m.requires_grad_(False)
    cond = zero_condition(dict(trunk.config))
    g_lora = count_lora_parameters(unet, DEFAULT_UNET_LORA_TARGETS, args.rank)
    d_lora = sum(
        args.rank
        * (
            m.in_features + m.out_features
            if isinstance(m, torch.nn.Linear)
            else (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
        )
        for m in (trunk.get_submodule(n) for n in lora_target_names(trunk))
    )
    head = 1280 * 256 + 256 + 2 * 256 + 256 + 1  # PatchHead
    trainable = g_lora + d_lora + head
    frozen = params(unet) + params(vae) + params(trunk) + params(vgg)

    def trunk_logits(z, batch):
        t = torch.zeros(batch, dtype=torch.long, device="meta")
        ctx = cond.encoder_hidden_states.to("meta", dtype).expand(batch, -1, -1)
        te = cond.text_embeds.to("meta", dtype).expand(batch, -1)
        ids = cond.time_ids.to("meta").expand(batch, -1)
        return trunk_forward(trunk, z, t, ctx, te, ids)

    h = s // 8
    # ---- generator step: UNet (+ LoRA grads) -> VAE decoder -> EA-DISTS (2 VGG passes) + D
    latent = torch.empty(b, 4, h, h, device="meta", dtype=dtype, requires_grad=True)
    prompt = torch.empty(b, 77, 1024, device="meta", dtype=dtype)
    t = torch.full((b,), 399, device="meta", dtype=torch.long)
    with SavedBytes() as unet_saved:
        z0 = unet(latent, t, encoder_hidden_states=prompt, return_dict=False)[0]
    with SavedBytes() as dec_saved:
        img = vae.decode(z0, return_dict=False)[0]
    with SavedBytes() as vgg_saved:
        vgg(img)
        vgg(img)  # the Sobel edge map goes through VGG too (target features: no autograd)
    with SavedBytes() as dg_saved:
        trunk_logits(z0, b)
    g_act = unet_saved.bytes + dec_saved.bytes + vgg_saved.bytes + dg_saved.bytes
    # ---- discriminator step: trunk on real + fake latents (LoRA grads)
    z = torch.empty(2 * b, 4, h, h, device="meta", dtype=dtype, requires_grad=True)
    with SavedBytes() as d_saved:
        trunk_logits(z, 2 * b)

    el = torch.finfo(dtype).bits // 8
    weights = frozen * el
    state = trainable * 4 * 4  # fp32 params, grads, AdamW exp_avg and exp_avg_sq
    print(f"batch {b} per GPU, {s}x{s} crops, {args.dtype} frozen weights and activations")
    print(f"frozen parameters: {frozen / 1e6:,.1f} M -> {weights / GIB:.2f} GiB")
    print(f"  UNet {params(unet) / 1e6:.1f} M, VAE {params(vae) / 1e6:.1f} M, SDXL trunk "
          f"{params(trunk) / 1e6:.1f} M, VGG16 {params(vgg) / 1e6:.1f} M")  # fmt: skip
    print(f"trainable: G LoRA {g_lora / 1e6:.2f} M, D LoRA {d_lora / 1e6:.2f} M, head "
          f"{head / 1e3:.0f} k -> params+grads+AdamW {state / GIB:.2f} GiB (fp32)")  # fmt: skip
    print("activations saved for backward (no gradient checkpointing):")
    for name, v in (("UNet", unet_saved), ("VAE decoder", dec_saved), ("VGG x2", vgg_saved),
                    ("SDXL trunk (G step)", dg_saved), ("SDXL trunk (D step, 2B)", d_saved)):  # fmt: skip
        print(f"  {name:26s} {v.bytes / GIB:7.2f} GiB")
    peak = weights + state + max(g_act, d_saved.bytes)
    print(f"generator-step activations {g_act / GIB:.2f} GiB, discriminator-step "
          f"{d_saved.bytes / GIB:.2f} GiB")  # fmt: skip
    print(
        f"estimated peak (weights + state + larger step): {peak / GIB:.1f} GiB "
        "(+ allocator slack and temporaries)"
    )


if __name__ == "__main__":
    main()
