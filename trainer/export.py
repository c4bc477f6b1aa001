#!/usr/bin/env python3
"""Export a training checkpoint as a D3SR ``.safetensors`` that ``d3sr upscale``, ComfyUI and
A1111 load as they are.

    python trainer/export.py runs/d3sr -o my-d3sr.safetensors              # newest checkpoint
    python trainer/export.py runs/d3sr/checkpoints/step-00005000 -o x.safetensors --ema
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.checkpoints import CheckpointError, export_file, resolve_resume


def export(checkpoint: str | Path, output: str | Path, ema: bool = False) -> Path:
    """Copy a checkpoint's generator into ``output`` (re-read and re-written, so the file is
    validated as a D3SR checkpoint on the way). ``checkpoint``: a ``step-N`` folder or a run
    folder (its newest complete checkpoint)."""
    from d3sr_core.loading.checkpoint import load_checkpoint, save_checkpoint

    folder = resolve_resume(str(checkpoint), Path(checkpoint))
    if folder is None:
        raise CheckpointError(f"{checkpoint}: no complete checkpoint found")
    return save_checkpoint(load_checkpoint(export_file(folder, ema)), output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a checkpoint folder (step-N) or a run folder")
    parser.add_argument("-o", "--output", required=True, help="the D3SR .safetensors to write")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.output, args.ema)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
