import copy
import json
import struct

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import tiny_prompt_embeds, tiny_unet, tiny_vae

from d3sr_core.loading.base import BaseModel
from d3sr_core.loading.checkpoint import (
    D3SRCheckpoint,
    checkpoint_state_dict,
    is_d3sr_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
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


def checkpoint_file_parts() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header of ``random_checkpoint()`` as the file format spells them."""
    ckpt = random_checkpoint()
    meta = {
        "format": "d3sr",
        "format_version": "1",
        "config": json.dumps(ckpt.config.to_dict()),
        "adapters": json.dumps({"unet": {"scale": 1.0}, "vae": {"scale": 2.0}}),
    }
    return checkpoint_state_dict(ckpt), meta


_PROJ_B = "unet.mid_block.attentions.0.proj_in.lora_B.weight"
_INFO = (
    "(run `d3sr info` on it to see what it is; OSEDiff .pkl files are imported with `d3sr convert`)"
)
_META = "D3SR header metadata is incomplete or invalid"
_PAIRS = "LoRA pairs incomplete (lora_A without lora_B or the reverse) for: ['quant_conv']"
REFUSALS = {  # case -> (change to tensors / header, the whole problem the error must state)
    "no format entry": (
        lambda t, m: m.pop("format"),
        f"not a D3SR checkpoint: its header has no 'format: d3sr' entry {_INFO}",
    ),
    "no format_version (read as 0)": (
        lambda t, m: m.pop("format_version"),
        "D3SR format version 0; this d3sr reads versions 1..1 (update d3sr)",
    ),
    "config a list": (
        lambda t, m: m.update(config="[1]"),
        f"{_META} ('config' and 'adapters' must be JSON objects)",
    ),
    "adapters a list": (
        lambda t, m: m.update(adapters="[1]"),
        f"{_META} ('config' and 'adapters' must be JSON objects)",
    ),
    "no config": (lambda t, m: m.pop("config"), f"{_META} (missing 'config')"),
    "timestep a string": (
        lambda t, m: m.update(config=json.dumps({"timestep": "399"})),
        "D3SR header config has invalid fields: timestep = '399'",
    ),
    "scale a string": (
        lambda t, m: m.update(adapters=json.dumps({"unet": {"scale": "big"}, "vae": 2.0})),
        "unet LoRA scale is 'big', expected a finite number",
    ),
    "no prompt_embeds": (
        lambda t, m: t.pop("prompt_embeds"),
        "D3SR checkpoint lacks the 'prompt_embeds' tensor [1, 77, C]",
    ),
    "prompt_embeds inf": (
        lambda t, m: t["prompt_embeds"].view(-1).__setitem__(0, float("inf")),
        "D3SR checkpoint: prompt_embeds holds NaN or infinite values",
    ),
    "prompt_embeds batch 2": (
        lambda t, m: t.update(prompt_embeds=torch.zeros(2, 77, 32)),
        "'prompt_embeds' has shape (2, 77, 32), expected [1, 77, C]",
    ),
    "replacement for another model": (
        lambda t, m: t.update({"replace.text_encoder.weight": torch.zeros(1)}),
        "unexpected tensor 'replace.text_encoder.weight' in a D3SR checkpoint",
    ),
    "unet tensor without a LoRA marker": (
        lambda t, m: t.update({"unet.extra.weight": torch.zeros(1)}),
        "unexpected tensor 'unet.extra.weight' in a D3SR checkpoint",
    ),
    "vae lora_B missing": (
        lambda t, m: t.pop("vae.quant_conv.lora_B.weight"),
        f"vae LoRA: {_PAIRS}",
    ),
    "no scale for the vae": (
        lambda t, m: m.update(adapters=json.dumps({"unet": {"scale": 1.0}})),
        "header gives no LoRA scale for the vae adapter",
    ),
    "ranks differ": (
        lambda t, m: t.update({_PROJ_B: torch.zeros(64, 3)}),
        "unet LoRA: mid_block.attentions.0.proj_in: lora_A has rank 4, lora_B rank 3",
    ),
    "replacement NaN": (
        lambda t, m: t["replace.unet.conv_in.bias"].__setitem__(0, float("nan")),
        "unet replacement tensors: conv_in.bias holds NaN or infinite values",
    ),
    "no unet adapter": (
        lambda t, m: [t.pop(k) for k in list(t) if k.startswith(("unet.", "replace.unet."))],
        "D3SR checkpoint holds no UNet LoRA tensors ('unet.*.lora_A.weight')",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_checkpoint_refusals_state_the_whole_problem(tmp_path, case):
    from safetensors.torch import save_file

    change, problem = REFUSALS[case]
    tensors, meta = checkpoint_file_parts()
    change(tensors, meta)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(WeightsFileError) as err:
        load_checkpoint(path)
    assert err.value.problem == problem
    assert str(err.value) == f"{path}: {problem}"
    assert not is_d3sr_checkpoint(path) if case == "no format entry" else is_d3sr_checkpoint(path)


def test_checkpoint_file_names_scales_and_counts(tmp_path):
    from safetensors.torch import save_file

    # a bare number is accepted as an adapter's scale
    tensors, meta = checkpoint_file_parts()
    meta["adapters"] = json.dumps({"unet": 0.5, "vae": {"scale": 2.0}})
    save_file(tensors, str(tmp_path / "bare.safetensors"), metadata=meta)
    loaded = load_checkpoint(tmp_path / "bare.safetensors")
    assert (loaded.adapters["unet"].scale, loaded.adapters["vae"].scale) == (0.5, 2.0)
    # parameters: prompt 77*32, unet (4*16*9 + 16*4) + (4*64 + 64*4) + bias 16, vae 32 + 32
    assert loaded.num_parameters() == 77 * 32 + (576 + 64) + (256 + 256) + 16 + (32 + 32)
    # is_d3sr_checkpoint: the suffix (any case) and the header's format entry decide
    upper = save_checkpoint(random_checkpoint(), tmp_path / "nested" / "dir" / "M.SAFETENSORS")
    assert is_d3sr_checkpoint(upper) and load_checkpoint(upper).config.timestep == 250
    (tmp_path / "m.pkl").write_bytes(upper.read_bytes())
    assert not is_d3sr_checkpoint(tmp_path / "m.pkl")
    (tmp_path / "cut.safetensors").write_bytes(upper.read_bytes()[:50])
    assert not is_d3sr_checkpoint(tmp_path / "cut.safetensors")
    with pytest.raises(ValueError) as err:
        save_checkpoint(random_checkpoint(), tmp_path / "m.pt")
    assert str(err.value) == f"{tmp_path / 'm.pt'}: D3SR checkpoints are .safetensors files"
    # a failed write leaves nothing behind and reports its own error
    with pytest.raises(TypeError, match="metadata"):
        save_checkpoint(random_checkpoint(), tmp_path / "new" / "x.safetensors", {"x": 1})
    assert list((tmp_path / "new").iterdir()) == []
    ckpt = random_checkpoint()
    ckpt.adapters["text_encoder"] = LoraAdapter()
    with pytest.raises(ValueError) as err:
        checkpoint_state_dict(ckpt)
    assert str(err.value) == (
        "adapter for unknown model 'text_encoder'; expected one of ('unet', 'vae')"
    )


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
