"""The ComfyUI node pack driven through its V3 schema, with stand-ins for the host modules."""

import gc
import math

import pytest
import torch
import torch.nn.functional as F
from comfy_standin import install
from make_tiny_weights import write_tiny_base, write_tiny_checkpoint
from test_latent import reference_sr_latent
from tiny_models import TINY_CONTEXT_DIM

from d3sr_core.inference.options import UpscaleOptions
from d3sr_core.inference.pipeline import D3SRPipeline
from d3sr_core.loading.generator import load_generator

WEIGHTS = "tiny/d3sr-tiny.safetensors"
BASE = "diffusers: tiny-sd21-base"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_tiny_checkpoint(
        (models / "d3sr" / "tiny").mkdir(parents=True) or models / "d3sr" / WEIGHTS
    )
    (models / "d3sr" / "README.txt").write_text("not weights")
    (models / "d3sr" / "osediff.pkl").write_bytes(b"")
    write_tiny_base(models / "diffusers" / "tiny-sd21-base", text_encoder=False)
    (models / "checkpoints").mkdir()
    (models / "checkpoints" / "sd15.safetensors").write_bytes(b"")
    (models / "vae").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        host = install(mp, str(models))
        import asyncio

        import comfyui_d3sr
        from comfyui_d3sr import host as d3sr_host
        from comfyui_d3sr import nodes

        extension = asyncio.run(comfyui_d3sr.comfy_entrypoint())
        host.nodes = nodes
        host.host = d3sr_host
        host.node_list = asyncio.run(extension.get_node_list())
        host.models = models
        yield host


def run(node, **inputs):
    with torch.inference_mode():  # as ComfyUI runs every node
        return node.execute(**inputs).values


def validate(node, **values):
    """ComfyUI's prompt validation: schema min/max/options, except inputs ``validate_inputs``
    takes (those it checks itself), then ``validate_inputs``."""
    import inspect

    schema = node.define_schema()
    own = inspect.signature(node.validate_inputs).parameters
    for spec in schema.inputs:
        if spec.id not in values or spec.id in own:
            continue
        value = values[spec.id]
        if getattr(spec, "min", None) is not None and value < spec.min:
            return f"{spec.id}: {value} smaller than min of {spec.min}"
        if getattr(spec, "max", None) is not None and value > spec.max:
            return f"{spec.id}: {value} bigger than max of {spec.max}"
        if spec.io_type == "COMBO" and value not in spec.options:
            return f"{spec.id}: {value!r} not in list"
    return node.validate_inputs(**{k: v for k, v in values.items() if k in own})


def load(comfy, strength=1.0, precision="fp32", **kw):
    args = dict(weights=WEIGHTS, base=BASE, vae="from base", strength=strength)
    args.update(precision=precision, device="cpu")
    args.update(kw)
    return run(comfy.nodes.D3SRModelLoader, **args)[0]


def test_schema_ids_inputs_outputs_defaults(comfy):
    n = comfy.nodes
    assert [c.define_schema().node_id for c in comfy.node_list] == [
        "D3SRModelLoader",
        "D3SRUpscaleImage",
        "D3SRUpscaleLatent",
    ]
    loader = n.D3SRModelLoader.define_schema()
    assert [(i.id, i.io_type) for i in loader.inputs] == [
        ("weights", "COMBO"),
        ("base", "COMBO"),
        ("vae", "COMBO"),
        ("strength", "FLOAT"),
        ("precision", "COMBO"),
        ("device", "COMBO"),
    ]
    opts = {i.id: i for i in loader.inputs}
    assert opts["weights"].options == ["osediff.pkl", WEIGHTS]  # README.txt is not listed
    assert opts["base"].options == ["sd15.safetensors", BASE]
    assert opts["vae"].options == ["from base"] and opts["vae"].default == "from base"
    assert opts["precision"].options == ["auto", "fp32", "fp16", "bf16"]
    assert opts["strength"].default == 1.0
    assert [o.io_type for o in loader.outputs] == ["D3SR_MODEL"]
    image = n.D3SRUpscaleImage.define_schema()
    common = ["scale", "tile_size", "tile_overlap", "vae_tile_size", "color_fix", "seed"]
    assert [i.id for i in image.inputs] == ["model", "image", *common, "mask", "conditioning"]
    assert [(i.io_type, i.optional) for i in image.inputs[-2:]] == [
        ("MASK", True),
        ("CONDITIONING", True),
    ]
    assert [o.io_type for o in image.outputs] == ["IMAGE", "MASK"]
    latent = n.D3SRUpscaleLatent.define_schema()
    assert [i.id for i in latent.inputs] == ["model", "samples", *common, "vae", "conditioning"]
    assert [o.io_type for o in latent.outputs] == ["LATENT"]
    d = {i.id: i for i in image.inputs}
    assert (d["scale"].default, d["tile_size"].default, d["vae_tile_size"].default) == (4.0, 0, 0)
    assert d["color_fix"].default == "wavelet" and d["seed"].control_after_generate
    # models/d3sr was registered with ComfyUI's model extensions
    assert comfy.folder_paths.get_folder_paths("d3sr") == [str(comfy.models / "d3sr")]


def test_extra_model_paths_entry_is_kept(comfy, tmp_path):
    fp = comfy.folder_paths
    saved = fp.folder_names_and_paths.pop("d3sr")
    try:
        # extra_model_paths.yaml is applied before custom nodes load and creates the key
        fp.add_model_folder_path("d3sr", str(tmp_path / "shared"))
        comfy.host.register_model_folder()
        assert fp.get_folder_paths("d3sr") == [str(tmp_path / "shared"), str(comfy.models / "d3sr")]
    finally:
        fp.folder_names_and_paths["d3sr"] = saved


def test_validation(comfy):
    node = comfy.nodes.D3SRUpscaleImage
    good = dict(scale=2.0, tile_size=0, tile_overlap=64, vae_tile_size=0, color_fix="none", seed=1)
    assert validate(node, **good) is True
    assert validate(node, **{**good, "tile_size": 512, "vae_tile_size": 256}) is True
    assert "multiple of 8 >= 64" in validate(node, **{**good, "tile_size": 60})
    assert "multiple of 8 >= 64" in validate(node, **{**good, "tile_size": 100})
    assert "vae_tile_size" in validate(node, **{**good, "vae_tile_size": 16})
    assert "smaller than min" in validate(node, **{**good, "scale": 1.0})
    assert "not in list" in validate(node, **{**good, "color_fix": "lab"})
    # missing files pass validation: the run reports them with where to put them
    loader = comfy.nodes.D3SRModelLoader
    assert validate(loader, weights="gone.safetensors", base="x", vae="y", strength=1.0) is True
    assert "bigger than max" in validate(
        loader, weights=WEIGHTS, base=BASE, vae="from base", strength=5.0
    )


def test_image_conversions_are_exact(comfy):
    from comfyui_d3sr.convert import bchw_to_image, image_to_bchw

    x = torch.rand(2, 5, 7, 3)
    t = image_to_bchw(x)
    assert t.shape == (2, 3, 5, 7) and t[1, 2, 4, 6] == x[1, 4, 6, 2]
    assert torch.equal(bchw_to_image(t), x)


def test_upscale_image_equals_engine_and_reports_progress(comfy):
    model = load(comfy)
    image = torch.rand(2, 6, 5, 3, generator=torch.Generator().manual_seed(0))
    args = dict(
        scale=1.5, tile_size=64, tile_overlap=16, vae_tile_size=32, color_fix="wavelet", seed=3
    )
    comfy.ProgressBar.instances.clear()
    out, mask = run(comfy.nodes.D3SRUpscaleImage, model=model, image=image, **args)
    assert out.shape == (2, 9, 8, 3) and out.dtype == torch.float32 and mask.shape == (2, 9, 8)
    assert out.device.type == "cpu" and 0 <= out.min() and out.max() <= 1
    options = UpscaleOptions(scale=1.5, seed=3, tile_size=64, tile_overlap=16, vae_tile_size=32)
    expected = D3SRPipeline(model.loaded.generator).upscale_tensor(image.movedim(-1, 1), options)
    torch.testing.assert_close(out, expected.movedim(1, -1), atol=1e-6, rtol=0)
    (bar,) = comfy.ProgressBar.instances
    values = [v for v, _ in bar.updates]
    assert values == sorted(set(values)) and bar.updates[-1] == (200, 200)
    assert comfy.mm.load_calls[-1] == (1, True)  # through ComfyUI's loader, fully loaded


def test_interrupt_stops_within_a_tile_and_model_stays_usable(comfy):
    model = load(comfy)
    image = torch.rand(1, 16, 16, 3)
    args = dict(
        scale=2.0, tile_size=64, tile_overlap=16, vae_tile_size=32, color_fix="none", seed=0
    )
    bars = comfy.ProgressBar.instances
    bars.clear()
    original = comfy.ProgressBar.update_absolute

    def press_cancel_after_two(self, value, total=None, preview=None):
        original(self, value, total, preview)
        if len(self.updates) == 2:
            comfy.mm.interrupt = True

    comfy.ProgressBar.update_absolute = press_cancel_after_two
    try:
        with pytest.raises(comfy.mm.InterruptProcessingException):
            run(comfy.nodes.D3SRUpscaleImage, model=model, image=image, **args)
    finally:
        comfy.ProgressBar.update_absolute = original
    assert len(bars[0].updates) == 2 and comfy.mm.interrupt is False  # flag consumed
    out, _ = run(comfy.nodes.D3SRUpscaleImage, model=model, image=image, **args)
    assert out.shape == (1, 32, 32, 3)


def test_strength_change_reuses_the_base(comfy, tmp_path):
    before = comfy.host.load_count
    full = load(comfy, strength=1.0)
    half = load(comfy, strength=0.5)
    assert comfy.host.load_count - before <= 1 and half.loaded is full.loaded
    image = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(1))
    args = dict(scale=2.0, tile_size=0, tile_overlap=0, vae_tile_size=0, color_fix="none", seed=0)
    out_half = run(comfy.nodes.D3SRUpscaleImage, model=half, image=image, **args)[0]
    out_full = run(comfy.nodes.D3SRUpscaleImage, model=full, image=image, **args)[0]
    # independent reference: a generator merged at 0.5 from scratch
    fresh = load_generator(
        comfy.models / "d3sr" / WEIGHTS, comfy.models / "diffusers" / "tiny-sd21-base", strength=0.5
    )
    ref = D3SRPipeline(fresh).upscale_tensor(
        image.movedim(-1, 1), UpscaleOptions(scale=2.0, seed=0, color_fix="none")
    )
    torch.testing.assert_close(out_half, ref.movedim(1, -1), atol=1e-4, rtol=0)
    assert (out_half - out_full).abs().max() > 1e-4
    assert comfy.host.load_count - before <= 1


def test_model_is_released_when_comfyui_drops_it(comfy, caplog):
    import logging

    model = load(comfy, precision="bf16")
    key = model.loaded.key
    assert comfy.host._CACHE[key]() is model.loaded
    with caplog.at_level(logging.INFO, logger="d3sr"):
        del model
        gc.collect()
    assert comfy.host._CACHE[key]() is None
    assert "D3SR: released model d3sr-tiny.safetensors" in caplog.text


def test_upscale_latent_raw_convention_and_extras(comfy):
    model = load(comfy)
    raw = torch.randn(2, 4, 4, 5, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 1, 32, 40)
    mask[:, :, :16] = 0
    samples = {"samples": raw, "noise_mask": mask, "batch_index": [3, 4]}
    args = dict(scale=2.0, tile_size=0, tile_overlap=0, vae_tile_size=0, color_fix="none", seed=0)
    (out,) = run(comfy.nodes.D3SRUpscaleLatent, model=model, samples=samples, **args)
    expected, _ = reference_sr_latent(model.loaded.generator, raw[1:], 2.0)
    assert out["samples"].shape == (2, 4, 8, 10) and out["batch_index"] == [3, 4]
    torch.testing.assert_close(out["samples"][1:], expected, atol=2e-4, rtol=1e-4)
    assert out["noise_mask"].shape == (2, 1, 64, 80)
    assert out["noise_mask"][:, :, :30].max() == 0 and out["noise_mask"][:, :, 34:].min() == 1


class ComfyStyleVAE:
    """What comfy.sd.VAE offers the node: IMAGE-in/out encode/decode with raw latents."""

    def __init__(self, vae, channels=4):
        self.vae, self.channels = vae, channels

    def decode(self, z):
        with torch.no_grad():
            img = self.vae.decode(z[:, :4]).sample
        return ((img.clamp(-1, 1) + 1) / 2).movedim(1, -1)

    def encode(self, image):
        with torch.no_grad():
            z = self.vae.encode(image.movedim(-1, 1) * 2 - 1).latent_dist.mode()
        return z.repeat(1, self.channels // 4, 1, 1)


def test_upscale_latent_with_connected_vae_of_each_family(comfy):
    from tiny_models import tiny_vae

    model = load(comfy)
    g = model.loaded.generator
    raw = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    args = dict(scale=2.0, tile_size=0, tile_overlap=0, vae_tile_size=0, color_fix="none", seed=0)
    same = ComfyStyleVAE(g.vae)  # SD-family VAE: the SR latent itself comes back
    (out,) = run(
        comfy.nodes.D3SRUpscaleLatent, model=model, samples={"samples": raw}, vae=same, **args
    )
    expected, _ = reference_sr_latent(g, raw, 2.0)
    torch.testing.assert_close(out["samples"], expected, atol=2e-4, rtol=1e-4)
    other = ComfyStyleVAE(tiny_vae(seed=9), channels=16)  # e.g. Flux: re-encoded by that VAE
    wide = torch.randn(1, 16, 4, 4)
    (out,) = run(
        comfy.nodes.D3SRUpscaleLatent, model=model, samples={"samples": wide}, vae=other, **args
    )
    assert out["samples"].shape == (1, 16, 8, 8)


def test_conditioning_replaces_the_prompt_for_that_run(comfy):
    model = load(comfy)
    g = model.loaded.generator
    stored = g.prompt_embeds.clone()
    embeds = torch.randn(1, 77, TINY_CONTEXT_DIM, generator=torch.Generator().manual_seed(6))
    cond = [[embeds, {"pooled_output": torch.zeros(1, TINY_CONTEXT_DIM)}]]
    raw = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    args = dict(scale=2.0, tile_size=0, tile_overlap=0, vae_tile_size=0, color_fix="none", seed=0)
    (out,) = run(
        comfy.nodes.D3SRUpscaleLatent,
        model=model,
        samples={"samples": raw},
        conditioning=cond,
        **args,
    )
    expected, _ = reference_sr_latent(g, raw, 2.0, embeds=embeds)
    torch.testing.assert_close(out["samples"], expected, atol=2e-4, rtol=1e-4)
    assert torch.equal(g.prompt_embeds, stored)
    sd15 = [[torch.zeros(1, 77, 768), {}]]
    with pytest.raises(
        comfy.host.D3SRNodeError, match="width 768 does not match the UNet's context"
    ):
        run(
            comfy.nodes.D3SRUpscaleLatent,
            model=model,
            samples={"samples": raw},
            conditioning=sd15,
            **args,
        )


def test_rgba_and_mask_are_carried(comfy):
    model = load(comfy)
    args = dict(scale=2.0, tile_size=0, tile_overlap=0, vae_tile_size=0, color_fix="none", seed=0)
    image = torch.rand(1, 6, 6, 3)
    mask = torch.zeros(1, 6, 6)
    mask[:, :, 3:] = 1
    out, out_mask = run(comfy.nodes.D3SRUpscaleImage, model=model, image=image, mask=mask, **args)
    assert out.shape == (1, 12, 12, 3) and out_mask.shape == (1, 12, 12)
    expected = 1 - F.interpolate(1 - mask[:, None], size=(12, 12), mode="bicubic").clamp(0, 1)[:, 0]
    torch.testing.assert_close(out_mask, expected, atol=1e-6, rtol=0)
    rgba = torch.rand(2, 6, 6, 4)
    out, out_mask = run(comfy.nodes.D3SRUpscaleImage, model=model, image=rgba, **args)
    assert out.shape == (2, 12, 12, 4) and out_mask.shape == (2, 12, 12)
    # LoadImage's 64x64 placeholder mask (image without alpha) is ignored
    out, out_mask = run(
        comfy.nodes.D3SRUpscaleImage, model=model, image=image, mask=torch.zeros(1, 64, 64), **args
    )
    assert out.shape == (1, 12, 12, 3) and out_mask.abs().max() == 0


def test_errors_are_one_clear_message(comfy):
    err = comfy.host.D3SRNodeError
    with pytest.raises(err, match=r"(?s)'gone.safetensors' not found.*osediff.pkl.*models0.d3sr"):
        load(comfy, weights="gone.safetensors")
    with pytest.raises(err, match=r"SD2.1-base model 'nope' not found"):
        load(comfy, base="nope")
    with pytest.raises(err, match=r"D3SR Model Loader: .*sd15.safetensors"):
        load(comfy, base="sd15.safetensors")
    model = load(comfy)
    args = dict(scale=4.0, tile_size=0, tile_overlap=0, vae_tile_size=0, color_fix="none", seed=0)
    with pytest.raises(err, match="video / 3-D latents"):
        run(
            comfy.nodes.D3SRUpscaleLatent,
            model=model,
            samples={"samples": torch.zeros(1, 4, 2, 4, 4)},
            **args,
        )
    big = torch.zeros(1, 5000, 4000, 3)
    with pytest.raises(
        err, match=r"D3SR Upscale Image: output would be 16000x20000 = 320.0 MP, above the limit"
    ):
        run(comfy.nodes.D3SRUpscaleImage, model=model, image=big, **args)
    assert math.isfinite(model.loaded.generator.strength)
