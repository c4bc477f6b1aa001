"""Benchmark: precision "auto" vs plain fp32 on CPU, full-size generator (random weights).

Same weights, same run, 512x512 output from a 128x128 input:

* **fp32**: the plain diffusers calls (``vae.encode`` -> ``unet`` -> closed-form x0 ->
  ``vae.decode``) in fp32, contiguous memory format;
* **auto**: :func:`prepare_generator` with ``"auto"`` (bf16 + channels_last on CPUs with
  native bf16, else fp32) through :class:`D3SRPipeline`.

Reports the time ratio (goal: auto <= 0.4x fp32), the output PSNR of auto vs fp32
(goal >= 35 dB), and achieved FLOP/s against the bf16 GEMM rate measured in the same run
(the full generator costs 4.24 TFLOP per 512x512 output, reference/paper: 2,132 G MACs).

    python bench/bench_cpu_precision.py          # 512x512, best of 2 (~3 min on 2 cores)
    python bench/bench_cpu_precision.py --quick  # 256x256, one run (FLOPs scaled by area)
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiling import ROOT, _image, build_generator  # noqa: E402

sys.path.insert(0, str(ROOT))

FLOPS_512 = 4.24e12


def gemm_rate(dtype, n: int = 2048, reps: int = 5) -> float:
    """Measured dense matmul FLOP/s for ``dtype`` (best of ``reps``)."""
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def psnr(a, b) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="256x256 output, one run")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from d3sr_core.inference.options import UpscaleOptions
    from d3sr_core.inference.pipeline import D3SRPipeline
    from d3sr_core.inference.precision import cpu_supports_bf16, prepare_generator

    torch.set_grad_enabled(False)
    out = 256 if args.quick else 512
    reps = 1 if args.quick else 2
    flops = FLOPS_512 * (out / 512) ** 2

    g32 = build_generator()
    gauto = prepare_generator(copy.deepcopy(g32), "cpu", "auto")
    plan = gauto.precision_plan
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU native bf16: {cpu_supports_bf16()}"
    )
    print(f"auto = {plan.describe()}")

    image = _image(out // 4)
    up = F.interpolate(image, size=(out, out), mode="bicubic", align_corners=False).clamp(0, 1)

    def plain_fp32():
        # The diffusers calls a user would write, fp32, no tiling, no colour fix.
        return (g32.decode(g32.denoise(g32.encode(up * 2 - 1))) + 1) / 2

    pipe = D3SRPipeline(gauto)
    opts = UpscaleOptions(scale=4, color_fix="none")

    def auto():
        return pipe.upscale_tensor(image, opts)

    # warm-up (oneDNN primitive creation) at a small size
    small = _image(8)
    D3SRPipeline(g32).upscale_tensor(small, opts)
    pipe.upscale_tensor(small, opts)

    times = {"fp32": [], "auto": []}
    outputs = {}
    for _ in range(reps):
        for name, fn in (("fp32", plain_fp32), ("auto", auto)):
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
            print(
                f"  {name}: wall {times[name][-1][0]:.1f} s, CPU {times[name][-1][1]:.1f} s",
                flush=True,
            )

    bf16_rate = gemm_rate(torch.bfloat16)
    fp32_rate = gemm_rate(torch.float32)
    best = {k: min(v) for k, v in times.items()}
    quality = psnr(outputs["auto"], outputs["fp32"].clamp(0, 1))

    print(f"\n## {out}x{out} output, best of {reps}")
    print(
        "| run | wall (s) | CPU (s) | achieved GFLOP/s | vs bf16 GEMM | vs fp32 GEMM |\n|---|---|---|---|---|---|"
    )
    for name in ("fp32", "auto"):
        wall, cpu = best[name]
        rate = flops / wall
        print(
            f"| {name} | {wall:.2f} | {cpu:.1f} | {rate / 1e9:.0f} | {rate / bf16_rate:.0%} | {rate / fp32_rate:.0%} |"
        )
    ratio = best["auto"][0] / best["fp32"][0]
    print(f"\nauto / fp32 time: {ratio:.2f} (goal <= 0.40)")
    print(f"PSNR auto vs fp32: {quality:.1f} dB (goal >= 35)")
    print(f"GEMM 2048^3: bf16 {bf16_rate / 1e9:.0f} GFLOP/s, fp32 {fp32_rate / 1e9:.0f} GFLOP/s")
    print(
        f"(FLOPs: {flops / 1e12:.2f} T for this output{', scaled by area from 4.24 T at 512' if out != 512 else ''})"
    )


if __name__ == "__main__":
    main()
