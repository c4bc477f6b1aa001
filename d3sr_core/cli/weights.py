"""Finding (or downloading) the weights and base, and the ``info`` and ``convert`` commands."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .common import EXIT_FAILED, EXIT_OK, CliError, log_error, log_status


@dataclass
class Models:
    weights: Path
    base: str
    vae: str | None


def search_env(args) -> dict[str, str]:
    env = dict(os.environ)
    if getattr(args, "models_dir", None) is not None:
        env["D3SR_MODELS_DIR"] = str(args.models_dir)
    return env


def _looks_like_hub_id(text: str) -> bool:
    from ..loading.base import _looks_like_hub_id

    return not Path(text).expanduser().exists() and _looks_like_hub_id(text)


def resolve_models(args, command: str) -> Models:
    """``--weights`` / ``--base`` / ``--vae``, else what :mod:`.loading.locate` finds, else
    (with ``--download``) downloads; exits with the "put these files there" message otherwise."""
    from ..loading.files import WeightsFileError
    from ..loading.locate import default_models_dir, locate_models, missing_message

    env = search_env(args)
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
        from ..loading.fetch import download_file

        name = args.weights_url.rstrip("/").rsplit("/", 1)[-1] or "osediff.pkl"
        log_status(args, f"downloading weights {args.weights_url} -> {dest / name}")
        try:
            weights = download_file(args.weights_url, dest / name, progress=not args.quiet)
        except OSError as err:
            raise CliError(str(err), EXIT_FAILED) from None
    return Models(weights, base, vae)


def _download_base(args, dest: Path, repo_id: str | None) -> Path:
    from ..loading.base import DEFAULT_HUB_ID
    from ..loading.fetch import download_base

    repo_id = repo_id or DEFAULT_HUB_ID
    log_status(args, f"downloading {repo_id} (UNet, VAE, text encoder; about 4.5 GB) into {dest}")
    try:
        return download_base(dest, repo_id)
    except Exception as err:  # hub errors have many types; all mean "not fetched"
        raise CliError(f"could not download {repo_id}: {err}", EXIT_FAILED) from None


def cmd_info(args) -> int:
    from ..loading.detect import describe_weights
    from ..loading.files import WeightsFileError

    infos, failed = [], 0
    for path in args.files:
        try:
            infos.append(describe_weights(path))
        except WeightsFileError as err:
            failed += 1
            if args.json:
                infos.append({"path": str(path), "error": err.problem})
            else:
                log_error(str(err))
    if args.json:
        print(json.dumps([i if isinstance(i, dict) else i.to_dict() for i in infos], indent=2))
    elif infos:
        print("\n\n".join(i.format() for i in infos))
    return EXIT_FAILED if failed else EXIT_OK


def cmd_convert(args) -> int:
    from ..loading.fetch import convert_osediff, read_prompt_embeds
    from ..loading.files import WeightsFileError
    from ..loading.locate import converted_path, locate_models, missing_message

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
            found = locate_models(search_env(args))
            if found.base is None:
                found.weights = source  # only the base is missing
                raise CliError(
                    "converting needs the SD2.1 base's text encoder (or --prompt-embeds FILE).\n"
                    + missing_message(found, download_hint=False)
                )
            base = str(found.base)
        if base is not None:
            log_status(args, f"computing the empty-prompt embedding from {base}")
        path = convert_osediff(source, out, base=base, prompt_embeds=embeds)
    except WeightsFileError as err:
        raise CliError(str(err), EXIT_FAILED) from None
    log_status(args, f"wrote {path}")
    return EXIT_OK
