"""The LoRA strength through every entry point, checked numerically against a merge by hand.

Strength ``s`` must give exactly the weights ``W + s * scale * B @ A`` (and, for a trained
replacement tensor, ``W + s * (trained - W)``), where ``scale`` is the adapter's own
``alpha / rank``: 1 for the test checkpoints below, 2 for OSEDiff imports (rank 4, peft's
default alpha 8). ``build_generator`` is checked end to end in ``test_reference_pipeline.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from make_tiny_weights import write_tiny_base
from reference import merge_by_hand, reference_upscale
from test_reference_pipeline import LORA_PATHS, lora_factors
from tiny_models import tiny_prompt_embeds, tiny_unet, tiny_vae

from d3sr_core import cli
from d3sr_core.image_files import decode_png16, encode_png16
from d3sr_core.loading.base import BaseModel
from d3sr_core.loading.checkpoint import D3SRCheckpoint, save_checkpoint
from d3sr_core.loading.generator import build_generator, load_generator
from d3sr_core.loading.osediff import osediff_to_checkpoint
from d3sr_core.models import GeneratorConfig, LoraAdapter
from d3sr_core.models.configs import bundled_config

VAE_PATHS = ("encoder.down_blocks.0.resnets.0.conv1", "quant_conv")


def assert_same_weights(model, expected, atol=1e-6):
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=atol, rtol=0, msg=key)


def checkpoint(unet_scale: float, vae_scale: float | None = None) -> D3SRCheckpoint:
    adapters = {"unet": LoraAdapter(lora_factors(tiny_unet(), LORA_PATHS, seed=1), unet_scale)}
    if vae_scale is not None:
        adapters["vae"] = LoraAdapter(lora_factors(tiny_vae(), VAE_PATHS, seed=2), vae_scale)
    config = GeneratorConfig(timestep=399, lora_rank=4, lora_alpha=4 * unet_scale)
    return D3SRCheckpoint(config, tiny_prompt_embeds(), adapters)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("base"), text_encoder=False)


def test_load_generator_strength_equals_merge_by_hand(tmp_path, base_folder):
    ckpt = checkpoint(unet_scale=2.0, vae_scale=0.5)
    weights = save_checkpoint(ckpt, tmp_path / "w.safetensors")
    gen = load_generator(weights, base_folder, strength=0.6)
    unet, vae = ckpt.adapters["unet"], ckpt.adapters["vae"]
    assert_same_weights(gen.unet, merge_by_hand(tiny_unet(), unet.factors, 2.0, 0.6))
    assert_same_weights(gen.vae, merge_by_hand(tiny_vae(), vae.factors, 0.5, 0.6))
    assert gen.strength == 0.6


def _peft_keys(factors: dict, adapter: str) -> dict[str, torch.Tensor]:
    sd = {}
    for path, (a, b) in factors.items():
        sd[f"{path}.lora_A.{adapter}.weight"] = a
        sd[f"{path}.lora_B.{adapter}.weight"] = b
    return sd


def test_set_strength_on_an_osediff_import_uses_its_scale_of_two():
    """OSEDiff: rank 4, lora_alpha never set (peft default 8) -> every delta counts twice."""
    unet_factors = lora_factors(tiny_unet(), LORA_PATHS, seed=3)
    vae_factors = lora_factors(tiny_vae(), VAE_PATHS, seed=4)
    trained_conv_in = tiny_unet(seed=9).conv_in.state_dict()
    state = {
        "state_dict_unet": {
            **_peft_keys(unet_factors, "default_encoder"),
            **{f"conv_in.{k}": v for k, v in trained_conv_in.items()},
        },
        "state_dict_vae": _peft_keys(vae_factors, "default_encoder"),
        "rank_unet": 4,
        "rank_vae": 4,
    }
    ckpt = osediff_to_checkpoint(state, tiny_prompt_embeds())
    base = BaseModel(tiny_unet(), tiny_vae(), bundled_config("sd21-base", "scheduler"), "tiny")
    gen = build_generator(base, ckpt, strength=1.0)
    replaced = {f"conv_in.{k}": v for k, v in trained_conv_in.items()}
    for strength in (0.3, 2.0, 1.0):
        gen.set_strength(strength)
        assert gen.strength == strength
        assert_same_weights(
            gen.unet, merge_by_hand(tiny_unet(), unet_factors, 2.0, strength, replaced), 2e-6
        )
        assert_same_weights(gen.vae, merge_by_hand(tiny_vae(), vae_factors, 2.0, strength), 2e-6)
    gen.set_strength(0.0)
    assert_same_weights(gen.unet, tiny_unet(), 2e-6)
    assert_same_weights(gen.vae, tiny_vae(), 2e-6)


def test_cli_strength_gives_the_reference_image(tmp_path, base_folder):
    ckpt = checkpoint(unet_scale=2.0)
    weights = save_checkpoint(ckpt, tmp_path / "w.safetensors")
    values = np.random.default_rng(0).integers(0, 65536, size=(6, 8, 3)).astype(np.float32)
    pixels = values / 65535.0  # exactly representable in a 16-bit PNG
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(encode_png16(pixels))
    args = ["--weights", str(weights), "--base", str(base_folder), "-q", "--precision", "fp32"]
    args += ["--color-fix", "none", "--scale", "2", "--strength", "0.4"]
    assert cli.main(["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *args]) == 0
    out = decode_png16((tmp_path / "out" / "x.png").read_bytes())
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    factors = ckpt.adapters["unet"].factors

    def expected(strength):
        unet = merge_by_hand(tiny_unet(), factors, 2.0, strength)
        ref = reference_upscale(unet, tiny_vae(), ckpt.prompt_embeds, x, 2, 399)
        return ref[0].permute(1, 2, 0).numpy()

    want = expected(0.4)
    # 16-bit quantisation (half a step) + the pipeline tolerance of test_reference_pipeline
    assert np.abs(out - want).max() < 0.5 / 65535 + 5e-5
    assert np.abs(expected(1.0) - want).max() > 5e-3
