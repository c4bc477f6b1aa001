import copy
import json
import struct

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import tiny_prompt_embeds, tiny_unet, tiny_vae

from d3sr_core.loading.base import BaseModel
from d3sr_core.loading.checkpoint import D3SRCheckpoint, load_checkpoint, save_checkpoint
from d3sr_core.loading.files import WeightsFileError, read_state_dict
from d3sr_core.loading.generator import build_generator, read_weights
from d3sr_core.loading.osediff import osediff_to_checkpoint, read_osediff
from d3sr_core.models import D3SRGenerator, GeneratorConfig, LoraAdapter
from d3sr_core.models.configs import bundled_config
from d3sr_core.models.schedule import alphas_cumprod


def random_checkpoint(dtype=torch.float32) -> D3SRCheckpoint:
    g = torch.Generator().manual_seed(0)
    factors = {
        "down_blocks.0.resnets.0.conv1": (
            torch.randn(4, 16, 3, 3, generator=g),
            torch.randn(16, 4, 1, 1, generator=g),
        ),
        "mid_block.attentions.0.proj_in": (
            torch.randn(4, 64, generator=g),
            torch.randn(64, 4, generator=g),
        ),
    }
    factors = {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in factors.items()}
    return D3SRCheckpoint(
        config=GeneratorConfig(
            timestep=250, lora_rank=4, lora_alpha=4.0, lora_targets=["conv1", "proj_in"]
        ),
        prompt_embeds=tiny_prompt_embeds().to(dtype),
        adapters={
            "unet": LoraAdapter(
                factors, 1.0, {"conv_in.bias": torch.randn(16, generator=g).to(dtype)}
            ),
            "vae": LoraAdapter(
                {
                    "quant_conv": (
                        torch.randn(4, 8, 1, 1, generator=g),
                        torch.randn(8, 4, 1, 1, generator=g),
                    )
                },
                2.0,
            ),
        },
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_checkpoint_round_trip_is_bit_exact(tmp_path, dtype):
    ckpt = random_checkpoint(dtype)
    path = save_checkpoint(ckpt, tmp_path / "model.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.config == ckpt.config
    assert (
        torch.equal(loaded.prompt_embeds, ckpt.prompt_embeds)
        and loaded.prompt_embeds.dtype == dtype
    )
    assert loaded.adapters.keys() == ckpt.adapters.keys()
    for name, adapter in ckpt.adapters.items():
        got = loaded.adapters[name]
        assert got.scale == adapter.scale
        assert got.factors.keys() == adapter.factors.keys()
        for k, (a, b) in adapter.factors.items():
            assert torch.equal(got.factors[k][0], a) and torch.equal(got.factors[k][1], b)
        assert got.replaced.keys() == adapter.replaced.keys()
        assert all(torch.equal(got.replaced[k], v) for k, v in adapter.replaced.items())
    assert not list(tmp_path.glob("*.partial"))


def test_checkpoint_header_metadata_is_readable_json(tmp_path):
    path = save_checkpoint(random_checkpoint(), tmp_path / "m.safetensors")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))["__metadata__"]
    assert meta["format"] == "d3sr" and meta["format_version"] == "1"
    config = json.loads(meta["config"])
    for field in (
        "base",
        "timestep",
        "lora_rank",
        "lora_alpha",
        "lora_targets",
        "prediction_type",
        "scaling_factor",
    ):
        assert field in config
    assert config["timestep"] == 250


def test_not_a_d3sr_file_is_rejected_with_its_name(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "some_lora.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsFileError, match="some_lora.safetensors.*not a D3SR checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_rejected(tmp_path):
    path = save_checkpoint(random_checkpoint(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsFileError, match="m.safetensors.*(damaged|truncated)"):
        load_checkpoint(path)


def test_newer_format_version_is_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "future.safetensors"
    save_file(
        {"prompt_embeds": torch.zeros(1, 77, 32)},
        str(path),
        metadata={"format": "d3sr", "format_version": "9", "config": "{}"},
    )
    with pytest.raises(WeightsFileError, match="version 9"):
        load_checkpoint(path)


class NotATensor:
    pass


def test_pickle_needing_code_execution_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    torch.save({"state_dict_unet": NotATensor()}, str(path))
    with pytest.raises(WeightsFileError, match="evil.pkl.*refused"):
        read_state_dict(path)


# ---- OSEDiff ----------------------------------------------------------------------------------
UNET_PATTERNS = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in",
                 "conv_shortcut", "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]  # fmt: skip
VAE_PATTERNS = [
    "conv1",
    "conv2",
    "conv_in",
    "conv_shortcut",
    "conv",
    "conv_out",
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
]


def osediff_selection(unet):
    """OSEDiff's own rule (osediff.py initialize_unet): substring grep over parameter names."""
    enc, dec, oth = [], [], []
    for n, _ in unet.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in UNET_PATTERNS:
            if pattern in n and ("down_blocks" in n or "conv_in" in n):
                enc.append(n.replace(".weight", ""))
                break
            elif pattern in n and ("up_blocks" in n or "conv_out" in n):
                dec.append(n.replace(".weight", ""))
                break
            elif pattern in n:
                oth.append(n.replace(".weight", ""))
                break
    return enc, dec, oth


def osediff_vae_selection(vae):
    mods = []
    for n, _ in vae.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in VAE_PATTERNS:
            if pattern in n and "encoder" in n:
                mods.append(n.replace(".weight", ""))
            elif "quant_conv" in n and "post_quant_conv" not in n:
                mods.append(n.replace(".weight", ""))
    return mods


def randomize_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def make_osediff(tmp_path):
    """Build, with peft, exactly what OSEDiff's save_model writes; return (path, peft unet, peft vae)."""
    unet, vae = tiny_unet(), tiny_vae()
    enc, dec, oth = osediff_selection(unet)
    assert (len(enc), len(dec), len(oth)) == (
        94,
        148,
        16,
    )  # same module counts as the full SD2.1 UNet
    for name, targets in (
        ("default_encoder", enc),
        ("default_decoder", dec),
        ("default_others", oth),
    ):
        unet = inject_adapter_in_model(
            LoraConfig(r=4, target_modules=targets, init_lora_weights="gaussian"),
            unet,
            adapter_name=name,
        )
    # as OSEDiff_test does with unet.set_adapter([...]): each injection activated only its own adapter
    adapters = ["default_encoder", "default_decoder", "default_others"]
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(adapters)
    vae_mods = osediff_vae_selection(vae)
    vae = inject_adapter_in_model(
        LoraConfig(r=4, target_modules=vae_mods, init_lora_weights="gaussian"),
        vae,
        adapter_name="default_encoder",
    )
    randomize_lora(unet, 1)
    randomize_lora(vae, 2)
    with torch.no_grad():
        unet.conv_in.base_layer.weight.add_(torch.randn_like(unet.conv_in.base_layer.weight) * 0.1)
    state = {
        "vae_lora_encoder_modules": vae_mods,
        "unet_lora_encoder_modules": enc,
        "unet_lora_decoder_modules": dec,
        "unet_lora_others_modules": oth,
        "rank_unet": 4,
        "rank_vae": 4,
        "state_dict_unet": {
            k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k
        },
        "state_dict_vae": {k: v for k, v in vae.state_dict().items() if "lora" in k},
    }
    assert len(state["state_dict_unet"]) == 518 and len(state["state_dict_vae"]) == 64
    assert len(set(vae_mods)) == 32
    path = tmp_path / "osediff.pkl"
    torch.save(state, str(path))
    return path, unet.eval(), vae.eval()


def test_osediff_pickle_loads_and_matches_peft(tmp_path):
    path, peft_unet, peft_vae = make_osediff(tmp_path)
    prompt = tiny_prompt_embeds()
    ckpt = osediff_to_checkpoint(read_osediff(path), prompt, path)
    assert ckpt.config.timestep == 999 and ckpt.adapters["unet"].scale == 2.0
    assert len(ckpt.adapters["unet"].factors) == 258 and len(ckpt.adapters["vae"].factors) == 32

    ours = build_generator(
        BaseModel(tiny_unet(), tiny_vae(), bundled_config("sd21-base", "scheduler"), "tiny"), ckpt
    )
    reference = D3SRGenerator(peft_unet, peft_vae, prompt, alphas_cumprod(), ckpt.config).eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        z_ref, z = reference.encode(x), ours.encode(x)
        torch.testing.assert_close(z, z_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            ours.predict(z_ref), reference.predict(z_ref), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)


def test_osediff_converts_to_d3sr_file_and_back(tmp_path):
    path, _, _ = make_osediff(tmp_path)
    ckpt = osediff_to_checkpoint(read_osediff(path), tiny_prompt_embeds(), path)
    out = save_checkpoint(ckpt, tmp_path / "osediff_d3sr.safetensors")
    again = read_weights(out)
    assert again.config == ckpt.config
    for name in ("unet", "vae"):
        assert again.adapters[name].factors.keys() == ckpt.adapters[name].factors.keys()
    assert torch.equal(
        again.adapters["unet"].replaced["conv_in.weight"],
        ckpt.adapters["unet"].replaced["conv_in.weight"],
    )


def test_non_osediff_pickle_is_named(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"params": {"w": torch.zeros(1)}}, str(path))
    with pytest.raises(WeightsFileError, match="other.pth.*not an OSEDiff checkpoint"):
        read_osediff(path)


def test_adapter_for_other_architecture_is_rejected():
    ckpt = random_checkpoint()
    ckpt.adapters["unet"].factors["down_blocks.0.resnets.0.conv1"] = (
        torch.zeros(4, 8, 3, 3),
        torch.zeros(16, 4, 1, 1),
    )
    base = BaseModel(tiny_unet(), tiny_vae(), bundled_config("sd21-base", "scheduler"), "tiny")
    with pytest.raises(WeightsFileError, match="does not fit this base model.*conv1"):
        build_generator(base, ckpt, weights_name="w.safetensors")


def test_generator_from_checkpoint_merges_every_adapter():
    """UNet LoRA (scale 1), replaced conv_in bias and VAE LoRA (scale 2), merged by hand."""
    from reference import merge_by_hand

    ckpt = random_checkpoint()
    base = BaseModel(tiny_unet(), tiny_vae(), bundled_config("sd21-base", "scheduler"), "tiny")
    gen = build_generator(base, ckpt, strength=0.75)
    unet, vae = ckpt.adapters["unet"], ckpt.adapters["vae"]
    expected = {
        "unet": merge_by_hand(tiny_unet(), unet.factors, 1.0, 0.75, unet.replaced),
        "vae": merge_by_hand(tiny_vae(), vae.factors, 2.0, 0.75),
    }
    for name, model in expected.items():
        got = getattr(gen, name).state_dict()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(got[key], value, atol=2e-6, rtol=0, msg=f"{name}.{key}")
    assert gen.config == ckpt.config and copy.deepcopy(gen).strength == 0.75
