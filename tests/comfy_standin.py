"""A minimal in-test stand-in for the ComfyUI modules the node pack imports.

Only what ``comfyui_d3sr`` touches: ``comfy_api.latest`` (``io`` types/Schema/NodeOutput,
``ComfyExtension``), ``comfy.model_management`` (devices, ``load_models_gpu``, interrupt
flag), ``comfy.model_patcher.ModelPatcher``, ``comfy.utils.ProgressBar`` and
``folder_paths``. Behaviour follows ComfyUI v0.12.1 (see docs in the reference notes); the
real host is exercised by ``tests/integration/test_comfyui.py``.
"""

from __future__ import annotations

import os
import sys
import types
from types import SimpleNamespace

import torch

# ----------------------------------------------------------------------------- comfy_api.latest


class _Type:
    def __init__(self, io_type: str):
        self.io_type = io_type

    def Input(self, id, optional=False, **options):  # noqa: N802 - ComfyUI's spelling
        return SimpleNamespace(id=id, io_type=self.io_type, optional=optional, **options)

    def Output(self, id=None, display_name=None, **options):  # noqa: N802
        return SimpleNamespace(id=id, io_type=self.io_type, display_name=display_name, **options)


class NodeOutput:
    def __init__(self, *values, ui=None):
        self.values = values
        self.ui = ui


class ComfyNode:
    pass


class ComfyExtension:
    async def on_load(self) -> None:
        pass


def _io_module():
    io = types.ModuleType("comfy_api.latest.io")
    for name, io_type in {
        "Image": "IMAGE",
        "Mask": "MASK",
        "Latent": "LATENT",
        "Vae": "VAE",
        "Conditioning": "CONDITIONING",
        "Float": "FLOAT",
        "Int": "INT",
        "Combo": "COMBO",
        "Boolean": "BOOLEAN",
    }.items():
        setattr(io, name, _Type(io_type))
    io.Custom = _Type
    io.Schema = lambda **fields: SimpleNamespace(**fields)
    io.NodeOutput = NodeOutput
    io.ComfyNode = ComfyNode
    return io


# ----------------------------------------------------------------------------- comfy.*


class InterruptProcessingException(Exception):
    pass


class ModelPatcher:
    """Records loads/unloads; moves the module like ComfyUI's (full loads only)."""

    def __init__(self, model, load_device, offload_device, size=0):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        model.device = offload_device
        self.loads = 0

    def load(self):
        self.model.to(self.load_device)
        self.model.device = self.load_device
        self.loads += 1

    def detach(self):
        self.model.to(self.offload_device)
        self.model.device = self.offload_device


class ModelManagement(types.ModuleType):
    def __init__(self):
        super().__init__("comfy.model_management")
        self.interrupt = False
        self.OOM_EXCEPTION = torch.cuda.OutOfMemoryError
        self.InterruptProcessingException = InterruptProcessingException
        self.load_calls = []

    def get_torch_device(self):
        return torch.device("cpu")

    def unet_offload_device(self):
        return torch.device("cpu")

    def load_models_gpu(self, models, memory_required=0, force_full_load=False, **_):
        self.load_calls.append((len(models), force_full_load))
        for m in models:
            m.load()

    def processing_interrupted(self):
        return self.interrupt

    def throw_exception_if_processing_interrupted(self):
        if self.interrupt:
            self.interrupt = False
            raise InterruptProcessingException()


class ProgressBar:
    instances: list[ProgressBar] = []

    def __init__(self, total, node_id=None):
        self.total = total
        self.updates = []
        ProgressBar.instances.append(self)

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.updates.append((value, self.total))


# ----------------------------------------------------------------------------- folder_paths


def _folder_paths(models_dir: str):
    fp = types.ModuleType("folder_paths")
    fp.models_dir = models_dir
    fp.supported_pt_extensions = {
        ".ckpt",
        ".pt",
        ".pt2",
        ".bin",
        ".pth",
        ".safetensors",
        ".pkl",
        ".sft",
    }
    fp.folder_names_and_paths = {
        key: ([os.path.join(models_dir, key)], set(fp.supported_pt_extensions))
        for key in ("checkpoints", "vae")
    }
    fp.folder_names_and_paths["diffusers"] = ([os.path.join(models_dir, "diffusers")], {"folder"})

    def add_model_folder_path(name, path, is_default=False):
        paths, exts = fp.folder_names_and_paths.setdefault(name, ([], set()))
        if path not in paths:
            paths.insert(0, path) if is_default else paths.append(path)

    def get_folder_paths(name):
        return list(fp.folder_names_and_paths[name][0])

    def get_filename_list(name):
        paths, exts = fp.folder_names_and_paths[name]
        out = []
        for root in paths:
            for current, _dirs, files in os.walk(root, followlinks=True):
                for f in files:
                    if not exts or os.path.splitext(f)[1].lower() in exts:
                        out.append(
                            os.path.relpath(os.path.join(current, f), root).replace(os.sep, "/")
                        )
        return sorted(set(out))

    def get_full_path(name, filename):
        for root in fp.folder_names_and_paths[name][0]:
            path = os.path.join(root, filename)
            if os.path.isfile(path):
                return path
        return None

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    return fp


def install(monkeypatch, models_dir: str) -> SimpleNamespace:
    """Put the stand-ins into ``sys.modules`` (undone by ``monkeypatch``); returns them."""
    api = types.ModuleType("comfy_api")
    latest = types.ModuleType("comfy_api.latest")
    latest.io = _io_module()
    latest.ComfyExtension = ComfyExtension
    api.latest = latest
    comfy = types.ModuleType("comfy")
    mm = ModelManagement()
    patcher = types.ModuleType("comfy.model_patcher")
    patcher.ModelPatcher = ModelPatcher
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    comfy.model_management, comfy.model_patcher, comfy.utils = mm, patcher, utils
    fp = _folder_paths(models_dir)
    modules = {
        "comfy_api": api,
        "comfy_api.latest": latest,
        "comfy": comfy,
        "comfy.model_management": mm,
        "comfy.model_patcher": patcher,
        "comfy.utils": utils,
        "folder_paths": fp,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in [n for n in sys.modules if n == "comfyui_d3sr" or n.startswith("comfyui_d3sr.")]:
        monkeypatch.delitem(sys.modules, name)
    ProgressBar.instances.clear()
    return SimpleNamespace(io=latest.io, mm=mm, folder_paths=fp, ProgressBar=ProgressBar)
