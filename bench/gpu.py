"""GPU benchmark (CUDA, e.g. H100/H200): latency and peak memory of the full-size generator.

For the SD2.1-base-sized generator with random weights, in bf16 and in fp16 (VAE kept in
fp32 under fp16, see ``prepare_generator``), through :class:`D3SRPipeline`:

* latency for a 512x512 output (paper: 0.11 s on an A100; goal < 0.05 s on an H100), also
  for the bare encode -> UNet -> decode (no bicubic upsampling, checks or colour fix);
* latency and peak GPU memory for 2048x2048 and 4096x4096 outputs, with the default memory
  budget and with an 8 GiB budget (tiles bound the memory);
* the 512x512 latency again with ``torch.compile`` on the UNet and the untiled VAE path.

    python bench/gpu.py                 # CUDA, about 5-8 minutes; stops new items at --time-limit
    python bench/gpu.py --skip-compile  # without the torch.compile rows
    python bench/gpu.py --dry-run       # tiny config on CPU: checks this script's logic quickly
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiling import ROOT, _image, build_generator  # noqa: E402

sys.path.insert(0, str(ROOT))

GIB = 2**30


class Clock:
    """Wall-clock timing that waits for the device; peak memory on CUDA."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        return (
            self.torch.cuda.max_memory_allocated(self.device) / GIB if self.cuda else float("nan")
        )

    def time(self, fn, warmup: int, reps: int) -> tuple[float, float]:
        """Median and min seconds of ``fn()`` over ``reps`` after ``warmup`` calls."""
        for _ in range(warmup):
            fn()
        self.sync()
        samples = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            self.sync()
            samples.append(time.perf_counter() - t)
        return statistics.median(samples), min(samples)


def bench_dtype(
    name, master, device, clock, rows, out_of_time, small, reps, sizes_big, dry, skip_compile
):
    """All rows for one precision (a function, so each dtype's models are freed after it)."""
    import torch

    from d3sr_core.inference.options import UpscaleOptions
    from d3sr_core.inference.pipeline import D3SRPipeline
    from d3sr_core.inference.precision import prepare_generator

    g = prepare_generator(copy.deepcopy(master), device, name)
    pipe = D3SRPipeline(g)
    plan = g.precision_plan.describe()
    print(f"\n== {name}: {plan}", flush=True)
    lr = _image(small // 4).to(device)
    opts = UpscaleOptions(scale=4, color_fix="none")
    med, best = clock.time(lambda: pipe.upscale_tensor(lr, opts), warmup=3, reps=reps)
    rows.append(
        (f"{name} {small}x{small} pipeline", f"{med * 1e3:.1f} ms (min {best * 1e3:.1f})", "", plan)
    )
    up = torch.nn.functional.interpolate(lr, size=(small, small), mode="bicubic") * 2 - 1
    med, best = clock.time(lambda: g.decode(g.denoise(g.encode(up))), warmup=2, reps=reps)
    rows.append(
        (
            f"{name} {small}x{small} encode+UNet+decode",
            f"{med * 1e3:.1f} ms (min {best * 1e3:.1f})",
            "",
            "",
        )
    )
    print(rows[-2], rows[-1], sep="\n", flush=True)

    for size in sizes_big:
        big = _image(size // 4).to(device)
        for budget in (None, 8 * GIB if not dry else 2**22):
            label = f"{name} {size}x{size} budget {'auto' if budget is None else f'{budget / GIB:g} GiB'}"
            if out_of_time(label):
                continue
            o = UpscaleOptions(scale=4, memory_budget_bytes=budget)
            clock.reset_peak()
            try:
                med, _ = clock.time(
                    lambda o=o, big=big: pipe.upscale_tensor(big, o),
                    warmup=1 if size <= 2048 else 0,
                    reps=1,
                )
                rows.append((label, f"{med:.2f} s", f"{clock.peak_gib():.1f} GiB", ""))
            except Exception as err:  # report and go on: one failure must not lose the table
                rows.append((label, f"error: {type(err).__name__}: {str(err)[:80]}", "", ""))
            print(rows[-1], flush=True)

    if not skip_compile and not out_of_time(f"{name} compile"):
        backend = "eager" if dry else "inductor"
        # The untiled VAE calls conv_padded / group_norm_act with weights of ~20 shapes: at
        # dynamo's default limit of 8 compiled variants per function the rest ran eagerly
        # (the 2026-12-04 H200 run's fp16 row).
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        from d3sr_core.inference import tiled_vae

        # The UNet module, and the untiled VAE path (a function over the VAE's weights).
        g.unet = torch.compile(g.unet, backend=backend, dynamic=False)
        saved = tiled_vae.whole_encode, tiled_vae.whole_decode
        tiled_vae.whole_encode = torch.compile(saved[0], backend=backend, dynamic=False)
        tiled_vae.whole_decode = torch.compile(saved[1], backend=backend, dynamic=False)
        try:
            t = time.perf_counter()
            pipe.upscale_tensor(lr, opts)
            clock.sync()
            compile_s = time.perf_counter() - t
            med, best = clock.time(lambda: pipe.upscale_tensor(lr, opts), warmup=2, reps=reps)
        finally:
            tiled_vae.whole_encode, tiled_vae.whole_decode = saved
        rows.append(
            (
                f"{name} {small}x{small} pipeline, torch.compile",
                f"{med * 1e3:.1f} ms (min {best * 1e3:.1f})",
                "",
                f"first call {compile_s:.0f} s ({backend})",
            )
        )
        print(rows[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dry-run", action="store_true", help="tiny config on CPU (logic check)")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument(
        "--time-limit", type=float, default=420.0, help="seconds; later items are skipped"
    )
    args = ap.parse_args()

    import torch

    torch.set_grad_enabled(False)
    start = time.perf_counter()
    dry = args.dry_run
    if dry:
        device = torch.device("cpu")
        sizes_big = [128, 256]
        small, reps = 64, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device (use --dry-run to check the script on CPU)")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        sizes_big = [2048, 4096]
        small, reps = 512, 10
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    clock = Clock(device)

    master = build_generator(tiny=dry)  # fp32 on the CPU; each dtype gets a copy
    rows: list[tuple[str, ...]] = []

    def out_of_time(what: str) -> bool:
        if time.perf_counter() - start > args.time_limit:
            rows.append((what, "skipped (time limit)", "", ""))
            print(f"skip {what}: time limit", flush=True)
            return True
        return False

    for name in args.dtypes.split(","):
        if out_of_time(f"{name}: all"):
            break
        bench_dtype(
            name,
            master,
            device,
            clock,
            rows,
            out_of_time,
            small,
            reps,
            sizes_big,
            dry,
            args.skip_compile,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print("\n| run | latency | peak GPU memory | note |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(
        f"\ntotal {time.perf_counter() - start:.0f} s"
        + (" (dry run: tiny config on CPU)" if dry else "")
    )


if __name__ == "__main__":
    main()
