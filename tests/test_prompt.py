"""The empty-prompt embedding, computed in plain torch, against transformers' CLIPTextModel."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from d3sr_core.loading.files import WeightsFileError
from d3sr_core.loading.prompt import (
    EMPTY_PROMPT_IDS,
    empty_prompt_embeds,
    empty_prompt_ids,
    encode_empty_prompt_hf_clip,
    encode_empty_prompt_openclip,
)

transformers = pytest.importorskip("transformers")

# head_dim 64 as in OpenCLIP ViT-H (1024 / 16): the OpenCLIP layout has no head count, so
# encode_empty_prompt_openclip derives it as width // 64.
WIDTH, LAYERS, HEADS = 128, 3, 2


def tiny_clip(hidden_act: str = "gelu", seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
    )
    model = transformers.CLIPTextModel(config).eval()
    # Random init leaves LayerNorms at identity and biases at zero: perturb them too, so a
    # swapped or dropped norm/bias would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def reference(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=empty_prompt_ids()).last_hidden_state


def hf_state(model, layout: str = "text_model.") -> dict:
    """CLIPTextModel weights keyed as on disk: SD2.1's hub files (and transformers < 5) use
    ``text_model.*``; transformers >= 5 saves the same tensors with no prefix."""
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    return {layout + k: v for k, v in sd.items() if k != "embeddings.position_ids"}


def to_openclip(hf: dict, prefix: str = "cond_stage_model.model.", extra_block: bool = True):
    """HF CLIPTextModel weights -> original OpenCLIP layout (written independently of the
    module under test), plus a random extra last block that SD2 skips (its HF export drops it)."""
    hf = {k.removeprefix("text_model."): v for k, v in hf.items()}
    t = ""
    out = {
        "token_embedding.weight": hf[t + "embeddings.token_embedding.weight"],
        "positional_embedding": hf[t + "embeddings.position_embedding.weight"],
        "ln_final.weight": hf[t + "final_layer_norm.weight"],
        "ln_final.bias": hf[t + "final_layer_norm.bias"],
        "text_projection": torch.randn(WIDTH, WIDTH),
        "logit_scale": torch.tensor(4.6),
    }
    names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for i in range(LAYERS):
        src, dst = f"{t}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [hf[f"{src}self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")]
            )
            for a, b in names.items():
                out[f"{dst}{b}.{kind}"] = hf[f"{src}{a}.{kind}"]
    if extra_block:
        last = f"transformer.resblocks.{LAYERS}."
        for k in [k for k in out if k.startswith(f"transformer.resblocks.{LAYERS - 1}.")]:
            out[last + k.split(".", 3)[3]] = torch.randn_like(out[k])
    return {prefix + k: v.clone().contiguous() for k, v in out.items()}


def test_empty_prompt_ids():
    assert len(EMPTY_PROMPT_IDS) == 77
    assert EMPTY_PROMPT_IDS[:3] == (49406, 49407, 0)
    assert set(EMPTY_PROMPT_IDS[2:]) == {0}
    ids = empty_prompt_ids(10, pad_id=49407)
    assert ids.shape == (1, 10) and ids.dtype == torch.long
    assert ids[0].tolist() == [49406] + [49407] * 9


@pytest.mark.parametrize("layout", ["text_model.", ""])
@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_hf_clip_matches_transformers(act, layout):
    model = tiny_clip(act)
    out = encode_empty_prompt_hf_clip(model.state_dict(), model.config.to_dict())
    torch.testing.assert_close(out, reference(model), atol=1e-5, rtol=1e-5)
    out = encode_empty_prompt_hf_clip(hf_state(model, layout), model.config.to_dict())
    assert out.shape == (1, 77, WIDTH) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(model), atol=1e-5, rtol=1e-5)


def test_hf_clip_reads_activation_from_config():
    model = tiny_clip("gelu")
    cfg = model.config.to_dict()
    wrong = encode_empty_prompt_hf_clip(model.state_dict(), {**cfg, "hidden_act": "quick_gelu"})
    assert not torch.allclose(wrong, reference(model), atol=1e-4)


@pytest.mark.parametrize("prefix", ["cond_stage_model.model.", ""])
def test_openclip_layout_matches_and_skips_last_block(prefix):
    model = tiny_clip("gelu")
    sd = to_openclip(model.state_dict(), prefix)
    out = encode_empty_prompt_openclip(sd)
    assert out.shape == (1, 77, WIDTH)
    torch.testing.assert_close(out, reference(model), atol=1e-5, rtol=1e-5)
    # The extra block is really there and really skipped.
    assert not torch.allclose(encode_empty_prompt_openclip(sd, skip_last_layers=0), out)
    no_extra = to_openclip(model.state_dict(), prefix, extra_block=False)
    torch.testing.assert_close(
        encode_empty_prompt_openclip(no_extra, skip_last_layers=0), out, atol=1e-5, rtol=1e-5
    )


def test_openclip_head_count_override():
    model = tiny_clip("gelu")
    sd = to_openclip(hf_state(model))
    out = encode_empty_prompt_openclip(sd, num_heads=HEADS)
    torch.testing.assert_close(out, reference(model), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(encode_empty_prompt_openclip(sd, num_heads=4), out, atol=1e-4)


def test_openclip_fp16_weights_give_float32():
    model = tiny_clip("gelu")
    sd = {k: v.half() for k, v in to_openclip(model.state_dict()).items()}
    out = encode_empty_prompt_openclip(sd)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(model), atol=2e-2, rtol=2e-2)


def test_diffusers_folder(tmp_path):
    model = tiny_clip("gelu")
    model.save_pretrained(tmp_path / "text_encoder")
    (tmp_path / "model_index.json").write_text("{}")
    torch.testing.assert_close(
        empty_prompt_embeds(tmp_path), reference(model), atol=1e-5, rtol=1e-5
    )


def test_diffusers_folder_with_bin_weights(tmp_path):
    model = tiny_clip("quick_gelu")
    te = tmp_path / "text_encoder"
    te.mkdir()
    (te / "config.json").write_text(model.config.to_json_string())
    torch.save(hf_state(model), te / "pytorch_model.bin")
    torch.testing.assert_close(
        empty_prompt_embeds(tmp_path), reference(model), atol=1e-5, rtol=1e-5
    )


def test_single_file_safetensors_and_ckpt(tmp_path):
    model = tiny_clip("gelu")
    sd = to_openclip(hf_state(model))
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    sd["first_stage_model.encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3)
    expected = reference(model)

    st = tmp_path / "sd21.safetensors"
    save_file(sd, str(st))
    torch.testing.assert_close(empty_prompt_embeds(st), expected, atol=1e-5, rtol=1e-5)

    ckpt = tmp_path / "sd21.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, ckpt)
    torch.testing.assert_close(empty_prompt_embeds(str(ckpt)), expected, atol=1e-5, rtol=1e-5)


def test_no_text_encoder_is_a_clear_error(tmp_path):
    path = tmp_path / "unet_only.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3)}, str(path))
    with pytest.raises(WeightsFileError, match="this checkpoint has no text encoder") as err:
        empty_prompt_embeds(path)
    assert err.value.path == path and "unet_only.safetensors" in str(err.value)

    folder = tmp_path / "sd21_no_te"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(WeightsFileError, match="no text encoder"):
        empty_prompt_embeds(folder)

    with pytest.raises(WeightsFileError, match="file not found"):
        empty_prompt_embeds(tmp_path / "missing.safetensors")


def test_truncated_text_encoder_names_the_problem(tmp_path):
    model = tiny_clip("gelu")
    sd = to_openclip(model.state_dict())
    del sd["cond_stage_model.model.transformer.resblocks.1.mlp.c_fc.weight"]
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsFileError, match="resblocks.1.mlp.c_fc.weight"):
        empty_prompt_embeds(path)
