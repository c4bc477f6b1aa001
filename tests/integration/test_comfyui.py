"""The node pack inside a real ComfyUI: start the server, POST the example workflows.

Skipped unless ``D3SR_COMFYUI_DIR`` points at a ComfyUI checkout (tested: v0.12.1) whose
Python already has this pack's requirements (ComfyUI-Manager's steps:
``pip install -r requirements.txt`` then ``python install.py``). The Python used is
``$D3SR_COMFYUI_PYTHON``, else ``$D3SR_COMFYUI_DIR/venv/bin/python``, else this one.

The server runs from a temporary ``--base-directory`` whose ``models/`` get tiny weights.
``$D3SR_COMFYUI_LAYOUT`` picks how the pack sits in its ``custom_nodes/`` (one install path each):

* ``clone`` (default): the repository linked in under an arbitrary folder name, as a
  ``git clone`` is (the engine as installed by ``install.py``);
* ``copy``: the tracked files copied into ``custom_nodes/d3sr``, as a registry / zip install
  puts them (works even when the engine is not pip-installed);
* ``pip``: only ``custom_nodes/d3sr_nodes.py`` = ``from comfyui_d3sr import comfy_entrypoint``,
  for a ``pip install`` of this repository into the server's Python.

Nothing in the ComfyUI checkout is changed.

    D3SR_COMFYUI_DIR=~/ComfyUI python -m pytest tests/integration/test_comfyui.py -v -s
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

COMFY = os.environ.get("D3SR_COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFY, reason="set D3SR_COMFYUI_DIR to a ComfyUI checkout")

REPO = Path(__file__).resolve().parents[2]
LAYOUT = os.environ.get("D3SR_COMFYUI_LAYOUT", "clone")
# ComfyUI must not depend on the folder name
PACK = {"clone": "D3SR-pack (any name)", "copy": "d3sr", "pip": "d3sr_nodes.py"}[LAYOUT]
TINY_WEIGHTS = "tiny/d3sr-tiny.safetensors"
TINY_BASE = "diffusers: tiny-sd21-base"
SD_VAE = "sd-vae-random.safetensors"

# CPU torch beside PyPI's CUDA-linked torchvision: register the two operators torchvision's
# Python code looks up, so that `import torchvision` (ComfyUI, diffusers) works. A no-op where
# torchvision imports normally.
LAUNCHER = """
import os, runpy, sys
import torch
try:
    import torchvision  # noqa: F401
except RuntimeError:
    for name in [k for k in sys.modules if k.startswith("torchvision")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401
comfy = sys.argv[1]
os.chdir(comfy)
sys.path.insert(0, comfy)
sys.argv = ["main.py"] + sys.argv[2:]
runpy.run_path(os.path.join(comfy, "main.py"), run_name="__main__")
"""

TIMINGS: dict[str, float] = {}


def _python() -> str:
    explicit = os.environ.get("D3SR_COMFYUI_PYTHON")
    venv = Path(COMFY or ".") / "venv" / "bin" / "python"
    return explicit or (str(venv) if venv.exists() else sys.executable)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_models(root: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from diffusers import AutoencoderKL
    from make_tiny_weights import write_test_image, write_tiny_base, write_tiny_checkpoint
    from safetensors.torch import save_file

    from d3sr_core.models.configs import bundled_config

    (root / "models" / "d3sr" / "tiny").mkdir(parents=True)
    write_tiny_checkpoint(root / "models" / "d3sr" / TINY_WEIGHTS)
    write_tiny_base(root / "models" / "diffusers" / "tiny-sd21-base")
    # A full-size SD VAE (random weights): ComfyUI's VAELoader only builds the real architecture.
    torch.manual_seed(0)
    config = {k: v for k, v in bundled_config("sd21-base", "vae").items() if not k.startswith("_")}
    vae = AutoencoderKL(**config)
    (root / "models" / "vae").mkdir(parents=True)
    save_file(
        {k: v.half().contiguous() for k, v in vae.state_dict().items()},
        str(root / "models" / "vae" / SD_VAE),
    )
    (root / "input").mkdir()
    write_test_image(root / "input" / "in.png", (24, 16))
    write_test_image(root / "input" / "big.png", (256, 256))


class Server:
    def __init__(self, root: Path, port: int, process: subprocess.Popen, log: Path):
        self.root, self.port, self.process, self.log = root, port, process, log
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict):
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(data).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{path}: HTTP {err.code}: {err.read().decode()}") from None
        return json.loads(body) if body.strip() else None

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": "d3sr-test"})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry:  # history holds a prompt once it finished (success, error or interrupt)
                return entry
            assert self.process.poll() is None, "ComfyUI exited:\n" + self.log.read_text()[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, prompt: dict, timeout: float = 300) -> tuple[dict, float]:
        start = time.perf_counter()
        entry = self.wait(self.queue(prompt), timeout)
        return entry, time.perf_counter() - start


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    start = time.perf_counter()
    _write_models(root)
    TIMINGS["write tiny weights + SD VAE"] = time.perf_counter() - start
    (root / "custom_nodes").mkdir()
    target = root / "custom_nodes" / PACK
    if LAYOUT == "clone":
        target.symlink_to(REPO, target_is_directory=True)
    elif LAYOUT == "copy":
        files = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout.split(b"\0")
        for name in filter(None, files):
            (target / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name.decode(), target / name.decode())
    else:
        target.write_text("from comfyui_d3sr import comfy_entrypoint  # noqa: F401\n")
    (root / "launch.py").write_text(LAUNCHER)
    port = _free_port()
    log = root / "server.log"
    cmd = [_python(), str(root / "launch.py"), str(Path(COMFY).resolve())]
    cmd += ["--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(root)]
    cmd += [
        "--disable-auto-launch",
        "--disable-api-nodes",
        "--database-url",
        f"sqlite:///{root / 'comfyui.db'}",
    ]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    env.pop("PYTHONPATH", None)  # the server imports what its own Python has installed
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    srv = Server(root, port, process, log)
    try:
        for _ in range(1200):
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, "ComfyUI exited:\n" + log.read_text()[-3000:]
                time.sleep(0.1)
        else:
            raise AssertionError("ComfyUI did not start:\n" + log.read_text()[-3000:])
        TIMINGS["server start"] = time.perf_counter() - start
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        print(
            f"\nComfyUI integration timings, layout {LAYOUT!r} (s): "
            + json.dumps({k: round(v, 2) for k, v in TIMINGS.items()})
        )


def to_api(workflow: dict, object_info: dict) -> dict:
    """A saved UI workflow -> an API prompt, reading widget order from ``/object_info``."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for section in ("required", "optional"):
            for name in info.get("input_order", {}).get(section, []):
                spec = info["input"][section][name]
                if name in linked:
                    inputs[name] = [str(linked[name][1]), linked[name][2]]
                    continue
                kind = spec[0]
                if not (
                    isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
                ):
                    continue
                if not values:
                    break
                inputs[name] = values.pop(0)
                options = spec[1] if len(spec) > 1 else {}
                if options.get("control_after_generate"):
                    values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def example(server, name: str) -> dict:
    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    return to_api(workflow, server.get("/object_info"))


def _output_image(server, entry: dict, node: str):
    from PIL import Image

    (image,) = entry["outputs"][node]["images"]
    return Image.open(server.root / "output" / image["subfolder"] / image["filename"])


def _messages(entry: dict) -> dict:
    return {kind: data for kind, data in entry["status"]["messages"]}


def test_pack_registers_nodes_folders_and_examples(server):
    info = server.get("/object_info/D3SRModelLoader")["D3SRModelLoader"]
    required = info["input"]["required"]
    assert TINY_WEIGHTS in required["weights"][1]["options"]
    assert TINY_BASE in required["base"][1]["options"]
    assert SD_VAE in required["vae"][1]["options"]
    for node in ("D3SRUpscaleImage", "D3SRUpscaleLatent"):
        assert node in server.get(f"/object_info/{node}")
    if LAYOUT != "pip":  # a single-file entry has no example_workflows/ folder
        templates = server.get("/api/workflow_templates")
        assert sorted(templates[PACK]) == ["d3sr_txt2img_upscale_latent", "d3sr_upscale_image"]
    log = server.log.read_text()
    assert "IMPORT FAILED" not in "\n".join(line for line in log.splitlines() if PACK in line)


def test_image_example_workflow(server):
    prompt = example(server, "d3sr_upscale_image")
    prompt["1"]["inputs"].update(weights=TINY_WEIGHTS, base=TINY_BASE)
    prompt["2"]["inputs"]["image"] = "in.png"
    entry, seconds = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    TIMINGS["image example 24x16 -> x4 (incl. model load)"] = seconds
    assert _output_image(server, entry, "4").size == (96, 64)
    prompt["3"]["inputs"]["scale"] = 2.5  # floor(w * s + 0.5): 60 x 40; the loader is cached
    entry, seconds = server.run(prompt)
    TIMINGS["image x2.5, model cached"] = seconds
    assert "1" in _messages(entry)["execution_cached"]["nodes"]  # the loader did not run again
    assert _output_image(server, entry, "4").size == (60, 40)


def _latent_prompt(server, with_vae: bool) -> dict:
    prompt = example(server, "d3sr_txt2img_upscale_latent")
    # Tiny weights cannot run a real SD2.1 KSampler: an empty 64x64 latent stands in for the
    # txt2img result, and a full-size random SD VAE for the checkpoint's VAE.
    for node in ("2", "3", "4"):
        del prompt[node]
    prompt["1"] = {"class_type": "VAELoader", "inputs": {"vae_name": SD_VAE}}
    prompt["5"] = {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1},
    }
    prompt["6"]["inputs"].update(weights=TINY_WEIGHTS, base=TINY_BASE)
    prompt["7"]["inputs"]["vae"] = ["1", 0]
    prompt["8"]["inputs"]["vae"] = ["1", 0]
    if not with_vae:
        del prompt["7"]["inputs"]["vae"]
    return prompt


@pytest.mark.parametrize("with_vae", [True, False], ids=["connected-vae", "d3sr-vae"])
def test_latent_example_workflow(server, with_vae):
    prompt = _latent_prompt(server, with_vae)
    assert prompt["7"]["inputs"]["scale"] == 2.0
    entry, seconds = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    TIMINGS[f"latent example ({'connected' if with_vae else 'D3SR'} VAE) 64 -> 128 px"] = seconds
    assert _output_image(server, entry, "9").size == (128, 128)


def test_missing_weights_is_a_clear_execution_error(server):
    prompt = example(server, "d3sr_upscale_image")
    prompt["1"]["inputs"].update(weights="missing.safetensors", base=TINY_BASE)
    prompt["2"]["inputs"]["image"] = "in.png"
    entry, _ = server.run(prompt)
    error = _messages(entry)["execution_error"]
    assert entry["status"]["status_str"] == "error"
    assert error["node_type"] == "D3SRModelLoader"
    message = error["exception_message"]
    assert "'missing.safetensors' not found" in message
    assert str(server.root / "models" / "d3sr") in message and "osediff.pkl" in message


def test_interrupt_stops_a_long_run_and_model_stays_usable(server):
    prompt = example(server, "d3sr_upscale_image")
    prompt["1"]["inputs"].update(weights=TINY_WEIGHTS, base=TINY_BASE)
    prompt["2"]["inputs"]["image"] = "big.png"  # 256 -> 1024 px in 64 px UNet / VAE tiles
    prompt["3"]["inputs"].update(tile_size=64, tile_overlap=16, vae_tile_size=64)
    prompt_id = server.queue(prompt)
    end = time.time() + 60
    while not server.get("/queue")["queue_running"] and time.time() < end:
        time.sleep(0.05)
    time.sleep(1.5)  # well inside the tiles
    start = time.perf_counter()
    server.post("/interrupt", {})
    entry = server.wait(prompt_id)
    TIMINGS["interrupt -> run stopped"] = time.perf_counter() - start
    assert "execution_interrupted" in _messages(entry), entry["status"]
    assert TIMINGS["interrupt -> run stopped"] < 10
    prompt["2"]["inputs"]["image"] = "in.png"
    prompt["3"]["inputs"]["seed"] = 1
    entry, _ = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert _output_image(server, entry, "4").size == (96, 64)


def test_free_memory_releases_the_model(server):
    before = server.log.read_text().count("D3SR: released model")
    start = time.perf_counter()
    server.post("/free", {"unload_models": True, "free_memory": True})
    end = time.time() + 30
    while server.log.read_text().count("D3SR: released model") == before and time.time() < end:
        time.sleep(0.1)
    TIMINGS["/free -> model released"] = time.perf_counter() - start
    assert server.log.read_text().count("D3SR: released model") > before
