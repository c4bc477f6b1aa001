"""Where DISTS' weight files are looked for, in which order, and what a refusal says: the hub
cache and the installed wheel simulated in a temporary folder, downloads recorded, never made."""

import hashlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_dists import _fake_vgg16_state

from d3sr_core.loading.files import WeightsFileError
from d3sr_core.losses import dists as dists_mod
from d3sr_core.losses.dists import (
    DISTS,
    DISTS_NUM_CHANNELS,
    DISTS_WEIGHTS_FILENAME,
    DISTS_WEIGHTS_URL,
    VGG16_FILENAME,
    VGG16_URL,
    resolve_dists_weights,
    resolve_vgg16_weights,
    vgg16_state_dict_from_file,
)

GOOD = "f5e65c96"  # DISTS_WEIGHTS_SHA256_PREFIX


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub folder; downloads are recorded and write the file they name."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    downloads = []

    def download(url, dst, hash_prefix=None):
        downloads.append((url, dst, hash_prefix))
        if url == VGG16_URL:
            torch.save(_fake_vgg16_state(), dst)
        else:
            torch.save(_alpha_beta(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return SimpleNamespace(root=tmp_path / "hub", downloads=downloads)


def _alpha_beta():
    shape = (1, DISTS_NUM_CHANNELS, 1, 1)
    return {"alpha": torch.full(shape, 0.25), "beta": torch.full(shape, 0.5)}


def test_vgg16_file_forms_and_refusals(tmp_path):
    state = _fake_vgg16_state()
    for name, content in (
        ("wrapped.pth", {"state_dict": state}),
        ("ddp.pth", {"module." + k: v for k, v in state.items()}),
    ):
        torch.save(content, tmp_path / name)
        loaded = vgg16_state_dict_from_file(tmp_path / name)
        assert torch.equal(loaded["features.28.weight"], state["features.28.weight"])
    for name, content, problem in (
        ("list.pth", [1, 2], "expected a VGG16 state dict, found list"),
        (
            "other.pth",
            {"features.99.weight": torch.zeros(1)},
            f"not a torchvision VGG16 checkpoint ({VGG16_FILENAME}): missing 26 of 26 feature "
            "tensors, e.g. ['features.0.weight', 'features.0.bias', 'features.2.weight']",
        ),
    ):
        torch.save(content, tmp_path / name)
        with pytest.raises(WeightsFileError) as err:
            vgg16_state_dict_from_file(tmp_path / name)
        assert str(err.value) == f"{tmp_path / name}: {problem}"


def test_sha256_prefix_is_the_first_eight_hex_digits(tmp_path):
    (tmp_path / "abc").write_bytes(b"abc")
    assert dists_mod._sha256_prefix(tmp_path / "abc") == hashlib.sha256(b"abc").hexdigest()[:8]


def test_vgg16_lookup_order_and_download(hub, tmp_path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(WeightsFileError) as err:
        resolve_vgg16_weights(missing)
    assert str(err.value) == f"{missing}: VGG16 weights not found (expected {VGG16_FILENAME})"
    cached = hub.root / "checkpoints" / VGG16_FILENAME
    with pytest.raises(WeightsFileError) as err:
        resolve_vgg16_weights()
    assert str(err.value) == (
        f"{cached}: ImageNet VGG16 weights for DISTS not found. Put torchvision's "
        f"{VGG16_FILENAME} (from {VGG16_URL}) at this path, pass its path explicitly, or allow "
        "downloads"
    )
    assert hub.downloads == []
    assert resolve_vgg16_weights(allow_download=True) == cached  # folders made on the way
    assert hub.downloads == [(VGG16_URL, str(cached), "397923af")]
    cached.unlink()
    assert resolve_vgg16_weights(allow_download=True) == cached  # the folder exists now
    assert resolve_vgg16_weights() == cached and len(hub.downloads) == 2


def test_dists_weights_lookup_order_size_and_hash(hub, tmp_path, monkeypatch):
    hashes = {}
    monkeypatch.setattr(dists_mod, "_sha256_prefix", lambda p: hashes[Path(p)])
    installed = [tmp_path / "site" / "weights.pt", tmp_path / "root" / "weights.pt"]
    monkeypatch.setattr(dists_mod, "_installed_dists_weights", lambda: list(installed))
    pyiqa = hub.root / "pyiqa" / DISTS_WEIGHTS_FILENAME
    checkpoints = hub.root / "checkpoints" / DISTS_WEIGHTS_FILENAME

    def put(path, size, digest):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * size)
        hashes[path] = digest

    put(checkpoints, 100, GOOD)
    assert resolve_dists_weights() == checkpoints
    put(pyiqa, 100, GOOD)
    assert resolve_dists_weights() == pyiqa
    put(installed[1], 1_000_000, GOOD)  # 1 MB or more: not DISTS' 12 KB, not even hashed
    assert resolve_dists_weights() == pyiqa
    put(installed[1], 999_999, GOOD)
    assert resolve_dists_weights() == installed[1]
    put(installed[0], 100, "00000000")  # an unrelated weights.pt: skipped
    assert resolve_dists_weights() == installed[1]
    hashes[installed[0]] = GOOD
    assert resolve_dists_weights() == installed[0]
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(WeightsFileError) as err:
        resolve_dists_weights(missing)
    assert str(err.value) == f"{missing}: DISTS alpha/beta weights not found"
    assert resolve_dists_weights(installed[1]) == installed[1]  # an explicit path wins
    assert hub.downloads == []


def test_dists_weights_download_and_refusal(hub, monkeypatch):
    monkeypatch.setattr(dists_mod, "_installed_dists_weights", lambda: [])
    target = hub.root / "checkpoints" / DISTS_WEIGHTS_FILENAME
    with pytest.raises(WeightsFileError) as err:
        resolve_dists_weights()
    assert str(err.value) == (
        f"{target}: DISTS alpha/beta weights not found. Install them with `pip install "
        "--no-deps dists-pytorch==0.1` (ships weights.pt; MIT), put "
        f"{DISTS_WEIGHTS_FILENAME} (from {DISTS_WEIGHTS_URL}) at this path, pass a path "
        "explicitly, or allow downloads"
    )
    target.parent.mkdir(parents=True)  # an existing folder is fine
    assert resolve_dists_weights(allow_download=True) == target
    assert hub.downloads == [(DISTS_WEIGHTS_URL, str(target), GOOD)]


def test_dists_weights_download_makes_the_folders(hub, monkeypatch):
    monkeypatch.setattr(dists_mod, "_installed_dists_weights", lambda: [])
    target = hub.root / "checkpoints" / DISTS_WEIGHTS_FILENAME
    assert resolve_dists_weights(allow_download=True) == target and target.is_file()


def test_from_pretrained_downloads_only_when_allowed(hub, monkeypatch):
    monkeypatch.setattr(dists_mod, "_installed_dists_weights", lambda: [])
    with pytest.raises(WeightsFileError):
        DISTS.from_pretrained()
    assert hub.downloads == []
    model = DISTS.from_pretrained(allow_download=True)
    assert [url for url, _, _ in hub.downloads] == [VGG16_URL, DISTS_WEIGHTS_URL]
    assert float(model.alpha.mean()) == 0.25 and float(model.beta.mean()) == 0.5


def test_installed_wheel_files_in_order(tmp_path, monkeypatch):
    from importlib import metadata

    def entry(path):
        return SimpleNamespace(name=Path(path).name, locate=lambda: str(path))

    in_package = tmp_path / "site" / "DISTS_pytorch" / "weights.pt"
    at_root = tmp_path / "env" / "weights.pt"
    for p in (in_package, at_root):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
    files = [entry(at_root), entry(tmp_path / "gone" / "weights.pt"), entry(in_package)]
    files.append(entry(tmp_path / "site" / "DISTS_pytorch" / "__init__.py"))
    asked = []

    def distribution(name):
        asked.append(name)
        return SimpleNamespace(files=files)

    monkeypatch.setattr(metadata, "distribution", distribution)
    fallback = Path(sys.prefix) / "weights.pt"
    assert dists_mod._installed_dists_weights() == [in_package, at_root, fallback]
    assert asked == ["dists-pytorch"]
    monkeypatch.setattr(metadata, "distribution", lambda name: SimpleNamespace(files=None))
    assert dists_mod._installed_dists_weights() == [fallback]

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    assert dists_mod._installed_dists_weights() == [fallback]


def test_vgg16_refusals_list_three_problems(tmp_path):
    state = _fake_vgg16_state()
    wrong = dict(state)
    for k in ("features.0.weight", "features.2.weight", "features.5.weight", "features.7.weight"):
        wrong[k] = torch.zeros(1)
    extra = dict(state)
    extra.update({f"features.{i}.weight": torch.zeros(1) for i in (31, 32, 33, 34)})
    for name, content, detail in (
        ("wrong.pth", wrong, "['features.0.weight (1,) (expected (64, 3, 3, 3))', "
         "'features.2.weight (1,) (expected (64, 64, 3, 3))', "
         "'features.5.weight (1,) (expected (128, 64, 3, 3))']"),
        ("vgg19.pth", extra, "['unexpected features.31.weight', 'unexpected features.32.weight', "
         "'unexpected features.33.weight']"),
    ):  # fmt: skip
        torch.save(content, tmp_path / name)
        with pytest.raises(WeightsFileError) as err:
            vgg16_state_dict_from_file(tmp_path / name)
        assert err.value.problem == (
            f"not a torchvision VGG16 checkpoint ({VGG16_FILENAME}; VGG16-BN/VGG19 differ): {detail}"
        )


def test_alpha_beta_file_forms_and_refusals(tmp_path):
    from d3sr_core.losses.dists import alpha_beta_from_file

    torch.save({"params": _alpha_beta()}, tmp_path / "pyiqa.pth")  # pyiqa-style wrapper
    alpha, beta = alpha_beta_from_file(tmp_path / "pyiqa.pth")
    assert float(alpha.mean()) == 0.25 and float(beta.mean()) == 0.5
    shape = (1, DISTS_NUM_CHANNELS, 1, 1)
    for name, content, problem in (
        ("list.pt", [1], "not a DISTS weights file: expected a dict with 'alpha' and 'beta'"),
        ("short.pt", {"alpha": torch.zeros(3), "beta": torch.zeros(shape)},
         f"DISTS alpha has shape (3,), expected {shape}"),
        ("beta.pt", {"alpha": torch.zeros(shape), "beta": [0.1]},
         f"DISTS beta has shape list, expected {shape}"),
    ):  # fmt: skip
        torch.save(content, tmp_path / name)
        with pytest.raises(WeightsFileError) as err:
            alpha_beta_from_file(tmp_path / name)
        assert str(err.value) == f"{tmp_path / name}: {problem}"


def test_untrained_module_layout_and_initialisation():
    from d3sr_core.losses.dists import L2Pool, VGG16Features, l2_pool

    layers = VGG16Features().features
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision's vgg16.features
    assert len(layers) == 30
    for i, layer in enumerate(layers):
        kind = torch.nn.Conv2d if i in convs else L2Pool if i in (4, 9, 16, 23) else torch.nn.ReLU
        assert type(layer) is kind, i
        if kind is torch.nn.Conv2d:
            assert layer.kernel_size == (3, 3) and layer.padding == (1, 1)
    shapes = [tuple(f.shape[1:]) for f in VGG16Features()(torch.rand(1, 3, 20, 20))]
    assert shapes == [(64, 20, 20), (128, 10, 10), (256, 5, 5), (512, 3, 3), (512, 2, 2)]
    # the reference's placeholder alpha/beta: N(0.1, 0.01), two draws of seed 0
    g = torch.Generator().manual_seed(0)
    alpha = 0.1 + 0.01 * torch.randn(1, DISTS_NUM_CHANNELS, 1, 1, generator=g)
    beta = 0.1 + 0.01 * torch.randn(1, DISTS_NUM_CHANNELS, 1, 1, generator=g)
    m = DISTS()
    assert torch.equal(m.alpha, alpha) and torch.equal(m.beta, beta)
    # l2_pool: the given kernel is used; any float dtype works
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    box = torch.ones(3, 3)
    expected = (torch.nn.functional.conv2d(x * x, box.double().expand(2, 1, 3, 3), stride=2,
                                           padding=1, groups=2) + 1e-12).sqrt()  # fmt: skip
    torch.testing.assert_close(l2_pool(x, box), expected, atol=1e-12, rtol=0)
    default = l2_pool(x)
    assert default.dtype == torch.float64 and default.shape == (1, 2, 3, 3)


def test_distance_input_rules_and_frozen_weights():
    from d3sr_core.losses.dists import dists_from_features

    torch.manual_seed(0)
    m = DISTS()
    assert not any(p.requires_grad for p in m.parameters())  # a metric: every weight frozen
    g = torch.Generator().manual_seed(3)
    gray_x, gray_y = torch.rand(2, 1, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)
    with torch.no_grad():  # a gray image is the same image in three channels
        torch.testing.assert_close(
            m(gray_x, gray_y), m(gray_x.expand(-1, 3, -1, -1), gray_y.expand(-1, 3, -1, -1))
        )
    for x, y, message in (
        (torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9),
         "x and y must have the same shape, got (1, 3, 8, 8) and (1, 3, 8, 9)"),
        (torch.rand(1, 2, 8, 8), torch.rand(1, 2, 8, 8),
         "expected [B, 3, H, W] (or 1 channel) images, got (1, 2, 8, 8)"),
        (torch.rand(3, 8, 8), torch.rand(3, 8, 8),
         "expected [B, 3, H, W] (or 1 channel) images, got (3, 8, 8)"),
    ):  # fmt: skip
        with pytest.raises(ValueError) as err:
            m(x, y)
        assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        DISTS(value_range=(1.0, 1.0))
    assert str(err.value) == "value_range must be (low, high) with high > low, got (1.0, 1.0)"
    feats = [torch.rand(1, c, 4, 4) for c in (3, 64)]
    ones = torch.ones(1, 67, 1, 1)
    with pytest.raises(ValueError) as err:
        dists_from_features(feats, feats, ones, torch.ones(1, 68, 1, 1))
    assert str(err.value) == (
        "features have 67 channels in all but alpha/beta have shapes (1, 67, 1, 1)/(1, 68, 1, 1)"
    )
    with pytest.raises(ValueError):  # one feature list shorter than the other
        dists_from_features(feats, feats[:1], ones, ones)
