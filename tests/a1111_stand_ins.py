"""Minimal stand-ins for the A1111 modules the extension imports (``modules.*``, ``launch``).

Only what the extension touches, with A1111 v1.10.1's behaviour where the extension relies
on it -- notably ``Upscaler.upscale`` (target ``floor(side * scale / 8) * 8``, up to three
``do_upscale`` passes, a final LANCZOS resize), which is written out here from the webui's
source so the tests check the extension against that contract, not against itself.
"""

from __future__ import annotations

import os
import sys
import types
from argparse import Namespace

from PIL import Image

LANCZOS = Image.Resampling.LANCZOS


class Options:
    """``shared.opts``: registered options in ``data``; unknown names raise AttributeError
    (as A1111's does before the settings UI registered them)."""

    def __init__(self, **data):
        self.__dict__["data"] = dict(data)

    def __getattr__(self, name):
        try:
            return self.__dict__["data"][name]
        except KeyError:
            raise AttributeError(name) from None


def build(models_path: str) -> dict[str, types.ModuleType]:
    """Fresh stand-in modules for one test, rooted at ``models_path``."""
    mods: dict[str, types.ModuleType] = {}

    def module(name: str, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        mods[name] = mod
        return mod

    package = module("modules")
    package.__path__ = []

    shared = module(
        "modules.shared",
        opts=Options(),
        cmd_opts=Namespace(d3sr_models_path=None, no_half=True, ckpt_dir=None, use_cpu=["all"]),
        state=Namespace(
            interrupted=False, skipped=False, sampling_step=0, sampling_steps=0, textinfo=None
        ),
        models_path=models_path,
        sd_upscalers=[],
        sd_model=None,
        device="cpu",
    )
    module("modules.paths", models_path=models_path)

    gc_calls = []

    def get_device_for(task):
        use_cpu = shared.cmd_opts.use_cpu
        return "cpu" if task in use_cpu or "all" in use_cpu else "cuda"

    module(
        "modules.devices",
        get_device_for=get_device_for,
        torch_gc=lambda: gc_calls.append(1),
        gc_calls=gc_calls,
        cpu="cpu",
    )

    class Upscaler:
        name = None
        model_path = None
        model_name = None
        model_url = None
        user_path = None

        def __init__(self, create_dirs=False):
            self.scale = 1
            if self.model_path is None and self.name:
                self.model_path = os.path.join(shared.models_path, self.name)

        def do_upscale(self, img, selected_model):
            return img

        def upscale(self, img, scale, selected_model=None):
            self.scale = scale
            dest_w = int((img.width * scale) // 8 * 8)
            dest_h = int((img.height * scale) // 8 * 8)
            for i in range(3):
                if img.width >= dest_w and img.height >= dest_h and (i > 0 or scale != 1):
                    break
                if shared.state.interrupted:
                    break
                shape = (img.width, img.height)
                img = self.do_upscale(img, selected_model)
                if shape == (img.width, img.height):
                    break
            if img.width != dest_w or img.height != dest_h:
                img = img.resize((int(dest_w), int(dest_h)), resample=LANCZOS)
            return img

    class UpscalerData:
        def __init__(self, name, path, upscaler=None, scale=4, model=None):
            self.name, self.data_path, self.scaler, self.scale = name, path, upscaler, scale

    class UpscalerNone(Upscaler):
        name = "None"

        def __init__(self, dirname=None):
            super().__init__()
            self.scalers = [UpscalerData("None", None, self)]

    module(
        "modules.upscaler", Upscaler=Upscaler, UpscalerData=UpscalerData, UpscalerNone=UpscalerNone
    )

    def load_upscalers():
        # reForge / Forge Neo: a fixed list, extension upscalers are not looked for
        shared.sd_upscalers = list(UpscalerNone().scalers)

    module("modules.modelloader", load_upscalers=load_upscalers)

    callbacks = {"ui_settings": [], "script_unloaded": []}
    module(
        "modules.script_callbacks",
        callbacks=callbacks,
        on_ui_settings=lambda fn, **kw: callbacks["ui_settings"].append(fn),
        on_script_unloaded=lambda fn, **kw: callbacks["script_unloaded"].append(fn),
    )

    class ScriptPostprocessing:
        name = None
        order = 1000

    class PostprocessedImage:
        def __init__(self, image):
            self.image = image
            self.info = {}

    module(
        "modules.scripts_postprocessing",
        ScriptPostprocessing=ScriptPostprocessing,
        PostprocessedImage=PostprocessedImage,
    )

    unloads = []
    module(
        "modules.sd_models",
        unload_model_weights=lambda *a, **k: unloads.append(1),
        unloads=unloads,
        model_data=Namespace(sd_model=None),  # the loaded generation model, if any
    )

    pip_calls = []
    module(
        "launch",
        is_installed=lambda name: True,
        run_pip=lambda cmd, desc=None: pip_calls.append((cmd, desc)),
        pip_calls=pip_calls,
    )
    return mods


def install(monkeypatch, models_path: str) -> dict[str, types.ModuleType]:
    """Put fresh stand-ins into ``sys.modules`` and forget any imported extension modules."""
    mods = build(models_path)
    for name in [
        n for n in sys.modules if n == "a1111_extension" or n.startswith("a1111_extension.")
    ]:
        monkeypatch.delitem(sys.modules, name)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return mods
