"""The A1111/Forge extension against small stand-ins for the webui modules it imports.

Real tiny weights (``make_tiny_weights``) run through the real engine; only the webui is
replaced (``a1111_stand_ins``). The real webui is exercised by tests/integration/test_a1111.py.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from a1111_stand_ins import install as install_stand_ins
from make_tiny_weights import write_test_image, write_tiny_base, write_tiny_checkpoint
from PIL import Image
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
_LOADED: dict = {}  # loaded tiny pipelines, shared by the tests (every test has its own copy
# of the same weights file, so the key leaves the weights path out)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("a1111-tiny")
    return {
        "base": write_tiny_base(root / "sd21-base-tiny", text_encoder=False),
        "weights": write_tiny_checkpoint(root / "d3sr-tiny.safetensors"),
        "image": write_test_image(root / "input.png", (20, 12)),
    }


@pytest.fixture
def webui(tmp_path, monkeypatch, tiny_files):
    """Stand-in webui with models/D3SR holding the tiny weights and the tiny base chosen in
    the settings; yields the stand-in modules plus the extension's modules."""
    models = tmp_path / "models"
    (models / "D3SR").mkdir(parents=True)
    (models / "D3SR" / "d3sr-tiny.safetensors").write_bytes(tiny_files["weights"].read_bytes())
    mods = install_stand_ins(monkeypatch, str(models))
    mods["modules.shared"].opts.data["d3sr_base_model"] = str(tiny_files["base"])
    ext = {
        name: importlib.import_module(f"a1111_extension.{name}")
        for name in ("host", "settings", "models", "upscaler", "postprocess")
    }
    real_load = ext["models"].load_pipeline

    def load_once(key, precision):
        memo = (key.base, key.vae, key.dtype, key.device, key.strength)
        if memo not in _LOADED:
            _LOADED[memo] = real_load(key, precision)
        return _LOADED[memo]

    monkeypatch.setattr(ext["models"], "load_pipeline", load_once)
    yield {"mods": mods, "shared": mods["modules.shared"], "models_dir": models, **ext}
    ext["models"].CACHE.release()


def image(tiny_files) -> Image.Image:
    return Image.open(tiny_files["image"]).convert("RGB")


# ------------------------------------------------------------------------------ discovery


def test_one_entry_per_weights_file(webui, tmp_path, tiny_files):
    folder = webui["models_dir"] / "D3SR"
    save_file({"x": torch.zeros(2)}, str(folder / "not-d3sr.safetensors"))  # not listed
    (folder / "osediff.pkl").write_bytes(b"")  # its conversion below is listed instead
    (folder / "osediff.safetensors").write_bytes(tiny_files["weights"].read_bytes())
    extra = tmp_path / "elsewhere"  # --d3sr-models-path
    extra.mkdir()
    (extra / "mine.safetensors").write_bytes(tiny_files["weights"].read_bytes())
    (extra / "osediff_v2.pkl").write_bytes(b"")

    scaler = webui["upscaler"].UpscalerD3SR(str(extra))
    names = [s.name for s in scaler.scalers]
    assert names == ["D3SR mine", "D3SR osediff_v2", "D3SR d3sr-tiny", "D3SR osediff"]
    assert Path(scaler.scalers[2].data_path) == folder / "d3sr-tiny.safetensors"
    assert scaler.model_path == str(webui["models_dir"] / "D3SR")
    assert all(s.scaler is scaler for s in scaler.scalers)


def test_no_weights_gives_one_entry_that_explains(webui, tiny_files):
    (webui["models_dir"] / "D3SR" / "d3sr-tiny.safetensors").unlink()
    scaler = webui["upscaler"].UpscalerD3SR(None)
    assert [s.name for s in scaler.scalers] == ["D3SR"]
    with pytest.raises(webui["models"].D3SRError, match=r"No D3SR weights found in .*D3SR"):
        scaler.upscale(image(tiny_files), 2, scaler.scalers[0].data_path)


# ------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("scale", [1.5, 2.7, 4])
def test_exact_target_size_in_one_pass(webui, tiny_files, scale):
    scaler = webui["upscaler"].UpscalerD3SR(None)
    calls = []
    do_upscale = scaler.do_upscale

    def counted(img, selected):
        out = do_upscale(img, selected)
        calls.append(out.size)
        return out

    scaler.do_upscale = counted
    source = image(tiny_files)
    out = scaler.upscale(source, scale, scaler.scalers[0].data_path)
    dest = (int(20 * scale // 8 * 8), int(12 * scale // 8 * 8))
    assert out.size == dest
    assert calls == [dest]  # one D3SR pass already at the final size: no loop, no resize
    lanczos = source.resize(dest, Image.Resampling.LANCZOS)
    assert out.tobytes() != lanczos.tobytes()


def test_target_not_larger_needs_no_model(webui, tiny_files, monkeypatch):
    monkeypatch.setattr(webui["models"], "load_pipeline", lambda *a: pytest.fail("loaded"))
    source = image(tiny_files)
    out = webui["upscaler"].upscale_image(source, "unused", (16, 8), webui["settings"].current())
    assert out.size == (16, 8)


# ------------------------------------------------------------------------------ cache


def test_model_cached_per_key_and_released(webui, tiny_files, monkeypatch):
    models, shared = webui["models"], webui["shared"]
    loads = []
    real = models.load_pipeline
    monkeypatch.setattr(models, "load_pipeline", lambda key, p: loads.append(key) or real(key, p))
    scaler = webui["upscaler"].UpscalerD3SR(None)
    path = scaler.scalers[0].data_path
    scaler.upscale(image(tiny_files), 2, path)
    scaler.upscale(image(tiny_files), 3, path)
    assert len(loads) == 1
    shared.opts.data["d3sr_strength"] = 0.5
    scaler.upscale(image(tiny_files), 2, path)
    assert [k.strength for k in loads] == [1.0, 0.5]
    assert loads[0].dtype == torch.float32 and loads[0].device == torch.device("cpu")

    webui["upscaler"].install_hooks()
    sd_models = webui["mods"]["modules.sd_models"]
    sd_models.unload_model_weights()  # the webui unloads its checkpoint: D3SR goes too
    assert sd_models.unloads == [1] and models.CACHE.pipeline is None

    shared.opts.data["d3sr_keep_loaded"] = False
    scaler.upscale(image(tiny_files), 2, path)
    assert len(loads) == 3 and models.CACHE.pipeline is None


def test_out_of_memory_moves_the_generation_model_once(webui, tiny_files, monkeypatch, capsys):
    up, sd_models = webui["upscaler"], webui["mods"]["modules.sd_models"]
    real_run, attempts = up._run, []

    def run_oom_once(*args):
        attempts.append(1)
        if len(attempts) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_run(*args)

    monkeypatch.setattr(up, "_run", run_oom_once)
    scaler = up.UpscalerD3SR(None)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # nothing loaded to make room with
        scaler.upscale(image(tiny_files), 2, scaler.scalers[0].data_path)
    assert sd_models.unloads == []
    attempts.clear()
    sd_models.model_data.sd_model = object()  # the user's checkpoint is loaded
    out = scaler.upscale(image(tiny_files), 2, scaler.scalers[0].data_path)
    assert out.size == (40, 24) and len(attempts) == 2 and sd_models.unloads == [1]
    assert "moving the generation checkpoint to RAM" in capsys.readouterr().err


def test_forge_frees_memory_before_gpu_work(webui, monkeypatch):
    host, calls = webui["host"], []
    forge = type(sys)("modules_forge")
    forge.__path__ = []
    utils = type(sys)("modules_forge.utils")
    utils.prepare_free_memory = lambda aggressive=False: calls.append(aggressive)
    monkeypatch.setitem(sys.modules, "modules_forge", forge)
    monkeypatch.setitem(sys.modules, "modules_forge.utils", utils)
    assert host.forge_free_memory(torch.device("cpu")) is False and calls == []
    assert host.forge_free_memory(torch.device("cuda")) is True and calls == [False]


def test_use_cpu_and_precision(webui):
    host, shared = webui["host"], webui["shared"]
    shared.cmd_opts.use_cpu = ["d3sr"]
    assert host.device() == torch.device("cpu")
    shared.cmd_opts.use_cpu = []
    assert host.device() == torch.device("cuda")  # the webui's choice, not ours
    assert host.precision("auto") == "fp32"  # --no-half
    shared.cmd_opts.no_half = False
    assert host.precision("auto") == "auto" and host.precision("bf16") == "bf16"


# ------------------------------------------------------------------------------ settings


def test_settings_defaults_when_ui_never_built(webui):
    settings, shared = webui["settings"], webui["shared"]
    shared.opts.data.clear()
    assert settings.current() == settings.RunParams()
    assert settings.RunParams().base_model == "Automatic"
    shared.opts.data.update(
        d3sr_tile_size=100,
        d3sr_color_fix="sepia",
        d3sr_precision=None,
        d3sr_strength="x",
        d3sr_tile_overlap=-3,
    )
    params = settings.current()
    assert params.tile_size == 96  # a multiple of 8
    assert (params.color_fix, params.precision, params.strength, params.tile_overlap) == (
        "wavelet",
        "auto",
        1.0,
        256,
    )
    assert settings.current(color_fix="adain", seed=None).color_fix == "adain"


def test_settings_registered_in_upscaling_section(webui, monkeypatch):
    settings, shared = webui["settings"], webui["shared"]
    added = {}

    class OptionInfo:
        def __init__(self, default, label, component, args=None, **kw):
            self.default, self.label, self.args, self.kw = default, label, args, kw

    fake_gradio = type(sys)("gradio")
    for name in ("Dropdown", "Slider", "Radio", "Checkbox"):
        setattr(fake_gradio, name, name)
    monkeypatch.setitem(sys.modules, "gradio", fake_gradio)
    shared.OptionInfo = OptionInfo
    shared.opts.add_option = lambda key, info: added.setdefault(key, info)
    webui["mods"]["modules.script_callbacks"].callbacks["ui_settings"].clear()
    settings.register()
    for callback in webui["mods"]["modules.script_callbacks"].callbacks["ui_settings"]:
        callback()
    assert set(added) == {
        "d3sr_base_model",
        "d3sr_tile_size",
        "d3sr_tile_overlap",
        "d3sr_color_fix",
        "d3sr_precision",
        "d3sr_strength",
        "d3sr_keep_loaded",
    }
    assert {info.kw["section"] for info in added.values()} == {("upscaling", "Upscaling")}
    defaults = settings.RunParams()
    assert added["d3sr_tile_size"].default == defaults.tile_size
    assert added["d3sr_keep_loaded"].default is True
    assert added["d3sr_base_model"].args()["choices"][0] == "Automatic"


def test_base_model_choices_and_messages(webui, tiny_files, monkeypatch, tmp_path):
    models = webui["models"]
    sd = webui["models_dir"] / "Stable-diffusion"
    (sd / "sub").mkdir(parents=True)
    (sd / "sub" / "dreamshaper.safetensors").write_bytes(b"")
    (sd / "v2-1_512-ema-pruned.safetensors").write_bytes(b"")
    assert models.base_model_choices() == [
        "Automatic",
        "v2-1_512-ema-pruned.safetensors",
        "sub/dreamshaper.safetensors",
    ]
    assert models.resolve_base("Automatic") == sd / "v2-1_512-ema-pruned.safetensors"
    with pytest.raises(models.D3SRError, match=r"'nope.ckpt' \(Settings > Upscaling\)"):
        models.resolve_base("nope.ckpt")
    (sd / "v2-1_512-ema-pruned.safetensors").unlink()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for name in (
        "D3SR_BASE",
        "D3SR_MODELS_DIR",
        "A1111_PATH",
        "WEBUI_PATH",
        "COMFYUI_PATH",
        "HF_HOME",
        "HF_HUB_CACHE",
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(models.D3SRError, match="v2-1_512-ema-pruned.safetensors into"):
        models.resolve_base("Automatic")


def test_wrong_family_base_is_explained(webui, tiny_files, tmp_path):
    sdxl = tmp_path / "sdxl-base"
    for sub, config in (("unet", {"cross_attention_dim": 2048}), ("vae", {})):
        (sdxl / sub).mkdir(parents=True)
        (sdxl / sub / "config.json").write_text(json.dumps(config))
    webui["shared"].opts.data["d3sr_base_model"] = str(sdxl)
    scaler = webui["upscaler"].UpscalerD3SR(None)
    with pytest.raises(webui["models"].D3SRError, match="SDXL.*Settings > Upscaling"):
        scaler.upscale(image(tiny_files), 2, scaler.scalers[0].data_path)


# ------------------------------------------------------------------------------ progress


def test_interrupt_between_tiles_returns_the_input(webui, tiny_files):
    shared = webui["shared"]
    shared.opts.data.update(d3sr_tile_size=64, d3sr_tile_overlap=8)
    shared.state.sampling_steps, shared.state.textinfo = 20, "hires"
    seen = []

    class Watch:
        def __setattr__(self, name, value):
            object.__setattr__(self, name, value)
            if name == "sampling_step":
                seen.append(value)
                if len(seen) == 2:
                    shared.state.interrupted = True  # pressed while the first tiles run

    state = Watch()
    for name, value in vars(shared.state).items():
        object.__setattr__(state, name, value)
    shared.state = state
    scaler = webui["upscaler"].UpscalerD3SR(None)
    source = image(tiny_files)
    out = scaler.upscale(source, 4, scaler.scalers[0].data_path)
    # stopped at the check after the second report (then the saved counter was restored)
    assert len(seen) == 3 and seen[-1] == 0
    assert out.tobytes() == source.resize((80, 48), Image.Resampling.LANCZOS).tobytes()
    assert (state.sampling_steps, state.textinfo) == (20, "hires")  # restored


def test_progress_reaches_total(webui, tiny_files):
    shared = webui["shared"]
    shared.opts.data.update(d3sr_tile_size=64, d3sr_tile_overlap=8)
    reports = []
    host = webui["host"]
    with host.progress("x") as report:
        report(3, 10)
        reports.append((shared.state.sampling_step, shared.state.sampling_steps))
    assert reports == [(3, 10)] and shared.state.sampling_steps == 0


# ------------------------------------------------------------------------------ Extras script


def test_script_with_none_arguments(webui, tiny_files):
    post = webui["postprocess"]
    pp_cls = webui["mods"]["modules.scripts_postprocessing"].PostprocessedImage
    script = post.ScriptPostprocessingD3SR()
    none_args = dict.fromkeys(
        [
            "enable",
            "model",
            "scale",
            "tile_size",
            "tile_overlap",
            "color_fix",
            "strength",
            "seed",
            "precision",
        ]
    )
    source = image(tiny_files)
    pp = pp_cls(source)
    script.process_firstpass(pp, **none_args)
    script.process(pp, **none_args)
    assert pp.image is source and pp.info == {}  # disabled, nothing to report

    # the Upscale step used a D3SR upscaler on this image: its parameters go to the infotext
    pp = pp_cls(source)
    script.process_firstpass(pp, **none_args)
    scaler = webui["upscaler"].UpscalerD3SR(None)
    pp.image = scaler.upscale(source, 2, scaler.scalers[0].data_path)
    script.process(pp, **none_args)
    assert pp.info["D3SR model"] == "d3sr-tiny" and pp.info["D3SR color fix"] == "wavelet"


def test_script_enabled_with_arguments(webui, tiny_files):
    post = webui["postprocess"]
    pp = webui["mods"]["modules.scripts_postprocessing"].PostprocessedImage(image(tiny_files))
    script = post.ScriptPostprocessingD3SR()
    script.process_firstpass(pp)
    script.process(
        pp,
        enable=True,
        model="D3SR d3sr-tiny",
        scale=2.5,
        tile_size=None,
        tile_overlap=None,
        color_fix="none",
        strength=0.8,
        seed=5,
        precision="fp32",
    )
    assert pp.image.size == (50, 30)
    assert pp.info["D3SR scale"] == 2.5 and pp.info["D3SR seed"] == 5
    assert pp.info["D3SR color fix"] == "none" and pp.info["D3SR strength"] == 0.8
    with pytest.raises(webui["models"].D3SRError, match="no D3SR weights named 'D3SR x'"):
        script.process(pp, enable=True, model="D3SR x")


# ------------------------------------------------------------------------------ registration


def test_fixed_upscaler_list_gets_d3sr_once(webui):
    modelloader = webui["mods"]["modules.modelloader"]
    shared = webui["shared"]
    up = webui["upscaler"]
    up.install_hooks()
    up.install_hooks()  # scripts reloaded: not wrapped twice
    modelloader.load_upscalers()
    modelloader.load_upscalers()
    names = [s.name for s in shared.sd_upscalers]
    assert names == ["None", "D3SR d3sr-tiny"]
    # A1111/Forge: the webui already found the subclass -> nothing appended
    shared.sd_upscalers = [*shared.sd_upscalers]
    up._add_missing_scalers(shared)
    assert [s.name for s in shared.sd_upscalers] == names
    for callback in webui["mods"]["modules.script_callbacks"].callbacks["script_unloaded"]:
        callback()
    assert not getattr(modelloader.load_upscalers, up.HOOK_MARK, False)


def test_scripts_shim_registers_everything(webui):
    mods = webui["mods"]
    spec = importlib.util.spec_from_file_location("d3sr_script", REPO / "scripts" / "d3sr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = mods["modules.scripts_postprocessing"].ScriptPostprocessing
    # what the webui's loader collects from the module: our subclass, never the base class
    found = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, base)]
    assert [c.name for c in found] == ["D3SR"]
    assert mods["modules.script_callbacks"].callbacks["ui_settings"]
    assert mods["modules.upscaler"].Upscaler.__subclasses__()[-1].__name__ == "UpscalerD3SR"


def test_preload_adds_models_path(webui):
    import argparse

    spec = importlib.util.spec_from_file_location("d3sr_preload", REPO / "preload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = argparse.ArgumentParser()
    module.preload(parser)
    assert parser.parse_args([]).d3sr_models_path == str(webui["models_dir"] / "D3SR")
