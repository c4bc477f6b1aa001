"""The large-scale diffusion discriminator: SDXL-base UNet down + mid blocks, LoRA, patch head.

``D(z, t) = head(mid(down(conv_in(F(z, t)), emb(t), context)))`` where
``F(z, t) = sqrt(abar_t) z + sqrt(1 - abar_t) eps`` with ``t ~ U[t_min, t_max)`` per sample,
``z`` an SD2.1-VAE latent (scaled by 0.18215), and ``context`` / ``text_embeds`` /
``time_ids`` a fixed precomputed condition stored with the discriminator (so no text
encoder is needed while training).

The trunk is a diffusers ``UNet2DConditionModel`` whose up path (``up_blocks``,
``conv_norm_out``, ``conv_out``) is never allocated: it is built on the ``meta`` device, the
up path removed, and only then are weights materialised (random, or read from disk key by
key). State-dict keys stay diffusers', so real SDXL weights load directly. Only the LoRA
(rank 16 / alpha 16 via peft on ``DEFAULT_UNET_LORA_TARGETS`` inside ``down_blocks`` and
``mid_block``) and the randomly initialised head train.

Backbones: ``"sdxl-base"`` (default, 1.24 B parameters, 1280 x 16 x 16 features for a
64 x 64 latent), ``"sd21-base"`` (the paper's ablation; 1280 x 8 x 8) and tiny configs
(``"sdxl-tiny"``, ``"sd21-tiny"``) for tests, or any UNet config dict.
"""

from .condition import (
    DEFAULT_SDXL_TIME_IDS,
    DiscriminatorCondition,
    encode_condition,
    zero_condition,
)
from .model import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SDXL_LATENT_RESCALE,
    DiffusionDiscriminator,
    DiscriminatorConfig,
    PatchHead,
)
from .trunk import (
    TINY_TRUNK_CONFIGS,
    TRUNK_SCOPE,
    UP_PATH_MODULES,
    assign_trunk_weights,
    build_trunk,
    load_trunk,
    lora_target_names,
    prune_up_path,
    trunk_config,
    trunk_forward,
)

__all__ = [
    "DEFAULT_SDXL_TIME_IDS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SDXL_LATENT_RESCALE",
    "TINY_TRUNK_CONFIGS",
    "TRUNK_SCOPE",
    "UP_PATH_MODULES",
    "DiffusionDiscriminator",
    "DiscriminatorCondition",
    "DiscriminatorConfig",
    "PatchHead",
    "assign_trunk_weights",
    "build_trunk",
    "encode_condition",
    "load_trunk",
    "lora_target_names",
    "prune_up_path",
    "trunk_config",
    "trunk_forward",
    "zero_condition",
]
