"""The diffusion discriminator: full-size SDXL trunk on meta, tiny trunks for behaviour."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from d3sr_core.loading.files import WeightsFileError
from d3sr_core.losses.gan import discriminator_loss, generator_loss
from d3sr_core.models.discriminator import (
    SDXL_LATENT_RESCALE,
    TINY_TRUNK_CONFIGS,
    DiffusionDiscriminator,
    DiscriminatorCondition,
    DiscriminatorConfig,
    PatchHead,
    build_trunk,
    encode_condition,
    lora_target_names,
    trunk_forward,
    zero_condition,
)
from d3sr_core.models.lora import DEFAULT_UNET_LORA_TARGETS, count_lora_parameters


def tiny_config(base: str = "sdxl-tiny", **kw) -> DiscriminatorConfig:
    return DiscriminatorConfig(base=base, head_hidden=32, head_groups=8, **kw)


@pytest.fixture(scope="module")
def tiny_sdxl() -> DiffusionDiscriminator:
    return DiffusionDiscriminator.from_config(tiny_config(), seed=0)


def _latents(b: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 4, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- full size, on meta


def test_full_size_sdxl_trunk_on_meta():
    d = DiffusionDiscriminator.from_config(DiscriminatorConfig(), device="meta")
    unet = d.unet
    assert unet.conv_in.weight.is_meta and d.head.proj_in.weight.is_meta
    assert d.condition_context.is_meta and d.condition_text_embeds.is_meta
    assert d.condition_time_ids.is_meta
    trunk = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)
    assert abs(trunk - 1.243e9) / 1.243e9 < 0.01, trunk
    assert unet.up_blocks is None and unet.conv_out is None and unet.conv_norm_out is None
    assert not any(
        n.startswith(("up_blocks", "conv_out", "conv_norm_out")) for n, _ in unet.named_parameters()
    )
    lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    assert 22.5e6 < lora < 24.0e6, lora  # 23.50 M on the default targets
    # What peft injected is exactly what lora.count_lora_parameters predicts.
    plain = build_trunk("sdxl-base", device="meta")
    names = lora_target_names(plain)
    assert all(n.startswith(("down_blocks.", "mid_block.")) for n in names)
    assert count_lora_parameters(plain, names, 16) == lora
    trainable = {n.split(".")[0] for n, p in d.named_parameters() if p.requires_grad}
    assert trainable == {"unet", "head"}
    head = sum(p.numel() for p in d.head.parameters())
    assert sum(p.numel() for p in d.parameters() if p.requires_grad) == lora + head
    assert d.condition_context.shape == (1, 77, 2048)
    assert d.condition_text_embeds.shape == (1, 1280) and d.condition_time_ids.shape == (1, 6)


def test_full_size_sd21_trunk_on_meta():
    unet = build_trunk("sd21-base", device="meta")
    n = sum(p.numel() for p in unet.parameters())
    assert abs(n - 351.7e6) < 1e6, n  # SD2.1 conv_in + time embedding + down + mid (of 865.9 M)
    assert unet.up_blocks is None


# ---------------------------------------------------------------- tiny SDXL


def test_logit_grid_and_trainable_parameters(tiny_sdxl):
    d = tiny_sdxl
    logits = d(_latents())
    assert logits.shape == (2, 1, 16, 16)  # 64 x 64 latent, two downsamplers
    trainable = [n for n, p in d.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any(n.startswith("head.") for n in trainable)
    frozen = [n for n, p in d.named_parameters() if not p.requires_grad]
    assert frozen and not any("lora_" in n or n.startswith("head.") for n in frozen)
    adapted = {n.split(".lora_")[0].removeprefix("unet.") for n in trainable if "lora_" in n}
    assert adapted == set(lora_target_names(build_trunk("sdxl-tiny", device="meta")))
    assert all(n.startswith(("down_blocks.", "mid_block.")) for n in adapted)


def test_timesteps_and_noising(tiny_sdxl):
    d = tiny_sdxl
    g = torch.Generator().manual_seed(0)
    t = d.sample_timesteps(20000, generator=g)
    assert t.min() >= 0 and t.max() <= 999 and t.min() < 10 and t.max() > 990
    z = _latents(2, 8)
    t = torch.tensor([0, 999])
    noisy = d.noise_latents(z, t, noise=torch.zeros_like(z))
    abar = d.alphas_cumprod[t].view(2, 1, 1, 1)
    assert torch.allclose(noisy, abar.sqrt() * z, atol=1e-6)
    rescaled = DiffusionDiscriminator(
        build_trunk("sdxl-tiny"), tiny_config(latent_rescale=SDXL_LATENT_RESCALE)
    )
    noisy = rescaled.noise_latents(z, t, noise=torch.zeros_like(z))
    assert torch.allclose(noisy, abar.sqrt() * z * (0.13025 / 0.18215), atol=1e-6)
    # the forward judges F(z, t) = sqrt(abar_t) z + sqrt(1 - abar_t) eps, written out here
    eps = torch.randn_like(z)
    by_hand = abar.sqrt() * z + (1 - abar).sqrt() * eps
    with torch.no_grad():
        torch.testing.assert_close(d(z, t, eps), d.logits(by_hand, t), atol=1e-5, rtol=0)
        assert (d.logits(by_hand, t) - d.logits(by_hand, t.flip(0))).abs().max() > 1e-4


def test_discriminator_steps_lower_its_loss():
    """A few optimizer steps on a fixed batch: D's loss falls (real up, fake down)."""
    d = DiffusionDiscriminator.from_config(tiny_config(), seed=1).train()
    real, fake = _latents(2, 16, seed=1), _latents(2, 16, seed=2) * 0.5 + 1.0
    t_r, t_f = torch.tensor([100, 500]), torch.tensor([300, 800])
    n_r, n_f = _latents(2, 16, seed=3), _latents(2, 16, seed=4)
    opt = torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=1e-3)

    def loss():
        return discriminator_loss(d(real, t_r, n_r), d(fake, t_f, n_f))

    start = loss().item()
    for _ in range(5):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    with torch.no_grad():
        end = loss().item()
        assert end < start - 0.05, (start, end)
        assert d(real, t_r, n_r).mean() > d(fake, t_f, n_f).mean()
    # LoRA B matrices left zero-init: they now carry updates
    assert any(p.abs().sum() > 0 for n, p in d.named_parameters() if "lora_B" in n)


def test_generator_gradient_raises_fake_logits(tiny_sdxl):
    """Stepping the fake latent against G's loss gradient makes D call it more real."""
    d = tiny_sdxl
    fake = _latents(1, 16, seed=5).requires_grad_(True)
    t, eps = torch.tensor([200]), _latents(1, 16, seed=6)
    before = d(fake, t, eps)
    generator_loss(before).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    with torch.no_grad():
        after = d(fake - 0.5 * fake.grad / fake.grad.norm(), t, eps)
    assert after.mean() > before.mean()


def test_gradient_checkpointing_gives_same_gradients():
    d = DiffusionDiscriminator.from_config(tiny_config(), seed=2).train()
    for n, p in d.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)
    z, t, eps = _latents(1, 16), torch.tensor([400]), _latents(1, 16, seed=7)

    def grads():
        d.zero_grad()
        discriminator_loss(d(z, t, eps), d(z * 0.3, t, eps)).backward()
        return {n: p.grad.clone() for n, p in d.named_parameters() if p.requires_grad}

    plain = grads()
    d.set_gradient_checkpointing(True)
    assert d.config.gradient_checkpointing
    ckpt = grads()
    d.set_gradient_checkpointing(False)
    assert plain.keys() == ckpt.keys()
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)


def test_save_and_load_trainable_state(tmp_path, tiny_sdxl):
    d = tiny_sdxl
    cond = zero_condition(TINY_TRUNK_CONFIGS["sdxl-tiny"])
    cond.encoder_hidden_states.normal_()
    trained = DiffusionDiscriminator(build_trunk("sdxl-tiny"), tiny_config(), condition=cond)
    for p in trained.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    path = tmp_path / "disc.safetensors"
    trained.save_trainable(path)
    fresh = DiffusionDiscriminator(build_trunk("sdxl-tiny"), tiny_config())
    fresh.load_trainable(path)
    for k, v in trained.trainable_state_dict().items():
        assert torch.equal(fresh.trainable_state_dict()[k], v), k
    assert torch.equal(fresh.condition_context, cond.encoder_hidden_states)
    other_rank = DiffusionDiscriminator(
        build_trunk("sdxl-tiny"), tiny_config(lora_rank=4, lora_alpha=4)
    )
    with pytest.raises(WeightsFileError, match="rank"):
        other_rank.load_trainable(path)
    with pytest.raises(WeightsFileError, match="not a D3SR discriminator"):
        d.load_trainable(_plain_safetensors(tmp_path))


def _plain_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    return path


# ---------------------------------------------------------------- conditioning and SD2.1


class _StubTokenizer:
    model_max_length = 77

    def __call__(self, prompts, padding, max_length, truncation, return_tensors):
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
        ids[:, 0], ids[:, 1] = 1, 2  # BOS, EOS, then padding

        class Out:
            input_ids = ids

        return Out()


def test_encode_condition_with_tiny_text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def cfg(**kw):
        return CLIPTextConfig(
            vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, **kw,
        )  # fmt: skip

    torch.manual_seed(0)
    enc1 = CLIPTextModel(cfg()).eval()
    enc2 = CLIPTextModelWithProjection(cfg(projection_dim=16)).eval()
    cond = encode_condition([_StubTokenizer(), _StubTokenizer()], [enc1, enc2])
    assert cond.encoder_hidden_states.shape == (1, 77, 32)
    assert cond.text_embeds.shape == (1, 16) and cond.time_ids.shape == (1, 6)
    # Reference, as diffusers' StableDiffusionXLPipeline.encode_prompt does: each encoder's
    # penultimate hidden states, concatenated; pooled = the second encoder's text_embeds.
    ids = _StubTokenizer()([""], "max_length", 77, True, "pt").input_ids
    with torch.no_grad():
        out1 = enc1(ids, output_hidden_states=True)
        out2 = enc2(ids, output_hidden_states=True)
    context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    assert (out1.hidden_states[-2] - out1.hidden_states[-1]).abs().max() > 1e-3
    torch.testing.assert_close(cond.encoder_hidden_states, context, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.text_embeds, out2.text_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.time_ids, torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]))
    d = DiffusionDiscriminator(build_trunk("sdxl-tiny"), tiny_config(), condition=cond)
    z, t = _latents(1, 16), torch.tensor([300])
    with torch.no_grad():
        logits = d.logits(z, t)
        feats = trunk_forward(d.unet, z, t, context, out2.text_embeds, cond.time_ids)
        torch.testing.assert_close(logits, d.head(feats), atol=1e-5, rtol=0)
        other = trunk_forward(
            d.unet, z, t, torch.zeros_like(context), out2.text_embeds, cond.time_ids
        )
        assert (d.head(other) - logits).abs().max() > 1e-4  # the condition matters
    assert logits.shape == (1, 1, 4, 4)
    single = encode_condition([_StubTokenizer()], [enc1])
    assert single.encoder_hidden_states.shape == (1, 77, 16) and single.text_embeds is None
    torch.testing.assert_close(single.encoder_hidden_states, out1.last_hidden_state)
    with pytest.raises(ValueError, match="context"):
        DiffusionDiscriminator(build_trunk("sdxl-tiny"), tiny_config(), condition=single)


def test_sd21_backbone_builds_and_runs():
    d = DiffusionDiscriminator.from_config(tiny_config("sd21-tiny"), seed=0)
    assert d.condition_text_embeds is None and d.condition_time_ids is None
    cfg = TINY_TRUNK_CONFIGS["sd21-tiny"]
    assert d.condition_context.shape == (1, 77, cfg["cross_attention_dim"])
    logits = d(_latents(2, 16))
    assert logits.shape == (2, 1, 2, 2)  # three downsamplers: /8 (8 x 8 for a 64 x 64 latent)
    assert all(
        "lora_" in n or n.startswith("head.") for n, p in d.named_parameters() if p.requires_grad
    )
    custom = DiscriminatorCondition(torch.randn(1, 77, cfg["cross_attention_dim"]))
    d2 = DiffusionDiscriminator(
        build_trunk("sd21-tiny"), tiny_config("sd21-tiny"), condition=custom
    )
    assert torch.equal(d2.condition_context, custom.encoder_hidden_states)


def test_config_round_trip_and_validation():
    cfg = tiny_config(latent_rescale=0.5, t_min=10, t_max=900)
    assert DiscriminatorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError):
        DiscriminatorConfig(t_min=500, t_max=100)
    assert DiscriminatorConfig().lora_targets == list(DEFAULT_UNET_LORA_TARGETS)


def test_zero_condition_and_encoder_calls_written_out():
    from types import SimpleNamespace

    from d3sr_core.models.discriminator.condition import encode_condition, zero_condition

    sdxl = {
        "cross_attention_dim": 2048,
        "addition_embed_type": "text_time",
        "projection_class_embeddings_input_dim": 2816,
        "addition_time_embed_dim": 256,
    }
    cond = zero_condition(sdxl)  # pooled width 2816 - 6 * 256
    assert cond.encoder_hidden_states.shape == (1, 77, 2048)
    assert not cond.encoder_hidden_states.any() and cond.text_embeds.shape == (1, 1280)
    assert not cond.text_embeds.any() and cond.time_ids.dtype == torch.float32
    assert cond.time_ids.tolist() == [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]
    small = zero_condition({**sdxl, "addition_time_embed_dim": 8}, 5, (1, 2, 3, 4, 5, 6))
    assert small.encoder_hidden_states.shape == (1, 5, 2048) and small.text_embeds.shape == (
        1,
        2768,
    )
    assert small.time_ids.tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]
    assert small.time_ids.dtype == torch.float32  # int sizes become float32 ids
    sd21 = zero_condition({"cross_attention_dim": 1024})
    assert sd21.encoder_hidden_states.shape == (1, 77, 1024) and sd21.text_embeds is None
    assert sd21.time_ids is None

    calls = []

    def tokenizer(texts, **kwargs):
        calls.append((texts, kwargs))
        return SimpleNamespace(input_ids=torch.arange(4)[None])

    tokenizer.model_max_length = 4

    class Output(tuple):
        """(first output,) with ``hidden_states``, like transformers' model outputs."""

        def __new__(cls, first, hidden):
            obj = super().__new__(cls, (first,))
            obj.hidden_states = hidden
            return obj

    class Encoder(torch.nn.Module):
        """Three "layers" ``proj(ids + k)``; [0] is the last hidden state, or with
        ``output_hidden_states`` a pooled (summed) output like CLIP's text_embeds."""

        def __init__(self, width):
            super().__init__()
            self.proj = torch.nn.Linear(1, width)

        def forward(self, ids, output_hidden_states=False):
            hidden = [self.proj(ids[..., None].float() + k) for k in range(3)]
            return Output(hidden[-1].sum(1) if output_hidden_states else hidden[-1], hidden)

    one = Encoder(6)
    got = encode_condition([tokenizer], [one], prompt="a photo")
    assert calls == [
        (["a photo"], {"padding": "max_length", "max_length": 4, "truncation": True,
                       "return_tensors": "pt"})
    ]  # fmt: skip
    with torch.no_grad():
        expected = one.proj(torch.arange(4).float()[None, :, None] + 2)  # last hidden state
    torch.testing.assert_close(got.encoder_hidden_states, expected)
    with pytest.raises(ValueError) as err:
        encode_condition([tokenizer], [one, one])
    assert str(err.value) == "pass one (SD2.1) or two (SDXL) tokenizers and text encoders"
    with pytest.raises(ValueError):
        encode_condition([tokenizer] * 3, [one] * 3)
    first, second = Encoder(3), Encoder(5)
    both = encode_condition([tokenizer, tokenizer], [first, second], time_ids=(7, 7, 0, 0, 7, 7))
    with torch.no_grad():
        x = torch.arange(4).float()[None, :, None]
        penultimate = torch.cat([first.proj(x + 1), second.proj(x + 1)], dim=-1)
        pooled = second.proj(x + 2).sum(1)
    torch.testing.assert_close(both.encoder_hidden_states, penultimate)
    torch.testing.assert_close(both.text_embeds, pooled)
    assert both.time_ids.tolist() == [[7.0, 7.0, 0.0, 0.0, 7.0, 7.0]]


# ---------------------------------------------------------------- construction and state, written out


_LORA_KEY = re.compile(r"^unet\.(down_blocks|mid_block)\..*\.lora_[AB]\.default\.weight$")
_HEAD_KEYS = {f"head.{m}.{p}" for m in ("proj_in", "norm", "proj_out") for p in ("weight", "bias")}


def test_from_pretrained_passes_every_argument_on(tmp_path):
    """Variant file, dtype, config, condition and seed all reach the discriminator."""
    torch.manual_seed(3)
    plain = UNet2DConditionModel(**TINY_TRUNK_CONFIGS["sdxl-tiny"])
    plain.save_pretrained(tmp_path / "unet")
    fp16 = UNet2DConditionModel(**TINY_TRUNK_CONFIGS["sdxl-tiny"])  # other weights
    fp16.save_pretrained(tmp_path / "unet", variant="fp16")
    cfg = tiny_config(lora_rank=4, lora_alpha=2.0)
    cond = zero_condition(TINY_TRUNK_CONFIGS["sdxl-tiny"])
    cond.encoder_hidden_states.normal_()
    d = DiffusionDiscriminator.from_pretrained(
        tmp_path / "unet", cfg, condition=cond, dtype=torch.bfloat16, variant="fp16"
    )
    assert d.config is cfg and d.head.proj_in.out_channels == 32
    assert d.head.proj_in.weight.dtype == torch.bfloat16
    assert torch.equal(d.unet.conv_in.weight, fp16.conv_in.weight.to(torch.bfloat16))
    assert torch.equal(d.condition_context, cond.encoder_hidden_states.to(torch.bfloat16))
    ranks = {p.shape[0] for n, p in d.named_parameters() if n.endswith("lora_A.default.weight")}
    assert ranks == {4}
    # seed 0 by default, whatever the global generator's state
    heads = []
    for global_seed, kw in ((5, {}), (6, {"seed": 0})):
        torch.manual_seed(global_seed)
        heads.append(DiffusionDiscriminator.from_pretrained(tmp_path / "unet", tiny_config(), **kw))
    assert torch.equal(heads[0].head.proj_in.weight, heads[1].head.proj_in.weight)


def test_trainable_state_is_lora_head_and_condition(tiny_sdxl):
    state = tiny_sdxl.trainable_state_dict()
    lora = {k for k in state if _LORA_KEY.match(k)}
    assert len(lora) == 2 * len(lora_target_names(build_trunk("sdxl-tiny", device="meta")))
    cond = {"condition_context", "condition_text_embeds", "condition_time_ids"}
    assert set(state) == lora | _HEAD_KEYS | cond
    assert not any(v.requires_grad for v in state.values())


def test_trainable_state_refusals_name_the_keys(tiny_sdxl):
    d = tiny_sdxl
    state = d.trainable_state_dict()
    keys = sorted(state)
    prefix = "discriminator state does not match this model (different backbone, rank or targets?)"
    with pytest.raises(WeightsFileError) as err:
        d.load_trainable_state_dict({k: v for k, v in state.items() if k not in keys[:4]})
    assert str(err.value) == f"state: {prefix}: missing {keys[:3]}, unexpected []"
    extra = {**state, **{f"extra.{i}": torch.zeros(1) for i in range(4)}}
    with pytest.raises(WeightsFileError) as err:
        d.load_trainable_state_dict(extra, "disc.safetensors")
    assert str(err.value) == (
        f"disc.safetensors: {prefix}: missing [], unexpected ['extra.0', 'extra.1', 'extra.2']"
    )
    order = list(state)
    wrong = {k: torch.zeros(2, 2) if k in order[-4:] else v for k, v in state.items()}
    with pytest.raises(WeightsFileError) as err:
        d.load_trainable_state_dict(wrong, "disc.safetensors")
    assert str(err.value) == f"disc.safetensors: shape mismatch for {order[-4:-1]}"


def test_trainable_file_header_and_refusals(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = tiny_config(lora_rank=4, lora_alpha=2.0)
    d = DiffusionDiscriminator(build_trunk("sdxl-tiny"), cfg)
    path = tmp_path / "d.safetensors"
    d.save_trainable(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta == {
        "format": "d3sr-discriminator",
        "format_version": "1",
        "config": json.dumps(dataclasses.asdict(cfg)),
    }
    d.load_trainable(path)  # rank 4 / alpha 2 on both sides (the defaults say 16 / 16)
    state = {k: v.contiguous() for k, v in d.trainable_state_dict().items()}
    for name, header, problem in (
        ("bare.safetensors", {"format": "d3sr-discriminator"},
         "LoRA rank/alpha 16/16.0 differ from this model's 4/2.0"),
        ("plain.safetensors", None, "not a D3SR discriminator file (format None)"),
        ("part.safetensors", meta, "discriminator state does not match this model (different "
         f"backbone, rank or targets?): missing {sorted(state)[:3]}, unexpected []"),
        ("other.safetensors", {"format": "other"}, "not a D3SR discriminator file (format 'other')"),
    ):  # fmt: skip
        part = {k: v for k, v in state.items() if k not in sorted(state)[:3]}
        save_file(part if header is meta else state, str(tmp_path / name), metadata=header)
        with pytest.raises(WeightsFileError) as err:
            d.load_trainable(tmp_path / name)
        assert str(err.value) == f"{tmp_path / name}: {problem}"


def test_from_config_passes_every_argument_on():
    cfg = tiny_config(lora_rank=4, lora_alpha=2.0)
    cond = zero_condition(TINY_TRUNK_CONFIGS["sdxl-tiny"])
    cond.encoder_hidden_states.normal_()
    d = DiffusionDiscriminator.from_config(cfg, condition=cond, dtype=torch.bfloat16)
    assert d.config is cfg and d.head.proj_in.out_channels == 32
    assert d.head.proj_in.weight.dtype == d.unet.conv_in.weight.dtype == torch.bfloat16
    assert torch.equal(d.condition_context, cond.encoder_hidden_states.to(torch.bfloat16))
    # a bf16 model takes float32 latents (cast to its own dtype) and gives bf16 logits close
    # to the float32 model's with the same seed
    d32 = DiffusionDiscriminator.from_config(cfg, condition=cond)
    z, t = _latents(1, 16), torch.tensor([500])
    with torch.no_grad():
        got, ref = d.logits(z, t), d32.logits(z, t)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0)
    nn.Module.to(d32.unet, torch.bfloat16)  # the trunk alone: condition buffers stay float32
    with torch.no_grad():
        mixed = d32.logits(z, t)  # float32 head on bf16 features
    torch.testing.assert_close(mixed, ref, atol=0.05 * ref.abs().max().item(), rtol=0)
    heads = []
    for global_seed, kw in ((5, {}), (6, {"seed": 0})):  # seed 0 by default
        torch.manual_seed(global_seed)
        heads.append(DiffusionDiscriminator.from_config(tiny_config(), **kw).head.proj_in.weight)
    assert torch.equal(heads[0], heads[1])


def test_random_timesteps_and_noise_come_from_the_generator():
    """forward(z, generator=g) draws t ~ U[t_min, t_max) then eps ~ N(0, 1) from g, in that
    order; F(z, t) and the logits are then written out."""
    d = DiffusionDiscriminator(
        build_trunk("sdxl-tiny"), tiny_config(t_min=200, t_max=300, latent_rescale=2.0)
    )
    z = _latents(2, 8)
    ref = torch.Generator().manual_seed(7)
    t = torch.randint(200, 300, (2,), generator=ref)
    eps = torch.randn(z.shape, generator=ref)
    abar = d.alphas_cumprod[t].view(2, 1, 1, 1)
    noisy = abar.sqrt() * 2.0 * z + (1 - abar).sqrt() * eps
    with torch.no_grad():
        got = d(z, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(got, d.logits(noisy, t), atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(8)
    assert torch.equal(
        d.sample_timesteps(5, generator=g),
        torch.randint(200, 300, (5,), generator=torch.Generator().manual_seed(8)),
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:  # the noise is float32 whatever the default dtype
        got = d.noise_latents(z, t, generator=torch.Generator().manual_seed(9))
    finally:
        torch.set_default_dtype(default)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(9))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, abar.sqrt() * 2.0 * z + (1 - abar).sqrt() * eps)


def test_lora_and_head_follow_the_config():
    """Rank, alpha, targets and head sizes reach peft and the head; LoRA starts at B = 0, so
    the discriminator's features are the plain trunk's."""
    bare = PatchHead()
    assert (bare.proj_in.in_channels, bare.proj_in.out_channels, bare.norm.num_groups) == (
        1280,
        256,
        32,
    )
    trunk_cfg = {**TINY_TRUNK_CONFIGS["sdxl-tiny"], "block_out_channels": [32, 64, 96]}
    torch.manual_seed(0)
    plain = build_trunk(trunk_cfg)
    trunk = build_trunk(trunk_cfg)
    trunk.load_state_dict(plain.state_dict())
    cfg = tiny_config(lora_rank=1, lora_alpha=3.0, lora_targets=["to_q"])
    d = DiffusionDiscriminator(trunk, cfg)
    assert (d.head.proj_in.in_channels, d.head.norm.num_groups) == (96, 8)
    lora = {n: m for n, m in d.unet.named_modules() if hasattr(m, "lora_A")}
    assert set(lora) == set(lora_target_names(plain, ["to_q"])) and lora
    assert all(m.lora_A["default"].weight.shape[0] == 1 for m in lora.values())
    assert all(m.scaling["default"] == 3.0 for m in lora.values())  # alpha / rank
    assert all(not m.lora_B["default"].weight.any() for m in lora.values())
    z, t = _latents(1, 16), torch.tensor([300])
    cond = zero_condition(trunk_cfg)
    with torch.no_grad():
        feats = trunk_forward(plain, z, t, cond.encoder_hidden_states, cond.text_embeds,
                              cond.time_ids)  # fmt: skip
        torch.testing.assert_close(d.logits(z, t), d.head(feats))
    none = DiffusionDiscriminator(build_trunk("sdxl-tiny"), tiny_config(lora_rank=0))
    assert not any("lora_" in n for n, _ in none.named_parameters())


def test_config_condition_and_schedule_refusals():
    for kw, message in (
        ({"t_min": 5, "t_max": 5}, "need 0 <= t_min < t_max, got 5, 5"),
        ({"t_min": -1}, "need 0 <= t_min < t_max, got -1, 1000"),
        ({"lora_rank": -1}, "lora_rank must be >= 0, got -1"),
    ):
        with pytest.raises(ValueError) as err:
            DiscriminatorConfig(**kw)
        assert str(err.value) == message
    cfg = TINY_TRUNK_CONFIGS["sdxl-tiny"]  # context width 32, add-embedding 16 + 6 x 8 = 64
    ctx, text, ids = torch.zeros(1, 77, 32), torch.zeros(1, 16), torch.zeros(1, 6)
    no_lora = tiny_config(lora_rank=0)  # refused before or after peft alike; faster without
    for cond, message in (
        (DiscriminatorCondition(torch.zeros(77, 32), text, ids),
         "condition context must be [1, L, 32], got (77, 32)"),
        (DiscriminatorCondition(torch.zeros(2, 77, 32), text, ids),
         "condition context must be [1, L, 32], got (2, 77, 32)"),
        (DiscriminatorCondition(torch.zeros(1, 77, 16), text, ids),
         "condition context must be [1, L, 32], got (1, 77, 16)"),
        (DiscriminatorCondition(ctx), "an SDXL trunk needs a condition with text_embeds and time_ids"),
        (DiscriminatorCondition(ctx, text), "an SDXL trunk needs a condition with text_embeds and time_ids"),
        (DiscriminatorCondition(ctx, None, ids), "an SDXL trunk needs a condition with text_embeds and time_ids"),
        (DiscriminatorCondition(ctx, torch.zeros(1, 8), ids),
         "text_embeds (1, 8) + time_ids (1, 6) do not give the add-embedding's 64 inputs"),
    ):  # fmt: skip
        with pytest.raises(ValueError) as err:
            DiffusionDiscriminator(build_trunk(cfg, device="meta"), no_lora, condition=cond)
        assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        DiffusionDiscriminator(
            build_trunk(cfg, device="meta"), no_lora, alphas_cumprod=torch.ones(500)
        )
    assert str(err.value) == "t_max 1000 exceeds the schedule's 500 steps"
    d = DiffusionDiscriminator(
        build_trunk(cfg, device="meta"), tiny_config(gradient_checkpointing=True, t_max=500),
        alphas_cumprod=torch.linspace(1, 0, 500, dtype=torch.float64),
    )  # fmt: skip
    assert d.unet.is_gradient_checkpointing and d.config.gradient_checkpointing
    assert d.alphas_cumprod.dtype == torch.float32 and d.alphas_cumprod[-1] == 0


def test_patch_head_casts_its_input_to_its_weights():
    torch.manual_seed(0)
    head = PatchHead(8, 16, 4).to(torch.bfloat16)
    x = torch.randn(1, 8, 3, 3)
    out = head(x)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 1, 3, 3)
    assert torch.equal(out, head(x.to(torch.bfloat16)))
