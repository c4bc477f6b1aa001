"""Reading weight files safely, with errors that name the file and what was expected."""

from __future__ import annotations

import json
import pickle
import struct
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


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` header (empty dict when absent)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header length implausible")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise WeightsFileError(path, "file not found") from None
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise WeightsFileError(path, f"not a readable .safetensors file ({err})") from None
    return dict(header.get("__metadata__") or {})


def read_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """Load a ``.safetensors`` file or a pickle checkpoint without executing any code.

    Pickles are read with ``torch.load(weights_only=True)``: a file that needs arbitrary
    code (custom classes) is refused, not run. The returned dict is the file's top level
    (callers unwrap ``state_dict`` etc. themselves, since formats differ).

    Raises:
        WeightsFileError: missing, truncated/corrupt, unsafe or unknown-format file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(path, "file not found" if not path.exists() else "not a file")
    if path.stat().st_size == 0:
        raise WeightsFileError(path, "file is empty")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        read_safetensors_metadata(path)  # clear error for a bad header before safetensors' own
        try:
            return load_file(str(path), device=str(device))
        except Exception as err:  # safetensors raises its own SafetensorError types
            raise WeightsFileError(
                path, f"damaged or truncated .safetensors file ({err})"
            ) from None
    try:
        return torch.load(str(path), map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsFileError(
            path,
            "refused: this pickle needs code execution to load (only plain tensors, numbers, "
            f"strings, lists and dicts are accepted; weights_only=True). Detail: {err}",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise WeightsFileError(
            path, f"damaged or truncated checkpoint, or not a torch file ({err})"
        ) from None


def only_tensors(state: dict, path: str | Path) -> dict[str, Tensor]:
    """Check every value is a tensor (e.g. after unwrapping a pickle's ``state_dict``)."""
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsFileError(
            path, f"expected a flat dict of tensors; non-tensor entries: {bad[:5]}"
        )
    return state
