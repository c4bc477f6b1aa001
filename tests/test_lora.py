import copy

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from tiny_models import TINY_CONTEXT_DIM, tiny_unet

from d3sr_core.models import GeneratorConfig
from d3sr_core.models.configs import bundled_config
from d3sr_core.models.lora import (
    DEFAULT_UNET_LORA_TARGETS,
    LoraAdapter,
    MergedLora,
    count_lora_parameters,
    find_lora_targets,
    lora_delta,
    split_peft_state_dict,
)


def peft_unet(rank=4, alpha=8.0, seed=0):
    """A tiny UNet with a peft LoRA (unmerged) whose B matrices are random, plus its base copy."""
    base = tiny_unet()
    model = copy.deepcopy(base)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(DEFAULT_UNET_LORA_TARGETS),
        init_lora_weights="gaussian",
    )
    model = inject_adapter_in_model(config, model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return base, model.eval()


def run_unet(unet, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 77, TINY_CONTEXT_DIM, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([399]), encoder_hidden_states=cond).sample


def test_merged_lora_equals_peft_unmerged():
    base, peft_model = peft_unet(rank=4, alpha=8.0)
    factors = split_peft_state_dict(get_peft_model_state_dict(peft_model))
    assert len(factors) == len(find_lora_targets(base, DEFAULT_UNET_LORA_TARGETS))
    merged = copy.deepcopy(base)
    MergedLora(merged, LoraAdapter(factors, scale=2.0))
    expected = run_unet(peft_model)
    assert (expected - run_unet(base)).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(run_unet(merged), expected, atol=1e-4, rtol=0)


def test_strength_zero_is_base_and_strength_is_reversible():
    base, peft_model = peft_unet()
    factors = split_peft_state_dict(get_peft_model_state_dict(peft_model))
    model = copy.deepcopy(base)
    merged = MergedLora(model, LoraAdapter(factors, scale=2.0), strength=0.0)
    torch.testing.assert_close(run_unet(model), run_unet(base), atol=0, rtol=0)
    merged.set_strength(1.0)
    torch.testing.assert_close(run_unet(model), run_unet(peft_model), atol=1e-4, rtol=0)
    merged.set_strength(2.0)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    down, up = factors[path]
    expected = base.get_submodule(path).weight + 2.0 * 2.0 * (up @ down)
    torch.testing.assert_close(model.get_submodule(path).weight, expected, atol=1e-6, rtol=0)
    merged.set_strength(0.0)
    torch.testing.assert_close(run_unet(model), run_unet(base), atol=1e-5, rtol=0)


def test_replaced_parameter_interpolates_with_strength():
    base = tiny_unet()
    model = copy.deepcopy(base)
    trained = torch.randn_like(base.conv_in.weight)
    merged = MergedLora(model, LoraAdapter({}, 1.0, {"conv_in.weight": trained}), strength=1.0)
    torch.testing.assert_close(model.conv_in.weight, trained)
    merged.set_strength(0.5)
    torch.testing.assert_close(model.conv_in.weight, (trained + base.conv_in.weight) / 2)


def test_mismatched_lora_shape_and_unknown_module_are_named():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="conv_in.*delta of shape"):
        MergedLora(
            unet, LoraAdapter({"conv_in": (torch.zeros(4, 3, 3, 3), torch.zeros(16, 4, 1, 1))})
        )
    with pytest.raises(KeyError, match="no_such.block"):
        MergedLora(unet, LoraAdapter({"no_such.block": (torch.zeros(4, 8), torch.zeros(8, 4))}))


def test_incomplete_peft_pairs_rejected():
    with pytest.raises(KeyError, match="incomplete"):
        split_peft_state_dict({"a.lora_A.default.weight": torch.zeros(1, 1)})


# The target list of spec section 2, written out independently of the code.
SPEC_TARGETS = {
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "conv", "conv_in", "conv_out", "time_emb_proj",
}  # fmt: skip


def test_full_size_parameter_counts_match_paper():
    """UNet 865.9 M + VAE 83.7 M + the rank-16 LoRA on every spec target = the paper's 966.3 M.

    The LoRA count is peft's own on the full-size UNet (meta device). Each target family must
    match modules (conv_in / conv_out add only 6 k / 46 k parameters, below what the total can
    resolve, so they are checked one by one); rank 8 (958.1 M) or dropping conv1 (961.9 M)
    is far outside the +-0.3 M accepted.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(bundled_config("sd21-base", "unet"))
        vae = AutoencoderKL.from_config(bundled_config("sd21-base", "vae"))
    n_unet = sum(p.numel() for p in unet.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    assert n_unet / 1e6 == pytest.approx(865.9, abs=0.05)
    assert n_vae / 1e6 == pytest.approx(83.7, abs=0.05)
    assert set(DEFAULT_UNET_LORA_TARGETS) == SPEC_TARGETS
    config = GeneratorConfig()
    assert (config.lora_rank, config.lora_alpha) == (16, 16.0)
    assert set(config.lora_targets) == SPEC_TARGETS
    n_lora = count_lora_parameters(unet, config.lora_targets, rank=config.lora_rank)
    for target in SPEC_TARGETS:
        assert find_lora_targets(unet, [target]), f"{target} matches no module"
    with torch.device("meta"):
        lora = LoraConfig(r=16, lora_alpha=16, target_modules=sorted(SPEC_TARGETS))
        peft_model = inject_adapter_in_model(lora, unet)
    n_peft = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert n_lora == n_peft
    total = (n_unet + n_vae + n_lora) / 1e6
    assert total == pytest.approx(966.3, abs=0.3)


def test_lora_count_matches_peft_on_tiny_model():
    base, peft_model = peft_unet(rank=4)
    n_peft = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert count_lora_parameters(base, DEFAULT_UNET_LORA_TARGETS, rank=4) == n_peft


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_accumulates_in_float32(dtype):
    """A nested half-precision module: W + s * scale * B @ A and b + s (b' - b), each summed in
    float32 and rounded once (written out), at strength 0.7 and back at 0."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(6, 5))).to(dtype)
    weight0, bias0 = model[0][0].weight.detach().clone(), model[0][0].bias.detach().clone()
    down, up = torch.randn(3, 6, generator=g), torch.randn(5, 3, generator=g)
    trained_bias = torch.randn(5, generator=g)
    adapter = LoraAdapter(
        factors={"0.0": (down, up)}, scale=2.0, replaced={"0.0.bias": trained_bias}
    )
    merged = MergedLora(model, adapter, strength=0.7)
    expected_w = (weight0.float() + 0.7 * 2.0 * (up @ down)).to(dtype)
    expected_b = (bias0.float() + 0.7 * (trained_bias - bias0.float())).to(dtype)
    assert model[0][0].weight.dtype == dtype
    torch.testing.assert_close(model[0][0].weight, expected_w, atol=0, rtol=0)
    torch.testing.assert_close(model[0][0].bias, expected_b, atol=0, rtol=0)
    merged.set_strength(0.0)
    torch.testing.assert_close(model[0][0].weight.float(), weight0.float(), atol=0.02, rtol=0.01)


def test_split_peft_state_dict_key_forms_written_out():
    """``<path>[.base_layer].lora_A[.<adapter>].weight``: grouped by path, filtered by adapter;
    biases, other tensors and a second adapter's keys are ignored or refused as documented."""
    t = {name: torch.full((1,), float(i)) for i, name in enumerate("abcdefgh")}
    state = {
        "down.0.attn.lora_A.weight": t["a"],
        "down.0.attn.lora_B.weight": t["b"],
        "conv_in.base_layer.lora_A.default_encoder.weight": t["c"],
        "conv_in.base_layer.lora_B.default_encoder.weight": t["d"],
        "up.lora_A.other.weight": t["e"],
        "up.lora_B.other.weight": t["f"],
        "down.0.attn.lora_A.bias": t["g"],  # not a weight: ignored
        "mid.lora_A_not_a_marker.weight": t["h"],  # no ".lora_A." marker: ignored
    }
    assert split_peft_state_dict(state) == {
        "down.0.attn": (t["a"], t["b"]),
        "conv_in": (t["c"], t["d"]),
        "up": (t["e"], t["f"]),
    }
    assert split_peft_state_dict(state, "default_encoder") == {"conv_in": (t["c"], t["d"])}
    assert split_peft_state_dict(state, "") == {"down.0.attn": (t["a"], t["b"])}
    with pytest.raises(KeyError, match="more than one adapter name"):
        split_peft_state_dict({**state, "up.lora_A.third.weight": t["a"]})
    with pytest.raises(KeyError, match=r"incomplete .* for: \['up'\]"):
        split_peft_state_dict({k: v for k, v in state.items() if k != "up.lora_B.other.weight"})
    # seven modules with lora_A only: the message lists the first five, sorted
    lonely = {f"m{i}.lora_A.weight": t["a"] for i in (6, 0, 5, 1, 4, 2, 3)}
    with pytest.raises(KeyError) as err:
        split_peft_state_dict(lonely)
    assert str(err.value).endswith("for: ['m0', 'm1', 'm2', 'm3', 'm4']\"")


def test_adapter_length_and_parameter_count_written_out():
    adapter = LoraAdapter(
        factors={
            "a": (torch.zeros(4, 10), torch.zeros(6, 4)),
            "b": (torch.zeros(2, 3, 3, 3), torch.zeros(5, 2, 1, 1)),
        },
        replaced={"c.weight": torch.zeros(7, 3)},
    )
    assert len(adapter) == 3
    assert adapter.num_parameters() == (40 + 24) + (54 + 10) + 21
    assert len(LoraAdapter()) == 0 and LoraAdapter().num_parameters() == 0


@pytest.mark.parametrize(
    "down_shape,up_shape",
    [((2, 3, 3, 3), (4, 2)), ((2, 3, 3, 3), (4, 2, 3, 3)), ((2, 3, 1), (4, 2, 1))],
)
def test_lora_delta_refuses_pairs_that_are_neither_linear_nor_1x1_conv(down_shape, up_shape):
    message = (
        f"unsupported LoRA pair shapes A={down_shape} B={up_shape}: expected A [r, in] / B [out, r] "
        "(linear) or A [r, in, kh, kw] / B [out, r, 1, 1] (conv)"
    )
    with pytest.raises(ValueError) as info:
        lora_delta(torch.zeros(down_shape), torch.zeros(up_shape))
    assert str(info.value) == message


def test_merge_refusals_name_the_path_and_the_mismatch():
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(6, 5)), torch.nn.ReLU())
    a, b = torch.zeros(2, 6), torch.zeros(5, 2)
    cases = [
        (
            LoraAdapter(factors={"0.9": (a, b)}),
            KeyError,
            "LoRA target '0.9' names no module of Sequential",
        ),
        (LoraAdapter(factors={"1": (a, b)}), KeyError, "LoRA target '1' has no weight"),
        (
            LoraAdapter(replaced={"0.0.bias": torch.zeros(4)}),
            ValueError,
            "replacement for '0.0.bias' has shape (4,), the model's parameter is (5,)",
        ),
        (
            LoraAdapter(replaced={"0.7.bias": torch.zeros(5)}),
            KeyError,
            "parameter owner '0.7' names no module",
        ),
        (
            LoraAdapter(replaced={"0.0.gain": torch.zeros(5)}),
            KeyError,
            "'0.0.gain' names no parameter of Sequential",
        ),
        (
            LoraAdapter(factors={"0.0": (torch.zeros(2, 6, 3), b)}),
            ValueError,
            "LoRA target '0.0': unsupported LoRA pair shapes A=(1, 6, 3) B=(5, 1)",
        ),
    ]
    for adapter, error, message in cases:
        with pytest.raises(error) as info:
            MergedLora(model, adapter)
        assert message in str(info.value), str(info.value)
