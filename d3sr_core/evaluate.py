"""``d3sr eval``: score SR images against HR images (optionally running the model first).

Per image: PSNR and SSIM on Y (:mod:`d3sr_core.metrics`, border crop = ``--crop-border``,
default the scale), DISTS (our module; needs the VGG16 and DISTS weights), and LPIPS / NIQE /
MUSIQ / MANIQA / CLIPIQA through pyiqa when it is installed. A metric that cannot run is
reported as unavailable with the reason - never estimated. Writes ``metrics.csv`` (one row
per image), ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data.datasets import DataError, list_images, load_rgb, match_pairs
from .metrics import mean_finite, psnr_y, ssim_y

PYIQA_METRICS = ("lpips", "niqe", "musiq", "maniqa", "clipiqa")
PYIQA_FULL_REFERENCE = ("lpips",)
LOWER_IS_BETTER = {"dists", "lpips", "niqe"}


@dataclass
class EvalResult:
    """Per-image rows and per-metric means (``None`` = unavailable, reason in ``unavailable``)."""

    rows: list[dict] = field(default_factory=list)
    means: dict[str, float | None] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    crop_border: int = 0

    def to_json(self) -> dict:
        return {
            "images": len(self.rows),
            "crop_border": self.crop_border,
            "metrics": {
                name: (
                    {"mean": mean, "lower_is_better": name in LOWER_IS_BETTER}
                    if mean is not None
                    else {"unavailable": self.unavailable[name]}
                )
                for name, mean in self.means.items()
            },
        }

    def to_markdown(self) -> str:
        lines = [
            f"{len(self.rows)} images, Y-channel PSNR/SSIM with a {self.crop_border}-pixel border crop",
            "",
            "| metric | mean |",
            "|---|---|",
        ]
        for name, mean in self.means.items():
            arrow = " (lower is better)" if name in LOWER_IS_BETTER else ""
            value = f"{mean:.4f}" if mean is not None else f"unavailable: {self.unavailable[name]}"
            lines.append(f"| {name}{arrow} | {value} |")
        return "\n".join(lines) + "\n"


def _to_tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(load_rgb(path)).permute(2, 0, 1)[None]


def _dists_metric(vgg: str | None, weights: str | None, allow_download: bool, device):
    from .loading.files import WeightsFileError
    from .losses import DISTS

    try:
        model = DISTS.from_pretrained(vgg, weights, allow_download=allow_download)
    except WeightsFileError as err:
        return None, str(err)
    model = model.to(device)
    return (lambda sr, hr: float(model.score(sr, hr)[0])), None


def _pyiqa_metrics(names, device) -> tuple[dict[str, Callable], dict[str, str]]:
    try:
        import pyiqa
    except Exception as err:  # ImportError, or its own dependencies failing to import
        reason = "pyiqa is not installed (pip install pyiqa)"
        if not isinstance(err, ModuleNotFoundError):
            reason = f"pyiqa failed to import ({type(err).__name__}: {err})"
        return {}, dict.fromkeys(names, reason)
    fns, missing = {}, {}
    for name in names:
        try:
            metric = pyiqa.create_metric(name, device=device)
        except Exception as err:  # e.g. its weights cannot be downloaded offline
            missing[name] = f"pyiqa could not create it ({type(err).__name__}: {err})"
            continue
        if name in PYIQA_FULL_REFERENCE:
            fns[name] = lambda sr, hr, m=metric: float(m(sr, hr))
        else:
            fns[name] = lambda sr, hr, m=metric: float(m(sr))
    return fns, missing


def evaluate_folders(
    sr_dir: str | Path,
    hr_dir: str | Path,
    *,
    crop_border: int = 4,
    dists: bool = True,
    vgg_weights: str | None = None,
    dists_weights: str | None = None,
    pyiqa_metrics: tuple[str, ...] = PYIQA_METRICS,
    allow_download: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> EvalResult:
    """Score every SR image against the HR image of the same relative name (any suffix).

    Raises:
        DataError: a folder is missing/empty, the file sets differ (the unmatched names are
            listed), or an SR image's size differs from its HR image's.
    """
    from tqdm.auto import tqdm

    sr_root, hr_root = Path(sr_dir), Path(hr_dir)
    pairs = match_pairs(
        list_images(sr_root, "SR folder"), sr_root, list_images(hr_root, "HR folder"), hr_root,
        "SR", "HR",
    )  # fmt: skip
    device = torch.device(device)
    metrics: dict[str, Callable] = {
        "psnr_y": lambda sr, hr: float(psnr_y(sr, hr, crop_border)[0]),
        "ssim_y": lambda sr, hr: float(ssim_y(sr, hr, crop_border)[0]),
    }
    unavailable: dict[str, str] = {}
    if dists:
        fn, reason = _dists_metric(vgg_weights, dists_weights, allow_download, device)
        if fn is not None:
            metrics["dists"] = fn
        else:
            unavailable["dists"] = reason
    if pyiqa_metrics:
        fns, missing = _pyiqa_metrics(pyiqa_metrics, device)
        metrics.update(fns)
        unavailable.update(missing)
    result = EvalResult(crop_border=crop_border)
    for sr_path, hr_path in tqdm(pairs, desc="evaluating", disable=not progress, unit="img"):
        sr, hr = _to_tensor(sr_path), _to_tensor(hr_path)
        if sr.shape != hr.shape:
            raise DataError(
                f"{sr_path}: SR image is {sr.shape[-1]}x{sr.shape[-2]}, its HR image {hr_path} is "
                f"{hr.shape[-1]}x{hr.shape[-2]}"
            )
        sr, hr = sr.to(device), hr.to(device)
        row = {"image": sr_path.relative_to(sr_root).with_suffix("").as_posix()}
        with torch.no_grad():
            for name, fn in metrics.items():
                row[name] = fn(sr, hr)
        result.rows.append(row)
    order = (
        ["psnr_y", "ssim_y", "dists", *pyiqa_metrics]
        if dists
        else ["psnr_y", "ssim_y", *pyiqa_metrics]
    )
    for name in order:
        if name in metrics:
            values = [r[name] for r in result.rows]
            result.means[name] = (
                mean_finite(values) if name == "psnr_y" else sum(values) / len(values)
            )
        else:
            result.means[name] = None
    result.unavailable = unavailable
    return result


def write_reports(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """``metrics.csv`` (per image; unavailable metrics as ``n/a``), ``summary.json``, ``summary.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(result.means)
    paths = {"csv": out / "metrics.csv", "json": out / "summary.json", "md": out / "summary.md"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *names])
        for row in result.rows:
            cells = []
            for name in names:
                value = row.get(name)
                cells.append(
                    "n/a" if value is None else ("inf" if math.isinf(value) else f"{value:.6f}")
                )
            writer.writerow([row["image"], *cells])
    paths["json"].write_text(json.dumps(result.to_json(), indent=2))
    paths["md"].write_text(result.to_markdown())
    return paths


def upscale_folder(
    lr_dir: str | Path,
    out_dir: str | Path,
    weights: str,
    base: str,
    *,
    scale: float = 4.0,
    color_fix: str = "wavelet",
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Run the model on every LR image (PNG output, same relative names) for evaluation."""
    from tqdm.auto import tqdm

    from .inference.options import UpscaleOptions
    from .inference.pipeline import D3SRPipeline
    from .loading.generator import load_generator

    lr_root, out = Path(lr_dir), Path(out_dir)
    files = list_images(lr_root, "LR folder")
    pipeline = D3SRPipeline(load_generator(weights, base, device=device))
    options = UpscaleOptions(scale=scale, color_fix=color_fix)
    for path in tqdm(files, desc="upscaling", disable=not progress, unit="img"):
        rel = path.relative_to(lr_root).with_suffix(".png")
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        sr = pipeline.upscale(_to_tensor(path).to(pipeline.device), options)
        array = (sr[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
        from PIL import Image

        Image.fromarray(array).save(target)
    return out


# --------------------------------------------------------------------------- command line


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """Register ``d3sr eval`` on the CLI's subparsers."""
    p = sub.add_parser(
        "eval",
        help="score SR images against HR images (PSNR/SSIM-Y, DISTS, pyiqa metrics)",
        description=__doc__.split("\n\n")[0]
        + " Files are paired by relative name without suffix; sets must match exactly.",
    )
    p.add_argument("--hr", required=True, type=Path, help="folder of HR (ground-truth) images")
    p.add_argument("--sr", type=Path, help="folder of SR images (written here with --lr)")
    p.add_argument(
        "--lr", type=Path, help="LR folder: run the model first (needs --weights, --base)"
    )
    p.add_argument("--weights", help="D3SR .safetensors (with --lr)")
    p.add_argument("--base", help="SD2.1-base folder or single file (with --lr)")
    p.add_argument("--scale", type=float, default=4.0, help="SR factor (default 4)")
    p.add_argument("--color-fix", default="wavelet", choices=("none", "adain", "wavelet"))
    p.add_argument(
        "--crop-border",
        type=int,
        default=None,
        help="border excluded from PSNR/SSIM (default: scale)",
    )
    p.add_argument(
        "-o", "--output", type=Path, default=Path("eval"), help="report folder (default ./eval)"
    )
    p.add_argument("--no-dists", action="store_true", help="skip DISTS")
    p.add_argument("--vgg-weights", help="torchvision vgg16-397923af.pth for DISTS")
    p.add_argument("--dists-weights", help="DISTS alpha/beta weights.pt")
    p.add_argument(
        "--pyiqa",
        default=",".join(PYIQA_METRICS),
        help="comma-separated pyiqa metrics ('' for none; default: %(default)s)",
    )
    p.add_argument("--download", action="store_true", help="allow downloading metric weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args) -> int:
    from .loading.files import WeightsFileError

    try:
        sr_dir = args.sr
        if args.lr is not None:
            if not args.weights or not args.base:
                raise DataError("--lr runs the model first: give --weights and --base too")
            sr_dir = sr_dir or args.output / "sr"
            upscale_folder(
                args.lr, sr_dir, args.weights, args.base, scale=args.scale,
                color_fix=args.color_fix, device=args.device, progress=not args.quiet,
            )  # fmt: skip
        elif sr_dir is None:
            raise DataError("give --sr DIR (or --lr DIR with --weights and --base)")
        crop = args.crop_border if args.crop_border is not None else int(round(args.scale))
        names = tuple(n.strip().lower() for n in args.pyiqa.split(",") if n.strip())
        result = evaluate_folders(
            sr_dir, args.hr, crop_border=crop, dists=not args.no_dists,
            vgg_weights=args.vgg_weights, dists_weights=args.dists_weights, pyiqa_metrics=names,
            allow_download=args.download, device=args.device, progress=not args.quiet,
        )  # fmt: skip
    except (DataError, WeightsFileError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = write_reports(result, args.output)
    print(result.to_markdown())
    print(f"wrote {paths['csv']}, {paths['json']}, {paths['md']}", file=sys.stderr)
    return 0
