"""Nothing lost, nothing hangs: output collisions, up-front checks, special files, noise.

The checks that must happen before any model is loaded are run with ``--weights`` naming a
file that does not exist: reaching the loader would end in a different message.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from make_tiny_weights import write_test_image
from PIL import Image

from d3sr_core import cli
from d3sr_core.batch import collect_inputs, plan_outputs, split_by_pixels
from d3sr_core.image_files import ImageFileError, read_image
from d3sr_core.inference.options import UpscaleOptions

REPO = Path(__file__).resolve().parent.parent
NO_WEIGHTS = ["--weights", "/nonexistent/weights.safetensors", "--base", "/nonexistent/base", "-q"]


def weights_args(tiny) -> list[str]:
    return ["--weights", str(tiny["weights"]), "--base", str(tiny["base"])]


# --------------------------------------------------------------------------- collisions


def test_same_name_in_two_folders_and_a_glob_never_overwrites(tmp_path, tiny, capsys):
    for folder, size in (("a", (8, 8)), ("b", (10, 6)), ("scans/x/deep", (6, 6))):
        (tmp_path / folder).mkdir(parents=True)
        write_test_image(tmp_path / folder / "x.png", size)
    write_test_image(tmp_path / "scans" / "x.png", (7, 5))
    # folders a/ and b/ both hold x.png
    out = tmp_path / "out"
    code = cli.main(["upscale", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out),
                     *weights_args(tiny)])  # fmt: skip
    assert code == 0
    sizes = sorted(Image.open(p).size for p in out.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ["x.png", "x_2.png"]
    assert sizes == [(32, 32), (40, 24)]  # both images, neither overwritten
    assert "2 written, 0 skipped, 0 failed" in capsys.readouterr().err

    # a recursive glob mirrors the folders below its fixed part, like a folder does
    found, errors = collect_inputs([str(tmp_path / "scans" / "**" / "*.png")], recursive=True)
    assert not errors
    assert sorted(str(rel) for _, rel in found) == ["x.png", "x/deep/x.png"]
    # files named on the command line that collide, also only by letter case
    inputs = [(Path("a/x.png"), Path("x.png")), (Path("b/x.png"), Path("x.png")),
              (Path("c/X.PNG"), Path("X.PNG")), (Path("d/x_2.png"), Path("x_2.png"))]  # fmt: skip
    targets = [j.target.name for j in plan_outputs(inputs, Path("o"), None, "_s", False)]
    assert targets == ["x_s.png", "x_3_s.png", "X_4_s.png", "x_2_s.png"]
    assert len({t.casefold() for t in targets}) == 4
    # deterministic: the same command line plans the same names
    assert targets == [j.target.name for j in plan_outputs(inputs, Path("o"), None, "_s", False)]


# --------------------------------------------------------------------------- up-front checks


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(args)
    return code, capsys.readouterr().err


def test_output_target_checks_before_loading(tmp_path, capsys):
    a = write_test_image(tmp_path / "a.png", (8, 8))
    b = write_test_image(tmp_path / "b.png", (8, 8))
    existing = tmp_path / "taken.txt"
    existing.write_text("keep me")
    cases = [
        ([str(a), str(b), "-o", str(existing)], "is an existing file"),
        ([str(a), str(b), "-o", str(tmp_path / "name.png")], "names one image file"),
        ([str(a), "-o", str(tmp_path / "out.jpg"), "--format", "png"], "disagree"),
        ([str(a), "-o", str(existing / "sub")], "is not a folder"),
        ([str(a), "-o", str(tmp_path / "o"), "--suffix", "x/y"], "--suffix"),
    ]
    for args, expected in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        code, err = run_cli(["upscale", *args, *NO_WEIGHTS], capsys)
        assert code == 2 and expected in err and "-o" in err or "--suffix" in err, err
        assert "nonexistent" not in err  # refused before weights were even looked for
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize(
    "flag_args, flag",
    [
        (["--tile", "100"], "--tile"),
        (["--tile", "32"], "--tile"),
        (["--vae-tile", "16"], "--vae-tile"),
        (["--tile-overlap", "-1"], "--tile-overlap"),
        (["--vae-attention-window", "-5"], "--vae-attention-window"),
        (["--unet-attention-window", "-5"], "--unet-attention-window"),
        (["--quality", "101"], "--quality"),
        (["--strength", "nan"], "--strength"),
        (["--strength", "-1"], "--strength"),
        (["--max-output-mp", "inf"], "--max-output-mp"),
        (["--memory-budget", "0"], "--memory-budget"),
        (["--scale", "inf"], "--scale"),
        (["--seed", "-3"], "--seed"),
    ],
)
def test_bad_option_exits_2_naming_the_flag(tmp_path, capsys, flag_args, flag):
    src = write_test_image(tmp_path / "a.png", (8, 8))
    try:
        code, err = run_cli(["upscale", str(src), "-o", str(tmp_path / "o"), *flag_args,
                             *NO_WEIGHTS], capsys)  # fmt: skip
    except SystemExit as exit_info:  # argparse's own type checks also exit 2 naming the flag
        code, err = exit_info.code, capsys.readouterr().err
    assert code == 2, err
    assert flag in err and "nonexistent" not in err, err
    assert not re.search(r"\b(tile_size|vae_tile_size|tile_overlap|memory_budget_bytes)\b", err)
    assert not (tmp_path / "o").exists()


def test_help_shows_the_engine_defaults_and_readme_agrees():
    defaults = UpscaleOptions()
    for name, value in cli.ENGINE_DEFAULTS.items():
        assert getattr(defaults, name) == value, name
    upscale = cli.build_parser()._subparsers._group_actions[0].choices["upscale"]
    text = " ".join(upscale.format_help().split("options:", 1)[1].split())
    for flag, shown in (
        ("--color-fix", f"default {defaults.color_fix}"),
        ("--tile-overlap", f"default {defaults.tile_overlap}"),
        ("--vae-attention-window", f"default {defaults.vae_attention_window}"),
        ("--unet-attention-window", f"default {defaults.unet_attention_window}"),
        ("--tile N|auto", f"default {defaults.tile_size}"),
        ("--max-output-mp", f"default {defaults.max_output_pixels / 1e6:.0f}"),
        ("--quality", "default 95"),
        ("--format", "default png"),
    ):
        assert shown in text.split(flag, 1)[1][:400], flag
    readme = (REPO / "README.md").read_text()
    cells = [
        re.split(r"(?<!\\)\|", line) for line in readme.splitlines() if line.startswith("| `-")
    ]
    rows = {c[1].strip(): c[2].strip() for c in cells}
    assert rows["`--color-fix none\\|adain\\|wavelet`"] == defaults.color_fix
    assert rows["`--tile-overlap N`"] == str(defaults.tile_overlap)
    assert rows["`--vae-attention-window N`"] == str(defaults.vae_attention_window)
    assert rows["`--unet-attention-window N`"] == str(defaults.unet_attention_window)
    assert rows["`--tile N\\|auto`"] == rows["`--vae-tile N\\|auto`"] == defaults.tile_size


# --------------------------------------------------------------------------- special files


def finishes_quickly(fn, seconds: float = 1.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) unless it returns in time."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    start = time.perf_counter()
    thread.start()
    thread.join(seconds + 4)
    elapsed = time.perf_counter() - start
    assert not thread.is_alive(), "blocked (e.g. opened a FIFO)"
    assert elapsed < seconds, elapsed
    return result


@pytest.fixture
def special_files(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.png"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    folder = tmp_path / "folder.png"
    folder.mkdir()
    yield {"fifo": fifo, "device": Path("/dev/zero"), "socket": sock_path, "folder": folder}
    server.close()


def test_special_files_refused_without_opening(tmp_path, special_files, capsys):
    for kind, path in special_files.items():
        outcome = finishes_quickly(lambda p=path: read_image(p))
        assert isinstance(outcome.get("error"), ImageFileError), kind
        assert "not a regular file" in str(outcome["error"]) and str(path) in str(outcome["error"])
    for kind in ("fifo", "device", "socket"):
        path = special_files[kind]
        outcome = finishes_quickly(
            lambda p=path: cli.main(["upscale", str(p), "-o", str(tmp_path / "o"), *NO_WEIGHTS])
        )
        err = capsys.readouterr().err
        assert outcome.get("value") == 2, (kind, outcome)
        assert f"{path}: not a regular file" in err and "no such file" not in err, err
    # inside a folder, a FIFO with an image name is reported, not opened
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "queue.png")
    found, errors = finishes_quickly(lambda: collect_inputs([str(folder)], False))["value"]
    assert (
        found == []
        and errors[0] == f"{folder / 'queue.png'}: not a regular file (it is a FIFO (named pipe))"
    )
    from d3sr_core.loading.files import WeightsFileError, read_state_dict

    outcome = finishes_quickly(lambda: read_state_dict(special_files["fifo"]))
    assert isinstance(outcome.get("error"), WeightsFileError)


# --------------------------------------------------------------------------- bits and noise


def tiff16_rgb(path: Path, pixels: np.ndarray, orientation: int) -> Path:
    """A baseline uncompressed 16-bit RGB TIFF with an Orientation tag (written by hand:
    Pillow cannot write 16-bit colour TIFFs)."""
    import struct

    h, w, _ = pixels.shape
    data = pixels.astype("<u2").tobytes()
    entries = [
        (256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2),
        (273, 4, 1, None), (274, 3, 1, orientation), (277, 3, 1, 3), (278, 3, 1, h),
        (279, 4, 1, len(data)), (284, 3, 1, 1),
    ]  # fmt: skip
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    bits_offset = ifd_offset + ifd_size
    data_offset = bits_offset + 6
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_offset) + struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        if tag == 258:
            value = bits_offset
        elif tag == 273:
            value = data_offset
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + packed
    out += struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + data
    path.write_bytes(bytes(out))
    return path


def test_16bit_colour_tiff_with_orientation_keeps_bits_or_notes(tmp_path):
    rng = np.random.default_rng(0)
    pixels = (rng.random((4, 6, 3)) * 65535).astype(np.uint16)
    image = read_image(tiff16_rgb(tmp_path / "scan.tif", pixels, orientation=6))
    assert image.pixels.shape[:2] == (6, 4)  # rotated for display
    try:
        import cv2  # noqa: F401
    except ImportError:
        assert image.bits == 8
        assert any("16-bit colour TIFF read as 8-bit" in w for w in image.warnings)
    else:
        assert image.bits == 16 and not image.warnings


def test_clean_run_prints_no_third_party_warnings(tmp_path, tiny):
    src = write_test_image(tmp_path / "in.png", (10, 6))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "d3sr_core", "upscale", str(src), "-o", str(tmp_path / "o"),
           *weights_args(tiny)]  # fmt: skip
    quiet = subprocess.run([*cmd, "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == "", quiet.stderr
    # without -q only our own lines (and progress bars) appear
    loud = subprocess.run([*cmd, "--skip-existing"], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert loud.returncode == 0 and "warn" not in loud.stderr.lower(), loud.stderr


def test_split_by_pixels_balances_work():
    weights = [100, 1, 1, 1, 50, 50, 1]
    shares = split_by_pixels(weights, 2)
    assert sorted(i for s in shares for i in s) == list(range(7))
    loads = [sum(weights[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= 2  # by pixels, not by file count (files: 1 vs 6)
    assert split_by_pixels(weights, 2) == shares and split_by_pixels([], 3) == [[], [], []]
