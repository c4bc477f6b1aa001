#!/usr/bin/env python3
"""Fine-tune D3SR: generator UNet LoRA against an SDXL diffusion discriminator (accelerate).

    python trainer/train.py --config trainer/configs/gpu1.yaml --data.hr_dir /data/hr
    accelerate launch --num_processes 8 trainer/train.py --config trainer/configs/multi_gpu.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 trainer/train.py ...
    python trainer/train.py --config ... --resume latest          # continue a stopped run
    python trainer/export.py runs/d3sr -o my-d3sr.safetensors     # newest checkpoint -> D3SR file

Every config field can be set in the YAML file or overridden as ``--section.field VALUE``
(VALUE is parsed as YAML: 3, 1e-4, true, [0.9, 0.99]). The generator objective is
``mse_weight * MSE + ea_dists_weight * EA-DISTS + adv_weight * GAN`` (paper: MSE +
lambda2 EA-DISTS + lambda1 adv); the discriminator (SDXL-base down + mid blocks, LoRA + patch
head) judges noised latents of HR images (real) and of the generator's output (fake).
Several processes are data parallel (DDP) or DeepSpeed ZeRO-2/3 (accelerate's DeepSpeed config,
trainer/configs/accelerate_deepspeed_zero{2,3}.yaml); FSDP launches stop with an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `trainer` and `d3sr_core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from trainer.checkpoints import (
    EXPORT,
    EXPORT_EMA,
    CheckpointError,
    checkpoint_root,
    finalize,
    prune,
    read_meta,
    remove_leftovers,
    resolve_resume,
    temp_dir,
)
from trainer.config import (
    Config,
    ConfigError,
    add_field_arguments,
    build_config,
    overrides_from_args,
)
from trainer.distributed_backend import check_launch_mode, make_backend, warn_on_missing_processes
from trainer.models import seed_for
from trainer.validation import load_validation, validate

logger = logging.getLogger("d3sr.train")
FAULT_ENV = "D3SR_TRAIN_FAULT"  # tests: "during-checkpoint:STEP" / "after-checkpoint:STEP"


def build_parser() -> argparse.ArgumentParser:
    from d3sr_core.data.degradation import STAGES, DegradationConfig

    keys = ", ".join(
        f"{k}={v}" for k, v in DegradationConfig().to_dict().items() if k not in ("scale", "stages")
    )
    epilog = (
        "data.degradation keys (Real-ESRGAN defaults; *2 = second order; ranges [low, high], "
        "resize_prob [up, down, keep]): " + keys + f". stages (drop one to switch it off): "
        f"{list(STAGES)}."
    )
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML config (see trainer/configs/)")
    parser.add_argument(
        "--resume",
        metavar="latest|PATH",
        help="continue from the newest complete checkpoint of train.output_dir ('latest'; "
        "starts fresh when there is none) or from a checkpoint folder",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the merged config as YAML and exit"
    )
    add_field_arguments(parser)
    return parser


# --------------------------------------------------------------------------- state


class TrainState:
    """Step counter, LR schedulers and EMA: saved with every checkpoint (accelerate custom state)."""

    def __init__(self, schedulers: dict, ema=None) -> None:
        self.step = 0
        self.schedulers = schedulers
        self.ema = ema

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        if self.ema is not None:
            if state.get("ema") is None:
                raise CheckpointError("the checkpoint has no EMA but train.ema_decay > 0")
            self.ema.load_state_dict(state["ema"])


def _fault(stage: str, step: int) -> None:
    """Test hook: kill this process with SIGKILL at a given point (see FAULT_ENV)."""
    if os.environ.get(FAULT_ENV) == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- building


def build_data(cfg: Config, rank: int, world: int, start: int):
    from torch.utils.data import DataLoader

    from d3sr_core.data import HRFolderDataset, PairedFolderDataset, StreamSampler

    d = cfg.data
    if d.lr_dir:
        dataset = PairedFolderDataset(
            d.lr_dir, d.hr_dir, d.crop_size, d.scale, small=d.small, flip=d.flip,
            rotate=d.rotate, seed=cfg.train.seed,
        )  # fmt: skip
    else:
        dataset = HRFolderDataset(
            d.hr_dir, d.crop_size, cfg.degradation(), degrade=d.degrade_on == "workers",
            small=d.small, flip=d.flip, rotate=d.rotate, seed=cfg.train.seed,
        )  # fmt: skip
    sampler = StreamSampler(
        len(dataset), cfg.train.batch_size, seed=cfg.train.seed, rank=rank, world_size=world,
        start=start,
    )  # fmt: skip
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        num_workers=d.workers,
        persistent_workers=d.workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
    )
    return dataset, loader


def build_models(cfg: Config, device: torch.device, weight_dtype: torch.dtype):
    """Generator (peft LoRA), discriminator, EA-DISTS, all on ``device``."""
    from d3sr_core.loading.base import load_base
    from d3sr_core.loading.checkpoint import load_checkpoint
    from d3sr_core.losses import DISTS, EADISTS
    from d3sr_core.models.discriminator import DiffusionDiscriminator, DiscriminatorConfig
    from d3sr_core.models.generator import GeneratorConfig
    from trainer.models import build_generator_model

    m = cfg.model
    init = load_checkpoint(m.init_from) if m.init_from else None
    base = load_base(m.base, vae=m.vae, allow_download=m.allow_download)
    if m.prompt_embeds:
        from d3sr_core.loading.fetch import read_prompt_embeds

        prompt = read_prompt_embeds(m.prompt_embeds)
    elif init is not None:
        prompt = init.prompt_embeds.float()
    else:
        from d3sr_core.loading.prompt import empty_prompt_embeds

        prompt = empty_prompt_embeds(m.base)
    gcfg = GeneratorConfig(
        timestep=m.timestep,
        lora_rank=m.lora_rank,
        lora_alpha=m.lora_alpha,
        lora_targets=list(m.lora_targets),
    )
    torch.manual_seed(seed_for(cfg.train.seed, 1) % 2**63)  # peft's LoRA A initialisation
    generator = build_generator_model(base, prompt, gcfg, learn_prompt=m.learn_prompt)
    if init is not None:
        generator.load_checkpoint_lora(init, m.init_from)
    dc = cfg.discriminator
    dcfg = DiscriminatorConfig(
        base=dc.base, lora_rank=dc.lora_rank, lora_alpha=dc.lora_alpha,
        head_hidden=dc.head_hidden, head_groups=dc.head_groups,
        latent_rescale=dc.latent_rescale, t_min=dc.t_min, t_max=dc.t_max,
        gradient_checkpointing=cfg.train.grad_checkpointing,
    )  # fmt: skip
    seed = seed_for(cfg.train.seed, 3)
    if dc.weights:
        disc = DiffusionDiscriminator.from_pretrained(dc.weights, dcfg, seed=seed % 2**31)
    else:
        disc = DiffusionDiscriminator.from_config(dcfg, seed=seed % 2**31)
    loss = cfg.loss
    if loss.random_dists:
        logger.warning("loss.random_dists: EA-DISTS uses a random VGG (smoke test only)")
        torch.manual_seed(seed_for(cfg.train.seed, 4) % 2**63)
        dists = DISTS()
    else:
        dists = DISTS.from_pretrained(
            loss.vgg_weights, loss.dists_weights, allow_download=m.allow_download
        )
    ea = EADISTS(
        dists, value_range=(-1.0, 1.0), edge_mode=loss.edge_mode, edge_weight=loss.edge_weight
    )

    # Frozen weights in the compute dtype; trainable ones (LoRA, head, prompt) stay float32.
    for module in (generator, disc):
        for p in module.parameters():
            if not p.requires_grad and weight_dtype != torch.float32:
                p.data = p.data.to(weight_dtype)
    generator.to(device)
    disc.to(device)
    ea.to(device)
    if cfg.train.grad_checkpointing:
        generator.generator.unet.enable_gradient_checkpointing()
        generator.generator.vae.enable_gradient_checkpointing()
    return generator, disc, ea


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train` returns: the summary written to ``final.json`` and the (unwrapped)
    trained networks."""

    summary: dict
    generator: torch.nn.Module
    discriminator: torch.nn.Module


def train(cfg: Config, resume: str | None = None) -> TrainResult:
    """Run training (see the module docstring); ``resume``: ``latest`` or a checkpoint folder."""
    threads = torch.get_num_threads()
    try:
        return _train(cfg, resume)
    finally:
        torch.set_num_threads(threads)
        # accelerate keeps its state (mixed precision, accumulation) per process; forget it
        # so a later train() call in the same process (tests, notebooks) may use other settings
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()


def _train(cfg: Config, resume: str | None) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
    from tqdm.auto import tqdm

    from d3sr_core.losses import approximate_r1_penalty, discriminator_loss, generator_loss
    from trainer.models import EMA, frozen

    t = cfg.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    out_dir = Path(t.output_dir)
    root = checkpoint_root(out_dir)
    trackers = None
    if t.tensorboard:
        try:
            import tensorboard  # noqa: F401

            trackers = "tensorboard"
        except ImportError:
            logger.info("TensorBoard is not installed: logging to logs/metrics.jsonl only")
    check_launch_mode()
    backend = make_backend(cfg)  # DeepSpeed config errors: here, before any model loads
    accelerator = Accelerator(
        **backend.accelerator_kwargs(
            {
                "gradient_accumulation_steps": t.grad_accum,
                "mixed_precision": t.mixed_precision,
                "log_with": trackers,
                "project_config": ProjectConfiguration(
                    project_dir=str(out_dir), logging_dir=str(out_dir / "logs")
                ),
                "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=False)],
            }
        )
    )
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file save messages
    check_launch_mode(accelerator.distributed_type)
    warn_on_missing_processes(accelerator)

    # Everything that can fail on the user's files fails here, before any model is loaded.
    resume_dir = resolve_resume(resume, out_dir)
    meta = read_meta(resume_dir) if resume_dir else {"step": 0}
    if resume_dir is not None:
        backend.check_resume(resume_dir, meta, world)
    start_step = int(meta["step"])
    micro_per_step = t.grad_accum
    dataset, loader = build_data(
        cfg, rank, world, start=start_step * micro_per_step * t.batch_size * world
    )
    val_set = load_validation(cfg) if main or backend.collective_forward else []
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_leftovers(root)
        if removed:
            logger.info("removed %d incomplete checkpoint folder(s) of a killed run", len(removed))
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        logger.info("%d training images, %d validation images", len(dataset), len(val_set))
    accelerator.wait_for_everyone()

    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        t.mixed_precision
    ]
    generator, disc, ea = build_models(cfg, device, weight_dtype)
    generator.train()
    disc.train()
    o = cfg.optim
    opt_g = torch.optim.AdamW(
        [p for _, p in generator.trainable_named_parameters()], lr=o.lr_g,
        betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps,
    )  # fmt: skip
    opt_d = torch.optim.AdamW(
        [p for p in disc.parameters() if p.requires_grad], lr=o.lr_d,
        betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps,
    )  # fmt: skip
    from diffusers.optimization import get_scheduler

    scheds = {
        name: get_scheduler(
            o.scheduler, opt, num_warmup_steps=o.warmup_steps, num_training_steps=t.max_steps
        )
        for name, opt in (("g", opt_g), ("d", opt_d))
    }
    ema = EMA(generator.trainable_state_dict(), t.ema_decay) if t.ema_decay > 0 else None
    state = TrainState(scheds, ema)
    gen_w, disc_w = backend.prepare(accelerator, generator, disc, opt_g, opt_d)
    gen_params = [p for _, p in generator.trainable_named_parameters()]
    disc_params = [p for p in disc.parameters() if p.requires_grad]
    accelerator.register_for_checkpointing(state)

    def save_hook(models, weights, output_dir):
        # Only trainable tensors are written (not 3+ GB of frozen base weights).
        weights.clear()
        with backend.gathered(gen_params + disc_params):  # every process: ZeRO-3 gathers
            if accelerator.is_main_process:
                write_trainable(Path(output_dir))

    def write_trainable(out: Path) -> None:
        from safetensors.torch import save_file

        from d3sr_core.loading.checkpoint import save_checkpoint

        save_file(
            {k: v.contiguous().cpu() for k, v in generator.trainable_state_dict().items()},
            str(out / "generator_trainable.safetensors"),
        )
        _fault("during-checkpoint", state.step)
        disc.save_trainable(out / "discriminator.safetensors")
        save_checkpoint(generator.to_checkpoint(), out / EXPORT)
        if ema is not None:
            save_checkpoint(generator.to_checkpoint(ema.shadow), out / EXPORT_EMA)

    def load_hook(models, input_dir):
        from d3sr_core.loading.files import read_state_dict

        models.clear()  # our own files, not accelerate's model.safetensors
        if backend.loads_weights:  # DeepSpeed engines restore theirs (with the fp32 master)
            return
        src = Path(input_dir)
        generator.load_trainable_state_dict(
            read_state_dict(src / "generator_trainable.safetensors"), str(src)
        )
        disc.load_trainable(src / "discriminator.safetensors")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir), **backend.load_kwargs)
        if state.step != start_step:
            raise CheckpointError(f"{resume_dir}: meta says step {start_step}, state {state.step}")
        if main:
            logger.info("resumed from %s (step %d)", resume_dir, start_step)

    def save(step: int) -> None:
        tmp = temp_dir(root, step)
        if main:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), **backend.save_kwargs)
        accelerator.wait_for_everyone()
        if main:
            finalize(tmp, {"step": step, "world_size": world, "time": time.time()})
            prune(root, t.keep_last)
            _fault("after-checkpoint", step)
        accelerator.wait_for_everyone()

    if trackers:
        flat = {
            f"{s}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
            for s, sec in cfg.to_dict().items()
            for k, v in sec.items()
        }
        accelerator.init_trackers("d3sr", config=flat)
    metrics_log = out_dir / "logs" / "metrics.jsonl"

    def log(values: dict, step: int) -> None:
        if not main:
            return
        accelerator.log(values, step=step)
        metrics_log.parent.mkdir(parents=True, exist_ok=True)
        with open(metrics_log, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def run_validation(at: int) -> dict:
        return validate(cfg, generator, ema, val_set, ea, accelerator, at, log, out_dir, backend)

    degradation = cfg.degradation()
    dc = cfg.discriminator
    lw = cfg.loss
    step = state.step
    data_iter = iter(loader)
    bar = tqdm(
        total=t.max_steps, initial=step, disable=not main, desc="training", dynamic_ncols=True
    )
    last: dict = {}
    sums: dict = {}
    count = 0
    if step == 0 and t.val_every:  # the untrained model's numbers, to compare against
        run_validation(0)
    while step < t.max_steps:
        for micro in range(micro_per_step):
            batch = next(data_iter)
            hr = batch["hr"].to(device, non_blocking=True)
            if "lr" in batch:
                lr = batch["lr"].to(device, non_blocking=True)
            else:
                from d3sr_core.data import degrade, sample_params

                params = sample_params(degradation, hr.shape[0], [int(s) for s in batch["seed"]])
                lr = degrade(hr, params, degradation)
            lr_up = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False)
            x = lr_up.clamp(0, 1) * 2 - 1
            target = hr * 2 - 1
            g = torch.Generator(device=device).manual_seed(
                seed_for(t.seed, step, micro, rank) % 2**63
            )
            b = hr.shape[0]
            with backend.accumulate():
                # ---- generator step. The discriminator is frozen (and called without DDP /
                # its engine) for the forward AND the backward: with gradient checkpointing its
                # blocks are recomputed in backward, which must see the same requires_grad state.
                with frozen(disc), backend.autocast():
                    sr, sr_latent = gen_w(x)
                    mse = F.mse_loss(sr.float(), target)
                    ea_loss = (
                        ea(sr.float(), target).mean() if lw.ea_dists_weight else mse.new_zeros(())
                    )
                    if lw.adv_weight:
                        t_g = disc.sample_timesteps(b, device, g)
                        adv = generator_loss(disc(sr_latent, t_g, generator=g), dc.gan_loss)
                    else:
                        adv = mse.new_zeros(())
                    loss_g = (
                        lw.mse_weight * mse + lw.ea_dists_weight * ea_loss + lw.adv_weight * adv
                    )
                    backend.backward("g", loss_g)
                backend.step("g")
                # ---- discriminator step (skipped without an adversarial term, e.g. an
                # MSE/EA-DISTS warm-up): real = VAE latent of HR, fake = generator latent
                d_values = {}
                if lw.adv_weight:
                    with backend.autocast():
                        real_latent = generator.encode(target)
                        latents = torch.cat([real_latent, sr_latent.detach()])
                        t_d = disc.sample_timesteps(2 * b, device, g)
                        noise = torch.randn(latents.shape, generator=g, device=device)
                        logits = disc_w(latents, t_d, noise)
                        loss_d = discriminator_loss(logits[:b], logits[b:], dc.gan_loss)
                        if dc.r1_gamma > 0:
                            bumped = real_latent + dc.r1_sigma * torch.randn(
                                real_latent.shape, generator=g, device=device
                            )
                            # same timesteps and diffusion noise as the real half
                            perturbed = disc(bumped, t_d[:b], noise[:b])
                            loss_d = loss_d + dc.r1_gamma * approximate_r1_penalty(
                                logits[:b], perturbed
                            )
                    backend.backward("d", loss_d)
                    backend.step("d")
                    d_values = {
                        "loss_d": loss_d.item(),
                        "d_real": logits[:b].float().mean().item(),
                        "d_fake": logits[b:].float().mean().item(),
                    }
            values = {
                "loss_g": loss_g.item(), "mse": mse.item(), "ea_dists": ea_loss.item(),
                "adv_g": adv.item(), **d_values,
            }  # fmt: skip
            for k, v in values.items():
                if not math.isfinite(v):
                    raise FloatingPointError(
                        f"step {step}: {k} is {v} (lower the learning rates, use bf16 instead of "
                        "fp16, or enable optim.grad_clip)"
                    )
                sums[k] = sums.get(k, 0.0) + v
            count += 1
        # one optimizer step done (accumulate() synchronised on the last micro-step)
        for name, s in scheds.items():
            if name == "g" or lw.adv_weight:  # opt_d does not step without an adversarial term
                s.step()
        step += 1
        state.step = step
        if ema is not None:
            with backend.gathered(gen_params):
                ema.update(generator.trainable_state_dict())
        last = {k: v / count for k, v in sums.items()}
        bar.update(1)
        bar.set_postfix(
            {k: f"{last[k]:.4f}" for k in ("loss_g", "mse", "ea_dists", "loss_d") if k in last},
            refresh=False,
        )
        if step % t.log_every == 0 or step == t.max_steps:
            log({**last, "lr_g": scheds["g"].get_last_lr()[0]}, step)
            sums, count = {}, 0
        if t.val_every and step % t.val_every == 0 and step != t.max_steps:
            run_validation(step)
        if step % t.ckpt_every == 0 or step == t.max_steps:
            save(step)
    bar.close()
    final_val = run_validation(step)
    checksum = _checksums(generator, disc, accelerator, backend)
    summary = {
        "step": step,
        "world_size": world,
        "losses": last,
        "validation": final_val,
        "checksums": checksum,
        "weights_agree": len(set(map(tuple, checksum))) == 1,
    }
    if main:
        (out_dir / "final.json").write_text(json.dumps(summary, indent=2))
        if not summary["weights_agree"]:
            logger.error("processes ended with different weights: %s", checksum)
    accelerator.end_training()
    return TrainResult(summary, generator, disc)


def _checksums(generator, disc, accelerator, backend) -> list[list[float]]:
    """Per process, for the generator then the discriminator: ``[sum, sum of squares]`` of the
    trainable weights and the sum of the frozen ones (gathered a group at a time where ZeRO-3
    shards them)."""
    vals = []
    for module in (generator, disc):
        trainable = [p for p in module.parameters() if p.requires_grad]
        with backend.gathered(trainable):
            params = [p.detach().double() for p in trainable]
            vals += [
                sum(float(p.sum()) for p in params), sum(float(p.pow(2).sum()) for p in params)
            ]  # fmt: skip
        frozen_sum = 0.0
        for chunk in _chunks([p for p in module.parameters() if not p.requires_grad]):
            with backend.gathered(chunk):
                frozen_sum += sum(float(p.detach().double().sum()) for p in chunk)
        vals.append(frozen_sum)
    local = torch.tensor([vals], dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(local).cpu()
    return gathered.tolist()


def _chunks(params: list, max_elements: int = 2**26) -> list[list]:
    """Consecutive groups of about ``max_elements`` elements (ZeRO-3 ``ds_numel``): gathering
    a group at a time bounds the memory, one collective per group keeps it fast."""
    groups, size = [[]], 0
    for p in params:
        n = getattr(p, "ds_numel", p.numel())
        if groups[-1] and size + n > max_elements:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += n
    return [g for g in groups if g]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = build_config(args.config, overrides_from_args(args))
    except ConfigError as err:
        parser.error(str(err))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    try:
        train(cfg, resume=args.resume)
    except (ConfigError, CheckpointError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # DataError, WeightsFileError: name the file
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
