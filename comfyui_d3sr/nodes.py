"""The D3SR nodes (ComfyUI V3 schema): Model Loader, Upscale Image, Upscale Latent.

Nodes only convert formats (:mod:`.convert`) and delegate to ``d3sr_core``; host plumbing
(folders, caching, memory management, errors) is in :mod:`.host`. Node ids and input order
are part of saved workflows: never rename or reorder them, append new inputs as optional.
"""

from __future__ import annotations

import torch
from comfy_api.latest import ComfyExtension, io

from . import host
from .convert import (
    alpha_to_mask,
    bchw_to_image,
    conditioning_to_embeds,
    image_to_bchw,
    latent_samples,
    mask_as_alpha,
    resize_noise_mask,
)

D3SRModelType = io.Custom("D3SR_MODEL")
CATEGORY = "image/upscaling/D3SR"
MAX_SEED = 2**63 - 1


def _tiling_inputs() -> list:
    return [
        io.Float.Input(
            "scale",
            default=4.0,
            min=1.05,
            max=16.0,
            step=0.05,
            tooltip="output / input size; the output is exactly floor(size * scale + 0.5)",
        ),
        io.Int.Input(
            "tile_size",
            default=0,
            min=0,
            max=8192,
            step=8,
            tooltip="UNet tile in output pixels (multiple of 8, >= 64); 0 = automatic from free memory",
        ),
        io.Int.Input(
            "tile_overlap",
            default=256,
            min=0,
            max=2048,
            step=8,
            tooltip="minimum overlap between UNet tiles, output pixels (blended)",
        ),
        io.Int.Input(
            "vae_tile_size",
            default=0,
            min=0,
            max=16384,
            step=32,
            tooltip="VAE tile in output pixels (>= 32); 0 = automatic. Tiling does not change the result",
        ),
        io.Combo.Input(
            "color_fix",
            options=["wavelet", "adain", "none"],
            default="wavelet",
            tooltip="match the output's colours to the input's",
        ),
        io.Int.Input(
            "seed",
            default=0,
            min=0,
            max=MAX_SEED,
            control_after_generate=True,
            tooltip="used when the checkpoint samples its latent (latent_mode 'sample')",
        ),
    ]


def _conditioning_input():
    return io.Conditioning.Input(
        "conditioning",
        optional=True,
        tooltip="optional prompt from CLIP Text Encode with an SD2.x CLIP; replaces the "
        "checkpoint's stored (empty-prompt) embedding for this run",
    )


def _validate_tiles(tile_size=0, tile_overlap=256, vae_tile_size=0) -> bool | str:
    if tile_size and (tile_size < 64 or tile_size % 8):
        return f"tile_size must be 0 (automatic) or a multiple of 8 >= 64, got {tile_size}"
    if vae_tile_size and vae_tile_size < 32:
        return f"vae_tile_size must be 0 (automatic) or >= 32, got {vae_tile_size}"
    if tile_overlap < 0:
        return f"tile_overlap must be >= 0, got {tile_overlap}"
    return True


def _options(scale, tile_size, tile_overlap, vae_tile_size, color_fix, seed, conditioning):
    from d3sr_core.inference.options import UpscaleOptions

    return UpscaleOptions(
        scale=float(scale),
        seed=int(seed),
        tile_size=int(tile_size) or "auto",
        tile_overlap=int(tile_overlap),
        vae_tile_size=int(vae_tile_size) or "auto",
        color_fix=color_fix,
        prompt_embeds=conditioning_to_embeds(conditioning),
    )


class D3SRModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="D3SRModelLoader",
            display_name="D3SR Model Loader",
            category=CATEGORY,
            description="Loads D3SR (or OSEDiff) weights onto a Stable Diffusion 2.1-base model.",
            search_aliases=["d3sr", "osediff", "super resolution", "upscale model"],
            inputs=[
                io.Combo.Input(
                    "weights",
                    options=host.weights_options(),
                    tooltip="D3SR .safetensors or OSEDiff osediff.pkl from models/d3sr",
                ),
                io.Combo.Input(
                    "base",
                    options=host.base_options(),
                    tooltip="SD2.1-base: a single file from models/checkpoints or a diffusers folder",
                ),
                io.Combo.Input(
                    "vae",
                    options=host.vae_options(),
                    default=host.VAE_FROM_BASE,
                    tooltip="replacement VAE from models/vae (default: the base's own)",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=2.0,
                    step=0.05,
                    tooltip="LoRA strength: 0 = base model, 1 = trained, > 1 extrapolates. "
                    "Changing it does not reload the base",
                ),
                io.Combo.Input(
                    "precision",
                    options=host.PRECISIONS,
                    default="auto",
                    tooltip="auto: bf16/fp16 on GPUs, bf16 on CPUs with native bf16, else fp32",
                ),
                io.Combo.Input(
                    "device",
                    options=host.DEVICES,
                    default="auto",
                    tooltip="auto: ComfyUI's device (managed with its other models)",
                ),
            ],
            outputs=[D3SRModelType.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, weights, base, vae) -> bool:
        # Missing files are reported when the node runs, with where to put them (an
        # execution error the UI shows), instead of a bare "value not in list".
        return True

    @classmethod
    def execute(cls, weights, base, vae, strength, precision, device) -> io.NodeOutput:
        return io.NodeOutput(host.load_model(weights, base, vae, strength, precision, device))


class D3SRUpscaleImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="D3SRUpscaleImage",
            display_name="D3SR Upscale Image",
            category=CATEGORY,
            description="One-step diffusion super-resolution of an IMAGE batch (tiled, any size).",
            search_aliases=["d3sr", "super resolution", "upscale", "osediff"],
            inputs=[
                D3SRModelType.Input("model"),
                io.Image.Input("image"),
                *_tiling_inputs(),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="optional MASK (e.g. from Load Image, 1 - alpha): upscaled with the image",
                ),
                _conditioning_input(),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def validate_inputs(cls, tile_size, tile_overlap, vae_tile_size) -> bool | str:
        return _validate_tiles(tile_size, tile_overlap, vae_tile_size)

    @classmethod
    def execute(
        cls,
        model,
        image,
        scale,
        tile_size,
        tile_overlap,
        vae_tile_size,
        color_fix,
        seed,
        mask=None,
        conditioning=None,
    ) -> io.NodeOutput:
        from d3sr_core.inference.pipeline import D3SRPipeline

        with host.user_errors("D3SR Upscale Image"):
            options = _options(
                scale, tile_size, tile_overlap, vae_tile_size, color_fix, seed, conditioning
            )
            images = image_to_bchw(image)
            if images.shape[1] == 1:
                images = images.expand(-1, 3, -1, -1)
            alpha = mask_as_alpha(mask, images) if images.shape[1] == 3 else None
            if alpha is not None:
                images = torch.cat([images, alpha], dim=1)
            pipeline = D3SRPipeline(model.activate())
            progress, cancel = host.run_callbacks()
            out = pipeline.upscale_tensor(images, options, progress=progress, cancel=cancel)
        b, _, h, w = out.shape
        if alpha is not None:
            out_mask = alpha_to_mask(out[:, 3:])
            out = out[:, :3]
        elif out.shape[1] == 4:  # an RGBA IMAGE stays RGBA; its mask is 1 - alpha
            out_mask = alpha_to_mask(out[:, 3:])
        else:
            out_mask = torch.zeros(b, h, w)
        return io.NodeOutput(bchw_to_image(out), out_mask)


class D3SRUpscaleLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="D3SRUpscaleLatent",
            display_name="D3SR Upscale Latent",
            category=CATEGORY,
            description="Super-resolves a LATENT: decodes it (connected VAE, else D3SR's SD2.1 "
            "VAE), upscales with D3SR and returns the SR latent, raw like every ComfyUI LATENT. "
            "SD1.x/SD2.x latents come back in the same space (ready for VAE Decode or a second "
            "KSampler pass); latents of another family (SDXL, SD3, Flux) are re-encoded with "
            "the connected VAE.",
            search_aliases=["d3sr", "latent upscale", "hires fix", "super resolution"],
            inputs=[
                D3SRModelType.Input("model"),
                io.Latent.Input("samples"),
                *_tiling_inputs(),
                io.Vae.Input(
                    "vae",
                    optional=True,
                    tooltip="the VAE that made the latent; needed for non-SD1.x/SD2.x latents",
                ),
                _conditioning_input(),
            ],
            outputs=[io.Latent.Output(display_name="samples")],
        )

    @classmethod
    def validate_inputs(cls, tile_size, tile_overlap, vae_tile_size) -> bool | str:
        return _validate_tiles(tile_size, tile_overlap, vae_tile_size)

    @classmethod
    def execute(
        cls,
        model,
        samples,
        scale,
        tile_size,
        tile_overlap,
        vae_tile_size,
        color_fix,
        seed,
        vae=None,
        conditioning=None,
    ) -> io.NodeOutput:
        from d3sr_core.inference.pipeline import D3SRPipeline

        with host.user_errors("D3SR Upscale Latent"):
            options = _options(
                scale, tile_size, tile_overlap, vae_tile_size, color_fix, seed, conditioning
            )
            latents = latent_samples(samples)
            pipeline = D3SRPipeline(model.activate())
            decode_input = encode_output = None
            if vae is not None:

                def decode_input(z):
                    return image_to_bchw(vae.decode(z))[:, :3]

                def encode(image):
                    return vae.encode(bchw_to_image(image))

                if not host.same_latent_family(model, pipeline, vae, encode):
                    encode_output = encode
            progress, cancel = host.run_callbacks()
            out = pipeline.upscale_latent(
                latents,
                options,
                progress=progress,
                cancel=cancel,
                decode_input=decode_input,
                encode_output=encode_output,
            )
        result = {k: v for k, v in samples.items() if k != "noise_mask"}
        result["samples"] = out
        if isinstance(samples.get("noise_mask"), torch.Tensor):
            result["noise_mask"] = resize_noise_mask(
                samples["noise_mask"], tuple(latents.shape[-2:]), tuple(out.shape[-2:])
            )
        return io.NodeOutput(result)


NODES = [D3SRModelLoader, D3SRUpscaleImage, D3SRUpscaleLatent]


class D3SRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> D3SRExtension:
    host.register_model_folder()
    return D3SRExtension()
