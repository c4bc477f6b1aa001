"""Benchmark: one forward + backward of the full-size SDXL diffusion discriminator on CPU.

512 x 512 crops (64 x 64 SD2.1 latents), batch 1, fp32, random trunk weights (same
architecture and cost as SDXL-base), LoRA r16 + patch head trainable, with and without
gradient checkpointing. Each configuration runs in its own process so the peak RSS
(``ru_maxrss``) belongs to it alone.

    python bench/bench_discriminator.py            # both configurations, prints a table
    python bench/bench_discriminator.py --steps 3  # more timed iterations (first is warm-up)

Not a test: it needs ~6-8 GB of RAM and a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_one(checkpointing: bool, steps: int, latent: int, base: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from d3sr_core.losses.gan import discriminator_loss
    from d3sr_core.models.discriminator import DiffusionDiscriminator, DiscriminatorConfig

    t0 = time.perf_counter()
    d = DiffusionDiscriminator.from_config(
        DiscriminatorConfig(base=base, gradient_checkpointing=checkpointing), seed=0
    ).train()
    build_s = time.perf_counter() - t0
    rss_model = _rss_gib()
    trainable = sum(p.numel() for p in d.parameters() if p.requires_grad)
    total = sum(p.numel() for p in d.parameters())
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1, 4, latent, latent, generator=g)
    t = torch.tensor([500])
    fwd, bwd, grid = [], [], None
    for _ in range(steps):
        d.zero_grad(set_to_none=True)
        s = time.perf_counter()
        logits = d(real, t, torch.randn(real.shape, generator=g))
        grid = tuple(logits.shape)
        fwd.append(time.perf_counter() - s)
        s = time.perf_counter()
        # one D call, its real-side loss term (the fake side costs the same again)
        discriminator_loss(logits, torch.full_like(logits, -10.0)).backward()
        bwd.append(time.perf_counter() - s)
    timed = slice(1, None) if steps > 1 else slice(0, None)
    return {
        "checkpointing": checkpointing,
        "params_total": total,
        "params_trainable": trainable,
        "logit_grid": grid,
        "build_s": build_s,
        "forward_s": sum(fwd[timed]) / len(fwd[timed]),
        "backward_s": sum(bwd[timed]) / len(bwd[timed]),
        "first_iter_s": fwd[0] + bwd[0],
        "rss_model_gib": rss_model,
        "peak_rss_gib": _peak_rss_gib(),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="iterations; the first is warm-up")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px crop)")
    parser.add_argument("--base", default="sdxl-base", help="backbone (sdxl-base, sd21-base, ...)")
    parser.add_argument("--child", choices=["plain", "ckpt"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_one(args.child == "ckpt", args.steps, args.latent, args.base)
        print("RESULT " + json.dumps(result))
        return

    rows = []
    for mode in ("plain", "ckpt"):
        cmd = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps)]
        cmd += ["--latent", str(args.latent), "--base", args.base]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.stderr.write(out.stdout + out.stderr)
            raise SystemExit(f"{mode} run failed (exit {out.returncode})")
        rows.append(json.loads(line[len("RESULT ") :]))

    r0 = rows[0]
    print(
        f"{args.base} discriminator, latent {args.latent}x{args.latent} "
        f"({8 * args.latent}px crop), batch 1, fp32, CPU, {r0['threads']} threads, "
        f"load avg {os.getloadavg()[0]:.1f}"
    )
    print(
        f"params: {r0['params_total'] / 1e9:.3f} B total, {r0['params_trainable'] / 1e6:.2f} M "
        f"trainable; logits {r0['logit_grid']}"
    )
    header = (
        f"{'grad ckpt':<10}{'build s':>9}{'fwd s':>8}{'bwd s':>8}{'fwd+bwd s':>11}"
        f"{'1st iter s':>12}{'RSS model GiB':>15}{'peak RSS GiB':>14}{'activ. GiB':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{'on' if r['checkpointing'] else 'off':<10}{r['build_s']:>9.1f}{r['forward_s']:>8.1f}"
            f"{r['backward_s']:>8.1f}{r['forward_s'] + r['backward_s']:>11.1f}"
            f"{r['first_iter_s']:>12.1f}{r['rss_model_gib']:>15.2f}{r['peak_rss_gib']:>14.2f}"
            f"{r['peak_rss_gib'] - r['rss_model_gib']:>12.2f}"
        )


if __name__ == "__main__":
    main()
