"""Planning a batch for ``d3sr upscale``: which files, which output paths, which process.

Kept apart from the argument parsing so the rules are testable without a model:

* :func:`collect_inputs` expands files, folders and globs into ``(file, relative path)``; a
  folder's or a glob's sub-folders are mirrored under the output folder (a glob is relative
  to its leading folder without wildcards, ``scans/**/*.tif`` -> ``scans``).
* :func:`plan_outputs` gives every input its own output path, deterministically: names
  that still collide (also case-insensitively, for Windows/macOS disks) get the input's
  extension, then ``_2``, ``_3``... in input order.
* :func:`check_output_target` refuses ``-o`` values that cannot work, before any model loads.
* :func:`split_by_pixels` shares the work between processes by pixel count.
"""

from __future__ import annotations

import glob
import os
import stat
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .image_files import IMAGE_SUFFIXES, regular_file_problem


@dataclass
class Job:
    """One input file and the output path it is written to."""

    source: Path
    target: Path


def _glob_root(pattern: str) -> Path:
    """The leading folders of a glob pattern that hold no wildcard (``.`` when none)."""
    parts = Path(pattern).parts
    root: list[str] = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        root.append(part)
    return Path(*root) if root else Path(".")


def collect_inputs(specs: list[str], recursive: bool) -> tuple[list[tuple[Path, Path]], list[str]]:
    """``(file, relative output path)`` pairs for files, folders and globs; plus error messages.

    Files given by name map to their name; files found in a folder or by a glob keep their
    path relative to that folder (or the glob's leading folder). Special files (FIFOs,
    devices, sockets) are refused without being opened. Duplicates (same file twice) are
    dropped, the first mention wins.
    """

    def wanted(p: Path) -> bool:
        return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")

    def images_in(folder: Path) -> list[Path]:
        pattern = "**/*" if recursive else "*"
        files = []
        for p in sorted(folder.glob(pattern)):
            if not wanted(p) or p.is_dir():
                continue
            problem = regular_file_problem(p)
            if problem:  # e.g. a FIFO named x.png: reported, never opened
                errors.append(f"{p}: {problem}")
            else:
                files.append(p)
        return files

    found: list[tuple[Path, Path]] = []
    errors: list[str] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = images_in(path)
            if not files:
                errors.append(
                    f"{spec}: no images in this folder{'' if recursive else ' (use --recursive for sub-folders)'}"
                )
            found += [(f, f.relative_to(path)) for f in files]
        elif os.path.lexists(path):
            problem = regular_file_problem(path)
            if problem:
                errors.append(f"{spec}: {problem}")
            else:
                found.append((path, Path(path.name)))
        elif glob.has_magic(spec):
            pattern = os.path.expanduser(spec)
            root = _glob_root(pattern)
            matches = sorted(Path(m) for m in glob.glob(pattern, recursive=recursive))
            files, before = [], len(errors)
            for m in matches:
                if m.is_dir() or not wanted(m):
                    continue
                problem = regular_file_problem(m)
                if problem:
                    errors.append(f"{m}: {problem}")
                else:
                    files.append(m)
            if not files and len(errors) == before:
                errors.append(f"{spec}: no image files match")
            found += [(f, _relative(f, root)) for f in files]
        else:
            errors.append(f"{spec}: no such file or folder")
    unique, seen = [], set()
    for source, rel in found:
        key = source.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((source, rel))
    return unique, errors


def _relative(file: Path, root: Path) -> Path:
    try:
        return file.relative_to(root)
    except ValueError:  # e.g. "../x/*.png" against a resolved path: fall back to the name
        return Path(file.name)


def _key(path: Path) -> str:
    """Collision key: case-insensitive, since many disks (Windows, macOS) are."""
    return os.path.normcase(str(path)).casefold()


def output_extension(rel: Path, fmt: str | None) -> str:
    """The output suffix for an input's relative path and ``--format`` (None = png)."""
    if fmt is None:
        fmt = "png"
    if fmt != "same":
        return "." + fmt
    return rel.suffix.lower() if rel.suffix.lower() in IMAGE_SUFFIXES else ".png"


def plan_outputs(
    inputs: list[tuple[Path, Path]],
    output: Path,
    fmt: str | None,
    suffix: str,
    single_file: bool,
) -> list[Job]:
    """A distinct output path for every input (see the module docstring for the rules)."""
    if single_file:
        return [Job(inputs[0][0], output)]

    def target(rel: Path, stem: str) -> Path:
        return output / rel.parent / f"{stem}{suffix}{output_extension(rel, fmt)}"

    targets = [target(rel, rel.stem) for _, rel in inputs]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        groups[_key(t)].append(i)
    for indices in groups.values():
        extensions = {inputs[i][1].suffix.lower() for i in indices}
        if len(indices) > 1 and len(extensions) > 1:
            for i in indices:
                rel = inputs[i][1]
                targets[i] = target(rel, f"{rel.stem}_{rel.suffix.lstrip('.').lower()}")
    taken: set[str] = set()
    planned: set[str] = {_key(t) for t in targets}
    for i, t in enumerate(targets):
        if _key(t) in taken:
            rel = inputs[i][1]
            stem = t.name[: -len(t.suffix) - len(suffix)] if suffix else t.stem
            n = 2
            while True:
                candidate = target(rel, f"{stem}_{n}")
                if _key(candidate) not in taken and _key(candidate) not in planned:
                    break
                n += 1
            targets[i] = candidate
            planned.add(_key(candidate))
        taken.add(_key(targets[i]))
    return [Job(source, t) for (source, _), t in zip(inputs, targets, strict=True)]


def is_single_file_output(output: Path, inputs: list[tuple[Path, Path]]) -> bool:
    """``-o`` names one output file: it has an image suffix and is not an existing folder."""
    return output.suffix.lower() in IMAGE_SUFFIXES and not output.is_dir()


def check_output_target(
    output: Path, inputs: list[tuple[Path, Path]], fmt: str | None, suffix: str
) -> bool:
    """Refuse ``-o`` values that cannot work; returns True when ``-o`` is a single file.

    Raises:
        ValueError: the message names the flag and what to do instead.
    """
    if os.sep in suffix or (os.altsep and os.altsep in suffix):
        raise ValueError(f"--suffix {suffix!r}: must not contain a path separator")
    single = is_single_file_output(output, inputs)
    if os.path.lexists(output) and not output.is_dir():
        mode = os.stat(output).st_mode if output.exists() else 0
        if not stat.S_ISREG(mode):
            raise ValueError(f"-o {output}: exists and is neither a folder nor a regular file")
        if not single:
            raise ValueError(
                f"-o {output}: is an existing file; give a folder for {len(inputs)} input(s)"
            )
    if single:
        if len(inputs) != 1:
            raise ValueError(
                f"-o {output}: names one image file but there are {len(inputs)} inputs; "
                "give a folder instead"
            )
        if fmt not in (None, "same"):
            wanted = output_extension(Path("x"), fmt)
            if _jpeg(output.suffix.lower()) != _jpeg(wanted):
                raise ValueError(
                    f"-o {output} and --format {fmt} disagree; drop --format or name a "
                    f"{wanted} file"
                )
    folder = output.parent if single else output
    for ancestor in (folder, *folder.parents):
        if os.path.lexists(ancestor):
            if not ancestor.is_dir():
                raise ValueError(f"-o {output}: {ancestor} is not a folder")
            break
    return single


def _jpeg(suffix: str) -> str:
    return {".jpeg": ".jpg", ".tiff": ".tif"}.get(suffix, suffix)


def image_pixels(path: Path) -> int:
    """Width x height from the file header (no decoding); 1 for unreadable files."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            w, h = image.size
        return max(1, w * h)
    except Exception:  # noqa: BLE001 - the real read reports it; here it only weighs the share
        return 1


def split_by_pixels(weights: list[int], parts: int) -> list[list[int]]:
    """Indices of ``weights`` shared into ``parts`` lists of nearly equal total weight.

    Greedy longest-first: the heaviest remaining item goes to the lightest part (ties by
    index, so every process computes the same split). Each part keeps input order.
    """
    loads = [0] * parts
    shares: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        part = min(range(parts), key=lambda p: (loads[p], p))
        shares[part].append(i)
        loads[part] += weights[i]
    return [sorted(s) for s in shares]
