"""Real-ESRGAN degradation (kernels, stages, seeding, batching) and the training datasets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from d3sr_core.data import (
    STAGES,
    DataError,
    DegradationConfig,
    HRFolderDataset,
    PairedFolderDataset,
    StreamSampler,
    degrade,
    degrade_batch,
    sample_params,
)
from d3sr_core.data.kernels import gaussian_kernel, plateau_kernel, sinc_kernel


def _hr(b: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, size // 8, size // 8, generator=g)
    smooth = torch.nn.functional.interpolate(base, size=(size, size), mode="bicubic")
    return (smooth + 0.05 * torch.rand(b, 3, size, size, generator=g)).clamp(0, 1)


# ---------------------------------------------------------------- kernels


def test_gaussian_kernel_matches_formula():
    k = gaussian_kernel(7, 1.3, 1.3)
    ax = np.arange(-3, 4)
    ref = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * 1.3**2))
    np.testing.assert_allclose(k.numpy(), ref / ref.sum(), atol=1e-12)
    # anisotropic + rotated by 90 degrees swaps the axes
    a = gaussian_kernel(9, 2.0, 0.5, 0.0)
    b = gaussian_kernel(9, 0.5, 2.0, math.pi / 2)
    assert torch.allclose(a, b, atol=1e-10)
    assert torch.allclose(
        plateau_kernel(9, 1, 1, 0, 1.5).sum(), torch.tensor(1.0, dtype=torch.float64)
    )


def test_sinc_kernel_is_normalised_circular_lowpass():
    k = sinc_kernel(11, math.pi / 2, pad_to=21)
    assert k.shape == (21, 21)
    assert abs(float(k.sum()) - 1) < 1e-9
    assert torch.allclose(k, k.T) and torch.allclose(k, k.flip(0))
    # its frequency response passes DC and attenuates the Nyquist frequency
    response = torch.fft.fft2(k).abs()
    assert response[0, 0] == pytest.approx(1.0) and response[10, 10] < 0.2


# ---------------------------------------------------------------- pipeline


def test_output_size_and_range():
    cfg = DegradationConfig()
    hr = _hr(size=64)
    for seed in range(6):  # covers up/down/keep resizes and both final orders
        lr, _ = degrade_batch(hr, cfg, seed * 11)
        assert lr.shape == (3, 3, 16, 16)
        assert lr.min() >= 0 and lr.max() <= 1
        assert torch.equal(lr, (lr * 255).round() / 255)  # 8-bit levels
    lr, _ = degrade_batch(_hr(1, 48), DegradationConfig(scale=2), 0)
    assert lr.shape == (1, 3, 24, 24)


def test_same_seed_same_lr_different_seed_differs():
    cfg = DegradationConfig()
    hr = _hr()
    a, _ = degrade_batch(hr, cfg, 5)
    b, _ = degrade_batch(hr, cfg, 5)
    c, _ = degrade_batch(hr, cfg, 6)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.02


def test_batch_and_single_agree():
    cfg = DegradationConfig()
    hr = _hr(4)
    for seed in (1, 2, 3):
        params = sample_params(cfg, 4, seed)
        batch = degrade(hr, params, cfg)
        singles = torch.cat([degrade(hr[i : i + 1], params.select(i), cfg) for i in range(4)])
        assert torch.allclose(batch, singles, atol=1e-6)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_can_be_switched_off(stage):
    # probabilities at 1 so every stage is active when enabled
    full = DegradationConfig(
        second_blur_prob=1.0, final_sinc_prob=1.0, sinc_prob=0.0, resize_prob=[0, 1, 0]
    )
    without = DegradationConfig(**{**full.to_dict(), "stages": [s for s in STAGES if s != stage]})
    hr = _hr(2)
    params = sample_params(full, 2, 3)
    a = degrade(hr, params, full)
    b = degrade(hr, params, without)
    assert a.shape == b.shape
    assert (a - b).abs().max() > 1e-4, f"switching off {stage} changed nothing"


def test_everything_off_is_a_plain_resize():
    cfg = DegradationConfig(stages=[])
    hr = _hr(2)
    params = sample_params(cfg, 2, 0)
    lr = degrade(hr, params, cfg)
    ref = torch.nn.functional.interpolate(
        hr,
        size=(16, 16),
        mode=params.final_resize_mode,
        **({} if params.final_resize_mode == "area" else {"align_corners": False}),
    ).clamp(0, 1)
    assert torch.allclose(lr, ref, atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown degradation stages"):
        DegradationConfig(stages=["blur3"])
    with pytest.raises(ValueError, match="kernel_range"):
        DegradationConfig(kernel_range=[6, 21])
    with pytest.raises(ValueError, match="noise_range"):
        DegradationConfig(noise_range=[30, 1])
    with pytest.raises(ValueError, match="unknown degradation options"):
        DegradationConfig.from_dict({"sigma": 1})


# ---------------------------------------------------------------- datasets


def _write(path, size, seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_hr_folder_dataset(tmp_path):
    _write(tmp_path / "a.png", (80, 72))
    _write(tmp_path / "sub" / "b.jpg", (64, 64))
    _write(tmp_path / "small.png", (20, 20))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    ds = HRFolderDataset(tmp_path, 64, DegradationConfig(), seed=1)
    assert len(ds) == 4
    names = []
    with pytest.warns(UserWarning) as record:
        for i in range(len(ds)):
            item = ds[(i, i)]
            assert item["hr"].shape == (3, 64, 64) and item["lr"].shape == (3, 16, 16)
            names.append(item["name"])
    messages = " ".join(str(w.message) for w in record)
    assert "broken.png" in messages and "small.png" in messages
    assert set(names) <= {"a.png", "sub/b.jpg"}
    # deterministic by (seed, position)
    assert torch.equal(ds[(0, 7)]["lr"], ds[(0, 7)]["lr"])
    assert not torch.equal(ds[(0, 7)]["hr"], ds[(0, 8)]["hr"])
    padded = HRFolderDataset(tmp_path, 64, small="pad", degrade=False)
    item = padded[(padded.files.index(tmp_path / "small.png"), 0)]
    assert item["hr"].shape == (3, 64, 64) and "lr" not in item


def test_dataset_errors_before_any_model(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        HRFolderDataset(tmp_path / "missing", 64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        HRFolderDataset(tmp_path / "empty", 64)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    ds = HRFolderDataset(tmp_path / "bad", 64)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="could be used"):
        ds[0]


def test_paired_dataset_alignment_and_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    hr = np.repeat(np.repeat(lr, 4, axis=0), 4, axis=1)  # each LR pixel is a 4x4 HR block
    (tmp_path / "hr").mkdir()
    (tmp_path / "lr").mkdir()
    Image.fromarray(hr).save(tmp_path / "hr" / "x.png")
    Image.fromarray(lr).save(tmp_path / "lr" / "x.png")
    ds = PairedFolderDataset(tmp_path / "lr", tmp_path / "hr", 32, 4, rotate=True)
    for pos in range(5):
        item = ds[(0, pos)]
        assert torch.equal(item["hr"][:, ::4, ::4], item["lr"])  # crops stay aligned
    _write(tmp_path / "hr" / "only_hr.png", (64, 64))
    _write(tmp_path / "lr" / "only_lr.png", (16, 16))
    with pytest.raises(DataError, match="only_hr") as err:
        PairedFolderDataset(tmp_path / "lr", tmp_path / "hr", 32, 4)
    assert "only_lr" in str(err.value)


def test_stream_sampler_shards_and_resumes():
    def take(s, k):
        it = iter(s)
        return [next(it) for _ in range(k)]

    whole = take(StreamSampler(10, 2, seed=3), 12)
    r0 = take(StreamSampler(10, 2, seed=3, rank=0, world_size=2), 6)
    r1 = take(StreamSampler(10, 2, seed=3, rank=1, world_size=2), 6)
    assert sorted(r0 + r1, key=lambda k: k[1]) == whole
    assert sorted(i for i, _ in whole[:10]) == list(range(10))  # an epoch visits every item
    resumed = take(StreamSampler(10, 2, seed=3, start=4), 8)
    assert resumed == whole[4:12]
