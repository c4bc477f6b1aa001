"""The trainer under DeepSpeed ZeRO-2 and ZeRO-3 through accelerate's own config, two CPU
processes, tiny models.

Skipped without the ``deepspeed`` package (the ``deepspeed`` extra; CI does not install it:
it builds from source for minutes). Run it where DeepSpeed is installed, e.g.
``python -m pytest tests/test_trainer_deepspeed.py -q`` (about 6 minutes on 2 CPU cores).

The key check: the same run under plain data parallel (DDP, same seeds, same data shards)
ends with the same weights, so each network's loss steps that network's own engine.

ZeRO-2 runs through the shipped ``accelerate_deepspeed_zero2.yaml``. ZeRO-3 runs with
``--use_deepspeed --deepspeed_config_file`` and ``stage3_param_persistence_threshold: 0``:
with DeepSpeed's default (1e5 elements) every tensor of the tiny test networks would stay
whole and nothing would be sharded (a probe with the parameter reads bypassed wrote empty,
shape-(0,) tensors into the checkpoint while exiting 0 - what these tests guard against).
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
CONFIGS = ROOT / "trainer" / "configs"
ACCELERATE_DDP = CONFIGS / "accelerate_multi_gpu.yaml"
ZERO3_JSON = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}
NETWORK_FILES = ("generator_trainable", "discriminator", "d3sr_ema")
# DeepSpeed vs DDP after 2 steps (lr 1e-3, AdamW): gradients are averaged in another order
# (bucketed all-reduce vs reduce-scatter), and AdamW's first steps turn tiny differences of
# near-zero, cancelling gradients into visible ones. Measured max |delta|: ZeRO-2 2.04e-5
# (generator LoRA) / 1.75e-5 (discriminator), ZeRO-3 3.27e-5 / 8.6e-6, while one step moves
# weights by up to 1.0e-3; a loss sent to the wrong network's engine would move them by ~1e-3.
TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trainer-ds")
    (root / "zero3.json").write_text(json.dumps(ZERO3_JSON))
    yield {
        "root": root,
        "base": write_tiny_base(root / "base"),
        "train": write_images(root / "train", count=6, size=72),
        "val": write_images(root / "val", count=2, size=64, seed=1),
    }
    shutil.rmtree(root, ignore_errors=True)


def _launch_args(assets, mode: str) -> list[str]:
    if mode == "ddp":
        return ["--config_file", str(ACCELERATE_DDP)]
    if mode == "zero2":
        return ["--config_file", str(CONFIGS / "accelerate_deepspeed_zero2.yaml")]
    return ["--use_deepspeed", "--deepspeed_config_file", str(assets["root"] / "zero3.json")]


def _run_config(assets, name: str, **sections) -> tuple[Path, Path]:
    """2 steps of 2 micro-steps each, validation and a checkpoint every step, EMA."""
    out = assets["root"] / name
    train = {"max_steps": STEPS, "grad_accum": 2, "val_every": 1, **sections.pop("train", {})}
    loss = {"ea_dists_weight": 0.0, **sections.pop("loss", {})}
    cfg = _config(assets, out, train=train, loss=loss, **sections)
    return out, _write_config(cfg, assets["root"] / f"{name}.yaml")


def _launch(assets, mode: str, config: Path, port: int, *args: str):
    """``accelerate launch ... --num_processes 2`` of trainer/train.py (mode: ddp, zero2, zero3)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *_launch_args(assets, mode),
        "--num_processes", "2", "--main_process_port", str(port),
        str(ROOT / "trainer" / "train.py"), "--config", str(config), *args,
    ]  # fmt: skip
    # DDP on CPU processes needs ACCELERATE_USE_CPU; DeepSpeed must not get it (accelerate
    # would then quietly drop DeepSpeed): DeepSpeed finds no GPU and uses its CPU accelerator.
    env = _env()
    if mode == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"
    else:
        env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in NETWORK_FILES:
        out.update({f"{name}/{k}": v for k, v in load_file(ckpt / f"{name}.safetensors").items()})
    return out


def _step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


PORTS = {"zero2": 29562, "zero3": 29572}


@pytest.fixture(scope="module")
def ddp_run(assets) -> Path:
    out, config = _run_config(assets, "run-ddp")
    _launch(assets, "ddp", config, 29561)
    return out


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def ds_run(request, assets) -> tuple[str, Path, str]:
    mode = request.param
    out, config = _run_config(assets, f"run-{mode}")
    proc = _launch(assets, mode, config, PORTS[mode])
    return mode, out, proc.stderr


def test_deepspeed_trains_both_networks_like_data_parallel(ds_run, ddp_run):
    mode, out, log = ds_run
    assert f"DeepSpeed ZeRO stage {mode[-1]}, one engine per network, 2 processes" in log
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
    # validation ran (ZeRO-3: on every process, reported by the main one) and matches DDP's
    for key in ("val_psnr_y", "val_dists"):
        assert final["validation"][key] == pytest.approx(ref["validation"][key], abs=1e-3), key

    for step in (1, STEPS):
        ours, theirs = _tensors(_step_dir(out, step)), _tensors(_step_dir(ddp_run, step))
        assert ours.keys() == theirs.keys()
        assert all(ours[k].shape == theirs[k].shape for k in ours)  # whole, not shards
        worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
        assert worst < TOLERANCE, (step, worst)
    start, end = _tensors(_step_dir(ddp_run, 1)), _tensors(_step_dir(ddp_run, STEPS))
    moved = {
        name: max((end[k] - start[k]).abs().max().item() for k in end if k.startswith(name))
        for name in ("generator_trainable", "discriminator")
    }
    assert all(m > 20 * TOLERANCE for m in moved.values()), moved  # the check can fail
    # trainable tensors stay float32 (DeepSpeed's fp32 mode; the trainer autocasts)
    trained = load_file(_step_dir(out, STEPS) / "generator_trainable.safetensors")
    assert {v.dtype for v in trained.values()} == {torch.float32}


def test_deepspeed_checkpoint_is_sharded_and_holds_only_trainable_weights(ds_run):
    mode, out, _ = ds_run
    ckpt = _step_dir(out, STEPS)
    assert (ckpt / "meta.json").is_file()
    engines = (("pytorch_model", "generator_trainable"), ("pytorch_model_1", "discriminator"))
    for engine, name in engines:
        files = sorted(p.name for p in (ckpt / engine).iterdir())
        optim = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]  # AdamW shards
        if mode == "zero2":  # one file of (whole) trainable tensors
            model_files = ["mp_rank_00_model_states.pt"]
        else:  # ZeRO-3: per process, parameters as shards
            model_files = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]
        assert files == sorted(model_files + optim), files
        states = torch.load(ckpt / engine / model_files[0], weights_only=False)
        ours = load_file(ckpt / f"{name}.safetensors")
        assert set(states["module"]) == set(ours)  # no frozen base weights in DeepSpeed's file
        assert states["global_steps"] == STEPS  # one optimizer step per 2 micro-steps
        if mode == "zero2":
            assert all(torch.equal(states["module"][k].cpu(), ours[k]) for k in ours)


def test_deepspeed_export_loads_with_load_generator(assets, ds_run, tmp_path):
    """The exported D3SR file is the whole LoRA (gathered from the shards under ZeRO-3),
    loadable as users load weights, and reproduces the trained peft generator."""
    from d3sr_core.loading.base import load_base
    from d3sr_core.loading.checkpoint import load_checkpoint
    from d3sr_core.loading.files import read_state_dict
    from d3sr_core.loading.generator import load_generator
    from d3sr_core.models.generator import GeneratorConfig
    from trainer.export import export
    from trainer.models import build_generator_model

    _, out, _ = ds_run
    exported = export(out, tmp_path / "exported.safetensors")
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


def test_deepspeed_resume_from_its_checkpoint_matches_uninterrupted_run(assets, ds_run):
    """Resume (--resume latest) from the step-1 DeepSpeed checkpoint: engines reload their
    weights and sharded AdamW states; the run ends bit-identical to the uninterrupted one."""
    mode, out, _ = ds_run
    resumed, config = _run_config(assets, f"run-{mode}-resumed")
    shutil.copytree(_step_dir(out, 1), _step_dir(resumed, 1))
    proc = _launch(assets, mode, config, PORTS[mode] + 1, "--resume", "latest")
    assert "resumed from" in proc.stderr and "(step 1)" in proc.stderr
    final = json.loads((resumed / "final.json").read_text())
    assert final["step"] == STEPS and final["weights_agree"]
    ref, got = _tensors(_step_dir(out, STEPS)), _tensors(_step_dir(resumed, STEPS))
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert worst == 0.0, worst


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_deepspeed_bf16_checkpointing_r1_device_degradation(assets, mode):
    """bf16 autocast (frozen weights bf16, trainable float32), gradient checkpointing,
    EA-DISTS, approximate R1 and LR made on the device (and 2 micro-steps under ZeRO-2)."""
    out, config = _run_config(
        assets, f"run-{mode}-bf16",
        train={"max_steps": 1, "mixed_precision": "bf16", "grad_checkpointing": True,
               "val_every": 0, "grad_accum": 2 if mode == "zero2" else 1},
        loss={"ea_dists_weight": 0.5},
        discriminator={"r1_gamma": 1.0},
        data={"degrade_on": "device", "val_hr_dir": None},
    )  # fmt: skip
    _launch(assets, mode, config, PORTS[mode] + 2)
    final = json.loads((out / "final.json").read_text())
    assert final["step"] == 1 and final["weights_agree"]
    assert all(torch.isfinite(torch.tensor(v)) for v in final["losses"].values())
    assert final["losses"]["ea_dists"] > 0 and final["losses"]["adv_g"] > 0
    trained = load_file(_step_dir(out, 1) / "generator_trainable.safetensors")
    assert {v.dtype for v in trained.values()} == {torch.float32}
    assert all(v.numel() > 0 for v in trained.values())


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


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_accelerate_deepspeed_configs(stage):
    cfg = yaml.safe_load((CONFIGS / f"accelerate_deepspeed_zero{stage}.yaml").read_text())
    ds = cfg["deepspeed_config"]
    assert cfg["distributed_type"] == "DEEPSPEED" and ds["zero_stage"] == stage
    # left to the trainer (filled from its config): not pinned in the accelerate config
    assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(ds)
    assert cfg["mixed_precision"] == "no" and ds["zero3_init_flag"] is False
