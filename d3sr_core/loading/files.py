"""Reading weight files safely, with errors that name the file and what was expected."""

from __future__ import annotations

import json
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".pkl", ".bin")


class WeightsFileError(ValueError):
    """A weights file is missing, damaged, unsafe or not what the caller expected."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# safetensors dtype -> bytes per element (the format's full list as of safetensors 0.4)
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER_BYTES = 100_000_000


def regular_file(path: str | Path) -> Path:
    """``path`` if it is a regular file; else a :class:`WeightsFileError` saying what it is.

    Checked with ``stat`` before any ``open``: a FIFO would block and a device never end.
    """
    from ..image_files import regular_file_problem

    path = Path(path)
    problem = regular_file_problem(path)
    if problem:
        raise WeightsFileError(path, "file not found" if problem == "no such file" else problem)
    return path


def read_safetensors_header(path: str | Path) -> dict:
    """The parsed JSON header of a ``.safetensors`` file, checked field by field.

    Raises:
        WeightsFileError: truncated file, header that is not a JSON object, a tensor entry
            with wrong field types, an unknown dtype, offsets that disagree with the shape
            or point past the end of the file, or a ``__metadata__`` that is not
            string -> string.
    """
    path = regular_file(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
            header = json.loads(f.read(n).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, struct.error) as err:
        raise WeightsFileError(path, f"not a readable .safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise WeightsFileError(
            path,
            f"not a readable .safetensors file (header is a JSON {type(header).__name__}, "
            "expected an object)",
        )
    data_size = size - 8 - n
    ends = [
        e["data_offsets"][1]
        for k, e in header.items()
        if k != "__metadata__"
        and isinstance(e, dict)
        and isinstance(e.get("data_offsets"), list)
        and len(e["data_offsets"]) == 2
        and isinstance(e["data_offsets"][1], int)
    ]
    if ends and max(ends) > data_size:
        raise WeightsFileError(
            path,
            f"truncated .safetensors file: its header describes {max(ends)} bytes of tensor data, "
            f"the file holds {data_size}",
        )
    problems = []
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        problems.append("__metadata__ must map names to strings")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        problem = _entry_problem(entry, data_size)
        if problem:
            problems.append(f"tensor {name!r}: {problem}")
    if problems:
        from .validate import listing

        raise WeightsFileError(path, f"damaged .safetensors header: {listing(problems, 3)}")
    return header


def _entry_problem(entry: object, data_size: int) -> str | None:
    if not isinstance(entry, dict):
        return f"entry is a JSON {type(entry).__name__}, expected an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_ITEMSIZE:
        return f"unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        return f"shape {shape!r} is not a list of sizes"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        return f"data_offsets {offsets!r} is not [begin, end]"
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * _SAFETENSORS_ITEMSIZE[dtype]:
        return f"shape {shape} {dtype} needs {numel * _SAFETENSORS_ITEMSIZE[dtype]} bytes, offsets give {offsets[1] - offsets[0]}"
    if offsets[1] > data_size:
        return f"data ends at byte {offsets[1]} of a {data_size}-byte data section (truncated file)"
    return None


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` header (empty dict when absent); the whole
    header is checked (:func:`read_safetensors_header`)."""
    return dict(read_safetensors_header(path).get("__metadata__") or {})


def read_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """Load a ``.safetensors`` file or a pickle checkpoint without executing any code.

    Pickles are read with ``torch.load(weights_only=True)``: a file that needs arbitrary
    code (custom classes) is refused, not run. Zip-format pickles are memory-mapped, so a
    tensor declared larger than the bytes stored for it fails instead of being allocated.
    The returned dict is the file's top level (callers unwrap ``state_dict`` etc.
    themselves, since formats differ).

    Raises:
        WeightsFileError: missing, not a regular file, truncated/corrupt, unsafe or
            unknown-format file.
    """
    path = regular_file(path)
    if path.stat().st_size == 0:
        raise WeightsFileError(path, "file is empty")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        read_safetensors_header(path)  # clear error for a bad header before safetensors' own
        try:
            return load_file(str(path), device=str(device))
        except Exception as err:  # safetensors raises its own SafetensorError types
            raise WeightsFileError(
                path, f"damaged or truncated .safetensors file ({_first_line(err)})"
            ) from None
    mmap = zipfile.is_zipfile(path) and str(device) != "meta"
    try:
        with warnings.catch_warnings():  # torch's advice on odd pickle protocols is not ours
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(path), map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise WeightsFileError(path, _code_execution_refusal(err, path)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError) as err:
        raise WeightsFileError(
            path, f"damaged or truncated checkpoint, or not a torch file ({_first_line(err)})"
        ) from None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _code_execution_refusal(err: BaseException, path: Path) -> str:
    """One line instead of torch's multi-line weights_only advice: a refusal naming what the
    pickle would import and run, or "damaged" when it is not a loadable pickle at all."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    imported = found.group(1) if found else _first_import(path)
    if imported is None:
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        return f"damaged file, or not a torch checkpoint ({detail[0] if detail else 'unreadable'})"
    return (
        f"refused: loading this pickle would run code (it imports {imported}); only "
        "plain tensors, numbers, strings, lists and dicts are read"
    )


def _first_import(path: Path) -> str | None:
    """The first ``module.name`` a plain pickle imports, read with :mod:`pickletools` (which
    only decodes opcodes, never executes them); None when it imports nothing or is not one."""
    import pickletools

    strings: list[str] = []
    try:
        with path.open("rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL" and isinstance(arg, str):
                    return arg.replace(" ", ".")
                if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return f"{strings[-2]}.{strings[-1]}"
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name == "STOP":
                    return None
    except Exception:  # noqa: BLE001 - not decodable as a pickle: "damaged" is the answer
        return None
    return None


def only_tensors(state: dict, path: str | Path) -> dict[str, Tensor]:
    """Check every value is a tensor (e.g. after unwrapping a pickle's ``state_dict``)."""
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsFileError(
            path, f"expected a flat dict of tensors; non-tensor entries: {bad[:5]}"
        )
    return state
