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

Two more modes, each on its own:

3. ``--profile SIZE``: torch.profiler CPU op shares of one default upscale (after a warm-up
   run): convolutions, matrix products + attention, everything else (goal 3: <= 15 %), the
   top ops; ``--save`` / ``--reference`` compare the output with an earlier run's (PSNR).
4. ``--unet-window SIZES``: the UNet stage's thread CPU seconds per output MP with the
   self-attention windowed at ``--window`` px (the default) and global, the largest x0
   difference, and the runs' peak RSS minus the weights.
5. ``--vae SIZES``: the tiled VAE (encode + decode) at the default budget per output MP,
   thread CPU (and wall) of one thread, with the states that do not fit the budget spilled
   to disk (the default) and, with ``--no-spill``, recomputed instead; peak RSS minus the
   weights, the bytes written to disk, the seconds the computation waited for the disk,
   the I/O threads' CPU seconds (not in the thread CPU columns; they compete with the
   computation when no core is idle) and the number of recomputed passes.

    python bench/bench_large.py                       # 512..2048 + the ratio (~15 min, 2 cores)
    python bench/bench_large.py --sizes 512,1024,2048,4096
    python bench/bench_large.py --precision fp32 --skip-ratio
    python bench/bench_large.py --profile 512 [--threads 2]
    python bench/bench_large.py --unet-window 1024,2048
    python bench/bench_large.py --vae 1024,2048 [--no-spill]

Wall times are sensitive to other processes; the load average is printed with each row.
The profiler's per-op times are wall-clock too: run ``--profile`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiling import (  # noqa: E402
    ROOT,
    _image,
    _reset_peak_rss,
    _status_kib,
    build_generator,
    child_rss,
    run_script,
)

sys.path.insert(0, str(ROOT))


def run_child(args: list[str]) -> dict:
    return run_script(__file__, args)


def _vae_inputs(size: int, precision: str):
    """One thread, no autograd: the prepared generator, the default CPU budget for its VAE's
    dtype, and a seeded ``[1, 3, size, size]`` image in [-1, 1] plus its ``[1, 4, size/8,
    size/8]`` latent, in the layout the precision plan runs (channels_last or not)."""
    import torch

    from d3sr_core.inference.memory import resolve_budget
    from d3sr_core.inference.precision import prepare_generator

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    g = prepare_generator(build_generator(), "cpu", precision)
    dtype = next(g.vae.parameters()).dtype
    budget = resolve_budget(None, "cpu", dtype)
    fmt = torch.channels_last if g.precision_plan.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(size)
    image = (torch.rand(1, 3, size, size, generator=gen) * 2 - 1).to(dtype)
    latent = torch.randn(1, 4, size // 8, size // 8, generator=gen).to(dtype)
    image, latent = (t.contiguous(memory_format=fmt) for t in (image, latent))
    return g, budget, image, latent


def child_ratio(size: int, precision: str, repeat: int) -> dict:
    """Whole vs tiled VAE (encode + decode) on one ``size`` x ``size`` output, one thread."""
    from d3sr_core.inference import tiled_vae

    g, budget, image, latent = _vae_inputs(size, precision)
    vae = g.vae
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
    return {"best": best, "psnr_decode": psnr, "budget": budget, "dtype": str(image.dtype)}


# torch.profiler op names counted as convolutions / matrix products (self CPU time); the
# flash-attention kernel (QK^T, softmax, PV in one) counts as matrix products.
CONV_OPS = ("conv",)
MATMUL_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::matmul",
    "aten::linear",
    "flash_attention",
    "scaled_dot_product",
)


def op_kind(name: str) -> str:
    """``"conv"``, ``"matmul"`` or ``"other"`` for a torch.profiler op name."""
    if any(k in name for k in CONV_OPS):
        return "conv"
    if name in MATMUL_OPS or any(k in name for k in MATMUL_OPS[-2:]):
        return "matmul"
    return "other"


def child_profile(size: int, precision: str, top: int, save: str | None, threads: int) -> dict:
    """CPU profile (``threads`` threads) of one default upscale to ``size`` x ``size``: self CPU time
    per op, grouped into convolutions, matrix products and the rest (goal 3: rest <= 15 %)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from d3sr_core.inference.options import UpscaleOptions
    from d3sr_core.inference.pipeline import D3SRPipeline
    from d3sr_core.inference.precision import prepare_generator

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    pipe = D3SRPipeline(prepare_generator(build_generator(), "cpu", precision))
    image = _image(size // 4)
    options = UpscaleOptions(scale=4)
    c = time.thread_time()
    pipe.upscale_tensor(image, options)  # warm-up: oneDNN primitives, weight caches
    warm = time.thread_time() - c
    c = time.thread_time()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = pipe.upscale_tensor(image, options)
    cpu = time.thread_time() - c
    if save:
        torch.save(out, save)
    ops = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    total = sum(t for _, t, _ in ops)
    kinds = {"conv": 0.0, "matmul": 0.0, "other": 0.0}
    for name, t, _ in ops:
        kinds[op_kind(name)] += t
    ops.sort(key=lambda o: -o[1])
    return {
        "warmup_cpu_s": warm,
        "run_cpu_s": cpu,
        "profiled_s": total,
        "kinds": kinds,
        "top": [(n, t, k, op_kind(n)) for n, t, k in ops[:top]],
    }


def child_unet(size: int, precision: str, window: int, repeat: int) -> dict:
    """Thread CPU seconds (one thread, min of ``repeat``) of the default denoise stage on a
    ``size`` x ``size`` output (UNet tiles as the pipeline plans them), with the UNet
    self-attention windowed at ``window`` px and always global (0)."""
    import torch

    from d3sr_core.inference.options import UpscaleOptions
    from d3sr_core.inference.pipeline import D3SRPipeline
    from d3sr_core.inference.precision import prepare_generator

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    pipe = D3SRPipeline(prepare_generator(build_generator(), "cpu", precision))
    latent = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    seconds, outs = {window: math.inf, 0: math.inf, None: math.inf}, {}
    # only the UNet stage runs: encode crops the random latent, decode returns zeros
    pipe.encode = lambda image, rng=None: latent[:, :, : image.shape[2] // 8, : image.shape[3] // 8]
    pipe.decode = lambda z: torch.zeros(1, 3, 8 * z.shape[2], 8 * z.shape[3])
    real, now = D3SRPipeline.denoise, {}

    def denoise(z):
        c, w = time.thread_time(), now["window"]
        outs[w] = real(pipe, z)
        seconds[w] = min(seconds[w], time.thread_time() - c)
        return outs[w]

    pipe.denoise = denoise
    now["window"] = None  # warm-up on a small image: oneDNN primitives, weight caches
    pipe.upscale_tensor(torch.rand(1, 3, 32, 32), UpscaleOptions(color_fix="none"))
    image = torch.rand(1, 3, size // 4, size // 4)
    _reset_peak_rss()  # the peak of the runs, not of building the fp32 model
    for _ in range(repeat):
        for w in (window, 0):
            now["window"] = w
            pipe.upscale_tensor(image, UpscaleOptions(unet_attention_window=w, color_fix="none"))
    diff = float((outs[window] - outs[0]).abs().max())
    weights = sum(p.numel() * p.element_size() for p in pipe.generator.parameters())
    peak = _status_kib("VmHWM") * 1024 - weights
    return {
        "seconds": {str(k): seconds[k] for k in (window, 0)},
        "max_abs_diff": diff,
        "peak_minus_weights_gb": peak / 1e9,
    }


def child_vae(size: int, precision: str, spill: bool) -> dict:
    """Thread CPU seconds (one thread) of the tiled encode + decode of a ``size`` x ``size``
    output at the default budget (as the pipeline runs them beyond what fits whole), the
    peak RSS minus the weights, and what the runner did (spilled bytes, recomputed passes)."""
    from d3sr_core.inference import tiled_vae

    g, budget, image, latent = _vae_inputs(size, precision)
    vae = g.vae
    weights = sum(p.numel() * p.element_size() for p in g.parameters())
    config = tiled_vae.TiledVAEConfig(budget=budget, spill=spill)
    out: dict = {"budget": budget, "seconds": {}, "wall": {}, "spill_gb": 0.0, "recomputed": 0}
    out["disk_peak_gb"] = out["spill_wait_s"] = out["spill_io_cpu_s"] = 0.0
    # warm-up on a small image: oneDNN primitives
    tiled_vae.TiledVAERunner(tiled_vae._program(vae, "decode"), config).run(latent[:, :, :16, :16])
    _reset_peak_rss()
    for kind, x in (("encode", image), ("decode", latent)):
        runner = tiled_vae.TiledVAERunner(tiled_vae._program(vae, kind), config)
        c, t = time.thread_time(), time.perf_counter()
        runner.run(x)
        out["seconds"][kind] = time.thread_time() - c
        out["wall"][kind] = time.perf_counter() - t
        out["spill_wait_s"] += runner.report.spill_wait_s
        out["spill_io_cpu_s"] += runner.report.spill_io_cpu_s
        out["spill_gb"] += runner.report.spill_bytes / 1e9
        out["disk_peak_gb"] = max(out["disk_peak_gb"], runner.report.spill_peak / 1e9)
        out["recomputed"] += len(runner.report.recomputed)
    out["peak_minus_weights_gb"] = (_status_kib("VmHWM") * 1024 - weights) / 1e9
    return out


KINDS = ("encode", "decode")


def psnr(a, b) -> float:
    """PSNR of ``a`` against reference ``b`` (images in [0, 1])."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def print_profile(r: dict, args, save: str) -> None:
    size, precision, reference = args.profile, args.precision, args.reference
    total = r["profiled_s"]
    print(
        f"\n## CPU profile of one default {size}² upscale, precision {precision}, "
        f"{args.threads} thread(s)"
        f"\nmain-thread CPU {r['run_cpu_s']:.1f} s (warm-up run {r['warmup_cpu_s']:.1f} s); "
        f"profiled self time {total:.1f} s"
    )
    print("| kind | s | share |\n|---|---|---|")
    for kind, t in r["kinds"].items():
        print(f"| {kind} | {t:.2f} | {100 * t / total:.1f} % |")
    print(f"non-conv/non-matmul share: {100 * r['kinds']['other'] / total:.1f} % (goal <= 15 %)")
    print("\n| op | self s | share | calls | kind |\n|---|---|---|---|---|")
    for name, t, count, kind in r["top"]:
        print(f"| {name} | {t:.2f} | {100 * t / total:.1f} % | {count} | {kind} |")
    if reference:
        import torch

        db = psnr(torch.load(save), torch.load(reference))
        print(f"output vs {reference}: {db:.1f} dB (goal >= 40 dB)")


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
    ap.add_argument(
        "--profile",
        type=int,
        metavar="SIZE",
        help="only the CPU profile of one SIZE² upscale (goal 3: non-conv/matmul share)",
    )
    ap.add_argument("--top", type=int, default=15, help="ops listed by --profile")
    ap.add_argument(
        "--unet-window",
        metavar="SIZES",
        help="only the UNet stage's thread CPU time per MP at these output sides "
        "(e.g. 1024,2048), self-attention windowed at --window px vs global",
    )
    ap.add_argument("--window", type=int, default=512, help="--unet-window: window in px")
    ap.add_argument(
        "--vae",
        metavar="SIZES",
        help="only the tiled VAE's thread CPU time per MP at these output sides (default "
        "budget, states that do not fit spilled to disk)",
    )
    ap.add_argument("--no-spill", action="store_true", help="--vae: recompute instead of spill")
    ap.add_argument("--threads", type=int, default=1, help="--profile: torch threads (default 1)")
    ap.add_argument("--save", help="--profile: save the output tensor here (.pt)")
    ap.add_argument("--reference", help="--profile: a saved output to compare with (PSNR)")
    ap.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-ratio", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-profile", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-unet", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-vae", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    # as the d3sr command does, before this process's first convolution
    from d3sr_core.inference.memory import bound_onednn_primitive_cache

    bound_onednn_primitive_cache()
    if args.child_vae:
        print(json.dumps(child_vae(args.child_vae, args.precision, not args.no_spill)))
        return
    if args.child_unet:
        r = child_unet(args.child_unet, args.precision, args.window, args.repeat)
        print(json.dumps(r))
        return
    if args.child_profile:
        r = child_profile(args.child_profile, args.precision, args.top, args.save, args.threads)
        print(json.dumps(r))
        return
    if args.child_size:
        print(json.dumps(child_rss(args.child_size, None, args.precision)))
        return
    if args.child_ratio:
        print(json.dumps(child_ratio(args.child_ratio, args.precision, args.repeat)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if args.profile:
        name = f"d3sr_profile_{args.profile}_{args.precision}.pt"
        save = args.save or str(Path(tempfile.gettempdir()) / name)
        child = ["--child-profile", str(args.profile), "--precision", args.precision]
        child += ["--threads", str(args.threads)]
        r = run_child([*child, "--top", str(args.top), "--save", save])
        print_profile(r, args, save)
        return
    if args.unet_window:
        print(
            f"\n## UNet stage, precision {args.precision}, 1 thread, min of {args.repeat}, "
            f"thread CPU s per output MP\n| output | window {args.window} px | global | "
            "ratio | max abs diff of x0 | peak RSS - weights |\n|---|---|---|---|---|---|"
        )
        for size in [int(v) for v in args.unet_window.split(",")]:
            child = ["--child-unet", str(size), "--precision", args.precision]
            r = run_child([*child, "--window", str(args.window), "--repeat", str(args.repeat)])
            mp = size * size / 1e6
            win, glob = r["seconds"][str(args.window)] / mp, r["seconds"]["0"] / mp
            print(
                f"| {size}² | {win:.1f} | {glob:.1f} | {win / glob:.2f} | "
                f"{r['max_abs_diff']:.3g} | {r['peak_minus_weights_gb']:.2f} GB |",
                flush=True,
            )
        return
    if args.vae:
        mode = "recomputed" if args.no_spill else "spilled to disk"
        print(
            f"\n## Tiled VAE at the default budget, precision {args.precision}, 1 thread, "
            f"states that do not fit {mode}; thread CPU s/MP (wall)\n| output | encode s/MP "
            "| decode s/MP | written to disk (most at once) | waited for the disk | I/O threads' "
            "CPU | recomputed passes | peak RSS - weights | load |\n"
            "|---|---|---|---|---|---|---|---|---|"
        )
        for size in [int(v) for v in args.vae.split(",")]:
            child = ["--child-vae", str(size), "--precision", args.precision]
            r = run_child(child + (["--no-spill"] if args.no_spill else []))
            mp = size * size / 1e6
            enc, dec = (f"{r['seconds'][k] / mp:.1f} ({r['wall'][k] / mp:.1f})" for k in KINDS)
            print(
                f"| {size}² | {enc} | {dec} | {r['spill_gb']:.1f} GB "
                f"({r['disk_peak_gb']:.1f} GB) | {r['spill_wait_s']:.1f} s | "
                f"{r['spill_io_cpu_s']:.1f} s | "
                f"{r['recomputed']} | {r['peak_minus_weights_gb']:.2f} GB | "
                f"{os.getloadavg()[0]:.1f} |",
                flush=True,
            )
        print(f"(budget {r['budget'] / 2**30:.2f} GiB)")
        return
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
