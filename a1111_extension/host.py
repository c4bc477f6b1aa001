"""The webui facilities the extension uses, each read defensively.

Everything is looked up when called (never at import), so the module imports without a
webui and unit tests can put small stand-ins for ``modules.*`` into ``sys.modules``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

LOG_PREFIX = "[D3SR]"


def log(message: str) -> None:
    """A console line (the webui's console is where users look for what happened)."""
    print(f"{LOG_PREFIX} {message}", file=sys.stderr, flush=True)


def _shared():
    from modules import shared

    return shared


def option(name: str, default):
    """``shared.opts.<name>``, or ``default`` when the settings UI was never built (the option
    is then unknown), when there are no options yet, or when the stored value is None."""
    opts = getattr(_shared(), "opts", None)
    value = getattr(opts, name, None) if opts is not None else None
    return default if value is None else value


def cmd_opt(name: str, default=None):
    return getattr(getattr(_shared(), "cmd_opts", None), name, default)


def models_path() -> Path:
    """The webui's ``models`` folder (``--models-dir`` / ``--data-dir`` aware)."""
    try:
        from modules import paths

        return Path(paths.models_path)
    except (ImportError, AttributeError):
        return Path(getattr(_shared(), "models_path", "models"))


def checkpoints_folder() -> Path:
    """Where the webui keeps SD checkpoints: ``--ckpt-dir`` or ``models/Stable-diffusion``."""
    ckpt_dir = cmd_opt("ckpt_dir")
    return Path(ckpt_dir) if ckpt_dir else models_path() / "Stable-diffusion"


def device() -> torch.device:
    """``devices.get_device_for("d3sr")``: the CPU when ``--use-cpu d3sr`` (or ``all``) is given.

    Forge's ``get_device_for`` ignores ``--use-cpu`` and returns its main device.
    """
    from modules import devices

    get = getattr(devices, "get_device_for", None)
    if get is not None:
        return torch.device(get("d3sr"))
    return torch.device(getattr(devices, "device", "cpu"))


def precision(requested: str) -> str:
    """The engine precision for a setting value: ``auto`` follows ``--no-half`` (fp32)."""
    if requested == "auto" and cmd_opt("no_half", False):
        return "fp32"
    return requested


def torch_gc() -> None:
    try:
        from modules import devices

        devices.torch_gc()
    except (ImportError, AttributeError):
        pass


def forge_free_memory(target: torch.device) -> bool:
    """On Forge, ask its memory manager to make room before D3SR loads or runs (it unloads
    generation models only when needed). Returns whether Forge was there to ask."""
    if target.type == "cpu":
        return False
    try:
        from modules_forge.utils import prepare_free_memory
    except ImportError:
        return False
    log("asking Forge to free GPU memory for D3SR (it may unload the generation model)")
    prepare_free_memory()
    return True


def unload_generation_model(reason: str) -> bool:
    """Move the user's generation checkpoint off the GPU (A1111's "Unload SD checkpoint to
    RAM"), saying so in the console. Only done when D3SR ran out of GPU memory."""
    try:
        from modules import sd_models
    except ImportError:
        return False
    # not shared.sd_model: reading it makes A1111 load a checkpoint when none is loaded
    model_data = getattr(sd_models, "model_data", None)
    unload = getattr(sd_models, "unload_model_weights", None)
    if getattr(model_data, "sd_model", None) is None or unload is None:
        return False
    log(f"{reason}: moving the generation checkpoint to RAM to make room, then retrying")
    getattr(unload, "__wrapped__", unload)()  # the webui's own, not our release hook
    torch_gc()
    return True


def _state():
    return getattr(_shared(), "state", None)


def cancel_requested() -> bool:
    """Interrupt or Skip pressed (checked by the engine between tiles)."""
    state = _state()
    return bool(state is not None and (state.interrupted or getattr(state, "skipped", False)))


@contextmanager
def progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback feeding ``shared.state`` (the progress bar and
    ``/sdapi/v1/progress``); the state's step counters and text are restored afterwards, so a
    hires. fix pass keeps its own progress."""
    state = _state()
    saved = (
        (state.sampling_step, state.sampling_steps, state.textinfo) if state is not None else None
    )

    def report(done: int, total: int) -> None:
        if state is None:
            return
        state.sampling_steps = total
        state.sampling_step = done
        state.textinfo = f"{label}: {100 * done // max(total, 1)}%"

    try:
        yield report
    finally:
        if state is not None and saved is not None:
            state.sampling_step, state.sampling_steps, state.textinfo = saved
