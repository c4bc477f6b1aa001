"""Validation during training: a fixed held-out set, PSNR-Y / SSIM-Y / DISTS, image grids."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.config import Config, ConfigError
from trainer.models import seed_for

logger = logging.getLogger("d3sr.train")


def load_validation(cfg: Config) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, lr, hr)`` images in [0, 1] (``[1, 3, h, w]``), deterministic."""
    from d3sr_core.data import degrade_batch, list_images, match_pairs
    from d3sr_core.data.datasets import load_rgb

    d = cfg.data
    if not d.val_hr_dir:
        return []
    hr_root = Path(d.val_hr_dir)
    hr_files = list_images(hr_root, "validation HR folder")
    if d.val_lr_dir:
        lr_root = Path(d.val_lr_dir)
        pairs = match_pairs(
            list_images(lr_root, "validation LR folder"), lr_root, hr_files, hr_root, "LR", "HR"
        )
    else:
        pairs = [(None, f) for f in hr_files]
    s = d.scale
    out = []
    for i, (lr_path, hr_path) in enumerate(pairs[: d.val_max_images]):
        hr = torch.from_numpy(load_rgb(hr_path)).permute(2, 0, 1)[None]
        h, w = hr.shape[-2:]
        if d.val_crop:
            c = min(d.val_crop, h - h % (8 * s), w - w % (8 * s))
            top, left = (h - c) // 2 // s * s, (w - c) // 2 // s * s
        else:
            c = None
            top = left = 0
        ch = c or h - h % (8 * s)
        cw = c or w - w % (8 * s)
        if ch <= 0 or cw <= 0:
            raise ConfigError(f"validation image {hr_path} is smaller than {8 * s} px")
        hr_crop = hr[..., top : top + ch, left : left + cw]
        if lr_path is not None:
            lr = torch.from_numpy(load_rgb(lr_path)).permute(2, 0, 1)[None]
            lr = lr[..., top // s : (top + ch) // s, left // s : (left + cw) // s]
        else:
            lr, _ = degrade_batch(hr_crop, cfg.degradation(), seed_for(cfg.train.seed, 7, i))
        out.append((hr_path.name, lr, hr_crop))
    return out


@torch.no_grad()
def validate(
    cfg, generator, ema, val_set, ea, accelerator, step, log, out_dir, backend=None
) -> dict:
    """PSNR / SSIM (Y, border = scale) and DISTS of the (EMA) generator on the held-out set.
    ``backend`` (trainer/distributed_backend.py): its autocast, and whether the generator's
    forward is a collective (ZeRO-3: every process runs validation, the main one reports).
    Without it: ``accelerator.autocast``, main process only."""
    from d3sr_core.metrics import mean_finite, psnr_y, ssim_y

    result: dict = {}
    everywhere = backend is not None and backend.collective_forward
    autocast = backend.autocast if backend is not None else accelerator.autocast
    if (accelerator.is_main_process or everywhere) and val_set:
        import contextlib

        s = cfg.data.scale
        gathered = backend.gathered if backend is not None else None
        ctx = ema.swapped_into(generator, gathered) if ema is not None else contextlib.nullcontext()
        was_training = generator.training
        generator.eval()
        psnrs, ssims, dists_vals, rows = [], [], [], []
        device = accelerator.device
        with ctx, autocast():
            for _, lr, hr in val_set:
                up = F.interpolate(
                    lr.to(device), size=hr.shape[-2:], mode="bicubic", align_corners=False
                )
                sr = (generator.upscale(up.clamp(0, 1) * 2 - 1).float() + 1) / 2
                sr = (sr * 255).round() / 255  # as saved to an 8-bit file
                hr_d = hr.to(device)
                psnrs.append(float(psnr_y(sr, hr_d, s)[0]))
                ssims.append(float(ssim_y(sr, hr_d, s)[0]))
                dists_vals.append(float(ea.dists.distance(sr, hr_d)[0]))  # both in [0, 1]
                if len(rows) < 4:
                    rows.append(torch.cat([up.clamp(0, 1), sr, hr_d], dim=-1).cpu())
        generator.train(was_training)
        result = {
            "val_psnr_y": mean_finite(psnrs),
            "val_ssim_y": sum(ssims) / len(ssims),
            "val_dists": sum(dists_vals) / len(dists_vals),
        }
        log(result, step)
        if accelerator.is_main_process:
            _save_rows(rows, out_dir / "val" / f"step-{step:08d}.png", accelerator, step)
        logger.info(
            "step %d validation: PSNR-Y %.3f dB, SSIM-Y %.4f, DISTS %.4f",
            step, result["val_psnr_y"], result["val_ssim_y"], result["val_dists"],
        )  # fmt: skip
    accelerator.wait_for_everyone()
    return result


def _save_rows(rows, path: Path, accelerator, step: int) -> None:
    """LR (bicubic) | SR | HR, one row per validation image, as a PNG (and to TensorBoard)."""
    if not rows:
        return
    from PIL import Image

    width = max(r.shape[-1] for r in rows)
    rows = [F.pad(r, (0, width - r.shape[-1])) for r in rows]
    grid = torch.cat(rows, dim=-2)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(array).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", grid, step)
