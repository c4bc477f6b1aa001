"""Benchmark: large images at the speed of small ones (issue #12), the user's default run.

One command prints

1. **Per-size table**, 512x512 to 4096x4096 output (x4 from a quarter-side input), default
   options, precision ``auto`` (bf16 + channels_last on CPUs with native bf16, else fp32),
   full-size SD2.1 architecture with random weights, each size in a fresh process: wall
   seconds, s/MP, encode / UNet / decode seconds, peak RSS minus the loaded weights.
   ``--precision fp32`` gives the second column of the README.
2. **Tiled / untiled VAE per output pixel** at ``--ratio-size`` (1024 by default, where both
   fit): the tiled VAE at the default budget (forced to tile) against the whole VAE, the
   minimum of ``--repeat`` interleaved runs, thread CPU time of one thread (robust to a loaded
   machine) and wall time (goal: <= 1.2).

    python bench/bench_large.py                       # 512..2048 + the ratio (~15 min, 2 cores)
    python bench/bench_large.py --sizes 512,1024,2048,4096
    python bench/bench_large.py --precision fp32 --skip-ratio

Wall times are sensitive to other processes; the load average is printed with each row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiling import ROOT, build_generator, child_rss, run_script  # noqa: E402

sys.path.insert(0, str(ROOT))


def run_child(args: list[str]) -> dict:
    return run_script(__file__, args)


def child_ratio(size: int, precision: str, repeat: int) -> dict:
    """Whole vs tiled VAE (encode + decode) on one ``size`` x ``size`` output, one thread."""
    import torch

    from d3sr_core.inference import tiled_vae
    from d3sr_core.inference.memory import resolve_budget
    from d3sr_core.inference.precision import prepare_generator

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    g = prepare_generator(build_generator(), "cpu", precision)
    vae, dtype = g.vae, next(g.vae.parameters()).dtype
    budget = resolve_budget(None, "cpu", dtype)
    fmt = torch.channels_last if g.precision_plan.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(size)
    image = (torch.rand(1, 3, size, size, generator=gen) * 2 - 1).to(dtype)
    latent = torch.randn(1, 4, size // 8, size // 8, generator=gen).to(dtype)
    image, latent = (t.contiguous(memory_format=fmt) for t in (image, latent))
    runs = {
        "whole": lambda: (tiled_vae.whole_encode(vae, image), tiled_vae.whole_decode(vae, latent)),
        "tiled": lambda: (
            tiled_vae.tiled_encode(vae, image, budget),
            tiled_vae.tiled_decode(vae, latent, budget),
        ),
    }
    best = {k: [math.inf, math.inf] for k in runs}
    outs = {}
    for _ in range(repeat):
        for name, fn in runs.items():
            c, t = time.thread_time(), time.perf_counter()
            outs[name] = fn()
            c, t = time.thread_time() - c, time.perf_counter() - t
            best[name] = [min(best[name][0], c), min(best[name][1], t)]
    ref = outs["whole"][1].float()
    mse = float(((outs["tiled"][1].float() - ref) ** 2).mean())
    peak = float(ref.max() - ref.min())
    psnr = math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
    return {"best": best, "psnr_decode": psnr, "budget": budget, "dtype": str(dtype)}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="512,1024,2048", help="output sides (default 512..2048)")
    ap.add_argument("--precision", default="auto", help="auto (default) | fp32 | bf16")
    ap.add_argument("--ratio-size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2, help="interleaved runs for the ratio")
    ap.add_argument("--skip-ratio", action="store_true")
    ap.add_argument("--skip-table", action="store_true")
    ap.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-ratio", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_size:
        print(json.dumps(child_rss(args.child_size, None, args.precision)))
        return
    if args.child_ratio:
        print(json.dumps(child_ratio(args.child_ratio, args.precision, args.repeat)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if not args.skip_table:
        print(f"\n## Default options, precision {args.precision}, x4, each size in a fresh process")
        print(
            "| output | wall | s/MP | encode / UNet / decode (s) | peak RSS - weights | load |\n"
            "|---|---|---|---|---|---|"
        )
        first = None
        for size in [int(s) for s in args.sizes.split(",")]:
            r = run_child(["--child-size", str(size), "--precision", args.precision])
            mp = size * size / 1e6
            per = r["wall_s"] / mp
            first = first or per
            st = " / ".join(f"{r['stages_s'][k]:.1f}" for k in ("encode", "denoise", "decode"))
            print(
                f"| {size}² | {r['wall_s']:.1f} s | {per:.1f} ({per / first:.2f}x) | {st} "
                f"| {r['peak_minus_weights_gb']:.2f} GB | {os.getloadavg()[0]:.1f} |",
                flush=True,
            )
        print(f"(budget {r['budget_gib']:.2f} GiB, weights {r['weights_gib']:.2f} GiB)")
    if not args.skip_ratio:
        size = args.ratio_size
        r = run_child(
            [
                "--child-ratio",
                str(size),
                "--precision",
                args.precision,
                "--repeat",
                str(args.repeat),
            ]
        )
        (wc, ww), (tc, tw) = r["best"]["whole"], r["best"]["tiled"]
        print(
            f"\n## VAE encode + decode at {size}², {r['dtype']}, 1 thread, min of {args.repeat}"
            f"\n| run | thread CPU (s) | wall (s) |\n|---|---|---|\n| whole | {wc:.1f} | {ww:.1f} |"
            f"\n| tiled (budget {r['budget'] / 2**30:.2f} GiB) | {tc:.1f} | {tw:.1f} |"
            f"\ntiled/untiled per pixel: CPU {tc / wc:.2f}, wall {tw / ww:.2f} (goal <= 1.2); "
            f"decode tiled vs whole {r['psnr_decode']:.1f} dB; load {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
