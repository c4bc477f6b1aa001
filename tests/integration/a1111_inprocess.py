"""Drives a real A1111 in one process (no HTTP); run BY the webui's Python, not by pytest.

    cd $D3SR_A1111_DIR && venv/bin/python .../a1111_inprocess.py DATA_DIR IMAGE

DATA_DIR is a webui ``--data-dir`` whose ``extensions/`` holds this repository and whose
``models/`` holds the tiny weights. Prints one JSON line (prefixed ``RESULT ``) with what
the hires. fix path, the Extras script with arguments and an interrupted upscale produced.
"""

import json
import os
import shlex
import sys
import time

data_dir, image_path = sys.argv[1], sys.argv[2]
webui = os.getcwd()
sys.path.insert(0, webui)
sys.argv = [
    "webui.py",
    "--skip-torch-cuda-test",
    "--use-cpu",
    "all",
    "--no-half",
    "--no-download-sd-model",
    "--skip-load-model-at-start",
    "--skip-version-check",
    "--nowebui",
    "--data-dir",
    data_dir,
    *shlex.split(os.environ.get("D3SR_A1111_ARGS", "")),  # e.g. Forge without CUDA: --always-cpu
]

from modules import initialize  # noqa: E402

start = time.perf_counter()
initialize.imports()
initialize.initialize()
startup = time.perf_counter() - start

from modules import images, postprocessing, scripts, shared  # noqa: E402
from PIL import Image  # noqa: E402

result = {"startup_s": round(startup, 2), "models_path_arg": shared.cmd_opts.d3sr_models_path}
image = Image.open(image_path).convert("RGB")
names = [u.name for u in shared.sd_upscalers]
result["upscalers"] = names
name = next(n for n in names if n.startswith("D3SR "))
scaler = next(u.scaler for u in shared.sd_upscalers if u.name == name)

# hires. fix path: images.resize_image -> Upscaler.upscale -> do_upscale, counted
calls = []
original = type(scaler).do_upscale


def counting(self, img, selected_model):
    out = original(self, img, selected_model)
    calls.append(((img.width, img.height), (out.width, out.height)))
    return out


type(scaler).do_upscale = counting
t = time.perf_counter()
hires = images.resize_image(0, image, 80, 56, upscaler_name=name)
result["hires"] = {"size": hires.size, "calls": calls[:], "s": round(time.perf_counter() - t, 2)}
calls.clear()
t = time.perf_counter()
x4 = scaler.upscale(image, 4, scaler.scalers[0].data_path)
result["upscale_x4"] = {"size": x4.size, "calls": calls[:], "s": round(time.perf_counter() - t, 2)}
type(scaler).do_upscale = original

# the Extras tab path with the D3SR script's own arguments (what the UI sends)
args = scripts.scripts_postproc.create_args_for_run(
    {
        "Upscale": {  # off; its process_firstpass still reads every value
            "upscale_enabled": False,
            "upscale_mode": 0,
            "upscale_by": 1.0,
            "max_side_length": 0,
            "upscale_to_width": 0,
            "upscale_to_height": 0,
            "upscale_crop": False,
            "upscaler_1_name": "None",
            "upscaler_2_name": "None",
            "upscaler_2_visibility": 0.0,
        },
        "D3SR": {
            "enable": True,
            "model": name,
            "scale": 2.5,
            "tile_size": 64,
            "tile_overlap": 16,
            "color_fix": "adain",
            "strength": 0.5,
            "seed": 7,
            "precision": "fp32",
        },
    }
)
t = time.perf_counter()
outputs, *infos = postprocessing.run_postprocessing(
    0, image, None, "", "", True, *args, save_output=False
)
result["script"] = {
    "size": outputs[0].size,
    # A1111 1.10 and Forge return the infotext in different places
    "info": " ".join([outputs[0].info.get("postprocessing", ""), *map(str, infos)]),
    "s": round(time.perf_counter() - t, 2),
}

# Interrupt between tiles: the input comes back (resized by Upscaler.upscale), not a half result
from a1111_extension import host  # noqa: E402

seen = []


def interrupt_after_first(done, total, _report=None):
    seen.append(done)
    shared.state.interrupted = True


real_progress = host.progress


class _Interrupting:
    def __init__(self, label):
        self.label = label

    def __enter__(self):
        return interrupt_after_first

    def __exit__(self, *exc):
        return False


host.progress = _Interrupting
shared.opts.data["d3sr_tile_size"] = 64
shared.opts.data["d3sr_tile_overlap"] = 8
try:
    shared.state.interrupted = False
    interrupted = scaler.upscale(image, 4, scaler.scalers[0].data_path)
finally:
    host.progress = real_progress
    shared.state.interrupted = False
lanczos = image.resize(interrupted.size, Image.Resampling.LANCZOS)
result["interrupt"] = {
    "size": interrupted.size,
    "progress_calls": len(seen),
    "equals_lanczos_of_input": interrupted.tobytes() == lanczos.tobytes(),
}
# "Unload SD checkpoint" (Settings > Actions) releases the D3SR model too
from modules import sd_models  # noqa: E402

from a1111_extension import models  # noqa: E402

loaded_before = models.CACHE.pipeline is not None
sd_models.model_data.was_loaded_at_least_once = True  # no SD checkpoint here: do not load one
sd_models.unload_model_weights()
result["unload"] = {
    "loaded_before": loaded_before,
    "loaded_after": models.CACHE.pipeline is not None,
}
print("RESULT " + json.dumps(result), flush=True)
