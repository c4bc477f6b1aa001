"""D3SRGenerator's stages against the diffusers calls written out, in float32 and bfloat16,
and its prompt-embedding checks with their whole messages (tiny models, ~1 s)."""

import math

import pytest
import torch
from tiny_models import TINY_CONTEXT_DIM, tiny_generator, tiny_prompt_embeds, tiny_unet, tiny_vae

from d3sr_core.models import D3SRGenerator, GeneratorConfig
from d3sr_core.models.schedule import alphas_cumprod

SF = 0.18215


def reference_stages(g, x, noise=None, embeds=None):
    """encode -> UNet at the fixed timestep -> x0 (epsilon) -> decode, with diffusers' calls;
    ``noise``: the posterior sample's standard normal draw (None: the mode)."""
    vae, unet = g.vae, g.unet
    vdt, udt = next(vae.parameters()).dtype, next(unet.parameters()).dtype
    dist = vae.encode(x.to(vdt)).latent_dist
    z = (dist.mode() if noise is None else dist.mean + dist.std * noise).float() * SF
    cond = (g.prompt_embeds if embeds is None else embeds).to(udt)
    t = torch.full((x.shape[0],), g.config.timestep, dtype=torch.long)
    eps = unet(z.to(udt), t, encoder_hidden_states=cond.expand(x.shape[0], -1, -1)).sample.float()
    ab = g.alpha_bar
    x0 = (z - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    image = vae.decode((x0 / SF).to(vdt)).sample.float()
    return z, eps, x0, image


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stages_equal_the_diffusers_calls(dtype):
    g = tiny_generator()
    with torch.no_grad():
        g.vae.decoder.conv_out.weight.mul_(40)  # outputs beyond [-1, 1]: the clamp matters
    g.unet.to(dtype)
    g.vae.to(dtype)
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    other = tiny_prompt_embeds(seed=9)
    with torch.no_grad():
        z, eps, x0, image = reference_stages(g, x)
        _, eps_other, x0_other, _ = reference_stages(g, x, embeds=other)
        assert image.abs().max() > 1.5 and image.abs().min() < 0.9
        got_z = g.encode(x)
        assert got_z.dtype == torch.float32
        torch.testing.assert_close(got_z, z, atol=0, rtol=0)
        got_eps = g.predict(z)
        assert got_eps.dtype == torch.float32
        torch.testing.assert_close(got_eps, eps, atol=0, rtol=0)
        torch.testing.assert_close(g.predict(z, other), eps_other, atol=0, rtol=0)
        torch.testing.assert_close(g.denoise(z), x0, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(g.denoise(z, other), x0_other, atol=1e-6, rtol=1e-6)
        decoded = g.decode(x0)
        assert decoded.dtype == torch.float32
        torch.testing.assert_close(decoded, image.clamp(-1, 1), atol=1e-6, rtol=1e-6)
        # the whole chain: x0 rounds to bf16 at slightly other points (1 ulp moves the image)
        tol = 2e-3  # the x40 decoder turns float32 rounding of x0 into 1e-4
        torch.testing.assert_close(g(x), image.clamp(-1, 1), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_posterior_sample_is_mean_plus_std_times_seeded_noise(dtype):
    g = tiny_generator(GeneratorConfig(latent_mode="sample"))
    g.to(dtype)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = g.vae.encode(x.to(dtype)).latent_dist
        noise = torch.randn(
            dist.mean.shape, generator=torch.Generator().manual_seed(5), dtype=dtype
        )
        expected = (dist.mean + dist.std * noise).float() * SF
        got = g.encode(x, torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        _, _, _, image = reference_stages(g, x, noise=noise)
        forward = g(x, torch.Generator().manual_seed(5))
        tol = 2e-3 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(forward, image.clamp(-1, 1), atol=tol, rtol=0)
        assert not torch.equal(g.encode(x, torch.Generator().manual_seed(6)), got)


def test_prompt_embeds_checks_state_the_whole_problem():
    # the stored prompt is 48 wide, the UNet's context 32: the UNet's config decides
    g = D3SRGenerator(tiny_unet(), tiny_vae(), torch.randn(1, 77, 48).bfloat16(), alphas_cumprod())
    previous = g.set_prompt_embeds(torch.ones(5, TINY_CONTEXT_DIM))  # [N, C] is [1, N, C]
    assert previous.shape == (1, 77, 48)
    assert g.prompt_embeds.shape == (1, 5, 32) and g.prompt_embeds.dtype == torch.bfloat16
    g.set_prompt_embeds(torch.ones(1, 1, 32))  # a single token is fine
    assert g.prompt_embeds.shape == (1, 1, 32)
    cases = [
        ([[0.0]], "prompt_embeds must be a torch.Tensor [1, N, C], got list"),
        (torch.ones(2, 7, 32), "prompt_embeds must have shape [1, N, 32], got (2, 7, 32)"),
        (torch.ones(1, 7, 32, 1), "prompt_embeds must have shape [1, N, 32], got (1, 7, 32, 1)"),
        (torch.ones(1, 0, 32), "prompt_embeds must have shape [1, N, 32], got (1, 0, 32)"),
        (
            torch.ones(1, 7, 48),
            "prompt_embeds width 48 does not match the UNet's context 32 (SD2.x text encoders "
            "give 1024)",
        ),
        (
            torch.ones(1, 7, 32, dtype=torch.int64),
            "prompt_embeds must hold finite floating-point values",
        ),
        (torch.full((1, 7, 32), math.nan), "prompt_embeds must hold finite floating-point values"),
    ]
    for value, message in cases:
        with pytest.raises(ValueError) as err:
            g.set_prompt_embeds(value)
        assert str(err.value) == message
    assert g.prompt_embeds.shape == (1, 1, 32)  # nothing changed
    # a UNet without a config: the stored prompt's width is the reference
    bare = D3SRGenerator(
        torch.nn.Linear(2, 2), tiny_vae(), torch.zeros(1, 77, 48), alphas_cumprod()
    )
    bare.set_prompt_embeds(torch.ones(1, 3, 48))
    with pytest.raises(ValueError) as err:
        bare.set_prompt_embeds(torch.ones(1, 3, 32))
    assert str(err.value).startswith("prompt_embeds width 32 does not match the UNet's context 48")


def test_config_timestep_buffer_and_adapter_rules():
    from d3sr_core.models import LoraAdapter
    from d3sr_core.models.schedule import PREDICTION_TYPES

    for kwargs, message in (
        ({"prediction_type": "x0"}, f"prediction_type must be one of {PREDICTION_TYPES}, got 'x0'"),
        ({"latent_mode": "z"}, "latent_mode must be 'mode' or 'sample', got 'z'"),
    ):
        with pytest.raises(ValueError) as err:
            GeneratorConfig(**kwargs)
        assert str(err.value) == message
    for t in (0, 999):  # the schedule's whole range
        assert D3SRGenerator(tiny_unet(), tiny_vae(), tiny_prompt_embeds(), alphas_cumprod(),
                             GeneratorConfig(timestep=t)).config.timestep == t  # fmt: skip
    with pytest.raises(ValueError) as err:
        D3SRGenerator(tiny_unet(), tiny_vae(), tiny_prompt_embeds(), alphas_cumprod(),
                      GeneratorConfig(timestep=1000))  # fmt: skip
    assert str(err.value) == "timestep 1000 outside the schedule's 0..999"
    g = tiny_generator()
    assert "prompt_embeds" not in g.state_dict()  # not saved with the weights
    conv = g.vae.quant_conv
    adapter = LoraAdapter(
        {
            "quant_conv": (
                torch.ones(1, conv.in_channels, 1, 1),
                torch.ones(conv.out_channels, 1, 1, 1),
            )
        }
    )
    before = conv.weight.detach().clone()
    g.merge_adapters(vae=adapter)  # no UNet adapter: the VAE's is still merged
    assert set(g.adapters()) == {"vae"} and g.strength == 1.0
    torch.testing.assert_close(conv.weight, before + 1.0, atol=0, rtol=0)
    with pytest.raises(RuntimeError) as err:
        g.merge_adapters(vae=adapter)
    assert (
        str(err.value)
        == "an adapter is already merged into the vae; load a fresh base to change it"
    )
