"""Benchmark: tiled inference of the full-size generator on CPU (random weights, fp32).

Measurements, printed as tables:

1-2. **Time per output megapixel and peak memory** from 0.25 MP to 4 MP (x4 from 1/4 the
   side) with the default options, each size in its own process so the peak RSS belongs to
   it alone. Goals: time per MP flat within 20 %; at 2048x2048 the peak RSS stays below the
   loaded weights + 3 GB. ``--budget`` runs the same with an explicit memory budget.
3. **Tiled / untiled time** at 1024x1024 output: UNet tiles of 768 px (OSEDiff's default)
   and 512 px VAE tiles vs. one untiled pass (goal: <= 1.3).

    python bench/bench_tiling.py            # everything (~30 min on 2 cores)
    python bench/bench_tiling.py --quick    # small sizes only (~5 min)
    python bench/bench_tiling.py --sizes 512,2048 --skip-ratio --budget 4

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


def child_rss(out_size: int, budget_gib: float | None, precision: str | None = None) -> dict:
    """Peak RSS above the weights for one upscale (runs in its own process); ``precision``
    None keeps the fp32 generator, else :func:`prepare_generator` with it."""
    import torch

    from d3sr_core.inference.options import UpscaleOptions
    from d3sr_core.inference.pipeline import D3SRPipeline
    from d3sr_core.inference.precision import prepare_generator

    torch.set_grad_enabled(False)
    g = build_generator()
    if precision is not None:
        g = prepare_generator(g, "cpu", precision)
    pipe = D3SRPipeline(g)
    pipe.upscale_tensor(_image(8), UpscaleOptions(scale=4))  # warm-up, allocator settles
    weights = sum(p.numel() * p.element_size() for p in g.parameters())
    base_kib = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    budget = None if budget_gib is None else int(budget_gib * GIB)
    stages, stage_peaks, peaks = {}, {}, []
    for name in ("encode", "denoise", "decode"):
        stage = getattr(pipe, name)

        def timed_stage(*a, _stage=stage, _name=name, **k):
            t = time.perf_counter()
            out = _stage(*a, **k)
            stages[_name] = stages.get(_name, 0.0) + time.perf_counter() - t
            # the peak since the last stage ended (VmHWM is reset below the whole run's max)
            stage_peaks[_name] = (_status_kib("VmHWM") - base_kib) / 2**20
            peaks.append(_status_kib("VmHWM"))
            _reset_peak_rss()
            return out

        setattr(pipe, name, timed_stage)
    t0, c0 = time.perf_counter(), time.process_time()
    pipe.upscale_tensor(_image(out_size // 4), UpscaleOptions(scale=4, memory_budget_bytes=budget))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peaks.append(_status_kib("VmHWM"))
    peak_kib = max(peaks) if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "out": out_size,
        "budget_gib": (budget or pipe._budget(None)) / GIB,
        "explicit": budget_gib is not None,
        "weights_gib": weights / GIB,
        "rss_base_gib": base_kib / 2**20,
        "peak_above_base_gib": (peak_kib - base_kib) / 2**20,
        "peak_minus_weights_gb": (peak_kib * 1024 - weights) / 1e9,
        "wall_s": wall,
        "cpu_s": cpu,
        "stages_s": stages,
        "stage_peak_above_base_gib": stage_peaks,
    }


def run_script(script: str, args: list[str]) -> dict:
    """Run ``script args`` in a fresh process (so its peak RSS is its own) and return the
    last JSON line it prints."""
    res = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT)
    line = [x for x in res.stdout.splitlines() if x.startswith("{")]
    if res.returncode != 0 or not line:
        print(res.stdout[-2000:], res.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"child {Path(script).name} {' '.join(args)} failed")
    return json.loads(line[-1])


def run_child(out_size: int, budget: float | None) -> dict:
    """One upscale in a fresh process, so the peak RSS belongs to it alone."""
    args = ["--child-rss", str(out_size)]
    if budget is not None:
        args += ["--child-budget", str(budget)]
    return run_script(__file__, args)


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
    ap.add_argument(
        "--sizes", help="comma-separated output sides for time per MP (default 512..2048)"
    )
    ap.add_argument("--budget", type=float, help="memory budget in GiB (default: the engine's)")
    ap.add_argument("--skip-ratio", action="store_true", help="skip the tiled/untiled ratio")
    ap.add_argument("--skip-time", action="store_true", help="skip time per MP and peak RSS")
    ap.add_argument("--child-rss", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-budget", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    # as the d3sr command does, before this process's first convolution
    from d3sr_core.inference.memory import bound_onednn_primitive_cache

    bound_onednn_primitive_cache()
    if args.child_rss:
        print(json.dumps(child_rss(args.child_rss, args.child_budget)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    sizes = [512, 1024] if args.quick else [512, 1024, 1448, 2048]
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    sizes = [x for x in sizes if x * x <= args.max_mp * 1.05e6]
    if not args.skip_time:
        budget = "default" if args.budget is None else f"{args.budget:g} GiB"
        print(f"\n## 1-2. Time per output megapixel and peak RSS (x4, fp32, budget {budget})")
        print(
            "| output | MP | wall (s) | CPU (s) | wall s/MP | CPU s/MP | CPU s/MP vs smallest "
            "| encode / UNet / decode (s) | peak RSS above loaded model (GiB) "
            "| peak RSS - weights (GB) |\n|---|---|---|---|---|---|---|---|---|---|"
        )
        first = None
        for size in sizes:
            r = run_child(size, args.budget)
            mp = size * size / 1e6
            per = r["cpu_s"] / mp
            stages = " / ".join(f"{r['stages_s'][k]:.0f}" for k in ("encode", "denoise", "decode"))
            first = first or per
            print(
                f"| {size}x{size} | {mp:.2f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} "
                f"| {r['wall_s'] / mp:.1f} | {per:.1f} | {per / first:.2f} "
                f"| {stages} "
                f"| {r['peak_above_base_gib']:.2f} | {r['peak_minus_weights_gb']:.2f} |",
                flush=True,
            )
            peaks = r["stage_peak_above_base_gib"]
            print(
                "  peak RSS above the loaded model per stage (GiB): "
                + ", ".join(f"{k} {v:.2f}" for k, v in peaks.items()),
                file=sys.stderr,
                flush=True,
            )
        print(
            f"(budget {r['budget_gib']:.2f} GiB; weights {r['weights_gib']:.2f} GiB fp32; "
            f"loaded model (weights + torch runtime) RSS {r['rss_base_gib']:.2f} GiB; goal: at "
            f"2048x2048 the whole process's peak RSS < weights + 3 GB)"
        )

    import torch

    from d3sr_core.inference.options import UpscaleOptions
    from d3sr_core.inference.pipeline import D3SRPipeline

    torch.set_grad_enabled(False)
    g = build_generator()
    pipe = D3SRPipeline(g)
    pipe.upscale_tensor(_image(16), UpscaleOptions(scale=4))  # warm-up

    if args.skip_ratio:
        return
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
