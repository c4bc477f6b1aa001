#!/usr/bin/env python3
"""Write a small synthetic image set (smooth colour fields, edges, stripes, texture) for the
CPU smoke config and the tests: ``python trainer/smoke_data.py DIR [--count N] [--size S]``."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_image(size: int, seed: int) -> np.ndarray:
    """``[size, size, 3]`` uint8: a colour gradient, a disc, stripes and mild texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([x, y, 1 - x * y], axis=2) * rng.uniform(0.4, 1.0, 3)
    cx, cy, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
    disc = (x - cx) ** 2 + (y - cy) ** 2 < r**2
    img[disc] = rng.uniform(0, 1, 3)
    freq, angle = rng.uniform(4, 12), rng.uniform(0, np.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)))
    band = (y > 0.65) & (y < 0.9)
    img[band] = img[band] * 0.5 + 0.5 * stripes[band, None]
    img += rng.normal(0, 0.02, img.shape)
    return (img.clip(0, 1) * 255).round().astype(np.uint8)


def write_images(folder: str | Path, count: int = 8, size: int = 96, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(synthetic_image(size, seed * 1000 + i)).save(folder / f"img{i:03d}.png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_images(args.folder, args.count, args.size, args.seed))


if __name__ == "__main__":
    main()
