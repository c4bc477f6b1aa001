"""``describe_weights``: what a weights file or folder is, read from headers and shapes only."""

from __future__ import annotations

import json

import pytest
import torch
from make_tiny_weights import write_tiny_base, write_tiny_checkpoint
from safetensors.torch import save_file

from d3sr_core.loading.detect import describe_weights
from d3sr_core.loading.files import WeightsFileError

UNET = "model.diffusion_model."


def sd_single_file(context: int, vae: bool = True, sdxl: bool = False) -> dict:
    sd = {
        UNET + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, context),
        "cond_stage_model.model.token_embedding.weight": torch.zeros(4, 4),
    }
    if vae:
        sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
        sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(8, 4, 3, 3)
    if sdxl:
        sd["conditioner.embedders.0.transformer.x"] = torch.zeros(2)
    return sd


def test_d3sr_checkpoint(tmp_path):
    info = describe_weights(write_tiny_checkpoint(tmp_path / "w.safetensors"))
    assert (info.kind, info.usable_as, info.container) == ("d3sr", "weights", "safetensors")
    assert info.details["config"]["timestep"] == 399
    assert info.details["unet_lora"] == {"modules": 2, "scale": 1.0, "replaced_tensors": 0}
    assert info.details["prompt_embeds"] == [1, 77, 32]
    assert (
        info.num_tensors == 5 and info.num_parameters == 77 * 32 + 4 * 16 * 9 + 16 * 4 + 4 * 64 * 2
    )
    json.dumps(info.to_dict())
    text = info.format()
    assert "d3sr" in text and "--weights" in text and "timestep" in text


def test_osediff_pickle_is_read_without_tensor_data(tmp_path):
    state = {
        "state_dict_unet": {
            "conv_in.lora_A.default_encoder.weight": torch.zeros(4, 4, 3, 3),
            "conv_in.lora_B.default_encoder.weight": torch.zeros(320, 4, 1, 1),
            "conv_in.base_layer.weight": torch.zeros(320, 4, 3, 3),
        },
        "state_dict_vae": {"quant_conv.lora_A.default_encoder.weight": torch.zeros(4, 8, 1, 1)},
        "rank_unet": 4,
        "rank_vae": 4,
        "unet_lora_encoder_modules": ["conv_in"],
    }
    path = tmp_path / "osediff.pkl"
    torch.save(state, path)
    info = describe_weights(path)
    assert (info.kind, info.usable_as, info.container) == ("osediff", "weights", "pickle")
    d = info.details
    assert (
        d["rank_unet"],
        d["unet_lora_modules"],
        d["unet_conv_in_trained"],
        d["vae_lora_modules"],
    ) == (4, 1, True, 1)
    assert info.num_tensors == 4
    assert any("d3sr convert" in n for n in info.notes)


@pytest.mark.parametrize(
    ("context", "family", "usable"), [(1024, "sd21", "base"), (768, "sd1", None)]
)
def test_sd_single_file_family(tmp_path, context, family, usable):
    path = tmp_path / "model.safetensors"
    save_file(sd_single_file(context), str(path))
    info = describe_weights(path)
    assert (info.kind, info.family, info.usable_as) == ("sd-checkpoint", family, usable)
    assert info.details["parts"] == ["text_encoder", "unet", "vae"]


def test_sdxl_and_nested_ckpt_and_missing_vae(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file(sd_single_file(2048, sdxl=True), str(path))
    assert describe_weights(path).family == "sdxl"
    ckpt = tmp_path / "v2.ckpt"
    torch.save({"state_dict": sd_single_file(1024, vae=False), "global_step": 5}, ckpt)
    info = describe_weights(ckpt)
    assert (info.kind, info.family, info.container) == ("sd-checkpoint", "sd21", "pickle")
    assert any("--vae" in n for n in info.notes)


def test_vae_file(tmp_path):
    path = tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"
    save_file(
        {
            "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
            "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
        },
        str(path),
    )
    info = describe_weights(path)
    assert (info.kind, info.usable_as) == ("vae", "vae")


def test_diffusers_folders(tmp_path):
    tiny = describe_weights(write_tiny_base(tmp_path / "tiny"))
    assert tiny.kind == "diffusers" and tiny.container == "folder"
    assert set(tiny.details["parts"]) >= {"unet", "vae", "scheduler", "text_encoder"}
    assert tiny.details["prediction_type"] == "epsilon" and tiny.num_tensors > 100
    assert tiny.family == "unknown"  # context width 32: a test model, not SD2.1
    real = tmp_path / "stable-diffusion-2-1-base"
    for part, config in (
        ("unet", {"cross_attention_dim": 1024}),
        ("vae", {"_class_name": "AutoencoderKL"}),
    ):
        (real / part).mkdir(parents=True)
        (real / part / "config.json").write_text(json.dumps(config))
    info = describe_weights(real)
    assert (info.family, info.usable_as) == ("sd21", "base")
    assert any("text_encoder" in n for n in info.notes)


def test_unknown_file_lists_keys_and_broken_files_are_named(tmp_path):
    path = tmp_path / "thing.pth"
    torch.save({"params_ema": {"conv_first.weight": torch.zeros(2, 2)}, "step": 3}, path)
    info = describe_weights(path)
    assert info.kind == "unknown" and info.usable_as is None
    assert info.details["top_level_keys"] == ["params_ema", "step"]
    assert info.num_tensors == 1
    lora = tmp_path / "style_lora.safetensors"
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, str(lora))
    assert "LoRA" in describe_weights(lora).architecture
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{abc")
    with pytest.raises(WeightsFileError, match="broken.safetensors"):
        describe_weights(broken)
    with pytest.raises(WeightsFileError, match="absent"):
        describe_weights(tmp_path / "absent.ckpt")
