"""Checks on weights read from a file, before anything is merged into a model.

Every problem becomes one :class:`~.files.WeightsFileError` naming the user's file and
what is wrong in words; a model is never half-merged because of a bad file. The checks
list every offending entry (up to a few, then a count), not just the first.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.lora import LoraAdapter, lora_delta
from .files import WeightsFileError

# No LoRA factor or trained replacement in any D3SR/OSEDiff file comes near this many
# elements (SD2.1's largest weight has 13 M); far larger means a damaged or hostile file.
MAX_TENSOR_ELEMENTS = 1 << 28
MAX_RANK = 4096


def listing(items: list[str], limit: int = 5) -> str:
    """``a, b, c`` (and N more)."""
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def tensor_problem(tensor: object, *, finite: bool = True) -> str | None:
    """Why ``tensor`` cannot be a weight: not a tensor, not floating point, absurdly large,
    or holding NaN/inf; ``None`` when fine. The size is checked before any value is read."""
    if not isinstance(tensor, Tensor):
        return f"is a {type(tensor).__name__}, not a tensor"
    if tensor.numel() > MAX_TENSOR_ELEMENTS:
        return f"has {tensor.numel():,} elements (shape {tuple(tensor.shape)}), implausibly many"
    if not tensor.is_floating_point():
        return f"has dtype {str(tensor.dtype).removeprefix('torch.')}, expected floating point"
    if finite and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        return "holds NaN or infinite values"
    return None


def check_tensors(tensors: dict[str, object], path: str | Path, what: str) -> None:
    """Every value of ``tensors`` is a finite floating-point tensor of plausible size."""
    problems = [f"{k} {p}" for k, v in tensors.items() if (p := tensor_problem(v))]
    if problems:
        raise WeightsFileError(path, f"{what}: {listing(problems)}")


def check_factors(
    factors: dict[str, tuple[Tensor, Tensor]], path: str | Path, what: str, rank: int | None = None
) -> None:
    """LoRA pairs are well formed: A ``[r, in]`` / B ``[out, r]`` (linear) or A
    ``[r, in, kh, kw]`` / B ``[out, r, 1, 1]`` (conv), the same rank ``r >= 1`` in both (and
    equal to ``rank`` when given), finite floating-point values."""
    problems = []
    for module, (down, up) in factors.items():
        bad = tensor_problem(down) or tensor_problem(up)
        if bad:
            which = "lora_A" if tensor_problem(down) else "lora_B"
            problems.append(f"{module}.{which} {bad}")
            continue
        linear = down.ndim == 2 and up.ndim == 2
        conv = down.ndim == 4 and up.ndim == 4 and tuple(up.shape[2:]) == (1, 1)
        if not (linear or conv):
            problems.append(
                f"{module}: lora_A {tuple(down.shape)} / lora_B {tuple(up.shape)} are neither "
                "[r, in] / [out, r] nor [r, in, kh, kw] / [out, r, 1, 1]"
            )
        elif down.shape[0] != up.shape[1]:
            problems.append(f"{module}: lora_A has rank {down.shape[0]}, lora_B rank {up.shape[1]}")
        elif down.shape[0] < 1:
            problems.append(f"{module}: rank 0")
        elif rank is not None and down.shape[0] != rank:
            problems.append(f"{module}: rank {down.shape[0]}, the file declares rank {rank}")
    if problems:
        raise WeightsFileError(path, f"{what} LoRA: {listing(problems)}")


def fit_problems(model: nn.Module, adapter: LoraAdapter, model_name: str) -> list[str]:
    """Everything in ``adapter`` that does not fit ``model``: unknown target modules (all of
    them), modules without a weight, deltas or replacements of the wrong shape."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    unknown, problems = [], []
    for path, (down, up) in adapter.factors.items():
        module = modules.get(path)
        if module is None:
            unknown.append(path)
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            problems.append(f"{path} has no weight to adapt")
            continue
        try:
            shape = tuple(lora_delta(down[:1].to("meta"), up[:, :1].to("meta")).shape)
        except ValueError:
            shape = None
        if shape != tuple(weight.shape):
            problems.append(
                f"{path}: LoRA gives a {shape} delta, the {model_name}'s weight is "
                f"{tuple(weight.shape)}"
            )
    for path, tensor in adapter.replaced.items():
        param = params.get(path)
        if param is None:
            unknown.append(path)
        elif tuple(param.shape) != tuple(tensor.shape):
            problems.append(
                f"{path}: replacement {tuple(tensor.shape)}, the {model_name}'s is "
                f"{tuple(param.shape)}"
            )
    if unknown:
        problems.insert(
            0,
            f"{len(unknown)} target(s) name no module of the {model_name}: "
            + listing(sorted(unknown), 8),
        )
    return problems


def check_rank(value: object, path: str | Path, field: str) -> int:
    """An integer LoRA rank in 1..MAX_RANK (bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise WeightsFileError(
            path, f"{field} is a {type(value).__name__} ({value!r:.40}), expected an int"
        )
    if not 1 <= value <= MAX_RANK:
        raise WeightsFileError(path, f"{field} = {value}, expected 1..{MAX_RANK}")
    return value


def check_scale(value: object, path: str | Path, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise WeightsFileError(path, f"{what} is {value!r:.40}, expected a finite number")
    return float(value)


def check_config_types(config: dict, path: str | Path) -> None:
    """The JSON ``config`` of a D3SR header has the field types :class:`GeneratorConfig`
    expects (ints, finite numbers, strings, a list of strings)."""
    problems = []
    for name, kind in (
        ("base", str),
        ("timestep", int),
        ("prediction_type", str),
        ("scaling_factor", float),
        ("latent_mode", str),
        ("lora_rank", int),
        ("lora_alpha", float),
        ("lora_targets", list),
    ):
        if name not in config:
            continue
        value = config[name]
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, kind)
        if not ok:
            problems.append(f"{name} = {value!r:.40}")
    timestep = config.get("timestep")
    if isinstance(timestep, int) and not 0 <= timestep < 100_000:
        problems.append(f"timestep = {timestep}")
    if problems:
        raise WeightsFileError(path, f"D3SR header config has invalid fields: {listing(problems)}")
