"""``d3sr upscale``: plan the batch, share it between processes, upscale and write each file."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ..batch import Job, check_output_target, collect_inputs, plan_outputs
from .common import EXIT_FAILED, EXIT_OK, CliError, log_error, log_status
from .options import build_options
from .weights import resolve_models, search_env


@dataclass
class Summary:
    """One process's outcome; rank 0 adds them up."""

    written: int = 0
    skipped: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: Summary) -> None:
        self.written += other.written
        self.skipped += other.skipped
        self.failures += other.failures


def plan_batch(args) -> tuple[list[Job], list[str], int]:
    """``(jobs to run, failures so far, skipped)`` for the command line; no model involved.

    Raises:
        CliError: no inputs, or an ``-o`` that cannot work (exit 2, nothing written).
    """
    inputs, failures = collect_inputs(args.inputs, args.recursive)
    for message in failures:
        log_error(message)
    if not inputs:
        raise CliError("no input images" + (" (see the errors above)" if failures else ""))
    try:
        single = check_output_target(args.output, inputs, args.format, args.suffix)
    except ValueError as err:
        raise CliError(str(err)) from None
    jobs = plan_outputs(inputs, args.output, args.format, args.suffix, single)
    clashes = [j for j in jobs if j.target.resolve() == j.source.resolve()]
    for job in clashes:
        failures.append(
            f"{job.source}: output would overwrite the input; choose another -o, --format or --suffix"
        )
        log_error(failures[-1])
    jobs = [j for j in jobs if j not in clashes]
    pending = [j for j in jobs if not (args.skip_existing and j.target.exists())]
    return pending, failures, len(jobs) - len(pending)


def cmd_upscale(args) -> int:
    from ..batch import image_pixels, split_by_pixels
    from ..distributed import launched_processes

    options = build_options(args)
    try:
        procs = launched_processes()
    except RuntimeError as err:
        raise CliError(str(err)) from None
    try:
        plan: object = None
        if procs.main:
            try:
                pending, failures, skipped = plan_batch(args)
                weights = [image_pixels(j.source) for j in pending] if procs.world > 1 else []
                plan = (pending, failures, skipped, weights)
            except CliError as err:
                plan = err
        plan = procs.broadcast(plan)  # every rank works from rank 0's one plan
        if isinstance(plan, CliError):
            if procs.main:
                raise plan
            return plan.code  # rank 0 says it, once
        pending, failures, skipped, weights = plan
        if procs.world > 1:
            pending = [pending[i] for i in split_by_pixels(weights, procs.world)[procs.rank]]
        if not procs.main:
            args.quiet = True  # one progress bar and one set of status lines: rank 0's
        elif skipped:
            log_status(args, f"skipping {skipped} image(s) whose output exists")
        mine = Summary(skipped=skipped, failures=failures) if procs.main else Summary()
        crashed: CliError | None = None
        try:
            run_jobs(args, pending, options, mine, procs)
        except CliError as err:  # e.g. weights not found: gathered first so no rank hangs
            crashed = err
        total, other_crashes = Summary(), []
        for rank, (part, crash) in enumerate(procs.gather((mine, crashed))):
            total.add(part)
            if crash is not None and rank != procs.rank:
                other_crashes.append((rank, crash))
        if procs.main:  # rank 0 speaks for all: its own problem, or the others' (once each)
            if crashed is not None:
                raise crashed
            messages = dict.fromkeys(f"{c} (rank {r})" for r, c in other_crashes)
            if messages:
                raise CliError("\n".join(messages), max(c.code for _, c in other_crashes))
        elif crashed is not None:
            return crashed.code
    finally:
        procs.close()
    if procs.main:
        where = f" ({procs.world} processes)" if procs.world > 1 else ""
        log_status(
            args,
            f"{total.written} written, {total.skipped} skipped, {len(total.failures)} failed "
            f"-> {args.output}{where}",
        )
    return EXIT_FAILED if total.failures else EXIT_OK


def run_jobs(args, pending: list[Job], options, summary: Summary, procs) -> None:
    """Upscale ``pending`` (this process's share) into ``summary``. One bad file never stops
    the batch; a file this run wrote is never written again; only files found on disk
    afterwards count as written."""
    from tqdm.auto import tqdm

    if not pending:
        return
    pipeline = load_pipeline(args, procs)
    written_now: set[Path] = set()
    label = f"upscale (rank 0 of {procs.world})" if procs.world > 1 else "upscale"
    with tqdm(total=len(pending), unit="img", desc=label, disable=args.quiet, position=0) as bar:
        for job in pending:
            bar.set_postfix_str(job.source.name, refresh=True)
            try:
                target = job.target.resolve()
                if target in written_now:  # planning makes targets distinct; this guards it
                    raise RuntimeError(
                        f"{job.target} was already written by this run; not overwritten"
                    )
                for note in upscale_file(pipeline, job, options, args):
                    log_status(args, f"note: {note}")
                if not job.target.is_file():
                    raise RuntimeError(f"{job.target} is missing after writing it")
                written_now.add(target)
                summary.written += 1
            except KeyboardInterrupt:
                raise
            except Exception as err:  # one bad file must not stop the batch
                text = str(err)
                summary.failures.append(
                    text if text.startswith(str(job.source)) else f"{job.source}: {text}"
                )
                log_error(summary.failures[-1])
            bar.update(1)


def load_pipeline(args, procs=None):
    """Resolve weights, load the generator on the chosen device/precision, wrap it."""
    from ..distributed import Processes, process_device
    from ..inference.pipeline import D3SRPipeline
    from ..inference.precision import prepare_generator, resolve_device, resolve_dtype
    from ..loading.detect import base_lacks_vae
    from ..loading.fetch import load_converting
    from ..loading.files import WeightsFileError
    from ..loading.locate import default_models_dir, locate_models

    models = resolve_models(
        args, command="d3sr upscale " + " ".join(args.inputs) + f" -o {args.output}"
    )
    try:
        device = resolve_device(process_device(args.device, procs or Processes()))
        dtype = resolve_dtype(args.precision, device)
    except ValueError as err:
        raise CliError(f"--device {args.device} / --precision {args.precision}: {err}") from None
    vae = models.vae
    if vae is None and base_lacks_vae(models.base):
        vae = str(locate_models(search_env(args), need_vae=True).vae or "") or None
        if vae is None:
            raise CliError(
                f"{models.base} has no VAE inside: pass --vae (e.g. vae-ft-mse-840000-ema-pruned.safetensors)"
            )
    start = time.perf_counter()
    log_status(
        args,
        f"weights: {models.weights}\nbase:    {models.base}" + (f"\nvae:     {vae}" if vae else ""),
    )
    try:
        prompt_embeds = getattr(args, "prompt_embeds", None)
        if prompt_embeds is not None and not prompt_embeds.is_file():
            raise CliError(f"--prompt-embeds {prompt_embeds}: no such file")
        # LoRA merged in fp32 on the CPU; prepare_generator then casts and moves once
        # (keeping the VAE in fp32 where fp16 would overflow). An OSEDiff pickle is
        # converted once; the conversion is cached only after it merged cleanly.
        generator, converted = load_converting(
            models.weights,
            models.base,
            vae=vae,
            strength=args.strength,
            cache_dir=default_models_dir(search_env(args)),
            prompt_embeds=prompt_embeds,
        )
    except WeightsFileError as err:
        raise CliError(str(err)) from None
    if converted is not None:
        log_status(
            args, f"converted {models.weights} -> {converted} (reused while both are unchanged)"
        )
    generator = prepare_generator(generator, device, dtype)
    plan = generator.precision_plan.describe()
    log_status(args, f"loaded in {time.perf_counter() - start:.1f} s ({plan})")
    return D3SRPipeline(generator)


def upscale_file(pipeline, job: Job, options, args) -> list[str]:
    """Read, upscale and atomically write one image; returns notes (bit depth / alpha losses)."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from ..image_files import ImageData, read_image, write_image

    image = read_image(job.source)
    notes = list(image.warnings)
    pixels = image.pixels
    if image.channels == 2:  # gray + alpha: run as RGBA, return to gray + alpha
        pixels = np.concatenate([np.repeat(pixels[:, :, :1], 3, axis=2), pixels[:, :, 1:]], axis=2)
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)

    stage_bar = None

    def progress(done: int, total: int) -> None:
        nonlocal stage_bar
        if args.quiet:
            return
        if stage_bar is None or stage_bar.total != total:
            if stage_bar is not None:
                stage_bar.close()
            stage_bar = tqdm(
                total=total, desc=job.source.name, unit="step", leave=False, position=1
            )
        stage_bar.update(done - stage_bar.n)

    try:
        result = pipeline.upscale_tensor(tensor, options, progress=progress)
    finally:
        if stage_bar is not None:
            stage_bar.close()
    out = result[0].permute(1, 2, 0).float().cpu().numpy()
    if image.channels == 2:
        out = np.concatenate([out[:, :, :3].mean(axis=2, keepdims=True), out[:, :, 3:]], axis=2)
    notes += write_image(
        job.target, ImageData(out, image.bits, image.icc_profile), quality=args.quality
    )
    return notes
