"""LoRA without peft: target selection, and merging low-rank deltas into plain weights.

Inference never imports peft: a LoRA pair ``(A, B)`` on a module becomes
``W += multiplier * scale * B @ A`` (for a conv, ``B`` is 1x1 and is folded into ``A``'s
kernel). Module selection follows peft's ``target_modules`` rule (a module matches a
target when its name equals it or ends with ``"." + target``), so adapters trained with
peft in the trainer map one to one onto what is merged here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

# Spec section 2: with rank 16 these targets bring SD2.1-base to ~966 M parameters (paper: 966.3 M).
DEFAULT_UNET_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0",
    "proj_in", "proj_out",
    "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "conv",
    "conv_in", "conv_out",
    "time_emb_proj",
)  # fmt: skip


def module_matches(name: str, targets: Iterable[str]) -> bool:
    """peft's rule: ``name`` equals a target or ends with ``"." + target``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def find_lora_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Names of the ``nn.Linear`` / ``nn.Conv2d`` modules of ``model`` that LoRA adapts."""
    targets = tuple(targets)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d) and module_matches(name, targets)
    ]


def count_lora_parameters(model: nn.Module, targets: Iterable[str], rank: int) -> int:
    """Parameters an (unmerged) rank-``rank`` LoRA on ``targets`` would add; works on ``meta``."""
    total = 0
    for name in find_lora_targets(model, targets):
        m = model.get_submodule(name)
        if isinstance(m, nn.Linear):
            total += rank * (m.in_features + m.out_features)
        else:
            kh, kw = m.kernel_size
            total += rank * (m.in_channels // m.groups) * kh * kw + m.out_channels * rank
    return total


def lora_delta(down: Tensor, up: Tensor) -> Tensor:
    """The weight delta ``up @ down`` of one LoRA pair, in float32.

    Args:
        down: ``A``, ``[r, in]`` (linear) or ``[r, in, kh, kw]`` (conv).
        up: ``B``, ``[out, r]`` (linear) or ``[out, r, 1, 1]`` (conv).

    Returns:
        ``[out, in]`` or ``[out, in, kh, kw]``.
    """
    down, up = down.float(), up.float()
    if down.ndim == 2:
        return up.reshape(up.shape[0], -1) @ down
    if down.ndim == 4 and up.ndim == 4 and up.shape[2:] == (1, 1):
        # B is 1x1, so B o A is one conv whose kernel is B @ A over the flattened A kernel
        return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(
            up.shape[0], *down.shape[1:]
        )
    raise ValueError(
        f"unsupported LoRA pair shapes A={tuple(down.shape)} B={tuple(up.shape)}: "
        "expected A [r, in] / B [out, r] (linear) or A [r, in, kh, kw] / B [out, r, 1, 1] (conv)"
    )


@dataclass
class LoraAdapter:
    """A set of weight changes for one model, kept in factored form so it can be re-merged.

    Attributes:
        factors: module path (e.g. ``"down_blocks.0.resnets.0.conv1"``) -> ``(A, B)``.
        scale: ``alpha / rank``, applied to every ``B @ A``.
        replaced: parameter path -> a full trained tensor that replaces the base one
            (OSEDiff trains ``conv_in`` outright). Merged as ``W + m * (trained - W_base)``.
    """

    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    scale: float = 1.0
    replaced: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.factors) + len(self.replaced)

    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.factors.values()) + sum(
            t.numel() for t in self.replaced.values()
        )


def _check_and_get(model: nn.Module, path: str, kind: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise KeyError(f"{kind} {path!r} names no module of {type(model).__name__}") from None


class MergedLora:
    """Tracks an adapter merged into a model so its strength can be changed in place.

    ``strength`` multiplies every delta: 0 gives the base model, 1 the trained one,
    values above 1 extrapolate. Changing it adds only the difference, so no second copy
    of the base weights is ever held.
    """

    def __init__(self, model: nn.Module, adapter: LoraAdapter, strength: float = 1.0):
        self.model = model
        self.adapter = adapter
        self._base_of_replaced: dict[str, Tensor] = {}
        for path, trained in adapter.replaced.items():
            param = _param(model, path)
            if tuple(param.shape) != tuple(trained.shape):
                raise ValueError(
                    f"replacement for {path!r} has shape {tuple(trained.shape)}, "
                    f"the model's parameter is {tuple(param.shape)}"
                )
            self._base_of_replaced[path] = param.detach().float().cpu().clone()
        for path, (down, up) in adapter.factors.items():
            module = _check_and_get(model, path, "LoRA target")
            weight = getattr(module, "weight", None)
            if weight is None:
                raise KeyError(f"LoRA target {path!r} has no weight")
            try:
                shape = lora_delta(down[:1].to("meta"), up[:, :1].to("meta")).shape
            except ValueError as err:
                raise ValueError(f"LoRA target {path!r}: {err}") from None
            if tuple(shape) != tuple(weight.shape):
                raise ValueError(
                    f"LoRA for {path!r} gives a delta of shape {tuple(shape)}, "
                    f"the module's weight is {tuple(weight.shape)}"
                )
        self.strength = 0.0
        self.set_strength(strength)

    @torch.no_grad()
    def set_strength(self, strength: float) -> None:
        step = float(strength) - self.strength
        if step != 0.0:
            for path, (down, up) in self.adapter.factors.items():
                weight = self.model.get_submodule(path).weight
                delta = lora_delta(down.to(weight.device), up.to(weight.device))
                _add_scaled(weight, delta, step * self.adapter.scale)
            for path, trained in self.adapter.replaced.items():
                param = _param(self.model, path)
                base = self._base_of_replaced[path].to(param.device)
                _add_scaled(param, trained.float().to(param.device) - base, step)
        self.strength = float(strength)


def _add_scaled(param: Tensor, delta: Tensor, alpha: float) -> None:
    """``param += alpha * delta``, accumulated in float32 for half-precision weights."""
    if param.dtype == torch.float32:
        param.add_(delta, alpha=alpha)
    else:
        param.copy_(param.float().add_(delta, alpha=alpha).to(param.dtype))


def _param(model: nn.Module, path: str) -> nn.Parameter:
    module_path, _, name = path.rpartition(".")
    module = _check_and_get(model, module_path, "parameter owner") if module_path else model
    param = getattr(module, name, None)
    if not isinstance(param, Tensor):
        raise KeyError(f"{path!r} names no parameter of {type(model).__name__}")
    return param


def split_peft_state_dict(
    state_dict: dict[str, Tensor], adapter_name: str | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """Group peft-named LoRA tensors into ``{module path: (A, B)}``.

    Accepts ``<path>.lora_A[.<adapter>].weight`` / ``<path>.lora_B[.<adapter>].weight``;
    with ``adapter_name`` only that adapter's keys are taken. Other keys are ignored.
    """
    downs: dict[str, Tensor] = {}
    ups: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        for marker, bucket in ((".lora_A.", downs), (".lora_B.", ups)):
            if marker not in key or not key.endswith(".weight"):
                continue
            path, _, rest = key.partition(marker)
            adapter = rest[: -len(".weight")] if rest != "weight" else ""
            if adapter_name is not None and adapter != adapter_name:
                continue
            path = path.removesuffix(".base_layer")
            if path in bucket:
                raise KeyError(f"module {path!r} has LoRA tensors under more than one adapter name")
            bucket[path] = tensor
    missing = sorted(set(downs) ^ set(ups))
    if missing:
        raise KeyError(
            f"LoRA pairs incomplete (lora_A without lora_B or the reverse) for: {missing[:5]}"
        )
    return {p: (downs[p], ups[p]) for p in downs}
