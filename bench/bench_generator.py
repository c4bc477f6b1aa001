"""Full-size D3SR generator on CPU: per-stage time, peak RSS, merged LoRA vs peft's unmerged LoRA.

Random weights (no download), fp32, one 512x512 output (64x64 latent), batch 1.

    python bench/bench_generator.py            # 3 timed repeats after a warm-up
    python bench/bench_generator.py --repeats 1

Prints a table; the README's performance section quotes it.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from d3sr_core.models import D3SRGenerator, GeneratorConfig
from d3sr_core.models.configs import bundled_config
from d3sr_core.models.lora import DEFAULT_UNET_LORA_TARGETS, LoraAdapter, find_lora_targets
from d3sr_core.models.schedule import alphas_cumprod_from_config


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def random_adapter(unet: torch.nn.Module, rank: int = 16) -> LoraAdapter:
    g = torch.Generator().manual_seed(0)
    factors = {}
    for name in find_lora_targets(unet, DEFAULT_UNET_LORA_TARGETS):
        m = unet.get_submodule(name)
        if isinstance(m, torch.nn.Linear):
            a, b = (
                torch.randn(rank, m.in_features, generator=g),
                torch.randn(m.out_features, rank, generator=g),
            )
        else:
            kh, kw = m.kernel_size
            a = torch.randn(rank, m.in_channels, kh, kw, generator=g)
            b = torch.randn(m.out_channels, rank, 1, 1, generator=g)
        factors[name] = (a * 0.01, b * 0.01)
    return LoraAdapter(factors, scale=1.0)


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512, help="output side in pixels")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(bundled_config("sd21-base", "unet")).eval()
    vae = AutoencoderKL.from_config(bundled_config("sd21-base", "vae")).eval()
    build_s = time.perf_counter() - t0
    adapter = random_adapter(unet)

    gen = D3SRGenerator(
        unet,
        vae,
        torch.randn(1, 77, 1024),
        alphas_cumprod_from_config(bundled_config("sd21-base", "scheduler")),
        GeneratorConfig(),
    ).eval()
    t0 = time.perf_counter()
    gen.merge_adapters(unet=adapter)
    merge_s = time.perf_counter() - t0
    rss_after_load = peak_rss_gb()

    x = torch.rand(1, 3, args.size, args.size) * 2 - 1
    with torch.inference_mode():
        enc_s, z = timed(lambda: gen.encode(x), args.repeats)
        unet_s, z0 = timed(lambda: gen.denoise(z), args.repeats)
        dec_s, _ = timed(lambda: gen.decode(z0), args.repeats)

    # peft's unmerged path on the same weights: the LoRA runs as extra matmuls every call
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    rank = next(iter(adapter.factors.values()))[0].shape[0]
    gen.set_strength(0.0)  # back to the base weights, in place: no second UNet copy in memory
    peft_unet = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=list(DEFAULT_UNET_LORA_TARGETS)),
        gen.unet,
    ).eval()
    state = {}
    for name, (a, b) in adapter.factors.items():
        state[f"{name}.lora_A.weight"] = a
        state[f"{name}.lora_B.weight"] = b
    set_peft_model_state_dict(peft_unet, state)
    with torch.inference_mode():
        peft_s, z0_peft = timed(lambda: gen.denoise(z), args.repeats)
    max_diff = (z0 - z0_peft).abs().max().item()

    print(
        f"full-size D3SR generator, fp32, CPU ({args.threads} threads), {args.size}x{args.size} output, best of {args.repeats}"
    )
    print("| stage | seconds |\n|---|---|")
    print(f"| build model (random init) | {build_s:.1f} |")
    print(f"| merge rank-16 LoRA ({len(adapter.factors)} modules) | {merge_s:.2f} |")
    print(f"| VAE encode | {enc_s:.2f} |")
    print(f"| UNet (merged LoRA) | {unet_s:.2f} |")
    print(f"| VAE decode | {dec_s:.2f} |")
    print(f"| total | {enc_s + unet_s + dec_s:.2f} |")
    print(f"| UNet (peft, unmerged LoRA) | {peft_s:.2f} |")
    print(f"merged / unmerged UNet time: {unet_s / peft_s:.2f} (max |x0 diff| = {max_diff:.2e})")
    print(
        f"peak RSS after load+merge: {rss_after_load:.2f} GB; overall peak RSS: {peak_rss_gb():.2f} GB"
    )


if __name__ == "__main__":
    main()
