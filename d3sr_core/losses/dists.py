"""DISTS (Ding et al., TPAMI 2020): structure and texture similarity on VGG16 features.

A faithful re-implementation of the reference ``DISTS_pytorch/DISTS_pt.py`` (and pyiqa's
``dists_arch.py``, which is the same): VGG16 ``features[0:30]`` with every max-pool replaced
by an L2 pooling, the raw image as the first feature, learned per-channel weights
``alpha``/``beta`` of shape ``[1, 1475, 1, 1]`` and ``c1 = c2 = 1e-6``.

VGG16 is written out here rather than taken from torchvision (whose wheels do not import
beside a CPU torch); its state-dict keys are torchvision's (``features.0.weight`` ...
``features.28.bias``), so torchvision's ImageNet file ``vgg16-397923af.pth`` loads as is.

Weights (never downloaded unless ``allow_download=True``):

* VGG16: an explicit path, else ``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth``
  (where torchvision itself caches it).
* alpha/beta: an explicit path, else the ``weights.pt`` that the PyPI package
  ``dists-pytorch==0.1`` installs (its module is never imported: it imports torchvision),
  else pyiqa's ``DISTS_weights-f5e65c96.pth`` in the torch hub cache.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..loading.files import WeightsFileError, read_state_dict

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
DISTS_WEIGHTS_FILENAME = "DISTS_weights-f5e65c96.pth"  # pyiqa's name for the same bytes
DISTS_WEIGHTS_URL = (
    "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/"
    + DISTS_WEIGHTS_FILENAME
)
DISTS_WEIGHTS_SHA256_PREFIX = "f5e65c96"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Channels of the six compared features: raw image, relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
DISTS_CHANNELS = (3, 64, 128, 256, 512, 512)
DISTS_NUM_CHANNELS = sum(DISTS_CHANNELS)  # 1475

# torchvision's vgg16().features: (index, in, out) of each 3x3 conv; a ReLU follows each conv
# and max-pools sit at 4, 9, 16, 23 (and 30, which DISTS does not use).
VGG16_CONVS = (
    (0, 3, 64), (2, 64, 64),
    (5, 64, 128), (7, 128, 128),
    (10, 128, 256), (12, 256, 256), (14, 256, 256),
    (17, 256, 512), (19, 512, 512), (21, 512, 512),
    (24, 512, 512), (26, 512, 512), (28, 512, 512),
)  # fmt: skip
VGG16_POOLS = (4, 9, 16, 23)
# Index just after each stage's last ReLU: the outputs relu1_2 .. relu5_3.
VGG16_STAGE_ENDS = (4, 9, 16, 23, 30)


def l2_pool_kernel(dtype: torch.dtype = torch.float32) -> Tensor:
    """DISTS' 3x3 L2-pooling window: ``outer(h, h) / sum`` with ``h = hanning(5)[1:-1]``.

    Returns ``[[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16`` as a ``[3, 3]`` tensor.
    """
    h = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
    g = h[:, None] * h[None, :]
    return (g / g.sum()).to(dtype)


def l2_pool(x: Tensor, kernel: Tensor | None = None) -> Tensor:
    """L2 pooling, stride 2: ``sqrt(depthwise_conv(x^2, kernel) + 1e-12)``.

    Replaces VGG's max-pool in DISTS (it is smooth, so aliasing-free and differentiable
    everywhere). ``x``: ``[B, C, H, W]`` -> ``[B, C, ceil(H/2), ceil(W/2)]`` (padding 1).
    """
    if kernel is None:
        kernel = l2_pool_kernel()
    c = x.shape[1]
    weight = kernel.to(device=x.device, dtype=x.dtype).expand(c, 1, *kernel.shape[-2:])
    out = F.conv2d(x * x, weight, stride=2, padding=1, groups=c)
    return (out + 1e-12).sqrt()


class L2Pool(nn.Module):
    """:func:`l2_pool` as a module. The kernel is a non-persistent buffer, so the state dict
    keeps exactly torchvision's VGG16 keys."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kernel", l2_pool_kernel(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return l2_pool(x, self.kernel)


def dists_from_features(
    feats_x: Sequence[Tensor],
    feats_y: Sequence[Tensor],
    alpha: Tensor,
    beta: Tensor,
    c1: float = 1e-6,
    c2: float = 1e-6,
) -> Tensor:
    """The DISTS formula on two lists of feature maps.

    Per stage k and channel c (statistics over H, W; biased; ``cov = E[xy] - mu_x mu_y``):
    ``S1 = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1)``,
    ``S2 = (2 cov + c2) / (var_x + var_y + c2)``, and
    ``D = 1 - sum_kc (alpha_kc S1 + beta_kc S2)`` with alpha, beta divided by their joint sum.

    Args:
        feats_x, feats_y: ``[B, C_k, H_k, W_k]`` per stage (channels summing to
            ``alpha.shape[1]``).
        alpha, beta: ``[1, sum C_k, 1, 1]``.

    Returns:
        ``[B]`` distances (0 for identical inputs; in [0, 1] for natural images).
    """
    chns = [f.shape[1] for f in feats_x]
    if sum(chns) != alpha.shape[1] or alpha.shape != beta.shape:
        raise ValueError(
            f"features have {sum(chns)} channels in all but alpha/beta have shapes "
            f"{tuple(alpha.shape)}/{tuple(beta.shape)}"
        )
    w_sum = alpha.sum() + beta.sum()
    alphas = torch.split(alpha / w_sum, chns, dim=1)
    betas = torch.split(beta / w_sum, chns, dim=1)
    dist1 = 0.0
    dist2 = 0.0
    for fx, fy, a, b in zip(feats_x, feats_y, alphas, betas, strict=True):
        mx = fx.mean([2, 3], keepdim=True)
        my = fy.mean([2, 3], keepdim=True)
        s1 = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
        dist1 = dist1 + (a * s1).sum(1, keepdim=True)
        vx = ((fx - mx) ** 2).mean([2, 3], keepdim=True)
        vy = ((fy - my) ** 2).mean([2, 3], keepdim=True)
        cov = (fx * fy).mean([2, 3], keepdim=True) - mx * my
        s2 = (2 * cov + c2) / (vx + vy + c2)
        dist2 = dist2 + (b * s2).sum(1, keepdim=True)
    return 1 - (dist1 + dist2).reshape(-1)


def to_unit_range(x: Tensor, value_range: tuple[float, float]) -> Tensor:
    """Map ``x`` linearly from ``value_range`` (e.g. ``(-1, 1)``) onto ``[0, 1]``."""
    lo, hi = float(value_range[0]), float(value_range[1])
    if (lo, hi) == (0.0, 1.0):
        return x
    return (x - lo) / (hi - lo)


def _check_value_range(value_range: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    return lo, hi


class VGG16Features(nn.Module):
    """VGG16 ``features[0:30]`` with L2 pooling instead of max pooling (no torchvision).

    State-dict keys are torchvision's: ``features.{0,2,5,...,28}.{weight,bias}``.
    ``forward`` takes ImageNet-normalised ``[B, 3, H, W]`` and returns the five stage
    outputs relu1_2 .. relu5_3 (64, 128, 256, 512, 512 channels, H/1 .. H/16).
    """

    def __init__(self) -> None:
        super().__init__()
        convs = {i: (cin, cout) for i, cin, cout in VGG16_CONVS}
        layers: list[nn.Module] = []
        for i in range(30):
            if i in convs:
                layers.append(nn.Conv2d(*convs[i], kernel_size=3, padding=1))
            elif i in VGG16_POOLS:
                layers.append(L2Pool())
            else:
                layers.append(nn.ReLU(inplace=False))
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        start = 0
        for end in VGG16_STAGE_ENDS:
            for layer in self.features[start:end]:
                x = layer(x)
            outs.append(x)
            start = end
        return outs


def vgg16_state_dict_from_file(path: str | Path) -> dict[str, Tensor]:
    """The ``features.*`` tensors of a torchvision VGG16 checkpoint, checked key by key.

    Raises:
        WeightsFileError: missing/damaged file, or not a VGG16 (missing keys, wrong shapes).
    """
    state = read_state_dict(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsFileError(path, f"expected a VGG16 state dict, found {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = {k: v.shape for k, v in VGG16Features().state_dict().items()}
    missing = [k for k in expected if k not in state]
    if missing:
        raise WeightsFileError(
            path,
            f"not a torchvision VGG16 checkpoint ({VGG16_FILENAME}): missing {len(missing)} of "
            f"{len(expected)} feature tensors, e.g. {missing[:3]}",
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(s)})"
        for k, s in expected.items()
        if not isinstance(state[k], Tensor) or state[k].shape != s
    ]
    extra_features = [
        k for k in state if k.startswith("features.") and k not in expected
    ]  # e.g. VGG19 / VGG16-BN, whose feature indices differ
    if wrong or extra_features:
        detail = wrong[:3] if wrong else [f"unexpected {k}" for k in extra_features[:3]]
        raise WeightsFileError(
            path,
            f"not a torchvision VGG16 checkpoint ({VGG16_FILENAME}; VGG16-BN/VGG19 differ): {detail}",
        )
    return {k: state[k].float() for k in expected}


def alpha_beta_from_file(path: str | Path) -> tuple[Tensor, Tensor]:
    """DISTS' ``alpha`` and ``beta`` (``[1, 1475, 1, 1]`` each) from ``weights.pt``-style files.

    Raises:
        WeightsFileError: missing/damaged file, or no ``alpha``/``beta`` of the right shape.
    """
    state = read_state_dict(path)
    if isinstance(state, dict) and isinstance(state.get("params"), dict):
        state = state["params"]  # some pyiqa-style re-saves wrap the tensors
    shape = (1, DISTS_NUM_CHANNELS, 1, 1)
    try:
        alpha, beta = state["alpha"], state["beta"]
    except (KeyError, TypeError):
        raise WeightsFileError(
            path, "not a DISTS weights file: expected a dict with 'alpha' and 'beta'"
        ) from None
    for name, t in (("alpha", alpha), ("beta", beta)):
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise WeightsFileError(path, f"DISTS {name} has shape {got}, expected {shape}")
    return alpha.float(), beta.float()


def _sha256_prefix(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _installed_dists_weights() -> list[Path]:
    """``weights.pt`` files installed by the ``dists-pytorch`` wheel (read, never imported).

    The 0.1 wheel records it both as ``DISTS_pytorch/weights.pt`` and as a data file at the
    environment root (``../../../weights.pt`` relative to site-packages).
    """
    from importlib import metadata

    found: list[Path] = []
    try:
        files = metadata.distribution("dists-pytorch").files or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "weights.pt":
            p = Path(str(f.locate())).resolve()
            if p.is_file():
                found.append(p)
    # Sorted so the in-package copy (DISTS_pytorch/weights.pt) is preferred when both exist.
    found.sort(key=lambda p: p.parent.name != "DISTS_pytorch")
    found.append(Path(sys.prefix) / "weights.pt")  # the reference code's own lookup
    return found


def resolve_vgg16_weights(path: str | Path | None = None, allow_download: bool = False) -> Path:
    """Locate torchvision's ImageNet VGG16 file (``vgg16-397923af.pth``, ~528 MB).

    Order: ``path`` if given; else the torch hub cache
    (``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth``, where torchvision puts it);
    else, only with ``allow_download=True``, a hash-checked download into that cache.

    Raises:
        WeightsFileError: the file is absent (the message says where to put it).
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsFileError(p, f"VGG16 weights not found (expected {VGG16_FILENAME})")
        return p
    cached = _hub_checkpoints() / VGG16_FILENAME
    if cached.is_file():
        return cached
    if allow_download:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(VGG16_URL, str(cached), hash_prefix="397923af")
        return cached
    raise WeightsFileError(
        cached,
        f"ImageNet VGG16 weights for DISTS not found. Put torchvision's {VGG16_FILENAME} "
        f"(from {VGG16_URL}) at this path, pass its path explicitly, or allow downloads",
    )


def resolve_dists_weights(path: str | Path | None = None, allow_download: bool = False) -> Path:
    """Locate DISTS' learned ``alpha``/``beta`` file (12 KB, sha256 ``f5e65c96...``).

    Order: ``path`` if given; else the ``weights.pt`` installed by ``pip install
    dists-pytorch==0.1`` (in ``DISTS_pytorch/`` or at the environment root); else pyiqa's
    ``DISTS_weights-f5e65c96.pth`` in ``torch.hub.get_dir()/pyiqa`` or ``/checkpoints``;
    else, only with ``allow_download=True``, a hash-checked download into the hub cache.
    Auto-discovered files must match the hash (an unrelated ``weights.pt`` is skipped).

    Raises:
        WeightsFileError: the file is absent (the message says how to get it).
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsFileError(p, "DISTS alpha/beta weights not found")
        return p
    hub = Path(torch.hub.get_dir())
    candidates = _installed_dists_weights() + [
        hub / "pyiqa" / DISTS_WEIGHTS_FILENAME,
        hub / "checkpoints" / DISTS_WEIGHTS_FILENAME,
    ]
    for p in candidates:
        # size first: an unrelated, possibly huge, weights.pt is not hashed
        if p.is_file() and p.stat().st_size < 1_000_000:
            if _sha256_prefix(p) == DISTS_WEIGHTS_SHA256_PREFIX:
                return p
    target = hub / "checkpoints" / DISTS_WEIGHTS_FILENAME
    if allow_download:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(
            DISTS_WEIGHTS_URL, str(target), hash_prefix=DISTS_WEIGHTS_SHA256_PREFIX
        )
        return target
    raise WeightsFileError(
        target,
        "DISTS alpha/beta weights not found. Install them with "
        "`pip install --no-deps dists-pytorch==0.1` (ships weights.pt; MIT), put "
        f"{DISTS_WEIGHTS_FILENAME} (from {DISTS_WEIGHTS_URL}) at this path, pass a path "
        "explicitly, or allow downloads",
    )


class DISTS(nn.Module):
    """DISTS distance, usable as a metric (under ``torch.no_grad()``) or as a loss.

    Every weight is frozen (VGG and alpha/beta are not trained); gradients flow to the
    inputs whenever autograd is enabled.

    A freshly constructed module has random VGG weights and the reference's random
    alpha/beta initialisation (``N(0.1, 0.01)``), for tests; use :meth:`from_pretrained`
    for the real ImageNet VGG16 + learned alpha/beta.

    Args:
        value_range: the range of the images passed to :meth:`forward`: ``(0, 1)`` (the
            reference's convention) or e.g. ``(-1, 1)``; mapped linearly onto ``[0, 1]``.
    """

    def __init__(self, value_range: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__()
        self.value_range = _check_value_range(value_range)
        self.vgg = VGG16Features()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        g = torch.Generator().manual_seed(0)
        shape = (1, DISTS_NUM_CHANNELS, 1, 1)
        self.register_buffer("alpha", 0.1 + 0.01 * torch.randn(shape, generator=g))
        self.register_buffer("beta", 0.1 + 0.01 * torch.randn(shape, generator=g))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        vgg_weights: str | Path | None = None,
        dists_weights: str | Path | None = None,
        *,
        value_range: tuple[float, float] = (0.0, 1.0),
        allow_download: bool = False,
    ) -> DISTS:
        """Real DISTS: ImageNet VGG16 and learned alpha/beta, located as described in
        :func:`resolve_vgg16_weights` / :func:`resolve_dists_weights`."""
        model = cls(value_range=value_range)
        model.load_vgg16(resolve_vgg16_weights(vgg_weights, allow_download))
        model.load_alpha_beta(resolve_dists_weights(dists_weights, allow_download))
        return model

    def load_vgg16(self, path: str | Path) -> None:
        """Load torchvision's VGG16 (``features.*``; classifier keys are ignored)."""
        state = vgg16_state_dict_from_file(path)
        self.vgg.load_state_dict(state, strict=True)

    def load_alpha_beta(self, path: str | Path) -> None:
        """Load the learned ``alpha``/``beta`` (``[1, 1475, 1, 1]`` each)."""
        alpha, beta = alpha_beta_from_file(path)
        self.alpha.copy_(alpha)
        self.beta.copy_(beta)

    def features(self, x: Tensor) -> list[Tensor]:
        """``[raw x, relu1_2, relu2_2, relu3_3, relu4_3, relu5_3]`` for ``x`` in ``[0, 1]``."""
        h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return [x, *self.vgg(h)]

    def distance(self, x: Tensor, y: Tensor) -> Tensor:
        """DISTS of ``[B, 3, H, W]`` images already in ``[0, 1]``; returns ``[B]``.

        Single-channel inputs are repeated to 3 channels (as pyiqa's normalisation does
        by broadcasting). As a loss (autograd on, ``y`` not requiring grad) the target's
        features are computed without autograd, so backward runs over ``x``'s half only;
        otherwise both images go through VGG in one batch.
        """
        if x.shape != y.shape:
            raise ValueError(
                f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected [B, 3, H, W] (or 1 channel) images, got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        if torch.is_grad_enabled() and not y.requires_grad:
            fx = self.features(x)
            with torch.no_grad():
                fy = self.features(y)
        else:
            feats = self.features(torch.cat([x, y], dim=0))
            b = x.shape[0]
            fx = [f[:b] for f in feats]
            fy = [f[b:] for f in feats]
        return dists_from_features(fx, fy, self.alpha.to(x.dtype), self.beta.to(x.dtype))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """DISTS between ``x`` and ``y`` (``[B, 3, H, W]`` in ``value_range``): ``[B]``.

        Lower is more similar. For a loss take ``.mean()``.
        """
        return self.distance(to_unit_range(x, self.value_range), to_unit_range(y, self.value_range))

    @torch.no_grad()
    def score(self, x: Tensor, y: Tensor) -> Tensor:
        """Metric use: :meth:`forward` without autograd, ``[B]``."""
        return self.forward(x, y)
