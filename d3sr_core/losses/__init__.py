"""Training losses: DISTS, EA-DISTS (DISTS + DISTS on Sobel edges) and GAN losses."""

from .dists import DISTS, resolve_dists_weights, resolve_vgg16_weights
from .ea_dists import EADISTS, sobel_magnitude
from .gan import approximate_r1_penalty, discriminator_loss, generator_loss, r1_penalty

__all__ = [
    "DISTS",
    "EADISTS",
    "approximate_r1_penalty",
    "discriminator_loss",
    "generator_loss",
    "r1_penalty",
    "resolve_dists_weights",
    "resolve_vgg16_weights",
    "sobel_magnitude",
]
