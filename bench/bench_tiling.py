"""Benchmark: tiled inference of the full-size generator on CPU (random weights, fp32).

Three measurements, printed as tables:

1. **Peak memory** - peak RSS above the loaded weights for a 2048x2048 output from a
   512x512 input (goal: < 3 GB), once with the default memory budget and once with an
   explicit 2 GiB budget. Each runs in its own process so the peak belongs to it alone.
2. **Time per output megapixel** from 0.25 MP to 4 MP with the default options
   (goal: flat within 20 %).
3. **Tiled / untiled time** at 1024x1024 output: UNet tiles of 768 px (OSEDiff's default)
   and 512 px VAE tiles vs. one untiled pass (goal: <= 1.3).

    python bench/bench_tiling.py            # everything (~40 min on 2 cores)
    python bench/bench_tiling.py --quick    # small sizes only (~5 min)
    python bench/bench_tiling.py --max-mp 2 # time per MP up to 2 MP only

The machine may be shared: wall time and this process's CPU time are both reported;
CPU time is less disturbed by other processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30


def build_generator(tiny: bool = False, seed: int = 0):
    """The D3SR generator with the SD2.1-base UNet and VAE architectures, random weights.

    ``tiny`` builds the test suite's miniature configs (same block structure) instead.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from d3sr_core.models import D3SRGenerator, GeneratorConfig
    from d3sr_core.models.configs import bundled_config
    from d3sr_core.models.schedule import alphas_cumprod_from_config

    torch.manual_seed(seed)
    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import tiny_generator

        return tiny_generator(seed=seed)
    unet = UNet2DConditionModel(**bundled_config("sd21-base", "unet"))
    vae = AutoencoderKL(**bundled_config("sd21-base", "vae"))
    context = unet.config.cross_attention_dim
    prompt = torch.randn(1, 77, context, generator=torch.Generator().manual_seed(seed))
    alphas = alphas_cumprod_from_config(bundled_config("sd21-base", "scheduler"))
    return D3SRGenerator(unet, vae, prompt, alphas, GeneratorConfig()).eval()


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0), so the peak excludes model construction."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _image(size: int):
    import torch

    g = torch.Generator().manual_seed(size)
    # A smooth random image (a real photo is smooth at the input scale).
    small = torch.rand(1, 3, max(2, size // 16), max(2, size // 16), generator=g)
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bicubic").clamp(0, 1)


def child_rss(out_size: int, budget_gib: float | None) -> dict:
    """Peak RSS above the weights for one upscale (runs in its own process)."""
    import torch

    from d3sr_core.inference.pipeline import D3SRPipeline, UpscaleOptions

    torch.set_grad_enabled(False)
    g = build_generator()
    pipe = D3SRPipeline(g)
    pipe.upscale_tensor(_image(8), UpscaleOptions(scale=4))  # warm-up, allocator settles
    weights = sum(p.numel() * p.element_size() for p in g.parameters())
    base_kib = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    budget = None if budget_gib is None else int(budget_gib * GIB)
    t0, c0 = time.perf_counter(), time.process_time()
    pipe.upscale_tensor(_image(out_size // 4), UpscaleOptions(scale=4, memory_budget_bytes=budget))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_kib = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from d3sr_core.inference.memory import resolve_budget

    return {
        "out": out_size,
        "budget_gib": (budget or resolve_budget(None, "cpu")) / GIB,
        "explicit": budget_gib is not None,
        "weights_gib": weights / GIB,
        "rss_base_gib": base_kib / 2**20,
        "peak_above_base_gib": (peak_kib - base_kib) / 2**20,
        "wall_s": wall,
        "cpu_s": cpu,
    }


def run_rss(out_size: int, budgets: list[float | None]) -> list[dict]:
    rows = []
    for budget in budgets:
        cmd = [sys.executable, __file__, "--child-rss", str(out_size)]
        if budget is not None:
            cmd += ["--child-budget", str(budget)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in res.stdout.splitlines() if x.startswith("{")]
        if res.returncode != 0 or not line:
            print(res.stdout[-2000:], res.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"child failed for budget {budget}")
        rows.append(json.loads(line[-1]))
        r = rows[-1]
        print(
            f"  {out_size}x{out_size} budget {r['budget_gib']:.1f} GiB"
            f"{' (explicit)' if r['explicit'] else ' (default)'}: peak {r['peak_above_base_gib']:.2f} GiB"
            f" above weights+runtime, {r['wall_s']:.0f} s",
            flush=True,
        )
    return rows


def timed(pipe, image, options) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    pipe.upscale_tensor(image, options)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes only (~5 min)")
    ap.add_argument("--max-mp", type=float, default=4.0, help="largest output for time per MP")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--child-rss", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-budget", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_rss:
        print(json.dumps(child_rss(args.child_rss, args.child_budget)))
        return

    import torch

    from d3sr_core.inference.pipeline import D3SRPipeline, UpscaleOptions

    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    rss_size = 1024 if args.quick else 2048
    if not args.skip_rss:
        print(
            f"\n## 1. Peak RSS, {rss_size}x{rss_size} output from {rss_size // 4}x{rss_size // 4}"
        )
        rows = run_rss(rss_size, [None, 2.0])
        print("\n| budget | peak RSS above weights (GiB) | goal | wall (s) |\n|---|---|---|---|")
        for r in rows:
            kind = "explicit" if r["explicit"] else "default"
            ok = "ok" if r["peak_above_base_gib"] < 3 else "over"
            print(
                f"| {r['budget_gib']:.1f} GiB ({kind}) | {r['peak_above_base_gib']:.2f} | < 3 ({ok}) | {r['wall_s']:.0f} |"
            )
        print(
            f"(weights {rows[0]['weights_gib']:.2f} GiB fp32; runtime+weights RSS {rows[0]['rss_base_gib']:.2f} GiB)"
        )
    if args.skip_time:
        return

    g = build_generator()
    pipe = D3SRPipeline(g)
    pipe.upscale_tensor(_image(16), UpscaleOptions(scale=4))  # warm-up

    sizes = [512, 1024] if args.quick else [512, 1024, 1448, 2048]
    sizes = [s for s in sizes if s * s <= args.max_mp * 1.05e6 * 1.0]
    print("\n## 2. Time per output megapixel (default options, fp32)")
    print(
        "| output | MP | wall (s) | CPU (s) | wall s/MP | CPU s/MP | vs smallest |\n|---|---|---|---|---|---|---|"
    )
    first = None
    for s in sizes:
        wall, cpu = timed(pipe, _image(s // 4), UpscaleOptions(scale=4))
        mp = s * s / 1e6
        per = cpu / mp
        first = first or per
        print(
            f"| {s}x{s} | {mp:.2f} | {wall:.1f} | {cpu:.1f} | {wall / mp:.1f} | {per:.1f} | {per / first:.2f} |",
            flush=True,
        )

    ratio_size = 512 if args.quick else 1024
    print(f"\n## 3. Tiled vs untiled, {ratio_size}x{ratio_size} output (interleaved, min of 2)")
    untiled = UpscaleOptions(scale=4, tile_size=None, vae_tile_size=None)
    unet_tile = 384 if args.quick else 768
    tiled = UpscaleOptions(
        scale=4,
        tile_size=unet_tile,
        tile_overlap=256 if not args.quick else 128,
        vae_tile_size=ratio_size // 2,
    )
    image = _image(ratio_size // 4)
    best = {"untiled": [math.inf, math.inf], "tiled": [math.inf, math.inf]}
    for _ in range(2):
        for name, opts in (("untiled", untiled), ("tiled", tiled)):
            wall, cpu = timed(pipe, image, opts)
            best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
            print(f"  {name}: wall {wall:.1f} s, CPU {cpu:.1f} s", flush=True)
    print("| run | wall (s) | CPU (s) |\n|---|---|---|")
    for name, (wall, cpu) in best.items():
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")
    print(
        f"tiled/untiled: wall {best['tiled'][0] / best['untiled'][0]:.2f}, "
        f"CPU {best['tiled'][1] / best['untiled'][1]:.2f} (goal <= 1.3); UNet tiles {unet_tile} px, "
        f"VAE tiles {ratio_size // 2} px"
    )


if __name__ == "__main__":
    main()
