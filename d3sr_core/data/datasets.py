"""Training data: HR image folders (LR made on the fly) and paired LR/HR folders.

Every random choice of an item (crop, flips, degradation) is derived from ``(seed,
position)``, where ``position`` is the item's place in the training stream (see
:class:`StreamSampler`), so a resumed run sees exactly the data an uninterrupted one would,
whatever the number of data-loader workers.

Unreadable files and (with ``small="skip"``) images smaller than the crop are skipped with a
warning naming the file (once per file); the next file in the folder takes their place.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..image_files import IMAGE_SUFFIXES, ImageFileError, read_image
from .degradation import DegradationConfig, degrade_batch

logger = logging.getLogger(__name__)
SMALL_POLICIES = ("skip", "pad")


class DataError(ValueError):
    """The training data cannot be used (missing/empty folder, mismatched pairs...)."""


def list_images(root: str | Path, what: str = "image folder") -> list[Path]:
    """All image files under ``root`` (recursive, sorted by relative path).

    Raises:
        DataError: ``root`` is missing, not a folder, or holds no image file.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a folder")
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise DataError(
            f"{what} {root} holds no images (looked recursively for {', '.join(IMAGE_SUFFIXES)})"
        )
    return files


def load_rgb(path: Path) -> np.ndarray:
    """``[H, W, 3]`` float32 in [0, 1]; gray is repeated, alpha dropped. Raises ImageFileError."""
    pixels = read_image(path).pixels
    c = pixels.shape[2]
    if c in (1, 2):
        pixels = np.repeat(pixels[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3], dtype=np.float32)


def _augment(arrays: list[np.ndarray], rng: np.random.Generator, flip: bool, rotate: bool):
    """The same horizontal flip / (vertical flip + 90-degree rotation) on every array."""
    if flip and rng.random() < 0.5:
        arrays = [a[:, ::-1] for a in arrays]
    if rotate:
        if rng.random() < 0.5:
            arrays = [a[::-1] for a in arrays]
        if rng.random() < 0.5:
            arrays = [a.transpose(1, 0, 2) for a in arrays]
    return [np.ascontiguousarray(a) for a in arrays]


def _to_tensor(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()


def _pad_to(a: np.ndarray, h: int, w: int) -> np.ndarray:
    ph, pw = max(0, h - a.shape[0]), max(0, w - a.shape[1])
    if ph == 0 and pw == 0:
        return a
    return np.pad(a, ((0, ph), (0, pw), (0, 0)), mode="symmetric")


def _key(key) -> tuple[int, int]:
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), int(key)


class _SkippingDataset(Dataset):
    """Shared skip-and-warn logic: ``_load(i, rng)`` returns an item or raises ``_Skip``."""

    files: list[Path]

    def __init__(self, seed: int, small: str) -> None:
        if small not in SMALL_POLICIES:
            raise DataError(f"small must be one of {SMALL_POLICIES}, got {small!r}")
        self.seed = int(seed)
        self.small = small
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    def _warn(self, message: str, path: Path) -> None:
        if str(path) not in self._warned:
            self._warned.add(str(path))
            warnings.warn(message, stacklevel=3)
            logger.warning(message)

    def __getitem__(self, key) -> dict:
        index, position = _key(key)
        n = len(self.files)
        for attempt in range(n):
            i = (index + attempt) % n
            rng = np.random.default_rng([self.seed, position, attempt])
            try:
                return self._load(i, rng, position)
            except _Skip as skip:
                self._warn(str(skip), self.files[i])
        raise DataError(f"none of the {n} images in {self.root} could be used (see the warnings)")


class _Skip(Exception):
    pass


class HRFolderDataset(_SkippingDataset):
    """HR images from a folder (recursive); random crops; LR made by the Real-ESRGAN pipeline.

    Args:
        root: folder of HR images.
        crop_size: HR crop (pixels, a multiple of ``8 * scale`` for the model).
        degradation: the pipeline's settings (its ``scale`` is the SR factor).
        degrade: make the LR here (data-loader workers, CPU). With ``False`` items carry
            only ``hr`` and ``seed`` and the trainer degrades the batch on its device.
        small: ``"skip"`` images smaller than the crop, or ``"pad"`` them (mirror padding).
        flip, rotate: random horizontal flip; random vertical flip + transpose.

    Items: ``{"hr": [3, crop, crop], "lr": [3, crop/s, crop/s] (if degrade), "seed": int,
    "name": relative path}``, images in [0, 1].
    """

    def __init__(
        self,
        root: str | Path,
        crop_size: int,
        degradation: DegradationConfig | None = None,
        *,
        degrade: bool = True,
        small: str = "skip",
        flip: bool = True,
        rotate: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(seed, small)
        self.root = Path(root).expanduser()
        self.files = list_images(self.root, "HR image folder")
        self.crop_size = int(crop_size)
        self.degradation = degradation or DegradationConfig()
        if self.crop_size % self.degradation.scale:
            raise DataError(
                f"crop size {crop_size} is not a multiple of the scale {self.degradation.scale}"
            )
        self.degrade = degrade
        self.flip, self.rotate = flip, rotate

    def _load(self, i: int, rng: np.random.Generator, position: int) -> dict:
        path = self.files[i]
        try:
            img = load_rgb(path)
        except ImageFileError as err:
            raise _Skip(f"skipping unreadable training image: {err}") from None
        c = self.crop_size
        h, w = img.shape[:2]
        if h < c or w < c:
            if self.small == "skip":
                raise _Skip(f"skipping {path}: {w}x{h} is smaller than the {c}x{c} crop")
            img = _pad_to(img, c, c)
            h, w = img.shape[:2]
        top, left = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        (crop,) = _augment([img[top : top + c, left : left + c]], rng, self.flip, self.rotate)
        hr = _to_tensor(crop)
        seed = int(rng.integers(0, 2**62))
        item = {"hr": hr, "seed": seed, "name": path.relative_to(self.root).as_posix()}
        if self.degrade:
            lr, _ = degrade_batch(hr[None], self.degradation, seed)
            item["lr"] = lr[0]
        return item


class PairedFolderDataset(_SkippingDataset):
    """Paired LR/HR folders matched by relative path without suffix; aligned random crops.

    Raises:
        DataError: a folder is missing/empty, or names present on one side only (listed).
    """

    def __init__(
        self,
        lr_root: str | Path,
        hr_root: str | Path,
        crop_size: int,
        scale: int = 4,
        *,
        small: str = "skip",
        flip: bool = True,
        rotate: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(seed, small)
        self.root = Path(hr_root).expanduser()
        self.lr_root = Path(lr_root).expanduser()
        pairs = match_pairs(
            list_images(self.lr_root, "LR image folder"),
            self.lr_root,
            list_images(self.root, "HR image folder"),
            self.root,
            "LR",
            "HR",
        )
        self.files = [hr for _, hr in pairs]
        self.lr_files = [lr for lr, _ in pairs]
        self.crop_size, self.scale = int(crop_size), int(scale)
        if self.crop_size % self.scale:
            raise DataError(f"crop size {crop_size} is not a multiple of the scale {scale}")
        self.flip, self.rotate = flip, rotate

    def _load(self, i: int, rng: np.random.Generator, position: int) -> dict:
        hr_path, lr_path = self.files[i], self.lr_files[i]
        try:
            hr, lr = load_rgb(hr_path), load_rgb(lr_path)
        except ImageFileError as err:
            raise _Skip(f"skipping unreadable training pair: {err}") from None
        s, c = self.scale, self.crop_size
        if lr.shape[0] * s != hr.shape[0] or lr.shape[1] * s != hr.shape[1]:
            raise _Skip(
                f"skipping {lr_path}: LR {lr.shape[1]}x{lr.shape[0]} times {s} is not the HR size "
                f"{hr.shape[1]}x{hr.shape[0]} of {hr_path}"
            )
        if hr.shape[0] < c or hr.shape[1] < c:
            if self.small == "skip":
                raise _Skip(
                    f"skipping {hr_path}: {hr.shape[1]}x{hr.shape[0]} is smaller than the {c}x{c} crop"
                )
            lr = _pad_to(lr, -(-c // s), -(-c // s))
            hr = _pad_to(hr, lr.shape[0] * s, lr.shape[1] * s)
        cl = c // s
        top = int(rng.integers(0, lr.shape[0] - cl + 1))
        left = int(rng.integers(0, lr.shape[1] - cl + 1))
        hr_crop = hr[top * s : top * s + c, left * s : left * s + c]
        lr_crop = lr[top : top + cl, left : left + cl]
        hr_crop, lr_crop = _augment([hr_crop, lr_crop], rng, self.flip, self.rotate)
        return {
            "hr": _to_tensor(hr_crop),
            "lr": _to_tensor(lr_crop),
            "seed": int(rng.integers(0, 2**62)),
            "name": hr_path.relative_to(self.root).as_posix(),
        }


def match_pairs(
    a_files: list[Path], a_root: Path, b_files: list[Path], b_root: Path, a_name: str, b_name: str
) -> list[tuple[Path, Path]]:
    """Pair two file lists by relative path without suffix.

    Raises:
        DataError: listing (up to 10 of) the names found on one side only.
    """

    def keyed(files: list[Path], root: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for f in files:
            key = f.relative_to(root).with_suffix("").as_posix()
            if key in out:
                raise DataError(
                    f"{root}: two images share the name {key!r} ({out[key].name}, {f.name})"
                )
            out[key] = f
        return out

    a, b = keyed(a_files, a_root), keyed(b_files, b_root)
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        lines = []
        if only_a:
            lines.append(f"{len(only_a)} in {a_name} {a_root} only: {', '.join(only_a[:10])}")
        if only_b:
            lines.append(f"{len(only_b)} in {b_name} {b_root} only: {', '.join(only_b[:10])}")
        raise DataError("image sets do not match:\n  " + "\n  ".join(lines))
    return [(a[k], b[k]) for k in sorted(a)]


class StreamSampler(Sampler):
    """An endless, resumable stream of ``(index, position)`` keys for one process.

    The global stream visits the dataset in a fresh seeded permutation per epoch
    (``position // len``); consecutive blocks of ``batch_size`` positions go to the
    processes in turn (block ``k`` to rank ``k % world_size``). ``start`` is a global
    position (a multiple of ``batch_size * world_size``) to resume from.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        shuffle: bool = True,
    ) -> None:
        if num_items <= 0:
            raise DataError("cannot sample from an empty dataset")
        self.n, self.b, self.seed = num_items, batch_size, seed
        self.rank, self.world, self.start = rank, world_size, start
        self.shuffle = shuffle
        self._perm: tuple[int, Tensor] | None = None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if not self.shuffle:
            return offset
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][offset])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        block = self.start // self.b + self.rank
        while True:
            for j in range(self.b):
                p = block * self.b + j
                yield self._index(p), p
            block += self.world
