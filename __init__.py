"""ComfyUI custom-node entry for a clone of this repository in ``ComfyUI/custom_nodes/<any name>``.

ComfyUI imports this file as a package named after its folder path, so everything here is
relative or absolute-by-package-name, never built from the folder name. Import is light: no
model loading, no network, no torch work (the nodes import ``d3sr_core`` when they run).
Outside ComfyUI (e.g. pytest collecting this folder as a package) it exports nothing.
"""

import importlib.util
import os
import sys

# A registry or zip install may skip `pip install` of this repository; the engine then comes
# from this checkout. An installed d3sr_core (install.py, pip) always wins.
if importlib.util.find_spec("d3sr_core") is None:
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

if importlib.util.find_spec("comfy_api") is not None:  # inside ComfyUI
    from .comfyui_d3sr import D3SRExtension, comfy_entrypoint

    __all__ = ["D3SRExtension", "comfy_entrypoint"]
