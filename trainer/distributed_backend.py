"""How the trainer runs under accelerate: which launch modes it refuses (FSDP, Megatron-LM:
``check_launch_mode``), and how it prepares and steps its two networks (the backends).

The training loop talks to one :class:`Backend`: ``prepare`` the generator and the
discriminator with their optimizers, ``accumulate()`` around a micro-step, ``autocast()``
around forwards, ``backward(name, loss)`` and ``step(name)`` per network (``"g"`` or ``"d"``).

* :class:`DataParallelBackend` - one process or several (DDP, ``accelerate launch --multi_gpu``):
  accelerate's own ``prepare`` / ``accumulate`` / ``backward`` / ``clip_grad_norm_``.
* :class:`DeepSpeedBackend` - DeepSpeed ZeRO (stages 0-3) through accelerate's DeepSpeed config
  (``accelerate launch --config_file trainer/configs/accelerate_deepspeed_zero2.yaml``). The
  trainer updates two networks with two optimizers in alternating steps, and accelerate ties
  ``accelerator.backward()`` to the FIRST engine it built; so each network gets its own
  engine (accelerate's multi-plugin API: one ``DeepSpeedPlugin`` per network, both read from
  the launcher's config) and each loss goes to its own engine's ``backward`` / ``step``. The
  engine accumulates gradients, clips (``gradient_clipping`` = ``optim.grad_clip``) and
  steps at the accumulation boundary itself.

ZeRO-2 shards the trainable parameters' gradients and AdamW states across processes; every
process keeps the whole parameters, so EMA, validation, checkpoint files and the D3SR export
read the local module as with DDP. ZeRO-3 also shards the parameters (frozen ones included):
the parts of the networks the trainer calls outside their engine (VAE encoder, discriminator
in the generator step) still work because ZeRO-3 gathers parameters in hooks on every
sub-module, but a forward becomes a collective (validation then runs on every process:
``collective_forward``), and whoever reads or writes trainable tensors directly (EMA,
checkpoint files, export, checksums) does so inside ``gathered(...)`` on every process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from trainer.config import Config, ConfigError

logger = logging.getLogger("d3sr.train")

NETWORKS = ("generator", "discriminator")  # DeepSpeed plugin names; "g" / "d" in the loop
_SHORT = {"g": "generator", "d": "discriminator"}
ACCELERATE_CONFIG_HINT = (
    "the DeepSpeed section of the accelerate config (`deepspeed_config:` of the file given to "
    "`accelerate launch --config_file`, or its --deepspeed_config_file)"
)


def uses_deepspeed() -> bool:
    """Whether ``accelerate launch`` asked for DeepSpeed (flag or config file)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


# --------------------------------------------------------------------------- launch mode

# Why each accelerate mode this trainer rejects cannot work with it (checked before any model
# loads). Data parallel (`accelerate launch --multi_gpu`) and DeepSpeed ZeRO 0-3 (see
# trainer/distributed_backend.py) are the supported ways to use several GPUs.
UNSUPPORTED_MODES = {
    "FSDP": (
        "FSDP is not supported: the trainer calls parts of the models outside their wrapped "
        "forward (the frozen VAE encoder for the real latents, the discriminator in the "
        "generator step, validation on the main process) and saves, averages (EMA) and exports "
        "the trainable tensors of the local module, which FSDP would hold as shards; and "
        "accelerate does not run FSDP on CPU processes, so no FSDP path could be tested here. "
        "To shard use DeepSpeed: ZeRO-2 (gradients and optimizer states, `accelerate launch "
        "--config_file trainer/configs/accelerate_deepspeed_zero2.yaml ...`) or ZeRO-3 (also "
        "the parameters, frozen ones included: accelerate_deepspeed_zero3.yaml)"
    ),
    "MEGATRON_LM": "Megatron-LM is not supported (it is for transformer language models)",
}
# how `accelerate launch` (flags or config file) tells the script which mode to build
MODE_ENV = {
    "DEEPSPEED": "ACCELERATE_USE_DEEPSPEED",
    "FSDP": "ACCELERATE_USE_FSDP",
    "MEGATRON_LM": "ACCELERATE_USE_MEGATRON_LM",
}


def check_launch_mode(distributed_type: object = None) -> None:
    """Fail early, on every process and before any model loads, on accelerate modes the
    trainer does not support. Called with no argument before the ``Accelerator`` is built (the
    launcher's environment: on the CPU accelerate would otherwise fail inside its FSDP plugin,
    or quietly run data parallel) and again with its ``distributed_type``.

    Raises:
        ConfigError: FSDP or Megatron-LM, naming the mode and why.
    """
    if distributed_type is None:
        modes = [m for m, env in MODE_ENV.items() if os.environ.get(env, "").lower() == "true"]
    else:
        modes = [getattr(distributed_type, "name", str(distributed_type))]
    for mode in modes:
        if mode in UNSUPPORTED_MODES:
            raise ConfigError(
                f"accelerate {mode} ({MODE_ENV[mode]}=true): {UNSUPPORTED_MODES[mode]}. Or "
                "launch data parallel (`accelerate launch --multi_gpu ...` or `accelerate "
                "launch --config_file trainer/configs/accelerate_multi_gpu.yaml ...`) and save "
                "memory with train.mixed_precision bf16 and train.grad_checkpointing true."
            )


def warn_on_missing_processes(accelerator) -> None:
    """accelerate's ``--cpu --num_processes N`` quietly starts one process: say so."""
    asked = launcher_num_processes()
    if asked is not None and asked > accelerator.num_processes and accelerator.is_main_process:
        logger.warning(
            "accelerate launch was asked for %d processes but started %d: with --cpu it starts "
            "extra processes only through mpirun (--mpirun_hostfile). For several processes on "
            "one machine use: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            "--num_processes %d trainer/train.py ...", asked, accelerator.num_processes, asked,
        )  # fmt: skip


def launcher_num_processes(cmdline: list[str] | None = None) -> int | None:
    """``--num_processes`` of the ``accelerate launch`` command that started this process, read
    from the parent's command line (``/proc``, Linux); ``None`` when unknown."""
    if cmdline is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return None
        cmdline = [a for a in raw.decode(errors="replace").split("\0") if a]
    if not any("accelerate" in a for a in cmdline[:3]):  # accelerate / -m accelerate...launch
        return None
    for i, arg in enumerate(cmdline):
        for flag in ("--num_processes", "--num-processes"):
            value = None
            if arg == flag and i + 1 < len(cmdline):
                value = cmdline[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            if value is not None:
                return int(value) if value.isdigit() else None
    return None


# --------------------------------------------------------------------------- backends


class Backend:
    """The interface the training loop uses (see the module docstring)."""

    #: kwargs for ``accelerator.save_state`` / ``load_state``
    save_kwargs: dict = {}
    load_kwargs: dict = {}
    #: whether ``load_state`` restores the networks' weights itself (our load hook then does not)
    loads_weights = False

    def accelerator_kwargs(self, kwargs: dict) -> dict:
        """The ``Accelerator(...)`` keyword arguments, from the trainer's ``kwargs``."""
        return kwargs

    def check_resume(self, checkpoint: Path, meta: dict, world_size: int) -> None:
        """Raises :class:`~trainer.checkpoints.CheckpointError` when this kind of run cannot
        resume ``checkpoint`` (see :func:`check_resume`)."""
        check_resume(checkpoint, meta, world_size, deepspeed=isinstance(self, DeepSpeedBackend))

    def prepare(self, accelerator, generator: nn.Module, disc: nn.Module, opt_g, opt_d):
        """Returns the wrapped ``(generator, discriminator)`` to call in the loop."""
        raise NotImplementedError

    def accumulate(self) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def autocast(self) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def backward(self, which: str, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, which: str) -> None:
        """Optimizer step of network ``which`` (``"g"``/``"d"``) when the accumulation window
        is complete (clipped to ``optim.grad_clip``), then clear its gradients."""
        raise NotImplementedError

    #: whether a forward is a collective (ZeRO-3 gathers parameters in it): validation must
    #: then run on every process, not only the main one
    collective_forward = False

    def gathered(
        self, params: list[nn.Parameter], modify: bool = False
    ) -> contextlib.AbstractContextManager:
        """Make ``params`` whole for reading (and, with ``modify``, writing) inside the block;
        a no-op unless they are sharded (ZeRO-3), where EVERY process must enter it."""
        return contextlib.nullcontext()


class DataParallelBackend(Backend):
    """One process or DDP: everything through accelerate."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def prepare(self, accelerator, generator, disc, opt_g, opt_d):
        self.accelerator = accelerator
        gen_w, disc_w, opt_g, opt_d = accelerator.prepare(generator, disc, opt_g, opt_d)
        self.wrapped = {"g": gen_w, "d": disc_w}
        self.optimizers = {"g": opt_g, "d": opt_d}
        self.params = {
            "g": [p for _, p in generator.trainable_named_parameters()],
            "d": [p for p in disc.parameters() if p.requires_grad],
        }
        return gen_w, disc_w

    def accumulate(self):
        return self.accelerator.accumulate(self.wrapped["g"], self.wrapped["d"])

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, which, loss):
        self.accelerator.backward(loss)

    def step(self, which):
        clip = self.cfg.optim.grad_clip
        if self.accelerator.sync_gradients and clip > 0:
            self.accelerator.clip_grad_norm_(self.params[which], clip)
        self.optimizers[which].step()  # accelerate skips it inside an accumulation window
        self.optimizers[which].zero_grad(set_to_none=True)


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO 0-3: one engine per network (see the module docstring)."""

    # frozen base weights (GBs) are not written into DeepSpeed's model-state files; they come
    # from model.base at resume, as with data parallel
    save_kwargs = {"exclude_frozen_parameters": True}
    load_kwargs = {"load_module_strict": False}
    loads_weights = True

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.plugins = deepspeed_plugins(cfg)
        self.dtype = {"no": torch.float32, "bf16": torch.bfloat16}[cfg.train.mixed_precision]
        stage = self.plugins["generator"].deepspeed_config["zero_optimization"].get("stage", 0)
        self.collective_forward = int(stage) == 3

    def accelerator_kwargs(self, kwargs: dict) -> dict:
        # DeepSpeed's own bf16 mode would cast the trainable LoRA to bf16 (fp32 master copy in
        # the optimizer); the trainer keeps trainable tensors in float32 and autocasts (below),
        # exactly as with data parallel, so DeepSpeed runs in its fp32 mode.
        kwargs = {**kwargs, "deepspeed_plugins": self.plugins, "mixed_precision": "no"}
        if not _has_accelerator():
            # CPU processes (tests): accelerate finds no default process-group backend for the
            # CPU, lets DeepSpeed initialise one, and then counts every process as rank 0 of 1
            # (each one "main", all reading the same data shard). Naming gloo makes it read the
            # rank and world size from the process group.
            from accelerate.utils import InitProcessGroupKwargs

            handlers = kwargs.get("kwargs_handlers", [])
            kwargs["kwargs_handlers"] = [*handlers, InitProcessGroupKwargs(backend="gloo")]
        return kwargs

    def prepare(self, accelerator, generator, disc, opt_g, opt_d):
        self.accelerator = accelerator
        self.device = accelerator.device
        state = accelerator.state
        engines = {}
        for short, module, opt in (("g", generator, opt_g), ("d", disc, opt_d)):
            state.select_deepspeed_plugin(_SHORT[short])
            with _quiet("accelerate"):  # "a wrapped engine is tied..." (we never use it)
                engines[short], _ = accelerator.prepare(module, opt)
        state.select_deepspeed_plugin(_SHORT["g"])
        self.engines = engines
        logger.info(
            "DeepSpeed ZeRO stage %d, one engine per network, %d processes",
            engines["g"].zero_optimization_stage(), accelerator.num_processes,
        )  # fmt: skip
        return engines["g"], engines["d"]

    def accumulate(self):
        return contextlib.nullcontext()  # each engine counts its micro-steps

    def autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )

    def backward(self, which, loss):
        self.engines[which].backward(loss)  # scales by 1/gradient_accumulation_steps

    def step(self, which):
        self.engines[which].step()  # steps (and clips) only at the accumulation boundary

    def gathered(self, params, modify=False):
        if not self.collective_forward:
            return contextlib.nullcontext()
        import deepspeed

        # modify: rank 0's values are scattered back to every shard on exit
        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0 if modify else None)


def _has_accelerator() -> bool:
    from accelerate.utils import get_torch_accelerator_backend

    return get_torch_accelerator_backend()[0] not in (None, "cpu")


@contextlib.contextmanager
def _quiet(name: str):
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def deepspeed_plugins(cfg: Config) -> dict:
    """One accelerate ``DeepSpeedPlugin`` per network, both from the launcher's DeepSpeed config,
    with the values the trainer owns filled in (``"auto"`` entries) or checked.

    Raises:
        ConfigError: DeepSpeed is not installed, DeepSpeed's own optimizer/scheduler or
            bf16/fp16 sections, train.mixed_precision fp16, or a value that contradicts the
            trainer config (micro-batch, gradient accumulation, clipping).
    """
    t, o = cfg.train, cfg.optim
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(
            "accelerate was launched with DeepSpeed but the deepspeed package is not "
            "installed: python install.py --extras deepspeed (or pip install deepspeed)"
        ) from None
    import inspect

    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    if "deepspeed_plugins" not in inspect.signature(Accelerator).parameters:
        raise ConfigError(
            "DeepSpeed needs an accelerate with several DeepSpeed plugins per Accelerator "
            "(`deepspeed_plugins=`, accelerate 1.x; tested with 1.16): pip install -U accelerate"
        )

    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        raise ConfigError(
            "accelerate was launched with DeepSpeed and ACCELERATE_USE_CPU (or --cpu), which "
            "makes accelerate drop DeepSpeed: leave ACCELERATE_USE_CPU out (on a machine "
            "without GPUs DeepSpeed uses its CPU back-end by itself)"
        )
    if t.mixed_precision == "fp16":
        raise ConfigError(
            "train.mixed_precision fp16 is not supported with DeepSpeed (the trainer autocasts "
            "with float32 trainable weights and DeepSpeed's fp32 mode has no loss scaler): use "
            "bf16 or no"
        )
    plugins = {}
    for name in NETWORKS:
        plugin = DeepSpeedPlugin()  # reads the launcher's environment (accelerate config)
        ds = plugin.deepspeed_config
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise ConfigError(
                    f"remove the '{key}' section from {ACCELERATE_CONFIG_HINT}: the trainer "
                    "builds AdamW and its learning-rate schedule from the optim.* fields"
                )
        for key in ("bf16", "fp16"):
            enabled = str(ds.get(key, {}).get("enabled", "auto")).lower()
            if enabled not in ("auto", "false"):
                raise ConfigError(
                    f"'{key}.enabled: {enabled}' in {ACCELERATE_CONFIG_HINT}: set mixed "
                    "precision with train.mixed_precision instead (the trainer keeps its "
                    "trainable weights in float32 and autocasts; DeepSpeed's own mode would "
                    "train the LoRA in half precision)"
                )
        values = {
            "train_micro_batch_size_per_gpu": t.batch_size,
            "gradient_accumulation_steps": t.grad_accum,
            "gradient_clipping": float(o.grad_clip),
        }
        for key, value in values.items():
            if ds.get(key) is None:  # absent from a JSON config: DeepSpeed's default would win
                ds[key] = value
        mismatches: list[str] = []
        for key in values:  # fills "auto", records contradictions
            plugin.fill_match(key, mismatches, must_match=True, **values)
        if mismatches:
            raise ConfigError(
                f"{ACCELERATE_CONFIG_HINT} contradicts the trainer config "
                f"({'; '.join(m.lstrip('- ') for m in mismatches)}). Leave these entries 'auto' "
                "(or out): the trainer fills them from train.batch_size, train.grad_accum and "
                "optim.grad_clip"
            )
        plugins[name] = plugin
    return plugins


def check_resume(checkpoint: Path, meta: dict, world_size: int, deepspeed: bool) -> None:
    """A checkpoint is resumed by the kind of run that wrote it (DeepSpeed engines keep their
    optimizer states in ``pytorch_model*/``, data parallel in ``optimizer*.bin``), and a
    DeepSpeed one by as many processes (one AdamW shard per process).

    Raises:
        CheckpointError: naming the folder, what wrote it and how to resume it.
    """
    from trainer.checkpoints import CheckpointError

    by_deepspeed = (checkpoint / "pytorch_model").is_dir()
    if deepspeed and not by_deepspeed:
        raise CheckpointError(
            f"{checkpoint}: written by a data-parallel run (no DeepSpeed engine states in "
            "pytorch_model/); resume it without DeepSpeed, or start a new run with "
            "model.init_from pointing at its d3sr.safetensors"
        )
    if not deepspeed and by_deepspeed:
        raise CheckpointError(
            f"{checkpoint}: written by a DeepSpeed run (optimizer states in pytorch_model*/); "
            "resume it with the same DeepSpeed accelerate config, or start a new run with "
            "model.init_from pointing at its d3sr.safetensors"
        )
    saved = meta.get("world_size")
    if deepspeed and saved is not None and int(saved) != world_size:
        raise CheckpointError(
            f"{checkpoint}: written by {saved} DeepSpeed processes, resumed by {world_size}; "
            "ZeRO keeps one optimizer shard per process, so resume with --num_processes "
            f"{saved} (or start a new run with model.init_from pointing at its d3sr.safetensors)"
        )


def make_backend(cfg: Config) -> Backend:
    """The backend for how this process was launched (checked before any model loads)."""
    return DeepSpeedBackend(cfg) if uses_deepspeed() else DataParallelBackend(cfg)
