"""The ``d3sr`` command line, driven for real on tiny weights the tests write."""

from __future__ import annotations

import functools
import http.server
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from make_tiny_weights import (
    tiny_checkpoint,
    write_test_image,
)
from PIL import Image
from safetensors.torch import save_file

from d3sr_core import cli
from d3sr_core.image_files import encode_png16
from d3sr_core.inference.options import UpscaleOptions, output_size
from d3sr_core.loading.checkpoint import is_d3sr_checkpoint, load_checkpoint
from d3sr_core.loading.detect import base_lacks_vae
from d3sr_core.loading.fetch import download_file

HOST_ENV = (
    "D3SR_WEIGHTS",
    "D3SR_BASE",
    "D3SR_VAE",
    "D3SR_MODELS_DIR",
    "COMFYUI_PATH",
    "A1111_PATH",
    "WEBUI_PATH",
)


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No model folders anywhere: empty home and working directory, no D3SR/host variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    for name in HOST_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return home


def weights_args(tiny) -> list[str]:
    return ["--weights", str(tiny["weights"]), "--base", str(tiny["base"]), "-q"]


def png_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR."""
    data = path.read_bytes()[:29]
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


def exif_with_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def make_inputs(folder: Path) -> dict[str, tuple[int, int]]:
    """Images of every kind the CLI must keep; returns name -> displayed (w, h)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_test_image(folder / "rgb.png", (13, 9))
    Image.fromarray((rng.random((7, 10)) * 255).astype(np.uint8)).save(folder / "gray.png")
    Image.fromarray((rng.random((8, 6, 4)) * 255).astype(np.uint8)).save(folder / "rgba.png")
    Image.fromarray((rng.random((6, 9)) * 65535).astype(np.uint16)).save(folder / "gray16.png")
    (folder / "rgb16.png").write_bytes(encode_png16(rng.random((5, 7, 3)).astype(np.float32)))
    Image.fromarray((rng.random((6, 5, 2)) * 255).astype(np.uint8)).save(folder / "la.png")
    # stored 12 wide x 8 high, EXIF orientation 6 (rotate 90 clockwise): displayed 8 x 12
    Image.fromarray((rng.random((8, 12, 3)) * 255).astype(np.uint8)).save(
        folder / "rotated.jpg", exif=exif_with_orientation(6)
    )
    Image.fromarray((rng.random((10, 11, 3)) * 255).astype(np.uint8)).save(folder / "photo.webp")
    Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).save(folder / "pic.bmp")
    Image.fromarray((rng.random((5, 6)) * 65535).astype(np.uint16)).save(folder / "scan16.tif")
    return {
        "rgb": (13, 9),
        "gray": (10, 7),
        "rgba": (6, 8),
        "gray16": (9, 6),
        "rgb16": (7, 5),
        "la": (5, 6),
        "rotated": (8, 12),
        "photo": (11, 10),
        "pic": (6, 6),
        "scan16": (6, 5),
    }


def test_upscale_folder_keeps_size_depth_gray_alpha_and_orientation(tmp_path, tiny):
    sizes = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert cli.main(["upscale", str(tmp_path / "in"), "-o", str(out), *weights_args(tiny)]) == 0
    written = {p.stem: p for p in out.iterdir()}
    assert set(written) == set(sizes) and all(p.suffix == ".png" for p in written.values())
    for stem, (w, h) in sizes.items():
        with Image.open(written[stem]) as image:
            assert image.size == output_size(w, h, 4.0), stem
    assert Image.open(written["gray"]).mode == "L"
    assert Image.open(written["rgba"]).mode == "RGBA"
    assert Image.open(written["la"]).mode == "LA"
    assert Image.open(written["rgb"]).mode == "RGB"
    assert Image.open(written["gray16"]).mode == "I;16"
    assert Image.open(written["scan16"]).mode == "I;16"
    assert png_header(written["gray16"])[2:] == (16, 0)
    assert png_header(written["rgb16"])[2:] == (16, 2)  # 16-bit RGB stays 16-bit RGB
    assert png_header(written["rgb"])[2:] == (8, 2)
    alpha = np.asarray(Image.open(written["rgba"]))[:, :, 3]
    assert alpha.std() > 0  # carried over, not a constant fill
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_format_same_and_single_output_file(tmp_path, tiny):
    make_inputs(tmp_path / "in")
    out = tmp_path / "same"
    args = [
        "upscale",
        str(tmp_path / "in" / "*.*"),
        "-o",
        str(out),
        "--format",
        "same",
        "--suffix",
        "_x2",
    ]
    assert cli.main([*args, "--scale", "2", *weights_args(tiny)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "rotated_x2.jpg" in names and "photo_x2.webp" in names and "scan16_x2.tif" in names
    assert Image.open(out / "scan16_x2.tif").mode == "I;16"  # 16-bit gray TIFF stays 16-bit
    assert Image.open(out / "photo_x2.webp").size == (22, 20)

    target = tmp_path / "one" / "big.jpg"
    src = tmp_path / "in" / "rgb.png"
    assert (
        cli.main(["upscale", str(src), "-o", str(target), "--scale", "1.5", *weights_args(tiny)])
        == 0
    )
    with Image.open(target) as image:
        assert image.format == "JPEG" and image.size == output_size(13, 9, 1.5) == (20, 14)


def test_corrupt_input_is_reported_and_others_processed(tmp_path, tiny, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_test_image(folder / "a_good.png", (8, 8))
    (folder / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    write_test_image(folder / "c_good.png", (9, 7))
    out = tmp_path / "out"
    code = cli.main(
        ["upscale", str(folder), str(tmp_path / "missing.png"), "-o", str(out), *weights_args(tiny)]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "b_broken.png" in err and "missing.png" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_good.png", "c_good.png"]


def test_failed_write_leaves_no_partial_file(tmp_path, tiny, monkeypatch, capsys):
    src = write_test_image(tmp_path / "x.png", (8, 8))
    out = tmp_path / "out"

    def broken_save(self, fp, format=None, **kw):
        Path(fp).write_bytes(b"half an image")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    assert cli.main(["upscale", str(src), "-o", str(out), *weights_args(tiny)]) == 1
    assert "disk full" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_skip_existing_loads_nothing(tmp_path, tiny):
    src = write_test_image(tmp_path / "x.png", (8, 8))
    out = tmp_path / "out"
    assert cli.main(["upscale", str(src), "-o", str(out), *weights_args(tiny)]) == 0
    before = (out / "x.png").stat().st_mtime_ns
    # the weights path does not exist: with nothing to do, no model is even looked for
    args = [
        "upscale",
        str(src),
        "-o",
        str(out),
        "--skip-existing",
        "--weights",
        str(tmp_path / "nope"),
        "-q",
    ]
    assert cli.main(args) == 0
    assert (out / "x.png").stat().st_mtime_ns == before


def test_limits_and_bad_options(tmp_path, tiny, capsys):
    src = write_test_image(tmp_path / "x.png", (40, 30))
    out = tmp_path / "out"
    assert (
        cli.main(
            ["upscale", str(src), "-o", str(out), "--max-output-mp", "0.001", *weights_args(tiny)]
        )
        == 1
    )
    assert "MP" in capsys.readouterr().err and not out.exists() or not list(out.iterdir())
    assert cli.main(["upscale", str(src), "-o", str(out), "--scale", "1", *weights_args(tiny)]) == 2
    with pytest.raises(SystemExit):
        cli.main(["upscale", str(src), "-o", str(out), "--precision", "fp8"])


def test_output_names_collide_resolved():
    inputs = [
        (Path("in/a.png"), Path("a.png")),
        (Path("in/a.jpg"), Path("a.jpg")),
        (Path("in/b.tif"), Path("sub/b.tif")),
    ]
    jobs = cli.plan_outputs(inputs, Path("out"), "png", "", single_file=False)
    assert [j.target for j in jobs] == [
        Path("out/a_png.png"),
        Path("out/a_jpg.png"),
        Path("out/sub/b.png"),
    ]
    jobs = cli.plan_outputs(inputs, Path("out"), "same", "_x4", single_file=False)
    assert [j.target.name for j in jobs] == ["a_x4.png", "a_x4.jpg", "b_x4.tif"]


def test_recursive_folder_keeps_structure(tmp_path):
    (tmp_path / "in").mkdir()
    write_test_image(tmp_path / "in" / "top.png", (4, 4))
    (tmp_path / "in" / "deep").mkdir()
    write_test_image(tmp_path / "in" / "deep" / "low.png", (4, 4))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    flat, errors = cli.collect_inputs([str(tmp_path / "in")], recursive=False)
    assert [rel for _, rel in flat] == [Path("top.png")] and not errors
    deep, _ = cli.collect_inputs([str(tmp_path / "in")], recursive=True)
    assert sorted(rel for _, rel in deep) == [Path("deep/low.png"), Path("top.png")]


def test_options_reach_the_engine():
    args = cli.build_parser().parse_args(
        [
            "upscale",
            "x.png",
            "-o",
            "o",
            "--tile",
            "256",
            "--tile-overlap",
            "32",
            "--vae-tile",
            "auto",
            "--vae-attention-window",
            "0",
            "--unet-attention-window",
            "256",
            "--color-fix",
            "wavelet",
            "--memory-budget",
            "1.5",
            "--seed",
            "7",
        ]
    )
    options = cli.build_options(args)
    assert options == UpscaleOptions(
        scale=4.0,
        seed=7,
        tile_size=256,
        tile_overlap=32,
        vae_tile_size="auto",
        vae_attention_window=0,
        unet_attention_window=256,
        color_fix="wavelet",
        memory_budget_bytes=int(1.5 * 2**30),
    )
    defaults = cli.build_options(cli.build_parser().parse_args(["upscale", "x.png", "-o", "o"]))
    assert defaults.vae_attention_window == UpscaleOptions().vae_attention_window == 512
    assert defaults.unet_attention_window == UpscaleOptions().unet_attention_window == 512


def test_missing_weights_says_what_to_put_where(tmp_path, clean_env, capsys):
    src = write_test_image(tmp_path / "x.png", (8, 8))
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    for expected in (
        "osediff.pkl",
        "v2-1_512-ema-pruned.safetensors",
        "stable-diffusion-2-1-base",
        str(clean_env / ".cache" / "d3sr"),
        "./models",
        "ComfyUI's models/d3sr",
        "--download",
        "D3SR_WEIGHTS",
        "--base",
    ):
        assert expected in err, expected
    assert not (tmp_path / "out").exists()


def test_weights_found_in_models_dir(tmp_path, tiny, clean_env, monkeypatch):
    models = tmp_path / "my-models"
    models.mkdir()
    (models / "d3sr-tiny.safetensors").symlink_to(tiny["weights"])
    (models / "stable-diffusion-2-1-base").symlink_to(tiny["base"], target_is_directory=True)
    monkeypatch.setenv("D3SR_MODELS_DIR", str(models))
    src = write_test_image(tmp_path / "x.png", (8, 6))
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert Image.open(tmp_path / "out" / "x.png").size == (32, 24)


def test_download_flag_fetches_missing_files(tmp_path, tiny, clean_env, monkeypatch):
    calls = []

    def fake_download_base(dest, repo_id):
        calls.append((Path(dest), repo_id))
        return tiny["base"]

    monkeypatch.setattr("d3sr_core.loading.fetch.download_base", fake_download_base)
    models = tmp_path / "dl"
    src = write_test_image(tmp_path / "x.png", (8, 8))
    url = tiny["weights"].as_uri()
    args = [
        "upscale",
        str(src),
        "-o",
        str(tmp_path / "out"),
        "--download",
        "--weights-url",
        url,
        "--models-dir",
        str(models),
        "-q",
    ]
    assert cli.main(args) == 0
    assert calls == [(models, "stabilityai/stable-diffusion-2-1-base")]
    assert is_d3sr_checkpoint(models / "d3sr-tiny.safetensors")
    assert (tmp_path / "out" / "x.png").is_file()


def test_download_file_from_file_url_and_local_http(tmp_path, tiny):
    dest = download_file(tiny["weights"].as_uri(), tmp_path / "a" / "w.safetensors", progress=False)
    assert dest.read_bytes() == tiny["weights"].read_bytes()

    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tiny["weights"].parent)
    )
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{tiny['weights'].name}"
        dest = download_file(url, tmp_path / "b" / "w.safetensors", progress=False)
        assert dest.read_bytes() == tiny["weights"].read_bytes()
        with pytest.raises(OSError, match="could not download"):
            download_file(url + ".missing", tmp_path / "c" / "w.safetensors", progress=False)
        assert (
            not (tmp_path / "c" / "w.safetensors").exists()
            and list((tmp_path / "c").iterdir()) == []
        )
    finally:
        server.shutdown()
        server.server_close()


def test_the_command_bounds_onednn_primitive_cache_before_it_runs(tmp_path, monkeypatch):
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"):
        monkeypatch.setenv(name, "")  # so that the value set below is undone after the test
        monkeypatch.delenv(name)
    cli.main(["info", str(tmp_path / "missing.safetensors")])
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"


def test_info_each_kind(tmp_path, tiny, capsys):
    from test_checkpoint import make_osediff

    pkl, _, _ = make_osediff(tmp_path)
    junk = tmp_path / "junk.safetensors"
    save_file({"something.weight": torch.zeros(3, 2)}, str(junk))
    args = ["info", str(tiny["weights"]), str(pkl), str(tiny["base"]), str(junk), "--json"]
    assert cli.main(args) == 0
    infos = json.loads(capsys.readouterr().out)
    assert [i["kind"] for i in infos] == ["d3sr", "osediff", "diffusers", "unknown"]
    assert infos[0]["details"]["config"]["timestep"] == 399 and infos[0]["usable_as"] == "weights"
    assert infos[1]["details"]["rank_unet"] == 4 and infos[1]["details"]["unet_lora_modules"] == 258
    assert infos[3]["details"]["top_level_keys"] == ["something.weight"]

    assert cli.main(["info", str(tiny["weights"])]) == 0
    text = capsys.readouterr().out
    assert "kind:" in text and "d3sr" in text and "D3SR weights (--weights)" in text
    assert cli.main(["info", str(tmp_path / "absent.safetensors")]) == 1
    assert "absent.safetensors" in capsys.readouterr().err


def test_convert_osediff_pickle(tmp_path, tiny, capsys):
    from test_checkpoint import make_osediff

    pkl, _, _ = make_osediff(tmp_path)
    out = tmp_path / "converted.safetensors"
    # the prompt embedding from a file (here: another D3SR checkpoint holding one)
    assert (
        cli.main(
            ["convert", str(pkl), "-o", str(out), "--prompt-embeds", str(tiny["weights"]), "-q"]
        )
        == 0
    )
    ckpt = load_checkpoint(out)
    assert ckpt.config.timestep == 999 and len(ckpt.adapters["unet"].factors) == 258
    assert ckpt.adapters["unet"].scale == 2.0 and "vae" in ckpt.adapters
    assert torch.equal(ckpt.prompt_embeds, tiny_checkpoint().prompt_embeds.float())
    # or computed from the base's text encoder, written beside the pickle by default
    assert cli.main(["convert", str(pkl), "--base", str(tiny["base"]), "-q"]) == 0
    assert load_checkpoint(tmp_path / "osediff.safetensors").prompt_embeds.shape == (1, 77, 32)
    assert (
        cli.main(
            [
                "convert",
                str(tiny["weights"]),
                "-o",
                str(tmp_path / "x.safetensors"),
                "--prompt-embeds",
                str(tiny["weights"]),
            ]
        )
        == 1
    )
    assert "not an OSEDiff checkpoint" in capsys.readouterr().err


def test_upscale_with_osediff_pickle_converts_once(tmp_path, tiny):
    from test_checkpoint import make_osediff

    pkl, _, _ = make_osediff(tmp_path)
    src = write_test_image(tmp_path / "x.png", (8, 8))
    args = [
        "upscale",
        str(src),
        "-o",
        str(tmp_path / "out"),
        "--weights",
        str(pkl),
        "--base",
        str(tiny["base"]),
        "-q",
    ]
    assert cli.main(args) == 0
    cached = tmp_path / "osediff.safetensors"
    assert is_d3sr_checkpoint(cached)
    stamp = cached.stat().st_mtime_ns
    assert cli.main(args) == 0
    assert cached.stat().st_mtime_ns == stamp  # reused, not converted again


def test_python_m_d3sr_core_subprocess(tmp_path, tiny):
    src = write_test_image(tmp_path / "in.png", (10, 6))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [
        sys.executable,
        "-m",
        "d3sr_core",
        "upscale",
        str(src),
        "-o",
        str(out),
        *weights_args(tiny),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Image.open(out / "in.png").size == (40, 24)


def test_help_texts():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = cli.build_parser().format_help()
    assert "upscale" in text and "info" in text and "convert" in text
    upscale_help = cli.build_parser()._subparsers._group_actions[0].choices["upscale"].format_help()
    assert "v2-1_512-ema-pruned" in upscale_help and "--download" in upscale_help


def test_single_file_base_without_vae_is_recognised(tmp_path):
    unet_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    no_vae = tmp_path / "unet-only.safetensors"
    save_file({unet_key: torch.zeros(4, 1024)}, str(no_vae))
    full = tmp_path / "full.safetensors"
    save_file(
        {
            unet_key: torch.zeros(4, 1024),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3),
        },
        str(full),
    )
    assert base_lacks_vae(str(no_vae)) and not base_lacks_vae(str(full))
    assert not base_lacks_vae(str(tmp_path))  # a diffusers folder brings its own vae/
