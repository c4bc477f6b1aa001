"""The extension inside a real AUTOMATIC1111 (or Forge) checkout.

Skipped unless ``D3SR_A1111_DIR`` points at a webui checkout whose Python environment is
ready (``D3SR_A1111_PYTHON``, default ``$D3SR_A1111_DIR/venv/bin/python``, with the
repositories/ the webui needs); ``D3SR_A1111_ARGS`` adds webui arguments (Forge on a machine
without CUDA: ``--always-cpu``). The test writes tiny weights into a fresh ``--data-dir``,
links this repository into its ``extensions/``, and then

* starts the webui API-only on 127.0.0.1 and calls ``/sdapi/v1/upscalers``,
  ``/sdapi/v1/extra-single-image`` (D3SR as ``upscaler_1``; the Extras script "D3SR" is
  called with the stock API's None arguments) and ``/sdapi/v1/options``;
* runs :mod:`a1111_inprocess` in the webui's Python: ``images.resize_image`` (the hires.
  fix call), the Extras script with its own arguments, and Interrupt between tiles.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

A1111_DIR = os.environ.get("D3SR_A1111_DIR")
pytestmark = pytest.mark.skipif(not A1111_DIR, reason="set D3SR_A1111_DIR to an A1111 checkout")

REPO = Path(__file__).resolve().parents[2]
WEIGHTS_NAME = "D3SR d3sr-tiny"
STARTUP_TIMEOUT = 300


def webui_python() -> str:
    return os.environ.get("D3SR_A1111_PYTHON") or str(Path(A1111_DIR) / "venv" / "bin" / "python")


def webui_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMMANDLINE_ARGS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A webui data dir: this repository as an extension, tiny D3SR weights and SD2.1 base."""
    sys.path.insert(0, str(REPO / "tests"))
    from make_tiny_weights import write_test_image, write_tiny_base, write_tiny_checkpoint

    data = tmp_path_factory.mktemp("a1111-data")
    (data / "extensions").mkdir()
    (data / "extensions" / "d3sr").symlink_to(REPO, target_is_directory=True)
    (data / "models" / "D3SR").mkdir(parents=True)
    write_tiny_checkpoint(data / "models" / "D3SR" / "d3sr-tiny.safetensors")
    # found by name (sd21-base*) in models/Stable-diffusion: the "Automatic" base model
    write_tiny_base(data / "models" / "Stable-diffusion" / "sd21-base-tiny", text_encoder=False)
    write_test_image(data / "input.png", (24, 16))
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_webui(data_dir: Path, api_only: bool):
    """The webui on 127.0.0.1 (``--nowebui --api`` or the full UI with ``--api``); yields its
    base URL and stops it afterwards."""
    port = free_port()
    log_path = data_dir / f"webui-{port}.log"
    cmd = [
        webui_python(),
        "launch.py",
        "--skip-prepare-environment",
        "--skip-torch-cuda-test",
        "--use-cpu",
        "all",
        "--no-half",
        *(["--nowebui"] if api_only else []),
        "--api",
        "--no-download-sd-model",
        "--skip-version-check",
        "--skip-load-model-at-start",
        "--server-name",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        *shlex.split(os.environ.get("D3SR_A1111_ARGS", "")),
    ]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=A1111_DIR, env=webui_env(), stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    get(url, "/sdapi/v1/upscalers")
                    break
                except OSError:
                    if proc.poll() is not None or time.perf_counter() - start > STARTUP_TIMEOUT:
                        log.flush()
                        pytest.fail("webui did not start:\n" + log_path.read_text()[-4000:])
                    time.sleep(0.5)
            print(
                f"webui ({'API' if api_only else 'UI'}) ready in {time.perf_counter() - start:.1f} s"
            )
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    # the webui reports failing scripts/callbacks as "*** Error ..." lines (API errors, some
    # provoked on purpose, and git metadata of a linked checkout are not the extension's)
    problems = [
        line
        for line in log_path.read_text().splitlines()
        if line.startswith("***")
        and "d3sr" in line.lower()
        and not line.startswith(("*** API error", "*** Failed reading extension data from Git"))
    ]
    assert not problems, problems


@pytest.fixture(scope="module")
def server(data_dir):
    with running_webui(data_dir, api_only=True) as url:
        yield url


def get(url: str, path: str):
    with urllib.request.urlopen(url + path, timeout=30) as response:
        return json.loads(response.read())


def post(url: str, path: str, body: dict):
    request = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def gradio_image(url: str, config: dict, path: Path):
    """An image input value for ``/run/predict``: a data URL (gradio 3, A1111) or an uploaded
    file (gradio 4, Forge)."""
    if not str(config.get("version", "3")).startswith("4"):
        return "data:image/png;base64," + b64_png(path)
    boundary = "d3sr-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url + "/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        (uploaded,) = json.loads(response.read())
    return {"path": uploaded, "meta": {"_type": "gradio.FileData"}}


def gallery_path(item) -> str:
    """The file of a gallery item: gradio 3 ``{"name": "...png?123"}``, gradio 4
    ``{"image": {"path": ...}}``."""
    if "image" in item:
        return item["image"]["path"]
    return item["name"].split("?", 1)[0]


def b64_png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[-1])))


def test_upscaler_is_listed(server, data_dir):
    upscalers = {u["name"]: u for u in get(server, "/sdapi/v1/upscalers")}
    assert WEIGHTS_NAME in upscalers, sorted(upscalers)
    assert Path(upscalers[WEIGHTS_NAME]["model_path"]).name == "d3sr-tiny.safetensors"


@pytest.mark.parametrize("scale", [2, 3.5, 4])
def test_extra_single_image_exact_size(server, data_dir, scale):
    source = Image.open(data_dir / "input.png").convert("RGB")
    body = {"image": b64_png(data_dir / "input.png"), "upscaler_1": WEIGHTS_NAME}
    body["upscaling_resize"] = scale
    start = time.perf_counter()
    response = post(server, "/sdapi/v1/extra-single-image", body)
    print(f"x{scale}: {time.perf_counter() - start:.2f} s")
    image = decode(response["image"])
    # Upscaler.upscale's contract: floor(side * scale / 8) * 8
    assert image.size == (int(24 * scale // 8 * 8), int(16 * scale // 8 * 8))
    # the model ran: not what Lanczos alone gives
    lanczos = source.resize(image.size, Image.Resampling.LANCZOS)
    assert not np.array_equal(np.asarray(image.convert("RGB")), np.asarray(lanczos))
    # the Extras script "D3SR" ran with the API's None arguments and wrote the parameters
    assert "D3SR model: d3sr-tiny" in response["html_info"]
    assert "D3SR color fix: wavelet" in response["html_info"]


def test_scale_to_size_and_settings_through_api(server, data_dir):
    post(server, "/sdapi/v1/options", {"d3sr_color_fix": "none", "d3sr_tile_size": 64})
    try:
        body = {
            "image": b64_png(data_dir / "input.png"),
            "upscaler_1": WEIGHTS_NAME,
            "resize_mode": 1,
            "upscaling_resize_w": 100,
            "upscaling_resize_h": 60,
            "upscaling_crop": True,
        }
        response = post(server, "/sdapi/v1/extra-single-image", body)
        assert decode(response["image"]).size == (100, 60)
        assert "D3SR color fix: none" in response["html_info"]
        assert "D3SR tile: 64" in response["html_info"]
    finally:
        post(server, "/sdapi/v1/options", {"d3sr_color_fix": "wavelet", "d3sr_tile_size": 0})


def test_missing_base_model_is_a_clear_error(server, data_dir):
    post(server, "/sdapi/v1/options", {"d3sr_base_model": "no-such-sd21.safetensors"})
    try:
        body = {"image": b64_png(data_dir / "input.png"), "upscaler_1": WEIGHTS_NAME}
        body["upscaling_resize"] = 2.25  # not cached by the Upscale step
        with pytest.raises(urllib.error.HTTPError) as err:
            post(server, "/sdapi/v1/extra-single-image", body)
        detail = err.value.read().decode()  # A1111: {"errors": ...}; Forge: another shape
        assert "D3SR base model 'no-such-sd21.safetensors'" in detail, detail
        assert "Settings > Upscaling" in detail
    finally:
        post(server, "/sdapi/v1/options", {"d3sr_base_model": "Automatic"})


def test_in_process_hires_fix_script_and_interrupt(data_dir, server):
    # after the server test (module fixtures): both share data_dir but never run at once
    start = time.perf_counter()
    proc = subprocess.run(
        [
            webui_python(),
            str(Path(__file__).with_name("a1111_inprocess.py")),
            str(data_dir),
            str(data_dir / "input.png"),
        ],
        cwd=A1111_DIR,
        env=webui_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    print(f"in-process run: {time.perf_counter() - start:.1f} s; {result}")
    assert WEIGHTS_NAME in result["upscalers"]
    assert result["models_path_arg"].endswith(os.path.join("models", "D3SR"))
    # hires. fix: images.resize_image(0, 24x16 -> 80x56): one D3SR pass to exactly that size
    assert result["hires"]["size"] == [80, 56]
    assert result["hires"]["calls"] == [[[24, 16], [80, 56]]]
    assert result["upscale_x4"]["calls"] == [[[24, 16], [96, 64]]]
    script = result["script"]
    assert script["size"] == [60, 40]
    for entry in (
        "D3SR scale: 2.5",
        "D3SR tile: 64",
        "D3SR color fix: adain",
        "D3SR strength: 0.5",
        "D3SR seed: 7",
        "D3SR precision: fp32",
    ):
        assert entry in script["info"]
    interrupt = result["interrupt"]
    assert interrupt["size"] == [96, 64] and interrupt["progress_calls"] == 1
    assert interrupt["equals_lanczos_of_input"]
    assert result["unload"] == {"loaded_before": True, "loaded_after": False}


def test_extras_tab_button_with_the_d3sr_script(data_dir, server):
    """The Extras tab's Generate button (the exact UI code path, with the script's controls)."""
    with running_webui(data_dir, api_only=False) as url:
        config = get(url, "/config")
        components = {c["id"]: c for c in config["components"]}
        fn_index, dep = next(
            (i, d) for i, d in enumerate(config["dependencies"]) if d.get("js") == "submit_extras"
        )
        by_elem = {components[i]["props"].get("elem_id"): n for n, i in enumerate(dep["inputs"])}
        data = [components[i]["props"].get("value") for i in dep["inputs"]]
        data[0] = "task(d3sr-test)"
        data[by_elem["extras_image"]] = gradio_image(url, config, data_dir / "input.png")
        data[by_elem["extras_upscale-checkbox"]] = False
        data[by_elem["extras_d3sr-checkbox"]] = True
        assert data[by_elem["extras_d3sr_model"]] == WEIGHTS_NAME  # the dropdown's default
        data[by_elem["extras_d3sr_scale"]] = 2
        data[by_elem["extras_d3sr_color_fix"]] = "adain"
        start = time.perf_counter()
        response = post(
            url, "/run/predict", {"fn_index": fn_index, "data": data, "session_hash": "d3sr"}
        )
        print(f"Extras button: {time.perf_counter() - start:.2f} s")
        gallery, info_json, html_info = response["data"]
        for entry in ("D3SR scale: 2.0", "D3SR color fix: adain", "D3SR precision: fp32"):
            assert entry in info_json, info_json
        saved = Image.open(gallery_path(gallery[0]))
        assert saved.size == (48, 32)
        # the settings page offers D3SR's options in the Upscaling section
        assert "setting_d3sr_base_model" in {c["props"].get("elem_id") for c in components.values()}
