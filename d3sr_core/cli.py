"""The ``d3sr`` command line: ``upscale``, ``info``, ``convert`` and ``eval``.

Run ``d3sr --help`` or ``d3sr COMMAND --help``. Also available as ``python -m d3sr_core``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .batch import Job, check_output_target, collect_inputs, plan_outputs

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
OUTPUT_FORMATS = ("png", "jpg", "webp", "same")


class CliError(Exception):
    """A problem with the command line or the set-up: printed, then exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # sent between processes (distributed runs) with its exit code
        return (type(self), (str(self), self.code))


def _log(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)


def _error(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- argument parsing


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


# The engine's defaults (UpscaleOptions), spelled out so `--help` needs no torch import;
# tests/test_cli.py checks they agree with UpscaleOptions().
ENGINE_DEFAULTS = {
    "tile_size": "auto",
    "tile_overlap": 256,
    "vae_tile_size": "auto",
    "vae_attention_window": 1024,
    "unet_attention_window": 512,
    "color_fix": "wavelet",
    "max_output_pixels": 256 * 1024 * 1024,
}


def _tile(text: str) -> int | str:
    if text.lower() == "auto":
        return "auto"
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto', 0 (no tiling) or a size, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d3sr",
        description="D3SR: one-step diffusion image super-resolution (SD2.1-base + LoRA).",
        epilog="Weights are looked up automatically (see `d3sr upscale --help`); "
        "`d3sr info FILE` says what a weights file is.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = sub.add_parser(
        "upscale",
        help="upscale images",
        description="Upscale image files, folders or glob patterns.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_UPSCALE_EPILOG,
    )
    up.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns"
    )
    up.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        help="output folder (created), or an output file name when there is one input file",
    )
    io = up.add_argument_group("files")
    io.add_argument(
        "-r", "--recursive", action="store_true", help="descend into sub-folders (and ** in globs)"
    )
    io.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default=None,
        help="output format (default png, or the -o file's format; 'same' keeps each input's)",
    )
    io.add_argument(
        "--suffix", default="", help="appended to each output name, e.g. _x4 (default none)"
    )
    io.add_argument(
        "--quality", type=int, default=95, help="JPEG/WebP quality, 0..100 (default 95)"
    )
    io.add_argument("--skip-existing", action="store_true", help="skip inputs whose output exists")
    opts = up.add_argument_group("upscaling")
    opts.add_argument(
        "-s", "--scale", type=float, default=4.0, help="output/input size, > 1 (default 4)"
    )
    opts.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="LoRA strength >= 0: 0 = base model, 1 = as trained (default), >1 extrapolates",
    )
    opts.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed, 0..2^64-1 (for checkpoints that sample the latent; default none)",
    )
    opts.add_argument(
        "--color-fix",
        choices=("none", "adain", "wavelet"),
        default=None,
        help=f"match the output's colours to the input (default {ENGINE_DEFAULTS['color_fix']})",
    )
    opts.add_argument(
        "--max-output-mp",
        type=_positive_float,
        default=None,
        help="refuse images whose output would exceed this many megapixels "
        f"(default {ENGINE_DEFAULTS['max_output_pixels'] / 1e6:.0f})",
    )
    perf = up.add_argument_group("device and memory")
    perf.add_argument(
        "--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="default auto"
    )
    perf.add_argument(
        "--precision",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="compute precision (default auto: bf16 on CPUs that support it, else fp32; "
        "fp16/bf16 on GPUs)",
    )
    perf.add_argument(
        "--tile",
        type=_tile,
        default=None,
        metavar="N|auto",
        help="UNet tile size in output pixels, a multiple of 8 >= 64 "
        f"(0 = no tiling; default {ENGINE_DEFAULTS['tile_size']})",
    )
    perf.add_argument(
        "--tile-overlap",
        type=int,
        default=None,
        metavar="N",
        help=f"overlap between UNet tiles, output pixels >= 0 (default {ENGINE_DEFAULTS['tile_overlap']})",
    )
    perf.add_argument(
        "--vae-tile",
        type=_tile,
        default=None,
        metavar="N|auto",
        help="VAE tile size in pixels, >= 32 "
        f"(0 = no tiling; default {ENGINE_DEFAULTS['vae_tile_size']})",
    )
    perf.add_argument(
        "--vae-attention-window",
        type=int,
        default=None,
        metavar="N",
        help="VAE attention is global up to N pixels per side, windowed beyond "
        f"(linear cost; default {ENGINE_DEFAULTS['vae_attention_window']}; 0 = always global)",
    )
    perf.add_argument(
        "--unet-attention-window",
        type=int,
        default=None,
        metavar="N",
        help="UNet self-attention is global over UNet tiles up to N pixels per side and "
        "windowed beyond (each position sees the N px around it: linear cost; default "
        f"{ENGINE_DEFAULTS['unet_attention_window']} = the training crop; 0 = always global)",
    )
    perf.add_argument(
        "--memory-budget",
        type=_positive_float,
        default=None,
        metavar="GB",
        help="memory the automatic tile sizes may use (default: from the device)",
    )
    _weights_arguments(up, with_download=True)
    up.add_argument(
        "--prompt-embeds",
        type=Path,
        default=None,
        metavar="FILE",
        help="a .safetensors holding 'prompt_embeds' [1, N, C] (e.g. another D3SR checkpoint, or a "
        "saved text-encoder output) used instead of the weights' own condition; OSEDiff weights "
        "then need no text encoder in the base",
    )
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")
    up.set_defaults(func=cmd_upscale)

    info = sub.add_parser(
        "info",
        help="say what a weights file or folder is",
        description="Describe weights: D3SR checkpoint, OSEDiff pickle, SD single file (family), "
        "VAE or diffusers folder; anything else is listed by its keys.",
    )
    info.add_argument("files", nargs="+", metavar="FILE", type=Path)
    info.add_argument(
        "--json", action="store_true", help="print JSON (one object per file, in a list)"
    )
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser(
        "convert",
        help="convert OSEDiff's osediff.pkl into a D3SR .safetensors",
        description="Convert OSEDiff weights into a D3SR checkpoint. The fixed prompt embedding is "
        "computed from the SD2.1 base's text encoder (--base, or found like `upscale` finds it) "
        "or read from --prompt-embeds.",
    )
    conv.add_argument("source", type=Path, metavar="OSEDIFF_PKL")
    conv.add_argument(
        "-o", "--output", type=Path, default=None, help="default: beside the input, .safetensors"
    )
    conv.add_argument(
        "--base",
        default=None,
        help="SD2.1-base diffusers folder or single file (for its text encoder)",
    )
    conv.add_argument(
        "--prompt-embeds",
        type=Path,
        default=None,
        metavar="FILE",
        help="a .safetensors holding 'prompt_embeds' [1, 77, C] (e.g. another D3SR checkpoint) instead of --base",
    )
    conv.add_argument("-q", "--quiet", action="store_true")
    conv.set_defaults(func=cmd_convert)

    from .evaluate import add_eval_parser

    add_eval_parser(sub)
    return parser


_UPSCALE_EPILOG = """\
weights (when --weights / --base are not given, searched in this order):
  $D3SR_WEIGHTS, $D3SR_BASE, $D3SR_VAE
  $D3SR_MODELS_DIR, ~/.cache/d3sr, ./models           (and their d3sr/, checkpoints/ ... sub-folders)
  ComfyUI:  models/d3sr, models/upscale_models, models/checkpoints, models/vae
            under $COMFYUI_PATH, ~/ComfyUI, ...
  A1111/Forge: models/D3SR, models/Stable-diffusion, models/VAE
            under $A1111_PATH, $WEBUI_PATH, ~/stable-diffusion-webui, ...
  weights = any D3SR .safetensors, else osediff.pkl (converted once, cached beside it);
  base = v2-1_512-ema-pruned.safetensors (or .ckpt, nonema, sd21-base*) or a
         stable-diffusion-2-1-base/ diffusers folder.
  --download fetches what is missing (SD2.1-base from the Hugging Face hub, osediff.pkl
  from GitHub) into $D3SR_MODELS_DIR or ~/.cache/d3sr.

examples:
  d3sr upscale photo.jpg -o out/
  d3sr upscale photos/ -o out/ --format same --skip-existing
  d3sr upscale "scans/**/*.tif" -r -o out/ --tile 512 --precision bf16
  d3sr upscale small.png -o big.png --scale 2 --color-fix wavelet
"""


def _weights_arguments(parser: argparse.ArgumentParser, with_download: bool) -> None:
    group = parser.add_argument_group("weights")
    group.add_argument("--weights", default=None, help="D3SR .safetensors or OSEDiff osediff.pkl")
    group.add_argument(
        "--base",
        default=None,
        help="SD2.1-base: diffusers folder, single .safetensors/.ckpt, or a hub id (with --download)",
    )
    group.add_argument(
        "--vae", default=None, help="replacement VAE (single file or diffusers folder)"
    )
    group.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="D3SR's models folder (searched first, and where downloads go); default $D3SR_MODELS_DIR or ~/.cache/d3sr",
    )
    if with_download:
        from .loading.locate import OSEDIFF_URL

        group.add_argument(
            "--download",
            action="store_true",
            help="download the missing base (Hugging Face hub) and weights (--weights-url)",
        )
        group.add_argument(
            "--weights-url",
            default=OSEDIFF_URL,
            help="where --download gets weights (default: OSEDiff's osediff.pkl)",
        )
        group.add_argument(
            "--base-repo",
            default=None,
            help="hub id --download gets the base from (default stabilityai/stable-diffusion-2-1-base)",
        )


def _version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------- inputs and outputs

# The planning rules (collect_inputs, plan_outputs, check_output_target) live in batch.py.


# --------------------------------------------------------------------------- weights


@dataclass
class Models:
    weights: Path
    base: str
    vae: str | None


def _env(args) -> dict[str, str]:
    env = dict(os.environ)
    if getattr(args, "models_dir", None) is not None:
        env["D3SR_MODELS_DIR"] = str(args.models_dir)
    return env


def _looks_like_hub_id(text: str) -> bool:
    from .loading.base import _looks_like_hub_id

    return not Path(text).expanduser().exists() and _looks_like_hub_id(text)


def resolve_models(args, command: str) -> Models:
    """``--weights`` / ``--base`` / ``--vae``, else what :mod:`.loading.locate` finds, else
    (with ``--download``) downloads; exits with the "put these files there" message otherwise."""
    from .loading.files import WeightsFileError
    from .loading.locate import default_models_dir, locate_models, missing_message

    env = _env(args)
    weights = Path(args.weights).expanduser() if args.weights else None
    base = args.base
    vae = args.vae
    download = getattr(args, "download", False)
    if weights is not None and not weights.exists():
        raise CliError(f"--weights {weights}: no such file")
    if base is not None and not Path(base).expanduser().exists() and not _looks_like_hub_id(base):
        raise CliError(f"--base {base}: no such file or folder")
    if weights is None or base is None:
        try:
            found = locate_models(env)
        except WeightsFileError as err:
            raise CliError(str(err)) from None
        weights = weights or found.weights
        base = base or (str(found.base) if found.base else None)
        vae = vae or (str(found.vae) if found.vae else None)
        if (weights is None or base is None) and not download:
            raise CliError(missing_message(found, command=command))
    dest = default_models_dir(env)
    if base is not None and _looks_like_hub_id(base):
        if not download:
            raise CliError(f"--base {base} looks like a hub id: add --download to fetch it")
        base = str(_download_base(args, dest, base))
    if base is None:
        base = str(_download_base(args, dest, args.base_repo))
    if weights is None:
        from .loading.fetch import download_file

        name = args.weights_url.rstrip("/").rsplit("/", 1)[-1] or "osediff.pkl"
        _log(args, f"downloading weights {args.weights_url} -> {dest / name}")
        try:
            weights = download_file(args.weights_url, dest / name, progress=not args.quiet)
        except OSError as err:
            raise CliError(str(err), EXIT_FAILED) from None
    return Models(weights, base, vae)


def _download_base(args, dest: Path, repo_id: str | None) -> Path:
    from .loading.base import DEFAULT_HUB_ID
    from .loading.fetch import download_base

    repo_id = repo_id or DEFAULT_HUB_ID
    _log(args, f"downloading {repo_id} (UNet, VAE, text encoder; about 4.5 GB) into {dest}")
    try:
        return download_base(dest, repo_id)
    except Exception as err:  # hub errors have many types; all mean "not fetched"
        raise CliError(f"could not download {repo_id}: {err}", EXIT_FAILED) from None


# --------------------------------------------------------------------------- engine options

OPTION_FLAGS = {
    "scale": "--scale",
    "seed": "--seed",
    "max_output_pixels": "--max-output-mp",
    "tile_size": "--tile",
    "tile_overlap": "--tile-overlap",
    "vae_tile_size": "--vae-tile",
    "vae_attention_window": "--vae-attention-window",
    "unet_attention_window": "--unet-attention-window",
    "color_fix": "--color-fix",
    "memory_budget_bytes": "--memory-budget",
}


def _check_cli_only_options(args) -> None:
    """Options the engine does not see (file output, LoRA strength), checked up front."""
    if not math.isfinite(args.scale) or not args.scale > 1:
        raise CliError(f"--scale must be a finite number > 1, got {args.scale}")
    if not math.isfinite(args.strength) or args.strength < 0:
        raise CliError(f"--strength must be a finite number >= 0, got {args.strength}")
    if not 0 <= args.quality <= 100:
        raise CliError(f"--quality must be 0..100, got {args.quality}")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise CliError(f"--seed must be 0..2^64-1, got {args.seed}")


def build_options(args):
    """:class:`UpscaleOptions` from the command line, validated by the engine's rules; errors
    name the CLI flag (exit 2). Runs before any model is looked for or loaded."""
    from .inference.pipeline import InvalidImageError, UpscaleOptions, validate_options

    _check_cli_only_options(args)
    values = {"scale": args.scale, "seed": args.seed}
    if args.max_output_mp is not None:
        values["max_output_pixels"] = max(1, int(args.max_output_mp * 1_000_000))
    budget = args.memory_budget
    wanted = {
        "tile_size": args.tile,
        "tile_overlap": args.tile_overlap,
        "vae_tile_size": args.vae_tile,
        "vae_attention_window": args.vae_attention_window,
        "unet_attention_window": args.unet_attention_window,
        "color_fix": args.color_fix,
        "memory_budget_bytes": max(1, int(budget * 2**30)) if budget else None,
    }
    known = {f.name for f in dataclasses.fields(UpscaleOptions)}
    for name, value in wanted.items():
        if value is None:
            continue
        if name not in known:
            raise CliError(
                f"{OPTION_FLAGS[name]} is not supported by this d3sr_core (UpscaleOptions has no {name!r})"
            )
        values[name] = value
    options = UpscaleOptions(**values)
    try:
        validate_options(options)
    except InvalidImageError as err:
        raise CliError(_flag_message(str(err), args)) from None
    return options


def _flag_message(message: str, args) -> str:
    """An engine message about an option field, rewritten to name the CLI flag and value."""
    given = {
        "--tile": args.tile,
        "--tile-overlap": args.tile_overlap,
        "--vae-tile": args.vae_tile,
        "--vae-attention-window": args.vae_attention_window,
        "--unet-attention-window": args.unet_attention_window,
    }
    for field_name, flag in OPTION_FLAGS.items():
        if message.startswith(field_name + " "):
            rule = message[len(field_name) + 1 :].split(", got ")[0]
            rule = rule.replace("'auto', None/0", "'auto', 0").replace(" or None", "")
            value = given.get(flag)
            return f"{flag} {rule}" + (f", got {value}" if value is not None else "")
    return message


# --------------------------------------------------------------------------- commands


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
        _error(message)
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
        _error(failures[-1])
    jobs = [j for j in jobs if j not in clashes]
    pending = [j for j in jobs if not (args.skip_existing and j.target.exists())]
    return pending, failures, len(jobs) - len(pending)


def cmd_upscale(args) -> int:
    from .batch import image_pixels, split_by_pixels
    from .distributed import launched_processes

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
            _log(args, f"skipping {skipped} image(s) whose output exists")
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
        _log(
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
                    _log(args, f"note: {note}")
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
                _error(summary.failures[-1])
            bar.update(1)


def load_pipeline(args, procs=None):
    """Resolve weights, load the generator on the chosen device/precision, wrap it."""
    from .distributed import Processes, process_device
    from .inference.pipeline import D3SRPipeline
    from .inference.precision import prepare_generator, resolve_device, resolve_dtype
    from .loading.detect import base_lacks_vae
    from .loading.fetch import load_converting
    from .loading.files import WeightsFileError
    from .loading.locate import default_models_dir, locate_models

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
        vae = str(locate_models(_env(args), need_vae=True).vae or "") or None
        if vae is None:
            raise CliError(
                f"{models.base} has no VAE inside: pass --vae (e.g. vae-ft-mse-840000-ema-pruned.safetensors)"
            )
    start = time.perf_counter()
    _log(
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
            cache_dir=default_models_dir(_env(args)),
            prompt_embeds=prompt_embeds,
        )
    except WeightsFileError as err:
        raise CliError(str(err)) from None
    if converted is not None:
        _log(args, f"converted {models.weights} -> {converted} (reused while both are unchanged)")
    generator = prepare_generator(generator, device, dtype)
    plan = generator.precision_plan.describe()
    _log(args, f"loaded in {time.perf_counter() - start:.1f} s ({plan})")
    return D3SRPipeline(generator)


def upscale_file(pipeline, job: Job, options, args) -> list[str]:
    """Read, upscale and atomically write one image; returns notes (bit depth / alpha losses)."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from .image_files import ImageData, read_image, write_image

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


def cmd_info(args) -> int:
    from .loading.detect import describe_weights
    from .loading.files import WeightsFileError

    infos, failed = [], 0
    for path in args.files:
        try:
            infos.append(describe_weights(path))
        except WeightsFileError as err:
            failed += 1
            if args.json:
                infos.append({"path": str(path), "error": err.problem})
            else:
                _error(str(err))
    if args.json:
        print(json.dumps([i if isinstance(i, dict) else i.to_dict() for i in infos], indent=2))
    elif infos:
        print("\n\n".join(i.format() for i in infos))
    return EXIT_FAILED if failed else EXIT_OK


def cmd_convert(args) -> int:
    from .loading.fetch import convert_osediff, read_prompt_embeds
    from .loading.files import WeightsFileError
    from .loading.locate import converted_path, locate_models, missing_message

    source = args.source
    out = args.output or converted_path(source)
    if out.suffix.lower() != ".safetensors":
        raise CliError(f"-o {out}: D3SR checkpoints are .safetensors files")
    if out.resolve() == source.resolve():
        raise CliError("-o must differ from the input")
    try:
        embeds = read_prompt_embeds(args.prompt_embeds) if args.prompt_embeds else None
        base = args.base
        if embeds is None and base is None:
            found = locate_models(_env(args))
            if found.base is None:
                found.weights = source  # only the base is missing
                raise CliError(
                    "converting needs the SD2.1 base's text encoder (or --prompt-embeds FILE).\n"
                    + missing_message(found, download_hint=False)
                )
            base = str(found.base)
        if base is not None:
            _log(args, f"computing the empty-prompt embedding from {base}")
        path = convert_osediff(source, out, base=base, prompt_embeds=embeds)
    except WeightsFileError as err:
        raise CliError(str(err), EXIT_FAILED) from None
    _log(args, f"wrote {path}")
    return EXIT_OK


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 some files failed, 2 usage/set-up, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as err:
        _error(str(err))
        return err.code
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
