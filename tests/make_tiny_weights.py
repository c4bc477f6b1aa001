"""Write tiny but real D3SR weights: an SD2.1-layout diffusers base folder and a D3SR checkpoint.

Used by the CLI tests and by CI's smoke run (``python tests/make_tiny_weights.py DIR``):
the files load through exactly the code paths real weights take, in well under a second.

    DIR/tiny-sd21-base/    model_index.json, unet/, vae/, scheduler/, text_encoder/
    DIR/d3sr-tiny.safetensors
    DIR/input.png          a 24x16 RGB test image
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))  # the repository, when run uninstalled

from tiny_models import TINY_CONTEXT_DIM, tiny_prompt_embeds, tiny_unet, tiny_vae  # noqa: E402

from d3sr_core.loading.checkpoint import D3SRCheckpoint, save_checkpoint  # noqa: E402
from d3sr_core.models import GeneratorConfig, LoraAdapter  # noqa: E402
from d3sr_core.models.configs import bundled_config  # noqa: E402

TEXT_LAYERS = 1
TEXT_HEADS = 2
VOCAB = 49408  # the empty prompt uses ids 49406 / 49407


def tiny_text_encoder_state(seed: int = 3) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIPTextModel state dict (``text_model.*``) of width TINY_CONTEXT_DIM."""
    g = torch.Generator().manual_seed(seed)
    d = TINY_CONTEXT_DIM

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {
        "text_model.embeddings.token_embedding.weight": rnd(VOCAB, d),
        "text_model.embeddings.position_embedding.weight": rnd(77, d),
        "text_model.final_layer_norm.weight": torch.ones(d),
        "text_model.final_layer_norm.bias": torch.zeros(d),
    }
    for i in range(TEXT_LAYERS):
        p = f"text_model.encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            sd[p + norm + ".weight"] = torch.ones(d)
            sd[p + norm + ".bias"] = torch.zeros(d)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = rnd(d, d)
            sd[p + f"self_attn.{proj}.bias"] = rnd(d)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = rnd(2 * d, d), rnd(2 * d)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = rnd(d, 2 * d), rnd(d)
    return sd


def write_tiny_base(folder: Path, text_encoder: bool = True) -> Path:
    """A diffusers model folder with the tiny UNet/VAE, SD2.1's scheduler and a tiny text encoder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tiny_unet().save_pretrained(folder / "unet")
    tiny_vae().save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    scheduler = {"_class_name": "PNDMScheduler", **bundled_config("sd21-base", "scheduler")}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "PNDMScheduler"],
    }
    if text_encoder:
        (folder / "text_encoder").mkdir(exist_ok=True)
        save_file(tiny_text_encoder_state(), str(folder / "text_encoder" / "model.safetensors"))
        config = {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "hidden_size": TINY_CONTEXT_DIM,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": TEXT_HEADS,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
        }
        (folder / "text_encoder" / "config.json").write_text(json.dumps(config, indent=2))
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def tiny_checkpoint(seed: int = 4) -> D3SRCheckpoint:
    """A D3SR checkpoint whose LoRA fits the tiny UNet (two modules, rank 4)."""
    g = torch.Generator().manual_seed(seed)
    factors = {
        "down_blocks.0.resnets.0.conv1": (
            torch.randn(4, 16, 3, 3, generator=g) * 0.01,
            torch.randn(16, 4, 1, 1, generator=g) * 0.01,
        ),
        "mid_block.attentions.0.proj_in": (
            torch.randn(4, 64, generator=g) * 0.01,
            torch.randn(64, 4, generator=g) * 0.01,
        ),
    }
    return D3SRCheckpoint(
        config=GeneratorConfig(
            timestep=399, lora_rank=4, lora_alpha=4.0, lora_targets=["conv1", "proj_in"]
        ),
        prompt_embeds=tiny_prompt_embeds(),
        adapters={"unet": LoraAdapter(factors, 1.0)},
    )


def write_tiny_checkpoint(path: Path) -> Path:
    return save_checkpoint(tiny_checkpoint(), path)


def write_test_image(path: Path, size: tuple[int, int] = (24, 16)) -> Path:
    import numpy as np
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack(
        [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // (w + h)], axis=2
    )
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return Path(path)


def write_all(folder: Path) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "base": write_tiny_base(folder / "tiny-sd21-base"),
        "weights": write_tiny_checkpoint(folder / "d3sr-tiny.safetensors"),
        "image": write_test_image(folder / "input.png"),
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} OUTPUT_DIR")
    for name, path in write_all(Path(sys.argv[1])).items():
        print(f"{name}={path}")
