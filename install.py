#!/usr/bin/env python3
"""One-command set-up of D3SR into the Python running this script.

    python install.py                      # the package + the `d3sr` command (editable)
    python install.py --extras test        # + what the tests need
    python install.py --extras train,test --no-editable

Used by the README, by ComfyUI-Manager (which runs a node pack's install.py) and by hand.

Inside AUTOMATIC1111 / Forge (which run an extension's install.py with the webui on
PYTHONPATH, so ``import launch`` works) it does something smaller: it installs only the
runtime packages that are missing or too old, through ``launch.is_installed`` /
``launch.run_pip`` (so ``--skip-install`` is honoured), and not the d3sr package itself
(the extension imports ``d3sr_core`` from its own folder). Inference needs no peft.

Rules:

* An installed torch is kept as it is. Only when torch is missing is it installed, alone and
  first, as ``$D3SR_TORCH_SPEC`` (default ``torch==2.13.0``; e.g. set
  ``D3SR_TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"``).
* torch, torchvision, transformers and accelerate are never upgraded or downgraded: a pip
  constraints file pins whatever versions are installed. Hosts (ComfyUI, A1111, Forge) own
  those packages. With an old transformers (< 4.48, e.g. A1111 1.10's 4.30.2), diffusers is
  capped at 0.36 and peft at 0.13.2, the newest releases that still import beside it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_TORCH_SPEC = "torch==2.13.0"
HOST_OWNED = ("torch", "torchvision", "transformers", "accelerate")
EXTRAS = ("test", "train", "metrics", "tensorboard", "iqa", "deepspeed")


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:
            break
    return tuple(parts)


def constraints() -> list[str]:
    """Pins for the host-owned packages that are installed (and caps they imply)."""
    lines = []
    for name in HOST_OWNED:
        version = installed_version(name)
        if version:
            lines.append(f"{name}=={version}")
    transformers = installed_version("transformers")
    if transformers and _release(transformers) < (4, 48):
        # diffusers >= 0.37 imports Dinov2WithRegistersConfig (transformers 4.48+);
        # peft >= 0.14 needs transformers.Cache / newer accelerate.
        lines += ["diffusers<=0.36.0", "peft<=0.13.2"]
    return lines


# What the A1111/Forge extension needs at runtime: (distribution, minimum version).
# torch, torchvision, transformers, accelerate are the webui's and never installed here.
WEBUI_RUNTIME = (
    ("diffusers", "0.31"),
    ("safetensors", "0.4"),
    ("huggingface-hub", None),
    ("numpy", None),
    ("pillow", "9.1"),
    ("tqdm", None),
)


def webui_launch():
    """The webui's ``launch`` module when this runs as an A1111/Forge extension installer
    (the webui root, holding ``launch.py`` and ``modules/launch_utils.py``, is on
    PYTHONPATH), else None."""
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        root = Path(entry) if entry else None
        if (
            root
            and (root / "launch.py").is_file()
            and (root / "modules" / "launch_utils.py").is_file()
        ):
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            import launch

            if hasattr(launch, "is_installed") and hasattr(launch, "run_pip"):
                return launch
    return None


def webui_missing(launch) -> list[str]:
    """pip specs for the runtime packages that are missing, older than needed, or newer than
    the webui's transformers can import."""
    caps = {}
    for line in constraints():
        name, _, version = line.partition("<=")
        if version:
            caps[name] = version
    specs = []
    for name, minimum in WEBUI_RUNTIME:
        version = installed_version(name) if launch.is_installed(name) else None
        fits = version is not None and (minimum is None or _release(version) >= _release(minimum))
        if fits and name in caps:  # e.g. a diffusers too new for A1111 1.10's transformers
            fits = _release(version) <= _release(caps[name])
        if fits:
            continue
        spec = name + (f">={minimum}" if minimum else "")
        if name in caps:
            spec += f",<={caps[name]}"
        specs.append(spec)
    return specs


def install_into_webui(launch) -> int:
    """Install only what the extension lacks, keeping the webui's own packages as they are."""
    specs = webui_missing(launch)
    if not specs:
        print("D3SR: all requirements are installed", flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="d3sr-install-") as tmp:
        constraint_file = Path(tmp) / "constraints.txt"
        constraint_file.write_text("\n".join(constraints()) + "\n")
        quoted = " ".join(f'"{spec}"' for spec in specs)
        launch.run_pip(
            f'install -c "{constraint_file}" {quoted}', f"D3SR requirements: {', '.join(specs)}"
        )
    return 0


def run(cmd: list[str], dry_run: bool) -> None:
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if not dry_run:
        subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--extras", default="", help=f"comma-separated extras to add: {', '.join(EXTRAS)}"
    )
    parser.add_argument(
        "--no-editable",
        dest="editable",
        action="store_false",
        help="a regular install (default: editable, so `git pull` updates it)",
    )
    parser.add_argument(
        "--torch-spec",
        default=None,
        help=f"pip spec used only when torch is missing (default: $D3SR_TORCH_SPEC or {DEFAULT_TORCH_SPEC})",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the pip commands without running them"
    )
    args = parser.parse_args(argv)

    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        parser.error(f"unknown extras {unknown}; choose from {', '.join(EXTRAS)}")
    pip = [sys.executable, "-m", "pip"]
    print(f"D3SR set-up into {sys.executable} (Python {sys.version.split()[0]})", flush=True)

    try:
        torch_version = installed_version("torch")
        if torch_version:
            print(f"torch {torch_version} is installed: keeping it", flush=True)
        else:
            spec = args.torch_spec or os.environ.get("D3SR_TORCH_SPEC") or DEFAULT_TORCH_SPEC
            print(f"torch is missing: installing {spec}", flush=True)
            run([*pip, "install", *shlex.split(spec)], args.dry_run)

        pins = constraints()
        target = str(ROOT) + (f"[{','.join(extras)}]" if extras else "")
        with tempfile.TemporaryDirectory(prefix="d3sr-install-") as tmp:
            constraint_file = Path(tmp) / "constraints.txt"
            constraint_file.write_text("\n".join(pins) + "\n")
            if pins:
                print("keeping host packages: " + ", ".join(pins), flush=True)
            install = [*pip, "install", "-c", str(constraint_file)]
            install += ["-e", target] if args.editable else [target]
            run(install, args.dry_run)
    except subprocess.CalledProcessError as err:
        print(
            f"\nD3SR set-up FAILED: pip exited with {err.returncode} (see its output above).",
            file=sys.stderr,
        )
        return err.returncode or 1

    if args.dry_run:
        return 0
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import d3sr_core, torch; print(d3sr_core.__version__, torch.__version__)",
        ],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        print(
            f"\nD3SR set-up FAILED: the package does not import:\n{check.stderr}", file=sys.stderr
        )
        return 1
    d3sr_version, torch_version = check.stdout.split()
    if shutil.which("pyenv"):  # pyenv's shims learn about new commands (d3sr) only on rehash
        subprocess.run(["pyenv", "rehash"], check=False, capture_output=True)
    print(f"\nD3SR {d3sr_version} is installed (torch {torch_version}).")
    if shutil.which("d3sr"):
        print("Try: d3sr upscale photo.jpg -o out/      (d3sr --help for more)")
    else:
        scripts = sysconfig.get_path("scripts")
        print(
            f"`d3sr` was installed into {scripts}, which is not on PATH; or run: {sys.executable} -m d3sr_core --help"
        )
    return 0


if __name__ == "__main__":
    _launch = webui_launch() if len(sys.argv) == 1 else None
    sys.exit(install_into_webui(_launch) if _launch is not None else main())
