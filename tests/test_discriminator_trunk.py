"""The discriminator's trunk: forward against diffusers' UNet, weights from diffusers folders
(every layout) and single LDM files, and what each refusal says."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from test_discriminator import _latents, tiny_config

from d3sr_core.loading.files import WeightsFileError
from d3sr_core.models.discriminator import (
    TINY_TRUNK_CONFIGS,
    DiffusionDiscriminator,
    assign_trunk_weights,
    build_trunk,
    load_trunk,
    trunk_config,
    trunk_forward,
    zero_condition,
)


def test_trunk_forward_matches_full_unet_mid_block():
    torch.manual_seed(0)
    full = UNet2DConditionModel(**TINY_TRUNK_CONFIGS["sdxl-tiny"]).eval()
    trunk = build_trunk("sdxl-tiny")
    missing, unexpected = trunk.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(
        k.startswith(("up_blocks", "conv_norm_out", "conv_out")) for k in unexpected
    )
    cond = zero_condition(TINY_TRUNK_CONFIGS["sdxl-tiny"])
    cond.text_embeds.normal_()
    z, t = _latents(2, 16), torch.tensor([10, 700])
    ctx = torch.randn(2, 77, 32)
    kwargs = {
        "text_embeds": cond.text_embeds.expand(2, -1),
        "time_ids": cond.time_ids.expand(2, -1),
    }
    seen = {}
    full.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
    with torch.no_grad():
        full(z, t, encoder_hidden_states=ctx, added_cond_kwargs=kwargs)
        mine = trunk_forward(trunk, z, t, ctx, **kwargs)
    assert torch.allclose(mine, seen["mid"], atol=1e-5)


# ---------------------------------------------------------------- loading


def test_load_trunk_from_diffusers_folder(tmp_path):
    torch.manual_seed(3)
    full = UNet2DConditionModel(**TINY_TRUNK_CONFIGS["sdxl-tiny"])
    full.save_pretrained(tmp_path / "sdxl" / "unet")
    trunk = load_trunk(tmp_path / "sdxl")
    assert trunk.up_blocks is None
    ref = full.state_dict()
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert all(not p.requires_grad for p in trunk.parameters())
    d = DiffusionDiscriminator.from_pretrained(tmp_path / "sdxl" / "unet", tiny_config())
    assert d(_latents(1, 16)).shape == (1, 1, 4, 4)
    # a damaged/other model: tensors missing -> clear error naming the folder
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    save_file({k: v for k, v in state.items() if not k.startswith("mid_block")}, str(weights))
    with pytest.raises(WeightsFileError, match="missing"):
        load_trunk(tmp_path / "sdxl")
    with pytest.raises(WeightsFileError, match="not a diffusers UNet folder"):
        load_trunk(tmp_path)


def sdxl_trunk_to_ldm(state: dict) -> dict:
    """Diffusers SDXL down/mid keys -> original LDM names, written out for 3 levels x 2 layers
    (attention at levels 1 and 2), independently of the loader's converter."""
    renames = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("down_blocks.0.downsamplers.0.conv.", "input_blocks.3.0.op."),
        ("down_blocks.1.downsamplers.0.conv.", "input_blocks.6.0.op."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for level in range(3):
        for j in range(2):
            idx = 3 * level + j + 1
            renames.append((f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{idx}.0."))
            renames.append((f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{idx}.1."))
    resnet = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("time_emb_proj.", "emb_layers.1."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("conv_shortcut.", "skip_connection."),
    ]
    out = {}
    for key, value in state.items():
        new = next(ldm + key[len(hf) :] for hf, ldm in renames if key.startswith(hf))
        if ".resnets." in key:  # inside a resnet: LDM's in_layers/out_layers names
            parts = new.split(".")
            cut = 3 if new.startswith("input_blocks") else 2  # input_blocks.N.0 / middle_block.N
            rest = ".".join(parts[cut:])
            for hf, ldm in resnet:
                if rest.startswith(hf):
                    rest = ldm + rest[len(hf) :]
                    break
            new = ".".join(parts[:cut] + [rest])
        out["model.diffusion_model." + new] = value
    return out


def test_load_trunk_from_sdxl_single_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(4)
    full = UNet2DConditionModel(**TINY_TRUNK_CONFIGS["sdxl-tiny"])
    ref = build_trunk("sdxl-tiny")
    ref.load_state_dict(full.state_dict(), strict=False)
    ldm = sdxl_trunk_to_ldm(ref.state_dict())
    assert "model.diffusion_model.input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight" in ldm
    assert "model.diffusion_model.input_blocks.7.0.in_layers.2.weight" in ldm
    # what else a real single file carries: up path, VAE, text encoders (all ignored)
    extra = {
        "model.diffusion_model.output_blocks.0.0.in_layers.0.weight": torch.zeros(3),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(2),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(2),
    }
    path = tmp_path / "sdxl_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in {**ldm, **extra}.items()}, str(path))
    trunk = load_trunk(path, config="sdxl-tiny")
    for k, v in ref.state_dict().items():
        assert torch.equal(trunk.state_dict()[k], v), k
    ckpt = tmp_path / "sdxl_tiny.ckpt"
    torch.save({"state_dict": {**ldm, **extra}, "global_step": 3}, ckpt)
    trunk = load_trunk(ckpt, config="sdxl-tiny", dtype=torch.bfloat16)
    assert trunk.conv_in.weight.dtype == torch.bfloat16
    # a different UNet (SD2.1 layout) for an SDXL backbone: clear error
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v for k, v in ldm.items() if "label_emb" not in k}, str(wrong))
    with pytest.raises(WeightsFileError, match="wrong.safetensors"):
        load_trunk(wrong, config="sdxl-tiny")


def test_trunk_files_every_layout_and_refusal(tmp_path, monkeypatch):
    """Plain, .bin, sharded and fp16-only folders, dtype, single-file defaults and family
    checks, and the whole message of each refusal."""
    from safetensors.torch import save_file

    cfg = TINY_TRUNK_CONFIGS["sdxl-tiny"]
    torch.manual_seed(5)
    ref = build_trunk("sdxl-tiny")
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    keys = list(state)

    def folder(name, files):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(cfg))
        for file, content in files.items():
            if file.endswith(".json"):
                (path / file).write_text(json.dumps(content))
            elif file.endswith(".bin"):
                torch.save(content, path / file)
            else:
                save_file(content, str(path / file))
        return path

    half = len(keys) // 2
    layouts = {
        "bin": {"diffusion_pytorch_model.bin": state},
        "fp16_only": {"diffusion_pytorch_model.fp16.safetensors": state},
        "sharded": {
            "a.safetensors": {k: state[k] for k in keys[:half]},
            "b.safetensors": {k: state[k] for k in keys[half:]},
            "diffusion_pytorch_model.safetensors.index.json": {
                "weight_map": {k: "a.safetensors" if i < half else "b.safetensors"
                               for i, k in enumerate(keys)}},
        },
    }  # fmt: skip
    for name, files in layouts.items():
        trunk = load_trunk(folder(name, files), dtype=torch.bfloat16)
        for k, v in state.items():
            assert torch.equal(trunk.state_dict()[k], v.to(torch.bfloat16)), (name, k)
    # assign_trunk_weights on its own: CPU and float32 by default
    direct = assign_trunk_weights(build_trunk(cfg, device="meta"), state, "src")
    assert direct.conv_in.weight.device.type == "cpu"
    assert torch.equal(direct.conv_in.weight, ref.conv_in.weight)

    def refusal(source, **kw):
        with pytest.raises(WeightsFileError) as err:
            load_trunk(source, **kw)
        return str(err.value)

    empty = folder("empty", {})
    assert refusal(empty) == (
        f"{empty}: no diffusion_pytorch_model[.fp16].safetensors/.bin weights in this folder"
    )
    assert refusal(tmp_path / "nothing") == (
        f"{tmp_path / 'nothing'}: no such file or folder (expected an SDXL diffusers folder or "
        "checkpoint)"
    )
    (tmp_path / "noconfig").mkdir()
    assert refusal(tmp_path / "noconfig") == (
        f"{tmp_path / 'noconfig'}: not a diffusers UNet folder (expected unet/config.json or "
        "config.json)"
    )
    missing = {k: v for k, v in state.items() if k not in keys[:4]}
    path = folder("missing", {"diffusion_pytorch_model.safetensors": missing})
    assert refusal(path) == (
        f"{path}: not the expected UNet: 4 of {len(keys)} down/mid tensors missing, e.g. {keys[:3]}"
    )
    wrong = {k: torch.zeros(3) if k in keys[-4:] else v for k, v in state.items()}
    path = folder("wrong", {"diffusion_pytorch_model.safetensors": wrong})
    shapes = [f"{k}: file (3,) vs model {tuple(state[k].shape)}" for k in keys[-4:-1]]
    assert refusal(path) == f"{path}: shape mismatch (a different UNet?): {shapes}"
    # single files: context width 2048 is checked against the family the file holds
    wide_cfg = {**cfg, "cross_attention_dim": 2048}
    torch.manual_seed(6)
    wide = build_trunk(wide_cfg)
    ldm = {k: v.contiguous() for k, v in sdxl_trunk_to_ldm(wide.state_dict()).items()}
    single = tmp_path / "wide.SAFETENSORS"
    save_file(ldm, str(single))
    trunk = load_trunk(single, config=wide_cfg)
    assert torch.equal(trunk.conv_in.weight, wide.conv_in.weight)
    sd21_wide = {**TINY_TRUNK_CONFIGS["sd21-tiny"], "cross_attention_dim": 1024}
    assert refusal(single, config=sd21_wide) == (
        f"{single}: this is a sdxl checkpoint; the discriminator backbone needs sd21"
    )
    nothing = tmp_path / "vae_only.ckpt"
    torch.save({"state_dict": {"first_stage_model.x": torch.zeros(1), "step": 3}}, nothing)
    assert refusal(nothing, config=wide_cfg) == (
        f"{nothing}: no LDM UNet keys (model.diffusion_model.input_blocks...)"
    )
    assert refusal(single).startswith(f"{single}: not the expected UNet: ")  # sdxl-base default
    # a 2048-wide config is checked too: an SDXL layout with 1024-wide context is no SDXL file
    torch.manual_seed(7)
    narrow = build_trunk({**cfg, "cross_attention_dim": 1024})
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in sdxl_trunk_to_ldm(narrow.state_dict()).items()},
              str(other))  # fmt: skip
    assert refusal(other, config=wide_cfg) == (
        f"{other}: this is a unknown checkpoint; the discriminator backbone needs sdxl"
    )
    no_map = folder("no_map", {"diffusion_pytorch_model.safetensors.index.json": {}})
    assert refusal(no_map) == (
        f"{no_map}: not the expected UNet: {len(keys)} of {len(keys)} down/mid tensors missing, "
        f"e.g. {keys[:3]}"
    )
    # safetensors' own errors (after the header check passed) name the file
    import safetensors

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(safetensors, "safe_open", broken)
    path = tmp_path / "missing" / "diffusion_pytorch_model.safetensors"
    assert refusal(path.parent) == f"{path}: damaged or truncated .safetensors file (boom)"
    assert refusal(single, config=wide_cfg) == (
        f"{single}: damaged or truncated .safetensors file (boom)"
    )


def test_trunk_forward_matches_diffusers_with_other_unet_options():
    """An SD2.1-style trunk with the UNet options SDXL does not use (activation after the time
    embedding, centred input, a mid block without attention) against diffusers' own forward;
    the SDXL add-embedding's refusal and its dtype cast."""
    cfg = {**TINY_TRUNK_CONFIGS["sd21-tiny"], "time_embedding_act_fn": "silu",
           "center_input_sample": True, "mid_block_type": "UNetMidBlock2D"}  # fmt: skip
    torch.manual_seed(1)
    full = UNet2DConditionModel(**cfg).eval()
    trunk = build_trunk(cfg)
    trunk.load_state_dict(full.state_dict(), strict=False)
    z, t, ctx = _latents(2, 16), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    seen = {}
    full.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
    with torch.no_grad():
        full(z, t, encoder_hidden_states=ctx)
        torch.testing.assert_close(trunk_forward(trunk, z, t, ctx), seen["mid"])
    sdxl = build_trunk("sdxl-tiny", dtype=torch.bfloat16)
    cond = zero_condition(TINY_TRUNK_CONFIGS["sdxl-tiny"])
    cond.text_embeds.normal_()
    z, t, ctx = z[:1].bfloat16(), t[:1], torch.randn(1, 77, 32).bfloat16()
    for text, ids in ((cond.text_embeds, None), (None, cond.time_ids)):
        with pytest.raises(ValueError) as err:
            trunk_forward(sdxl, z, t, ctx, text, ids)
        assert str(err.value) == "an SDXL-style trunk needs text_embeds and time_ids"
    with torch.no_grad():  # float32 text embeddings are cast to the trunk's dtype
        torch.testing.assert_close(
            trunk_forward(sdxl, z, t, ctx, cond.text_embeds, cond.time_ids),
            trunk_forward(sdxl, z, t, ctx, cond.text_embeds.bfloat16(), cond.time_ids),
            atol=0, rtol=0,
        )  # fmt: skip


def test_unsupported_unet_options_are_named():
    cfg = TINY_TRUNK_CONFIGS["sd21-tiny"]
    assert trunk_config({"_class_name": "UNet2DConditionModel", "_x": 1, **cfg}) == cfg
    for opts in (
        {"class_embed_type": "timestep"},
        {"num_class_embeds": 10},
        {"encoder_hid_dim": 16},
        {"time_cond_proj_dim": 8},
        {"addition_embed_type": "text"},
        {"class_embed_type": "timestep", "time_cond_proj_dim": 8, "addition_embed_type": "image"},
    ):
        with pytest.raises(ValueError) as err:
            build_trunk({**cfg, **opts}, device="meta")
        assert str(err.value) == (
            f"UNet config options the discriminator trunk does not support: {opts}"
        )


def test_from_pretrained_reads_a_single_file_with_the_config_base(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(4)
    ref = build_trunk("sdxl-tiny")
    path = tmp_path / "sdxl_tiny.safetensors"
    save_file(
        {k: v.contiguous() for k, v in sdxl_trunk_to_ldm(ref.state_dict()).items()}, str(path)
    )
    d = DiffusionDiscriminator.from_pretrained(path, tiny_config())
    assert torch.equal(d.unet.conv_in.weight, ref.conv_in.weight)
