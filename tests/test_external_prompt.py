"""An external prompt embedding for load_generator / read_weights and `d3sr upscale --prompt-embeds`."""

import pytest
import torch
from make_tiny_weights import write_test_image, write_tiny_base, write_tiny_checkpoint
from safetensors.torch import save_file
from tiny_models import TINY_CONTEXT_DIM

from d3sr_core import cli
from d3sr_core.loading.files import WeightsFileError
from d3sr_core.loading.generator import load_generator, read_weights


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt")
    embeds = torch.randn(1, 77, TINY_CONTEXT_DIM, generator=torch.Generator().manual_seed(9))
    save_file({"prompt_embeds": embeds}, str(root / "embeds.safetensors"))
    return {
        "root": root,
        "embeds": embeds,
        "base": write_tiny_base(root / "base", text_encoder=False),
        "weights": write_tiny_checkpoint(root / "w.safetensors"),
    }


def test_tensor_or_file_replaces_the_stored_embedding(files):
    stored = read_weights(files["weights"]).prompt_embeds
    assert not torch.equal(stored, files["embeds"])
    for source in (files["embeds"], files["embeds"][0], files["root"] / "embeds.safetensors"):
        ckpt = read_weights(files["weights"], prompt_embeds=source)
        assert torch.equal(ckpt.prompt_embeds, files["embeds"])
    gen = load_generator(files["weights"], files["base"], prompt_embeds=files["embeds"])
    assert torch.equal(gen.prompt_embeds, files["embeds"])


def test_bad_external_embeddings_are_named(files, tmp_path):
    with pytest.raises(WeightsFileError, match="w.safetensors.*prompt_embeds width 8"):
        load_generator(files["weights"], files["base"], prompt_embeds=torch.zeros(1, 77, 8))
    with pytest.raises(ValueError, match=r"float tensor \[1, N, C\]"):
        read_weights(files["weights"], prompt_embeds=torch.zeros(2, 77, 32))
    save_file({"other": torch.zeros(2, 2), "x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsFileError, match="bad.safetensors.*no 'prompt_embeds'"):
        read_weights(files["weights"], prompt_embeds=tmp_path / "bad.safetensors")


def test_osediff_needs_no_text_encoder_with_external_embedding(files, tmp_path):
    from test_checkpoint import make_osediff

    pkl, _, _ = make_osediff(tmp_path)
    with pytest.raises(WeightsFileError, match="need the SD2.1 base model"):
        read_weights(pkl)
    ckpt = read_weights(pkl, prompt_embeds=files["root"] / "embeds.safetensors")
    assert torch.equal(ckpt.prompt_embeds, files["embeds"])
    # the CLI: the base has no text encoder, so only --prompt-embeds makes this work
    src = write_test_image(tmp_path / "x.png", (8, 8))
    args = ["upscale", str(src), "-o", str(tmp_path / "out"), "--weights", str(pkl)]
    args += ["--base", str(files["base"]), "-q"]
    assert cli.main(args) != 0
    assert cli.main([*args, "--prompt-embeds", str(files["root"] / "embeds.safetensors")]) == 0
    assert (tmp_path / "out" / "x.png").is_file()
    assert not (tmp_path / "osediff.safetensors").exists()  # used directly, not converted
    assert cli.main([*args, "--prompt-embeds", str(tmp_path / "missing.safetensors")]) != 0


def test_explicit_prompt_embeds_in_denoise_match_diffusers_unet():
    """``denoise(latent, prompt_embeds=...)`` (the trainer's learnable prompt path) equals
    diffusers' UNet called directly with that condition plus the epsilon -> x0 formula written
    out here, leaves the stored embedding alone, and lets gradients reach the prompt."""
    from diffusers import DDPMScheduler
    from tiny_models import tiny_generator

    g = tiny_generator()
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompt = torch.randn(1, 77, TINY_CONTEXT_DIM, generator=torch.Generator().manual_seed(5))
    stored = g.prompt_embeds.clone()
    t = g.config.timestep
    with torch.no_grad():
        eps = g.unet(
            latent, torch.tensor([t, t]), encoder_hidden_states=prompt.expand(2, -1, -1)
        ).sample
        abar = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        abar = abar.alphas_cumprod[t].double()
        expected = (latent.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()
        got = g.denoise(latent, prompt_embeds=prompt)
        default = g.denoise(latent)
    assert (got.double() - expected).abs().max() < 1e-5
    assert torch.equal(g.prompt_embeds, stored)
    assert (default - got).abs().max() > 1e-3  # the argument is really used
    with torch.no_grad():
        assert torch.equal(g.denoise(latent, prompt_embeds=stored), default)

    learnable = prompt.clone().requires_grad_(True)
    g.denoise(latent, prompt_embeds=learnable).square().mean().backward()
    assert learnable.grad is not None and learnable.grad.abs().sum() > 0
