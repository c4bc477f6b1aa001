"""Engine options (``UpscaleOptions``) from the command line; errors name the CLI flag."""

from __future__ import annotations

import dataclasses
import math

from .common import CliError

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
    from ..inference.options import InvalidImageError, UpscaleOptions, validate_options

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
