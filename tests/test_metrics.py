"""PSNR / SSIM on Y against an independent numpy computation, and ``d3sr eval``."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from d3sr_core.cli import main
from d3sr_core.metrics import psnr_y, rgb_to_y, ssim_y


def _pair(seed=0, h=37, w=45):
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    sr = np.clip(hr.astype(int) + rng.integers(-20, 21, hr.shape), 0, 255).astype(np.uint8)
    return sr, hr


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32) / 255).permute(2, 0, 1)[None]


def _np_y(img: np.ndarray) -> np.ndarray:
    # MATLAB rgb2ycbcr on uint8 data: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255
    x = img.astype(np.float64)
    return 16.0 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0


def _np_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM, written out with an explicit 11x11 window loop ("valid")."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (win * pa).sum(), (win * pb).sum()
            va = (win * pa * pa).sum() - ma**2
            vb = (win * pb * pb).sum() - mb**2
            cov = (win * pa * pb).sum() - ma * mb
            vals.append(
                ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    return float(np.mean(vals))


def test_y_channel_matches_matlab_formula():
    sr, _ = _pair()
    np.testing.assert_allclose(rgb_to_y(_t(sr))[0, 0].numpy(), _np_y(sr), atol=1e-4)
    white = torch.ones(1, 3, 2, 2)
    assert torch.allclose(rgb_to_y(white), torch.full((1, 1, 2, 2), 235.0, dtype=torch.float64))


@pytest.mark.parametrize("border", [0, 4])
def test_psnr_and_ssim_match_independent_computation(border):
    sr, hr = _pair()
    ys, yh = _np_y(sr), _np_y(hr)
    if border:
        ys, yh = ys[border:-border, border:-border], yh[border:-border, border:-border]
    mse = np.mean((ys - yh) ** 2)
    ref_psnr = 10 * np.log10(255.0**2 / mse)
    assert float(psnr_y(_t(sr), _t(hr), border)[0]) == pytest.approx(ref_psnr, abs=1e-4)
    assert float(ssim_y(_t(sr), _t(hr), border)[0]) == pytest.approx(_np_ssim(ys, yh), abs=1e-5)


def test_identical_images_and_errors():
    _, hr = _pair()
    assert torch.isinf(psnr_y(_t(hr), _t(hr)))[0]
    assert float(ssim_y(_t(hr), _t(hr))[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr_y(_t(hr), _t(hr)[..., :-1])


# --------------------------------------------------------------------------- d3sr eval


def _write_set(folder, images, suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in images.items():
        Image.fromarray(arr).save(folder / f"{name}{suffix}")


def test_eval_writes_csv_json_markdown(tmp_path):
    pairs = {f"img{i}": _pair(i, 40, 48) for i in range(3)}
    _write_set(tmp_path / "sr", {k: v[0] for k, v in pairs.items()})
    _write_set(tmp_path / "hr", {k: v[1] for k, v in pairs.items()})
    out = tmp_path / "report"
    code = main(
        ["eval", "--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"), "-o", str(out),
         "--vgg-weights", str(tmp_path / "no-vgg.pth"), "-q"]
    )  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["image"] for r in rows] == ["img0", "img1", "img2"]
    for r in rows:
        sr, hr = pairs[r["image"]]
        assert float(r["psnr_y"]) == pytest.approx(float(psnr_y(_t(sr), _t(hr), 4)[0]), abs=1e-5)
        assert r["dists"] == "n/a"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 3 and summary["crop_border"] == 4
    mean = np.mean([float(r["ssim_y"]) for r in rows])
    assert summary["metrics"]["ssim_y"]["mean"] == pytest.approx(mean, abs=1e-5)
    assert "no-vgg.pth" in summary["metrics"]["dists"]["unavailable"]
    try:
        import pyiqa  # noqa: F401
    except Exception:
        assert "not installed" in summary["metrics"]["lpips"]["unavailable"]
    assert "| psnr_y |" in (out / "summary.md").read_text()


def test_eval_mismatched_sets_and_sizes(tmp_path, capsys):
    sr, hr = _pair(0, 40, 48)
    _write_set(tmp_path / "sr", {"a": sr, "only_sr": sr})
    _write_set(tmp_path / "hr", {"a": hr, "only_hr": hr}, ".jpg")
    args = ["eval", "--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"), "-o",
            str(tmp_path / "r"), "--no-dists", "--pyiqa", "", "-q"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "only_sr" in err and "only_hr" in err
    (tmp_path / "sr" / "only_sr.png").unlink()
    (tmp_path / "hr" / "only_hr.jpg").unlink()
    Image.fromarray(sr[:-4]).save(tmp_path / "sr" / "a.png")
    assert main(args) == 2
    assert "48x36" in capsys.readouterr().err


def test_eval_runs_the_model_first(tmp_path):
    from make_tiny_weights import write_all

    files = write_all(tmp_path / "w")
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
    _write_set(tmp_path / "lr", {"x": lr})
    _write_set(tmp_path / "hr", {"x": np.kron(lr, np.ones((4, 4, 1))).astype(np.uint8)})
    out = tmp_path / "report"
    code = main(
        ["eval", "--lr", str(tmp_path / "lr"), "--hr", str(tmp_path / "hr"), "--weights",
         str(files["weights"]), "--base", str(files["base"]), "-o", str(out), "--no-dists",
         "--pyiqa", "", "-q"]
    )  # fmt: skip
    assert code == 0
    assert (out / "sr" / "x.png").is_file()
    assert Image.open(out / "sr" / "x.png").size == (64, 48)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 1 and np.isfinite(float(rows[0]["psnr_y"]))
