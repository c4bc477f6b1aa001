"""Weights discovery over temporary folder trees laid out like D3SR, ComfyUI and A1111 installs."""

from __future__ import annotations

from pathlib import Path

import pytest
from make_tiny_weights import write_tiny_checkpoint

from d3sr_core.loading.files import WeightsFileError
from d3sr_core.loading.locate import locate_models, missing_message, model_roots


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def diffusers_folder(path: Path) -> Path:
    for part in ("unet", "vae"):
        touch(path / part / "config.json")
    return path


@pytest.fixture
def machine(tmp_path):
    """(env, home, cwd) of an empty machine."""
    home, cwd = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    cwd.mkdir()
    return {}, home, cwd


def locate(machine, **env):
    base_env, home, cwd = machine
    return locate_models({**base_env, **env}, home, cwd)


def test_nothing_found_and_message_names_files_and_folders(machine):
    _, home, cwd = machine
    comfy_upscale = home / "ComfyUI" / "models" / "upscale_models"
    comfy_upscale.mkdir(parents=True)  # an existing host folder is named in the message
    found = locate(machine)
    assert found.weights is None and found.base is None
    assert found.searched_weights[0] == home / ".cache" / "d3sr"
    assert cwd / "models" in found.searched_weights
    message = missing_message(found, command="d3sr upscale x.png -o out")
    for text in (
        "osediff.pkl",
        "v2-1_512-ema-pruned.safetensors",
        "stable-diffusion-2-1-base/",
        "--weights",
        "--base",
    ):
        assert text in message
    assert str(home / ".cache" / "d3sr") in message and str(comfy_upscale) in message
    assert "d3sr upscale x.png -o out --download" in message
    assert "--download" not in missing_message(found, download_hint=False)


def test_comfyui_layout(machine, tmp_path):
    comfy = tmp_path / "ComfyUI"
    pkl = touch(comfy / "models" / "upscale_models" / "osediff.pkl")
    touch(comfy / "models" / "upscale_models" / "RealESRGAN_x4plus.pth")
    ckpt = touch(comfy / "models" / "checkpoints" / "v2-1_512-ema-pruned.safetensors")
    touch(comfy / "models" / "checkpoints" / "v2-1_768-ema-pruned.safetensors")
    vae = touch(comfy / "models" / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors")
    found = locate(machine, COMFYUI_PATH=str(comfy))
    assert (found.weights, found.base) == (pkl, ckpt)
    assert found.vae is None  # only looked for when asked
    base_env, home, cwd = machine
    assert locate_models({"COMFYUI_PATH": str(comfy)}, home, cwd, need_vae=True).vae == vae


def test_comfyui_in_a_common_place_without_variables(machine):
    _, home, _ = machine
    weights = write_tiny_checkpoint(home / "ComfyUI" / "models" / "d3sr" / "my-d3sr.safetensors")
    found = locate(machine)
    assert found.weights == weights


def test_a1111_layout_and_case_insensitive_names(machine, tmp_path):
    webui = tmp_path / "webui"
    weights = write_tiny_checkpoint(webui / "models" / "D3SR" / "d3sr-x4.safetensors")
    touch(webui / "models" / "D3SR" / "not-d3sr.safetensors")  # unreadable header: ignored
    base = touch(webui / "models" / "Stable-diffusion" / "V2-1_512-NONEMA-PRUNED.ckpt")
    found = locate(machine, WEBUI_PATH=str(webui))
    assert (found.weights, found.base) == (weights, base)


def test_search_order_and_env_overrides(machine, tmp_path):
    _, home, cwd = machine
    own = write_tiny_checkpoint(tmp_path / "own" / "a.safetensors")
    comfy_weights = write_tiny_checkpoint(tmp_path / "comfy" / "models" / "d3sr" / "b.safetensors")
    cwd_base = diffusers_folder(cwd / "models" / "stable-diffusion-2-1-base")
    touch(tmp_path / "comfy" / "models" / "checkpoints" / "sd21-base-fp16.safetensors")
    found = locate(
        machine, D3SR_MODELS_DIR=str(tmp_path / "own"), COMFYUI_PATH=str(tmp_path / "comfy")
    )
    assert found.weights == own and found.base == cwd_base
    assert found.weights_candidates == [own, comfy_weights]

    explicit = touch(tmp_path / "elsewhere" / "w.pkl")
    found = locate(machine, D3SR_WEIGHTS=str(explicit), COMFYUI_PATH=str(tmp_path / "comfy"))
    assert found.weights == explicit
    with pytest.raises(WeightsFileError, match="D3SR_BASE"):
        locate(machine, D3SR_BASE=str(tmp_path / "absent"))


def test_diffusers_folder_needs_its_configs_and_hub_cache_is_used(machine, tmp_path):
    _, home, cwd = machine
    (cwd / "models" / "stable-diffusion-2-1-base").mkdir(parents=True)  # empty: not a model
    assert locate(machine).base is None
    snapshot = diffusers_folder(
        tmp_path
        / "hf"
        / "hub"
        / "models--stabilityai--stable-diffusion-2-1-base"
        / "snapshots"
        / "abc123"
    )
    assert locate(machine, HF_HOME=str(tmp_path / "hf")).base == snapshot


def test_converted_osediff_twin_is_preferred(machine):
    _, home, _ = machine
    folder = home / ".cache" / "d3sr"
    touch(folder / "osediff.pkl")
    twin = write_tiny_checkpoint(folder / "osediff.safetensors")
    assert locate(machine).weights == twin


def test_model_roots_cover_every_host(machine, tmp_path):
    roots = model_roots(
        {"COMFYUI_PATH": "/c", "A1111_PATH": "/a", "D3SR_MODELS_DIR": "/m"}, machine[1], machine[2]
    )
    paths = [r.path for r in roots]
    assert paths[0] == Path("/m")
    assert Path("/c/models") in paths and Path("/a/models") in paths
    assert {r.kind for r in roots} == {"d3sr", "comfyui", "a1111"}
    assert len(paths) == len(set(paths))
