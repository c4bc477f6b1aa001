"""Real-ESRGAN second-order degradation (Wang et al. 2021) in torch + kornia, seeded and batchable.

Mirrors basicsr's ``RealESRGANDataset`` (kernels) and ``RealESRGANModel.feed_data``
(everything else), reference/peers.md section 5, without importing basicsr::

    blur(k1) -> resize (up/down/keep) -> Gaussian|Poisson noise -> JPEG
    -> [p 0.8] blur(k2) -> resize -> noise
    -> [p 0.5] resize to H/s -> sinc -> JPEG  |  JPEG -> resize to H/s -> sinc
    -> round to 8 bit

Use: ``params = sample_params(config, batch, seeds)`` draws every random choice (kernels,
scales, noise seeds, JPEG qualities) on the CPU; ``degrade(hr, params, config)`` applies
them to ``[B, 3, H, W]`` images in ``[0, 1]`` on any device. Per-image choices (kernels,
noise, JPEG quality) come from each image's own seed; the resize choices and the order
of the last stage are shared by the batch, as in Real-ESRGAN (one ``interpolate`` per
batch). So degrading a batch equals degrading each image alone with
``params.select(i)``. Every stage can be switched off in :class:`DegradationConfig`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import KERNEL_TYPES, pulse_kernel, random_mixed_kernel, sinc_kernel

RESIZE_MODES = ("area", "bilinear", "bicubic")
STAGES = (
    "blur1",
    "resize1",
    "noise1",
    "jpeg1",
    "blur2",
    "resize2",
    "noise2",
    "final_sinc",
    "jpeg2",
    "round",
)


@dataclass
class DegradationConfig:
    """Every range and probability of the pipeline (defaults: Real-ESRGAN x4 / OSEDiff).

    Ranges are ``[low, high]`` (uniform draws). ``resize_prob`` is ``[up, down, keep]``.
    The ``*_enabled``-style switches are the names in :data:`STAGES`; a disabled stage is
    skipped entirely (``final_sinc`` off = pulse kernel; the final resize to ``H/scale``
    always runs).
    """

    scale: int = 4
    kernel_range: list[int] = field(default_factory=lambda: [7, 21])
    kernel_list: list[str] = field(default_factory=lambda: list(KERNEL_TYPES))
    kernel_prob: list[float] = field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sinc_prob: float = 0.1
    blur_sigma: list[float] = field(default_factory=lambda: [0.2, 3.0])
    betag_range: list[float] = field(default_factory=lambda: [0.5, 4.0])
    betap_range: list[float] = field(default_factory=lambda: [1.0, 2.0])
    kernel_list2: list[str] = field(default_factory=lambda: list(KERNEL_TYPES))
    kernel_prob2: list[float] = field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sinc_prob2: float = 0.1
    blur_sigma2: list[float] = field(default_factory=lambda: [0.2, 1.5])
    betag_range2: list[float] = field(default_factory=lambda: [0.5, 4.0])
    betap_range2: list[float] = field(default_factory=lambda: [1.0, 2.0])
    final_sinc_prob: float = 0.8
    resize_prob: list[float] = field(default_factory=lambda: [0.2, 0.7, 0.1])
    resize_range: list[float] = field(default_factory=lambda: [0.15, 1.5])
    gaussian_noise_prob: float = 0.5
    noise_range: list[float] = field(default_factory=lambda: [1.0, 30.0])
    poisson_scale_range: list[float] = field(default_factory=lambda: [0.05, 3.0])
    gray_noise_prob: float = 0.4
    jpeg_range: list[float] = field(default_factory=lambda: [30.0, 95.0])
    second_blur_prob: float = 0.8
    resize_prob2: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.3])
    resize_range2: list[float] = field(default_factory=lambda: [0.3, 1.2])
    gaussian_noise_prob2: float = 0.5
    noise_range2: list[float] = field(default_factory=lambda: [1.0, 25.0])
    poisson_scale_range2: list[float] = field(default_factory=lambda: [0.05, 2.5])
    gray_noise_prob2: float = 0.4
    jpeg_range2: list[float] = field(default_factory=lambda: [30.0, 95.0])
    final_order_prob: float = 0.5  # p of [resize -> sinc -> JPEG] (else JPEG -> resize -> sinc)
    stages: list[str] = field(default_factory=lambda: list(STAGES))

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown degradation stages {unknown}; known: {list(STAGES)}")
        if int(self.scale) < 1:
            raise ValueError(f"degradation scale must be >= 1, got {self.scale}")
        lo, hi = self.kernel_range
        if lo % 2 == 0 or hi % 2 == 0 or not 1 <= lo <= hi:
            raise ValueError(
                f"kernel_range must be two odd sizes low <= high, got {self.kernel_range}"
            )
        for name in ("kernel_list", "kernel_list2"):
            bad = [k for k in getattr(self, name) if k not in KERNEL_TYPES]
            if bad:
                raise ValueError(f"{name}: unknown kernel types {bad}; known {list(KERNEL_TYPES)}")
        for lst, prob in (("kernel_list", "kernel_prob"), ("kernel_list2", "kernel_prob2")):
            if len(getattr(self, lst)) != len(getattr(self, prob)):
                raise ValueError(f"{prob} needs one probability per entry of {lst}")
        for name in ("resize_prob", "resize_prob2"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must be [p_up, p_down, p_keep]")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_range", "_range2", "sigma", "sigma2")) and (
                len(value) != 2 or value[0] > value[1]
            ):
                raise ValueError(f"{f.name} must be [low, high] with low <= high, got {value}")

    def enabled(self, stage: str) -> bool:
        return stage in self.stages

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DegradationConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown degradation options {unknown}")
        return cls(**data)


@dataclass
class NoiseParams:
    """Per-image noise of one order: Gaussian (sigma in 0..255 units) or Poisson (scale)."""

    gaussian: list[bool]
    sigma: list[float]
    poisson_scale: list[float]
    gray: list[bool]
    seeds: list[int]


@dataclass
class DegradationParams:
    """All random choices for one batch (see module docstring). Kernels are ``[B, K, K]``."""

    kernel1: Tensor
    kernel2: Tensor
    sinc: Tensor
    resize1: tuple[str, float]  # (mode, scale factor)
    resize2: tuple[str, float]
    final_resize_mode: str
    final_sinc_first: bool  # True: resize -> sinc -> JPEG; False: JPEG -> resize -> sinc
    noise1: NoiseParams
    noise2: NoiseParams
    jpeg1: list[float]
    jpeg2: list[float]

    @property
    def batch_size(self) -> int:
        return self.kernel1.shape[0]

    def select(self, i: int) -> DegradationParams:
        """The parameters of image ``i`` alone (batch of one)."""

        def noise(n: NoiseParams) -> NoiseParams:
            return NoiseParams(*([getattr(n, f.name)[i]] for f in fields(NoiseParams)))

        return DegradationParams(
            self.kernel1[i : i + 1],
            self.kernel2[i : i + 1],
            self.sinc[i : i + 1],
            self.resize1,
            self.resize2,
            self.final_resize_mode,
            self.final_sinc_first,
            noise(self.noise1),
            noise(self.noise2),
            [self.jpeg1[i]],
            [self.jpeg2[i]],
        )


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64))


def _coin(g: torch.Generator, p: float) -> bool:
    return bool(torch.rand((), generator=g, dtype=torch.float64) < p)


def _choice(g: torch.Generator, options, probs=None):
    probs = torch.tensor(probs if probs is not None else [1.0] * len(options), dtype=torch.float64)
    return options[int(torch.multinomial(probs, 1, generator=g))]


def _kernel_size(g: torch.Generator, cfg: DegradationConfig) -> int:
    lo, hi = cfg.kernel_range
    return _choice(g, list(range(lo, hi + 1, 2)))


def _blur_kernel(g: torch.Generator, cfg: DegradationConfig, second: bool) -> Tensor:
    suffix = "2" if second else ""
    size = _kernel_size(g, cfg)
    max_size = cfg.kernel_range[1]
    if _coin(g, getattr(cfg, "sinc_prob" + suffix)):
        # basicsr: a wider cutoff range for larger kernels
        omega = _u(g, torch.pi / 3, torch.pi) if size < 13 else _u(g, torch.pi / 5, torch.pi)
        return sinc_kernel(size, omega, pad_to=max_size)
    kernel = random_mixed_kernel(
        g,
        size,
        getattr(cfg, "kernel_list" + suffix),
        getattr(cfg, "kernel_prob" + suffix),
        getattr(cfg, "blur_sigma" + suffix),
        (-torch.pi, torch.pi),
        getattr(cfg, "betag_range" + suffix),
        getattr(cfg, "betap_range" + suffix),
    )
    return torch.nn.functional.pad(kernel, [(max_size - size) // 2] * 4)


def _resize_choice(g: torch.Generator, probs, scale_range) -> tuple[str, float]:
    kind = _choice(g, ["up", "down", "keep"], probs)
    if kind == "up":
        scale = _u(g, 1.0, scale_range[1])
    elif kind == "down":
        scale = _u(g, scale_range[0], 1.0)
    else:
        scale = 1.0
    return _choice(g, list(RESIZE_MODES)), scale


def _noise_params(gs: list[torch.Generator], cfg: DegradationConfig, second: bool) -> NoiseParams:
    suffix = "2" if second else ""
    p_gauss = getattr(cfg, "gaussian_noise_prob" + suffix)
    sigma_range = getattr(cfg, "noise_range" + suffix)
    poisson_range = getattr(cfg, "poisson_scale_range" + suffix)
    p_gray = getattr(cfg, "gray_noise_prob" + suffix)
    out = NoiseParams([], [], [], [], [])
    for g in gs:
        out.gaussian.append(_coin(g, p_gauss))
        out.sigma.append(_u(g, *sigma_range))
        out.poisson_scale.append(_u(g, *poisson_range))
        out.gray.append(_coin(g, p_gray))
        out.seeds.append(int(torch.randint(0, 2**62, (), generator=g)))
    return out


def sample_params(
    config: DegradationConfig, batch_size: int, seeds: list[int] | int
) -> DegradationParams:
    """Draw every random choice of the pipeline (CPU, float64 kernels).

    Args:
        seeds: one seed per image, or one int (image ``i`` then uses ``seed + i``). Shared
            batch choices come from the first image's seed.
    """
    if isinstance(seeds, int):
        seeds = [seeds + i for i in range(batch_size)]
    if len(seeds) != batch_size:
        raise ValueError(f"need {batch_size} seeds, got {len(seeds)}")
    gs = [torch.Generator().manual_seed(int(s)) for s in seeds]
    shared = torch.Generator().manual_seed(int(seeds[0]) ^ 0x5EED)
    max_size = config.kernel_range[1]
    k1, k2, sinc = [], [], []
    for g in gs:
        k1.append(_blur_kernel(g, config, second=False))
        blur2 = _blur_kernel(g, config, second=True)
        k2.append(blur2 if _coin(g, config.second_blur_prob) else pulse_kernel(max_size))
        if _coin(g, config.final_sinc_prob):
            size = _kernel_size(g, config)
            sinc.append(sinc_kernel(size, _u(g, torch.pi / 3, torch.pi), pad_to=max_size))
        else:
            sinc.append(pulse_kernel(max_size))
    noise1 = _noise_params(gs, config, second=False)
    noise2 = _noise_params(gs, config, second=True)
    jpeg1 = [_u(g, *config.jpeg_range) for g in gs]
    jpeg2 = [_u(g, *config.jpeg_range2) for g in gs]
    return DegradationParams(
        kernel1=torch.stack(k1),
        kernel2=torch.stack(k2),
        sinc=torch.stack(sinc),
        resize1=_resize_choice(shared, config.resize_prob, config.resize_range),
        resize2=_resize_choice(shared, config.resize_prob2, config.resize_range2),
        final_resize_mode=_choice(shared, list(RESIZE_MODES)),
        final_sinc_first=_coin(shared, config.final_order_prob),
        noise1=noise1,
        noise2=noise2,
        jpeg1=jpeg1,
        jpeg2=jpeg2,
    )


# --------------------------------------------------------------------------- operations


def filter2d(x: Tensor, kernels: Tensor) -> Tensor:
    """Per-image blur with reflect padding: ``x`` ``[B, C, H, W]``, ``kernels`` ``[B, K, K]``.

    Images no larger than half the kernel (tiny test crops after a strong downscale) cannot
    be reflect-padded; they are padded by replication instead.
    """
    k = kernels.to(device=x.device, dtype=x.dtype)
    border = "reflect" if min(x.shape[-2:]) > k.shape[-1] // 2 else "replicate"
    return kornia.filters.filter2d(x, k, border_type=border)


def resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """``F.interpolate`` as basicsr calls it (``align_corners=False`` where it applies)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def _gray(x: Tensor) -> Tensor:
    return kornia.color.rgb_to_grayscale(x)


def _poisson(img: Tensor, g: torch.Generator) -> Tensor:
    """Poisson noise of one image ``[1, C, H, W]`` (basicsr ``generate_poisson_noise_pt``)."""
    img = torch.clamp((img * 255.0).round(), 0, 255) / 255.0
    vals = len(torch.unique(img))
    vals = 2 ** torch.tensor(vals, dtype=torch.float64).log2().ceil().item()
    out = torch.poisson(img * vals, generator=g) / vals
    return out - img


def add_noise(x: Tensor, params: NoiseParams) -> Tensor:
    """Add each image's Gaussian or Poisson, colour or gray noise; clip to [0, 1].

    Noise of image ``i`` is drawn from a CPU generator seeded with ``params.seeds[i]`` so it
    does not depend on the batch or the device.
    """
    outs = []
    for i in range(x.shape[0]):
        img = x[i : i + 1]
        g = torch.Generator().manual_seed(params.seeds[i])
        shape = (1, 1 if params.gray[i] else img.shape[1], *img.shape[2:])
        if params.gaussian[i]:
            noise = torch.randn(shape, generator=g, dtype=torch.float32).to(img.device, img.dtype)
            noise = noise * (params.sigma[i] / 255.0)
        else:
            src = _gray(img) if params.gray[i] else img
            noise = _poisson(src.float().cpu(), g).to(img.device, img.dtype)
            noise = noise * params.poisson_scale[i]
        outs.append((img + noise.expand_as(img)).clamp(0, 1))
    return torch.cat(outs)


def jpeg(x: Tensor, quality: list[float]) -> Tensor:
    """kornia's differentiable JPEG (DiffJPEG's model of libjpeg) with per-image quality."""
    q = torch.tensor(quality, device=x.device, dtype=torch.float32)
    return kornia.enhance.jpeg_codec_differentiable(x.clamp(0, 1), q)


def degrade(hr: Tensor, params: DegradationParams, config: DegradationConfig) -> Tensor:
    """Second-order degradation of ``[B, 3, H, W]`` images in ``[0, 1]``.

    Returns ``[B, 3, H // scale, W // scale]`` in ``[0, 1]`` (8-bit levels when the
    ``round`` stage is on). Runs on ``hr``'s device; float32 recommended.
    """
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"degrade expects [B, 3, H, W] images, got {tuple(hr.shape)}")
    if hr.shape[0] != params.batch_size:
        raise ValueError(f"{hr.shape[0]} images but parameters for {params.batch_size}")
    on = config.enabled
    h, w = hr.shape[-2:]
    s = int(config.scale)
    out = hr
    # ---- first order
    if on("blur1"):
        out = filter2d(out, params.kernel1)
    if on("resize1"):
        mode, f = params.resize1
        out = resize(out, (int(h * f), int(w * f)), mode)
    if on("noise1"):
        out = add_noise(out, params.noise1)
    if on("jpeg1"):
        out = jpeg(out, params.jpeg1)
    # ---- second order
    if on("blur2"):
        out = filter2d(out, params.kernel2)
    if on("resize2"):
        mode, f = params.resize2
        out = resize(out, (int(h / s * f), int(w / s * f)), mode)
    if on("noise2"):
        out = add_noise(out, params.noise2)
    # ---- final: resize to the LR size + sinc, and JPEG, in a random order
    target = (h // s, w // s)
    sinc = on("final_sinc")
    if params.final_sinc_first:
        out = resize(out, target, params.final_resize_mode)
        if sinc:
            out = filter2d(out, params.sinc)
        if on("jpeg2"):
            out = jpeg(out, params.jpeg2)
    else:
        if on("jpeg2"):
            out = jpeg(out, params.jpeg2)
        out = resize(out, target, params.final_resize_mode)
        if sinc:
            out = filter2d(out, params.sinc)
    out = out.clamp(0, 1)
    if on("round"):
        out = (out * 255.0).round() / 255.0
    return out


def degrade_batch(
    hr: Tensor, config: DegradationConfig, seeds: list[int] | int
) -> tuple[Tensor, DegradationParams]:
    """:func:`sample_params` + :func:`degrade` in one call; returns ``(lr, params)``."""
    params = sample_params(config, hr.shape[0], seeds)
    return degrade(hr, params, config), params
