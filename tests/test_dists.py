"""DISTS and EA-DISTS: the reference formula, weight files, Sobel edges, gradients."""

from __future__ import annotations

import hashlib
from importlib import metadata

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d3sr_core.loading.files import WeightsFileError
from d3sr_core.losses import dists as dists_mod
from d3sr_core.losses.dists import (
    DISTS,
    DISTS_NUM_CHANNELS,
    VGG16_FILENAME,
    VGG16Features,
    l2_pool_kernel,
    resolve_dists_weights,
    resolve_vgg16_weights,
)
from d3sr_core.losses.ea_dists import EADISTS, sobel_magnitude

SIZE = 32  # VGG16 reaches 2 x 2 at relu5_3: enough for every stage, fast on CPU


def _images(seed: int = 0, b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, SIZE, SIZE, generator=g)
    # y: a related image (blurred + noise) so that the similarity is neither 0 nor 1
    y = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    y = (y + 0.1 * torch.randn(y.shape, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def model() -> DISTS:
    torch.manual_seed(0)
    return DISTS()  # random VGG weights, reference-style random alpha/beta


def _real_alpha_beta_path():
    try:
        metadata.distribution("dists-pytorch")
    except metadata.PackageNotFoundError:
        return None
    try:
        return resolve_dists_weights()
    except WeightsFileError:
        return None


def _fake_vgg16_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's vgg16 key names and shapes (classifier kept small).

    Every tensor is a view into ONE random storage, each at its own offset (so no two are
    equal): ``torch.save`` writes that storage once, ~10 MB instead of the 58 MB of separate
    tensors. Tests save it many times, and mutation runs keep every pytest temp folder."""
    shapes = {k: v.shape for k, v in VGG16Features().state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(max(s.numel() for s in shapes.values()) + len(shapes), generator=g) * 0.05
    state = {k: base[i : i + s.numel()].view(s) for i, (k, s) in enumerate(shapes.items())}
    # torchvision's file also holds classifier.{0,3,6}.*; they must be ignored.
    state.update({"classifier.0.weight": torch.zeros(4, 8), "classifier.6.bias": torch.zeros(1000)})
    return state


# ---------------------------------------------------------------- building blocks


def test_l2_pool_kernel_is_reference_hanning_window():
    a = np.hanning(5)[1:-1]
    ref = torch.tensor(a[:, None] * a[None, :], dtype=torch.float32)
    ref = ref / ref.sum()
    assert torch.allclose(l2_pool_kernel(), ref)
    assert torch.allclose(l2_pool_kernel() * 16, torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]))


def test_vgg16_keys_are_torchvision_names():
    state = VGG16Features().state_dict()
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert list(state) == [f"features.{i}.{p}" for i in convs for p in ("weight", "bias")]
    assert state["features.0.weight"].shape == (64, 3, 3, 3)
    assert state["features.28.weight"].shape == (512, 512, 3, 3)
    assert sum(v.numel() for v in state.values()) == 14_714_688  # torchvision vgg16().features


# ---------------------------------------------------------------- the formula


def test_identity_is_zero_and_symmetric(model):
    x, y = _images()
    d_xy, d_yx, d_xx = model(x, y), model(y, x), model(x, x)
    assert d_xy.shape == (2,)
    assert torch.allclose(d_xx, torch.zeros(2), atol=1e-5)
    assert torch.allclose(d_xy, d_yx, atol=1e-6)
    assert (d_xy > 1e-3).all()


def _reference_dists(state, alpha, beta, x, y):
    """A straightforward re-computation (float64, loops), independent of the module code."""
    x, y = x.double(), y.double()
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    a = np.hanning(5)[1:-1]
    window = torch.tensor(a[:, None] * a[None, :])
    window = window / window.sum()

    def l2pool(h):
        w = window.expand(h.shape[1], 1, 3, 3)
        return torch.sqrt(F.conv2d(h**2, w, stride=2, padding=1, groups=h.shape[1]) + 1e-12)

    def feats(img):
        h = (img - mean) / std
        out = [img]
        layers = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]
        for k, convs in enumerate(layers):
            if k > 0:
                h = l2pool(h)
            for i in convs:
                h = F.relu(
                    F.conv2d(
                        h,
                        state[f"features.{i}.weight"].double(),
                        state[f"features.{i}.bias"].double(),
                        padding=1,
                    )
                )
            out.append(h)
        return out

    fx, fy = feats(x), feats(y)
    alpha = alpha.double().flatten()
    beta = beta.double().flatten()
    total = alpha.sum() + beta.sum()
    result = []
    for b in range(x.shape[0]):
        s, c0 = 0.0, 0
        for fa, fb in zip(fx, fy, strict=True):
            u, v = fa[b].flatten(1), fb[b].flatten(1)  # [C, H*W], one row per channel
            n = fa.shape[1]
            mu, mv = u.mean(1), v.mean(1)
            s1 = (2 * mu * mv + 1e-6) / (mu**2 + mv**2 + 1e-6)
            cov = (u * v).mean(1) - mu * mv
            s2 = (2 * cov + 1e-6) / (
                ((u - mu[:, None]) ** 2).mean(1) + ((v - mv[:, None]) ** 2).mean(1) + 1e-6
            )
            s = s + ((alpha[c0 : c0 + n] * s1).sum() + (beta[c0 : c0 + n] * s2).sum()) / total
            c0 += n
        result.append(1 - s)
    return torch.stack(result)


def test_equals_independent_recomputation(model):
    x, y = _images(seed=3)
    ref = _reference_dists(model.vgg.state_dict(), model.alpha, model.beta, x, y)
    assert torch.allclose(model(x, y).double(), ref, atol=1e-5), (model(x, y), ref)


def test_value_range_argument(model):
    x, y = _images(seed=4)
    signed = DISTS(value_range=(-1, 1))
    signed.load_state_dict(model.state_dict())
    assert torch.allclose(signed(2 * x - 1, 2 * y - 1), model(x, y), atol=1e-6)
    with pytest.raises(ValueError):
        DISTS(value_range=(1, 1))


def test_gradient_reaches_input_and_metric_has_none(model):
    x, y = _images(seed=5)
    x = x.clone().requires_grad_(True)
    model(x, y).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in model.parameters())
    assert not model.score(x, y).requires_grad


def test_real_alpha_beta_and_range():
    path = _real_alpha_beta_path()
    if path is None:
        pytest.skip("dists-pytorch (ships DISTS' weights.pt) is not installed")
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("f5e65c96")
    torch.manual_seed(0)
    m = DISTS()
    m.load_alpha_beta(path)
    assert m.alpha.shape == m.beta.shape == (1, DISTS_NUM_CHANNELS, 1, 1)
    assert abs(m.alpha.sum().item() - 0.8760) < 1e-3 and abs(m.beta.sum().item() - 0.1240) < 1e-3
    x, y = _images(seed=6, b=3)
    g = torch.Generator().manual_seed(7)
    for other in (
        y,
        torch.rand(x.shape, generator=g),
        1 - x,
        torch.zeros_like(x) + 0.5,
        x.flip(-1),
    ):
        d = m(x, other)
        assert ((d >= 0) & (d <= 1)).all(), d
    assert torch.allclose(m(x, x), torch.zeros(3), atol=1e-5)


# ---------------------------------------------------------------- weight files


def test_torchvision_vgg16_file_loads(tmp_path, model):
    state = _fake_vgg16_state()
    path = tmp_path / VGG16_FILENAME
    torch.save(state, path)
    m = DISTS()
    m.load_vgg16(path)
    assert torch.equal(m.vgg.state_dict()["features.14.weight"], state["features.14.weight"])


def test_wrong_vgg_file_gives_clear_error(tmp_path):
    bn = tmp_path / "vgg16_bn.pth"  # VGG16-BN: BatchNorm shifts every feature index
    torch.save(
        {"features.0.weight": torch.zeros(64, 3, 3, 3), "features.1.weight": torch.ones(64)}, bn
    )
    with pytest.raises(WeightsFileError, match=VGG16_FILENAME) as err:
        DISTS().load_vgg16(bn)
    assert str(bn) in str(err.value)
    shapes = tmp_path / "wrong_shapes.pth"
    state = _fake_vgg16_state()
    state["features.28.weight"] = torch.zeros(256, 512, 3, 3)
    torch.save(state, shapes)
    with pytest.raises(WeightsFileError, match="features.28.weight"):
        DISTS().load_vgg16(shapes)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsFileError, match="garbage.pth"):
        DISTS().load_vgg16(garbage)
    with pytest.raises(WeightsFileError, match="alpha"):
        DISTS().load_alpha_beta(shapes)


def test_vgg16_lookup_in_hub_cache_and_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsFileError) as err:
        resolve_vgg16_weights()
    message = str(err.value)
    assert VGG16_FILENAME in message and str(tmp_path / "hub" / "checkpoints") in message
    with pytest.raises(WeightsFileError, match="missing.pth"):
        resolve_vgg16_weights(tmp_path / "missing.pth")
    target = tmp_path / "hub" / "checkpoints" / VGG16_FILENAME
    target.parent.mkdir(parents=True)
    torch.save(_fake_vgg16_state(), target)
    assert resolve_vgg16_weights() == target


def test_dists_weights_lookup_and_from_pretrained(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(dists_mod, "_installed_dists_weights", lambda: [])
    with pytest.raises(WeightsFileError, match="dists-pytorch"):
        resolve_dists_weights()
    ab = tmp_path / "ab.pt"
    alpha = torch.rand(1, DISTS_NUM_CHANNELS, 1, 1)
    torch.save({"alpha": alpha, "beta": torch.rand(1, DISTS_NUM_CHANNELS, 1, 1)}, ab)
    vgg = tmp_path / VGG16_FILENAME
    torch.save(_fake_vgg16_state(), vgg)
    m = DISTS.from_pretrained(vgg, ab)
    assert torch.equal(m.alpha, alpha)
    x, y = _images(seed=8)
    assert m(x, y).shape == (2,)


def test_installed_wheel_weights_are_found():
    if _real_alpha_beta_path() is None:
        pytest.skip("dists-pytorch is not installed")
    assert resolve_dists_weights().name in ("weights.pt", dists_mod.DISTS_WEIGHTS_FILENAME)


# ---------------------------------------------------------------- Sobel and EA-DISTS


def test_sobel_unit_step_response():
    x = torch.zeros(1, 3, 8, 8)
    x[..., 4:] = 1.0
    s = sobel_magnitude(x)
    assert s.shape == x.shape
    assert torch.allclose(s[..., 3:5], torch.full_like(s[..., 3:5], 0.5), atol=1e-5)
    assert torch.allclose(s[..., :2], torch.full_like(s[..., :2], 1e-3), atol=1e-6)
    assert torch.allclose(sobel_magnitude(x, "gray"), s, atol=1e-5)  # grey step is also 0 -> 1


def test_ea_dists_edge_branch_changes_value_and_has_gradient(model):
    x, y = _images(seed=9)
    ea = EADISTS(model)
    x = x.clone().requires_grad_(True)
    image, edge = ea.terms(x, y)
    assert torch.allclose(image, model(x, y))
    assert (edge.abs() > 1e-4).all()
    total = ea(x, y)
    assert torch.allclose(total, image + edge)
    (grad,) = torch.autograd.grad(edge.sum(), x)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    assert not ea.score(x, y).requires_grad


def test_ea_dists_options(model):
    x, y = _images(seed=10)
    base = EADISTS(model)(x, y)
    signed = EADISTS(model, value_range=(-1, 1))(2 * x - 1, 2 * y - 1)
    assert torch.allclose(base, signed, atol=1e-5)
    gray = EADISTS(model, edge_mode="gray")(x, y)
    assert gray.shape == (2,) and not torch.allclose(gray, base)
    assert torch.allclose(EADISTS(model, edge_weight=0.0)(x, y), model(x, y))
    with pytest.raises(ValueError, match="edge_mode must be one of .*'canny'"):
        EADISTS(model, edge_mode="canny")
    with pytest.raises(ValueError, match="edge mode must be one of .*'canny'"):
        sobel_magnitude(x, "canny")


def test_target_features_are_computed_without_autograd(model):
    """As a loss the target half never enters the graph, and the gradient is unchanged."""
    x, y = _images(seed=11)
    x = x.clone().requires_grad_(True)
    saved = []

    def pack(t):
        if t.ndim == 4:
            saved.append(t.shape[0])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, y).sum()
    # activations saved for backward have x's batch (2), never the joint batch (4); VGG
    # weights (64..512 output channels) are the other 4-D saved tensors
    assert x.shape[0] in saved and 2 * x.shape[0] not in saved
    (grad,) = torch.autograd.grad(loss, x)
    # reference: the old joint computation (target requiring grad forces the joint batch)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = y.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(model(x2, y2).sum(), x2)
    assert torch.allclose(grad, ref, atol=1e-6)
    assert torch.allclose(loss, model.score(x, y).sum(), atol=1e-6)


def test_ea_dists_follows_its_dists_value_range(model):
    x, y = _images(seed=12)
    signed = DISTS(value_range=(-1, 1))
    signed.load_state_dict(model.state_dict())
    ea = EADISTS(signed)
    assert ea.value_range == (-1.0, 1.0)
    assert torch.allclose(ea(2 * x - 1, 2 * y - 1), EADISTS(model)(x, y), atol=1e-5)
    # an explicit value_range still wins
    assert EADISTS(signed, value_range=(0, 1)).value_range == (0.0, 1.0)
    assert EADISTS().value_range == (0.0, 1.0)


def _sobel_by_hand(x: torch.Tensor) -> torch.Tensor:
    """Per channel: kernels [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] / 8 and its transpose,
    replicate padding, sqrt(gx^2 + gy^2 + 1e-6)."""
    kx = (
        torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
        / 8
    )
    c = x.shape[1]
    padded = F.pad(x.double(), (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, kx.expand(c, 1, 3, 3), groups=c)
    gy = F.conv2d(padded, kx.T.expand(c, 1, 3, 3), groups=c)
    return (gx**2 + gy**2 + 1e-6).sqrt().float()


def test_sobel_modes_and_edge_term_equal_the_formulas(model):
    """rgb: the Sobel magnitude of each channel; gray: of the ITU-R 601 luma, on all three
    channels; the edge term of EA-DISTS is DISTS of those maps."""
    x, y = _images(seed=13)
    torch.testing.assert_close(sobel_magnitude(x, "rgb"), _sobel_by_hand(x), atol=1e-6, rtol=1e-5)
    luma = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    gray = sobel_magnitude(x, "gray")
    torch.testing.assert_close(
        gray, _sobel_by_hand(luma).expand(-1, 3, -1, -1), atol=1e-6, rtol=1e-5
    )
    assert not torch.allclose(gray, sobel_magnitude(x, "rgb"), atol=1e-3)
    _, edge = EADISTS(model, edge_mode="gray").terms(x, y)
    luma_y = 0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3]
    expected = model.distance(
        _sobel_by_hand(luma).expand(-1, 3, -1, -1), _sobel_by_hand(luma_y).expand(-1, 3, -1, -1)
    )
    torch.testing.assert_close(edge, expected, atol=1e-5, rtol=1e-5)
