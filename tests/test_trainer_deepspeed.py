"""The trainer under DeepSpeed ZeRO-2 through accelerate's own config
(``trainer/configs/accelerate_deepspeed_zero2.yaml``), two CPU processes, tiny models.

Skipped without the ``deepspeed`` package (the ``deepspeed`` extra; CI does not install it:
it builds from source for minutes). Run it where DeepSpeed is installed, e.g.
``python -m pytest tests/test_trainer_deepspeed.py -q``.

The key check: the same run under plain data parallel (DDP, same seeds, same data shards)
ends with the same weights, so each network's loss steps that network's own engine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("deepspeed")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_weights import write_tiny_base  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_trainer import ROOT, _config, _env, _write_config  # noqa: E402

from trainer.config import ConfigError, config_from_dict  # noqa: E402
from trainer.smoke_data import write_images  # noqa: E402

STEPS = 2
ACCELERATE_DDP = ROOT / "trainer" / "configs" / "accelerate_multi_gpu.yaml"
ACCELERATE_ZERO2 = ROOT / "trainer" / "configs" / "accelerate_deepspeed_zero2.yaml"
NETWORK_FILES = ("generator_trainable", "discriminator", "d3sr_ema")
# DeepSpeed vs DDP after 2 steps (lr 1e-3, AdamW): gradients are averaged in another order
# (bucketed all-reduce vs reduce-scatter), and AdamW's first steps turn tiny differences of
# near-zero, cancelling gradients into visible ones. Measured max |delta| 2.04e-5 (generator
# LoRA) and 1.75e-5 (discriminator) while one step moves weights by up to 1.0e-3; a loss sent
# to the wrong network's engine would move them by ~1e-3.
TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trainer-ds")
    yield {
        "root": root,
        "base": write_tiny_base(root / "base"),
        "train": write_images(root / "train", count=6, size=72),
        "val": write_images(root / "val", count=2, size=64, seed=1),
    }
    shutil.rmtree(root, ignore_errors=True)


def _run_config(assets, name: str, **sections) -> tuple[Path, Path]:
    """2 steps of 2 micro-steps each, validation and a checkpoint every step, EMA."""
    out = assets["root"] / name
    train = {"max_steps": STEPS, "grad_accum": 2, "val_every": 1, **sections.pop("train", {})}
    loss = {"ea_dists_weight": 0.0, **sections.pop("loss", {})}
    cfg = _config(assets, out, train=train, loss=loss, **sections)
    return out, _write_config(cfg, assets["root"] / f"{name}.yaml")


def _launch(accelerate_config: Path, config: Path, port: int, *args: str, ddp: bool = False):
    """``accelerate launch --config_file ... --num_processes 2`` of trainer/train.py."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(accelerate_config), "--num_processes", "2", "--main_process_port", str(port),
        str(ROOT / "trainer" / "train.py"), "--config", str(config), *args,
    ]  # fmt: skip
    # DDP on CPU processes needs ACCELERATE_USE_CPU; DeepSpeed must not get it (accelerate
    # would then quietly drop DeepSpeed): DeepSpeed finds no GPU and uses its CPU accelerator.
    env = _env()
    if ddp:
        env["ACCELERATE_USE_CPU"] = "1"
    else:
        env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in NETWORK_FILES:
        out.update({f"{name}/{k}": v for k, v in load_file(ckpt / f"{name}.safetensors").items()})
    return out


def _step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


@pytest.fixture(scope="module")
def ddp_run(assets) -> Path:
    out, config = _run_config(assets, "run-ddp")
    _launch(ACCELERATE_DDP, config, 29561, ddp=True)
    return out


@pytest.fixture(scope="module")
def zero2_run(assets) -> tuple[Path, str]:
    out, config = _run_config(assets, "run-zero2")
    proc = _launch(ACCELERATE_ZERO2, config, 29562)
    return out, proc.stderr


def test_zero2_trains_both_networks_like_data_parallel(zero2_run, ddp_run):
    out, log = zero2_run
    assert "DeepSpeed ZeRO stage 2, one engine per network, 2 processes" in log
    final, ref = (json.loads((o / "final.json").read_text()) for o in (out, ddp_run))
    assert final["world_size"] == 2 and final["step"] == STEPS
    # both processes agree: trainable [sum, sum of squares] and frozen sum, per network
    a, b = final["checksums"]
    assert a == b and final["weights_agree"]
    # frozen weights (UNet, VAE, discriminator trunk) are exactly those of the DDP run,
    # which tests/test_trainer.py checks against freshly built networks
    assert (a[2], a[5]) == (ref["checksums"][0][2], ref["checksums"][0][5])
    # losses seen by the loop match too (same data, seeds and weights at every step)
    for key in ("loss_g", "mse", "loss_d", "d_real", "d_fake"):
        assert final["losses"][key] == pytest.approx(ref["losses"][key], rel=1e-4, abs=1e-6), key

    for step in (1, STEPS):
        ours, theirs = _tensors(_step_dir(out, step)), _tensors(_step_dir(ddp_run, step))
        assert ours.keys() == theirs.keys()
        worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
        assert worst < TOLERANCE, (step, worst)
    start, end = _tensors(_step_dir(ddp_run, 1)), _tensors(_step_dir(ddp_run, STEPS))
    moved = {
        name: max((end[k] - start[k]).abs().max().item() for k in end if k.startswith(name))
        for name in ("generator_trainable", "discriminator")
    }
    assert all(m > 20 * TOLERANCE for m in moved.values()), moved  # the check can fail
    # trainable tensors stay float32 under bf16-capable DeepSpeed (fp32 mode, trainer autocast)
    assert {v.dtype for v in load_file(_step_dir(out, STEPS) / "generator_trainable.safetensors").values()} == {torch.float32}  # fmt: skip


def test_zero2_checkpoint_is_sharded_and_holds_only_trainable_weights(zero2_run):
    out, _ = zero2_run
    ckpt = _step_dir(out, STEPS)
    assert (ckpt / "meta.json").is_file()
    for engine, name in (("pytorch_model", "generator_trainable"), ("pytorch_model_1", "discriminator")):  # fmt: skip
        files = sorted(p.name for p in (ckpt / engine).iterdir())
        assert files == [
            "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",  # AdamW state shard of rank 0
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ], files
        states = torch.load(ckpt / engine / "mp_rank_00_model_states.pt", weights_only=False)
        ours = load_file(ckpt / f"{name}.safetensors")
        assert set(states["module"]) == set(ours)  # no frozen base weights in DeepSpeed's file
        assert all(torch.equal(states["module"][k].cpu(), ours[k]) for k in ours)
        assert states["global_steps"] == STEPS  # one optimizer step per 2 micro-steps


def test_zero2_export_loads_with_load_generator(assets, zero2_run, tmp_path):
    """The exported D3SR file is the full LoRA (every process holds it under ZeRO-2), loadable
    as users load weights, and reproduces the trained peft generator."""
    from d3sr_core.loading.base import load_base
    from d3sr_core.loading.checkpoint import load_checkpoint
    from d3sr_core.loading.files import read_state_dict
    from d3sr_core.loading.generator import load_generator
    from d3sr_core.models.generator import GeneratorConfig
    from trainer.export import export
    from trainer.models import build_generator_model

    out, _ = zero2_run
    exported = export(out, tmp_path / "zero2.safetensors")
    loaded = load_generator(exported, assets["base"])
    ckpt = load_checkpoint(exported)
    model = build_generator_model(
        load_base(assets["base"]), ckpt.prompt_embeds, GeneratorConfig(lora_rank=4, lora_alpha=4.0),
        learn_prompt=True,
    )  # fmt: skip
    trained = read_state_dict(_step_dir(out, STEPS) / "generator_trainable.safetensors")
    model.load_trainable_state_dict(trained, "trained")
    assert len(ckpt.adapters["unet"].factors) * 2 + 1 == len(trained)  # every LoRA pair + prompt
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        delta = (model.eval().upscale(x) - loaded(x)).abs().max().item()
    assert delta < 1e-4, delta  # merged vs peft LoRA, as in tests/test_trainer.py


def test_zero2_resume_from_its_checkpoint_matches_uninterrupted_run(assets, zero2_run):
    """Resume (--resume latest) from the step-1 DeepSpeed checkpoint: engines reload their
    weights and sharded AdamW states; the run ends bit-identical to the uninterrupted one."""
    out, _ = zero2_run
    resumed, config = _run_config(assets, "run-zero2-resumed")
    shutil.copytree(_step_dir(out, 1), _step_dir(resumed, 1))
    proc = _launch(ACCELERATE_ZERO2, config, 29563, "--resume", "latest")
    assert "resumed from" in proc.stderr and "(step 1)" in proc.stderr
    final = json.loads((resumed / "final.json").read_text())
    assert final["step"] == STEPS and final["weights_agree"]
    ref, got = _tensors(_step_dir(out, STEPS)), _tensors(_step_dir(resumed, STEPS))
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert worst == 0.0, worst


def test_zero2_bf16_checkpointing_r1_device_degradation(assets):
    """bf16 autocast (frozen weights bf16, trainable float32), gradient checkpointing, 2
    micro-steps, EA-DISTS, approximate R1 and LR made on the device, under ZeRO-2."""
    out, config = _run_config(
        assets, "run-zero2-bf16",
        train={"max_steps": 1, "mixed_precision": "bf16", "grad_checkpointing": True,
               "val_every": 0},
        loss={"ea_dists_weight": 0.5},
        discriminator={"r1_gamma": 1.0},
        data={"degrade_on": "device", "val_hr_dir": None},
    )  # fmt: skip
    _launch(ACCELERATE_ZERO2, config, 29564)
    final = json.loads((out / "final.json").read_text())
    assert final["step"] == 1 and final["weights_agree"]
    assert all(torch.isfinite(torch.tensor(v)) for v in final["losses"].values())
    assert final["losses"]["ea_dists"] > 0 and final["losses"]["adv_g"] > 0
    trained = load_file(_step_dir(out, 1) / "generator_trainable.safetensors")
    assert {v.dtype for v in trained.values()} == {torch.float32}


# --------------------------------------------------------------------------- config checks


def _ds_env(monkeypatch, **env: str) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for key in list(os.environ):
        if key.startswith(("ACCELERATE_DEEPSPEED_", "ACCELERATE_GRADIENT_", "ACCELERATE_USE_CPU")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_deepspeed_config_is_filled_from_the_trainer_config(assets, monkeypatch, tmp_path):
    from trainer.distributed_backend import deepspeed_plugins

    _ds_env(monkeypatch, ACCELERATE_DEEPSPEED_ZERO_STAGE="2")
    cfg = config_from_dict(
        _config(assets, tmp_path, train={"grad_accum": 3}, optim={"grad_clip": 0.5})
    )
    plugins = deepspeed_plugins(cfg)
    assert list(plugins) == ["generator", "discriminator"]
    for plugin in plugins.values():
        ds = plugin.deepspeed_config
        assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
        assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2
    assert plugins["generator"].deepspeed_config is not plugins["discriminator"].deepspeed_config


@pytest.mark.parametrize(
    ("env", "file", "train", "match"),
    [
        ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, None, {}, "ZeRO stage 3 is not supported"),
        ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, None, {},
         "contradicts the trainer config.*gradient_accumulation_steps=4"),
        ({}, None, {"mixed_precision": "fp16"}, "fp16 is not supported with DeepSpeed"),
        ({"ACCELERATE_USE_CPU": "1"}, None, {}, "makes accelerate drop DeepSpeed"),
        ({}, {"bf16": {"enabled": True}}, {}, "'bf16.enabled: true'.*train.mixed_precision"),
        ({}, {"optimizer": {"type": "Adam"}}, {}, "remove the 'optimizer' section"),
    ],
)  # fmt: skip
def test_deepspeed_config_errors(assets, monkeypatch, tmp_path, env, file, train, match):
    from trainer.distributed_backend import deepspeed_plugins

    if file is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **file}))
        env = {**env, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    _ds_env(monkeypatch, **env)
    with pytest.raises(ConfigError, match=match):
        deepspeed_plugins(config_from_dict(_config(assets, tmp_path, train=train)))


def test_shipped_accelerate_config_is_zero2():
    cfg = yaml.safe_load(ACCELERATE_ZERO2.read_text())
    assert cfg["distributed_type"] == "DEEPSPEED" and cfg["deepspeed_config"]["zero_stage"] == 2
    # left to the trainer (filled from its config): not pinned in the accelerate config
    assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(cfg["deepspeed_config"])
    assert cfg["mixed_precision"] == "no"
