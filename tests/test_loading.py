import pytest
import torch
from make_tiny_weights import write_tiny_base
from tiny_models import TINY_UNET_CONFIG, tiny_prompt_embeds, tiny_unet

from d3sr_core.loading.base import load_base
from d3sr_core.loading.checkpoint import D3SRCheckpoint, save_checkpoint
from d3sr_core.loading.files import WeightsFileError
from d3sr_core.loading.generator import load_generator
from d3sr_core.models import GeneratorConfig, LoraAdapter


def write_base_folder(root, unet_config=None):
    write_tiny_base(root, text_encoder=False)
    if unet_config is not None:  # swap in a UNet of another family
        type(tiny_unet())(**unet_config).save_pretrained(root / "unet")
    return root


def test_diffusers_folder_loads_same_weights(tmp_path):
    base = load_base(write_base_folder(tmp_path))
    ref = tiny_unet().state_dict()
    got = base.unet.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert base.prediction_type == "epsilon"


def test_sd15_folder_is_rejected(tmp_path):
    write_base_folder(tmp_path, {**TINY_UNET_CONFIG, "cross_attention_dim": 768})
    with pytest.raises(WeightsFileError, match="SD 1.x"):
        load_base(tmp_path)


def test_missing_path_and_hub_id_without_download(tmp_path):
    with pytest.raises(WeightsFileError, match="no such file"):
        load_base(tmp_path / "nope.safetensors")
    with pytest.raises(WeightsFileError, match="hub id"):
        load_base("someone/some-model")


def test_load_generator_end_to_end(tmp_path):
    base = write_base_folder(tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    ckpt = D3SRCheckpoint(
        GeneratorConfig(timestep=500),
        tiny_prompt_embeds(),
        {
            "unet": LoraAdapter(
                {
                    "conv_out": (
                        torch.randn(4, 16, 3, 3, generator=g),
                        torch.randn(4, 4, 1, 1, generator=g),
                    )
                },
                1.0,
            )
        },
    )
    weights = save_checkpoint(ckpt, tmp_path / "w.safetensors")
    gen = load_generator(weights, base, strength=1.0)
    assert gen.config.timestep == 500 and gen.strength == 1.0
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        y1 = gen(x)
        gen.set_strength(0.0)
        y0 = gen(x)
    assert (y1 - y0).abs().max() > 1e-4
    bf16 = load_generator(weights, base, dtype=torch.bfloat16)
    assert (
        bf16.dtype == torch.bfloat16 and bf16.alpha_bar == gen.alpha_bar
    )  # schedule never rounded


def test_prompt_width_mismatch_is_named(tmp_path):
    base = write_base_folder(tmp_path / "base")
    lora = {"conv_out": (torch.zeros(4, 16, 3, 3), torch.zeros(4, 4, 1, 1))}
    ckpt = D3SRCheckpoint(
        GeneratorConfig(), torch.zeros(1, 77, 1024), {"unet": LoraAdapter(lora, 1.0)}
    )
    weights = save_checkpoint(ckpt, tmp_path / "w.safetensors")
    with pytest.raises(WeightsFileError, match="w.safetensors.*prompt_embeds width 1024"):
        load_generator(weights, base)
