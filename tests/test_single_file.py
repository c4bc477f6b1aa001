"""Loading SD2.1 from one LDM-layout checkpoint (.safetensors / .ckpt), offline.

The LDM files are written from tiny diffusers models with an independent diffusers -> LDM
mapping (the table-driven scheme of diffusers' old
``scripts/convert_diffusers_to_original_stable_diffusion.py``), not by inverting the code
under test.
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from tiny_models import TINY_CONTEXT_DIM, TINY_UNET_CONFIG, TINY_VAE_CONFIG, tiny_unet, tiny_vae

from d3sr_core.loading.files import WeightsFileError
from d3sr_core.loading.single_file import (
    convert_ldm_unet,
    convert_ldm_vae,
    detect_family,
    detect_parts,
    load_single_file,
    load_single_file_vae,
)
from d3sr_core.models.configs import bundled_config

# --------------------------------------------------------------------------- diffusers -> LDM

UNET_MAP = [  # (ldm, diffusers), whole keys
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"),
    ("out.2.bias", "conv_out.bias"),
]
UNET_MAP_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]


def unet_layer_map(levels: int = 4, lpb: int = 2) -> list[tuple[str, str]]:
    """SD1/SD2 structure: attention in all but the lowest-resolution level."""
    m = []
    s = lpb + 1
    for i in range(levels):
        for j in range(lpb):
            m.append((f"input_blocks.{s * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < levels - 1:
                m.append((f"input_blocks.{s * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(lpb + 1):
            m.append((f"output_blocks.{s * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                m.append((f"output_blocks.{s * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            m.append((f"input_blocks.{s * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            m.append(
                (
                    f"output_blocks.{s * i + lpb}.{1 if i == 0 else 2}.",
                    f"up_blocks.{i}.upsamplers.0.",
                )
            )
    m.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        m.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return m


def diffusers_to_ldm_unet(sd: dict, levels: int = 4, lpb: int = 2) -> dict:
    mapping = {k: k for k in sd}
    for ldm, hf in UNET_MAP:
        mapping[hf] = ldm
    for k, v in mapping.items():
        if "resnets" in k:
            for ldm, hf in UNET_MAP_RESNET:
                v = v.replace(hf, ldm)
            mapping[k] = v
    layer_map = unet_layer_map(levels, lpb)
    for k, v in mapping.items():
        for ldm, hf in layer_map:
            v = v.replace(hf, ldm)
        mapping[k] = v
    return {v: sd[k] for k, v in mapping.items()}


def vae_map(levels: int = 4, lpb: int = 2) -> list[tuple[str, str]]:
    m = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out")]
    m.append(("mid.attn_1.", "mid_block.attentions.0."))
    for i in range(levels):
        for j in range(lpb):
            m.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < levels - 1:
            m.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            m.append((f"up.{levels - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(lpb + 1):
            m.append(
                (f"decoder.up.{levels - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
            )
    for i in range(2):
        m.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    return m


VAE_MAP_ATTN = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]


def diffusers_to_ldm_vae(sd: dict, levels: int = 4, lpb: int = 2) -> dict:
    mapping = {k: k for k in sd}
    table = vae_map(levels, lpb)
    for k, v in mapping.items():
        for ldm, hf in table:
            v = v.replace(hf, ldm)
        mapping[k] = v
    for k, v in mapping.items():
        if "attentions" in k:
            for ldm, hf in VAE_MAP_ATTN:
                v = v.replace(hf, ldm)
            mapping[k] = v
    new = {v: sd[k] for k, v in mapping.items()}
    for k, v in new.items():
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", k):
            new[k] = v.reshape(*v.shape, 1, 1)  # LDM stores these as 1x1 convs
    return new


def tiny_levels(config: dict) -> tuple[int, int]:
    return len(config["block_out_channels"]), config["layers_per_block"]


def ldm_checkpoint(unet, vae, with_vae: bool = True) -> dict:
    """A whole-model LDM checkpoint (UNet + VAE + text-encoder/EMA/schedule extras)."""
    u = diffusers_to_ldm_unet(unet.state_dict(), *tiny_levels(TINY_UNET_CONFIG))
    out = {f"model.diffusion_model.{k}": v.clone() for k, v in u.items()}
    if with_vae:
        v = diffusers_to_ldm_vae(vae.state_dict(), *tiny_levels(TINY_VAE_CONFIG))
        out.update({f"first_stage_model.{k}": t.clone() for k, t in v.items()})
    out["cond_stage_model.model.token_embedding.weight"] = torch.randn(10, 8)
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.diffusion_modelinput_blocks00weight"] = torch.randn(2, 2)
    out["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    return out


LOAD_KW = {"unet_config": TINY_UNET_CONFIG, "vae_config": TINY_VAE_CONFIG}


@pytest.fixture(scope="module")
def models():
    return tiny_unet(3), tiny_vae(4)


@pytest.fixture(scope="module")
def checkpoint(models):
    return ldm_checkpoint(*models)


def write(tmp_path, sd: dict, name: str = "model.safetensors"):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 123, "epoch": 1}, str(path))
    return path


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def assert_same_outputs(unet_a, vae_a, unet_b, vae_b):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 7, TINY_CONTEXT_DIM, generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        assert torch.equal(unet_a(sample, 399, ctx).sample, unet_b(sample, 399, ctx).sample)
        za = vae_a.encode(image).latent_dist.mode()
        zb = vae_b.encode(image).latent_dist.mode()
        assert torch.equal(za, zb)
        assert torch.equal(vae_a.decode(za).sample, vae_b.decode(zb).sample)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["v2-1_tiny.safetensors", "v2-1_tiny.ckpt"])
def test_roundtrip_is_exact(tmp_path, models, checkpoint, name):
    path = write(tmp_path, checkpoint, name)
    unet, vae = load_single_file(path, **LOAD_KW)
    assert isinstance(unet, UNet2DConditionModel) and isinstance(vae, AutoencoderKL)
    assert not unet.training and not vae.training
    assert not any(p.is_meta for p in [*unet.parameters(), *vae.parameters()])
    assert_same_model(unet, models[0])
    assert_same_model(vae, models[1])
    assert_same_outputs(unet, vae, *models)


def test_bare_unet_file_with_separate_vae_file(tmp_path, models):
    unet0, vae0 = models
    bare_unet = diffusers_to_ldm_unet(unet0.state_dict(), *tiny_levels(TINY_UNET_CONFIG))
    bare_vae = diffusers_to_ldm_vae(vae0.state_dict(), *tiny_levels(TINY_VAE_CONFIG))
    unet_path = write(tmp_path, bare_unet, "unet_only.safetensors")
    vae_path = write(tmp_path, bare_vae, "vae-ft-mse-tiny.ckpt")
    assert detect_parts(bare_unet) == {"unet"} and detect_parts(bare_vae) == {"vae"}

    with pytest.raises(WeightsFileError, match="no VAE weights.*vae_path") as err:
        load_single_file(unet_path, **LOAD_KW)
    assert "unet_only.safetensors" in str(err.value)

    unet, vae = load_single_file(unet_path, vae_path=vae_path, **LOAD_KW)
    assert_same_model(unet, unet0)
    assert_same_model(vae, vae0)

    unet, vae = load_single_file(unet_path, require_vae=False, **LOAD_KW)
    assert vae is None
    assert_same_model(unet, unet0)
    vae = load_single_file_vae(vae_path, vae_config=TINY_VAE_CONFIG)
    assert_same_model(vae, vae0)
    with pytest.raises(WeightsFileError, match="no VAE weights") as err:
        load_single_file_vae(unet_path, vae_config=TINY_VAE_CONFIG)
    assert "unet_only.safetensors" in str(err.value)


def test_vae_from_full_checkpoint(tmp_path, models, checkpoint):
    vae = load_single_file_vae(write(tmp_path, checkpoint), vae_config=TINY_VAE_CONFIG)
    assert_same_model(vae, models[1])


def test_conv_projection_file_into_linear_config(tmp_path, models, checkpoint):
    """SD1-style 1x1-conv proj_in/proj_out weights are reshaped for a linear-projection UNet."""
    sd = dict(checkpoint)
    n = 0
    for k, v in sd.items():
        if re.search(r"\.(proj_in|proj_out)\.weight$", k) and k.startswith("model."):
            sd[k] = v.reshape(*v.shape, 1, 1)
            n += 1
    assert n > 0
    unet, _ = load_single_file(write(tmp_path, sd), **LOAD_KW)
    assert_same_model(unet, models[0])


def test_dtype_and_fp16_file(tmp_path, models, checkpoint):
    half = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint.items()}
    unet, vae = load_single_file(write(tmp_path, half), dtype=torch.float32, **LOAD_KW)
    assert {p.dtype for p in [*unet.parameters(), *vae.parameters()]} == {torch.float32}
    ref = models[0].state_dict()["conv_in.weight"].half().float()
    assert torch.equal(unet.state_dict()["conv_in.weight"], ref)
    unet, vae = load_single_file(write(tmp_path, checkpoint), dtype=torch.bfloat16, **LOAD_KW)
    assert {p.dtype for p in [*unet.parameters(), *vae.parameters()]} == {torch.bfloat16}


# --------------------------------------------------------------------------- clear errors


def test_sd1_checkpoint_rejected(tmp_path):
    torch.manual_seed(0)
    sd1 = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "cross_attention_dim": 768})
    sd = ldm_checkpoint(sd1, tiny_vae())
    assert detect_family(sd) == "sd1"
    path = write(tmp_path, sd, "v1-5-pruned.safetensors")
    with pytest.raises(WeightsFileError) as err:
        load_single_file(path, **LOAD_KW)
    msg = str(err.value)
    assert "v1-5-pruned.safetensors" in msg
    assert "Stable Diffusion 1.x" in msg and "2.1" in msg


def test_sdxl_checkpoint_rejected(tmp_path, checkpoint):
    sd = dict(checkpoint)
    sd["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(4, 8)
    sd["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    assert detect_family(sd) == "sdxl"
    path = write(tmp_path, sd, "sd_xl_base_1.0.safetensors")
    with pytest.raises(
        WeightsFileError, match=r"SDXL checkpoint; D3SR needs a Stable Diffusion 2\.1"
    ):
        load_single_file(path, **LOAD_KW)


def test_other_context_width_rejected(tmp_path):
    torch.manual_seed(0)
    other = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "cross_attention_dim": 48})
    path = write(tmp_path, ldm_checkpoint(other, tiny_vae()))
    with pytest.raises(WeightsFileError, match="context is 48-dimensional.*expects 32"):
        load_single_file(path, **LOAD_KW)


def test_missing_key_named(tmp_path, checkpoint):
    sd = dict(checkpoint)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    del sd[key]
    with pytest.raises(WeightsFileError, match="missing") as err:
        load_single_file(write(tmp_path, sd), **LOAD_KW)
    assert key in str(err.value)

    sd = dict(checkpoint)
    key = "first_stage_model.decoder.up.1.upsample.conv.bias"
    del sd[key]
    with pytest.raises(WeightsFileError, match="VAE") as err:
        load_single_file(write(tmp_path, sd, "b.ckpt"), **LOAD_KW)
    assert key in str(err.value)


def test_unexpected_key_named(tmp_path, checkpoint):
    sd = dict(checkpoint)
    key = "model.diffusion_model.input_blocks.99.0.in_layers.0.weight"
    sd[key] = torch.zeros(3)
    with pytest.raises(WeightsFileError, match="no place") as err:
        load_single_file(write(tmp_path, sd), **LOAD_KW)
    assert key in str(err.value)


def test_misshaped_tensor_named(tmp_path, checkpoint):
    sd = dict(checkpoint)
    key = "model.diffusion_model.out.2.weight"
    expected = list(sd[key].shape)
    sd[key] = torch.zeros(5, *expected[1:])
    with pytest.raises(WeightsFileError) as err:
        load_single_file(write(tmp_path, sd), **LOAD_KW)
    msg = str(err.value)
    assert key in msg and str([5, *expected[1:]]) in msg and str(expected) in msg


def test_inpainting_conv_in_hint(tmp_path, checkpoint):
    sd = dict(checkpoint)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd[key] = torch.zeros(sd[key].shape[0], 9, 3, 3)
    with pytest.raises(WeightsFileError, match="9 input channels"):
        load_single_file(write(tmp_path, sd), **LOAD_KW)


@pytest.mark.parametrize("name", ["cut.safetensors", "cut.ckpt"])
def test_truncated_file(tmp_path, checkpoint, name):
    path = write(tmp_path, checkpoint, name)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError) as err:
        load_single_file(path, **LOAD_KW)
    assert name in str(err.value)


def test_diffusers_layout_and_missing_file(tmp_path, models):
    path = write(tmp_path, models[0].state_dict(), "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsFileError, match="diffusers layout"):
        load_single_file(path, **LOAD_KW)
    with pytest.raises(WeightsFileError, match="not found"):
        load_single_file(tmp_path / "nope.safetensors", **LOAD_KW)


# --------------------------------------------------------------------------- full size (meta)


def test_full_size_sd21_conversion_covers_every_key():
    unet_cfg, vae_cfg = bundled_config("sd21-base", "unet"), bundled_config("sd21-base", "vae")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
    for model, to_ldm, convert, cfg, prefix in (
        (unet, diffusers_to_ldm_unet, convert_ldm_unet, unet_cfg, "model.diffusion_model."),
        (vae, diffusers_to_ldm_vae, convert_ldm_vae, vae_cfg, "first_stage_model."),
    ):
        want = model.state_dict()
        ldm = to_ldm(want, len(cfg["block_out_channels"]), cfg["layers_per_block"])
        assert len(ldm) == len(want)
        for sd in (ldm, {prefix + k: v for k, v in ldm.items()}):
            got = convert(sd, cfg)
            assert got.keys() == want.keys()
            bad = [k for k in want if got[k].shape != want[k].shape]
            assert not bad, bad[:5]
    whole = {
        "model.diffusion_model." + k: v for k, v in diffusers_to_ldm_unet(unet.state_dict()).items()
    }
    k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert list(whole[k].shape) == [320, 1024]
    assert detect_family(whole) == "sd21"
    assert detect_parts({**whole, "cond_stage_model.x": torch.zeros(1)}) == {"unet", "text_encoder"}
