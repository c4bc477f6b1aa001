"""The trainer end to end on tiny models (CPU): losses, what trains, export, resume after
SIGKILL, two processes, learning sanity, config handling."""

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

pytest.importorskip("accelerate")
pytest.importorskip("peft")

from make_tiny_weights import write_tiny_base  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from d3sr_core.loading.generator import load_generator  # noqa: E402
from trainer.checkpoints import latest_checkpoint  # noqa: E402
from trainer.config import ConfigError, build_config, config_from_dict  # noqa: E402
from trainer.export import export  # noqa: E402
from trainer.smoke_data import write_images  # noqa: E402
from trainer.train import FAULT_ENV, build_parser, train  # noqa: E402

STEPS = 2
CKPT_EVERY = 1


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trainer")
    return {
        "root": root,
        "base": write_tiny_base(root / "base"),
        "train": write_images(root / "train", count=6, size=72),
        "val": write_images(root / "val", count=2, size=64, seed=1),
    }


def _config(assets, out: Path, **sections) -> dict:
    cfg = {
        "model": {"base": str(assets["base"]), "lora_rank": 4, "lora_alpha": 4, "learn_prompt": True},
        "discriminator": {
            "base": "sdxl-tiny", "lora_rank": 4, "lora_alpha": 4, "head_hidden": 16,
            "head_groups": 4,
        },
        "loss": {"random_dists": True},
        "data": {
            "hr_dir": str(assets["train"]), "val_hr_dir": str(assets["val"]), "crop_size": 64,
            "val_crop": 64, "workers": 0,
        },
        "optim": {"lr_g": 1e-3, "lr_d": 1e-3},
        "train": {
            "output_dir": str(out), "batch_size": 2, "max_steps": STEPS, "ckpt_every": CKPT_EVERY,
            "keep_last": 5, "log_every": 1, "val_every": 0, "ema_decay": 0.9, "threads": 1,
            "tensorboard": False, "seed": 3,
        },
    }  # fmt: skip
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def _write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _final_tensors(out: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step-{STEPS:08d}"
    tensors = {}
    for name in ("generator_trainable", "discriminator"):
        tensors.update(
            {f"{name}/{k}": v for k, v in load_file(ckpt / f"{name}.safetensors").items()}
        )
    tensors.update({f"ema/{k}": v for k, v in load_file(ckpt / "d3sr_ema.safetensors").items()})
    return tensors


@pytest.fixture(scope="module")
def reference_run(assets):
    """One uninterrupted run (in this process) that the other tests compare against."""
    out = assets["root"] / "run-ref"
    result = train(config_from_dict(_config(assets, out)))
    return out, result


# --------------------------------------------------------------------------- end to end


def test_end_to_end_losses_trainable_parts_and_export(assets, reference_run):
    out, result = reference_run
    summary = result.summary
    assert summary["step"] == STEPS
    for k, v in summary["losses"].items():
        assert torch.isfinite(torch.tensor(v)), k
    assert summary["losses"]["ea_dists"] > 0 and summary["losses"]["adv_g"] > 0
    log = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss_g" in r] == list(range(1, STEPS + 1))
    assert {"val_psnr_y", "val_ssim_y", "val_dists"} <= set(summary["validation"])

    # Only LoRA / head / prompt changed: compare every tensor with freshly built networks.
    from d3sr_core.loading.base import load_base
    from d3sr_core.models.discriminator import DiffusionDiscriminator

    fresh = load_base(assets["base"])
    gen = result.generator.generator
    for prefix, module, fresh_module in (
        ("unet", gen.unet, fresh.unet),
        ("vae", gen.vae, fresh.vae),
    ):
        own = dict(fresh_module.named_parameters())
        for name, p in module.named_parameters():
            if "lora_" in name:
                continue
            key = name.replace(".base_layer", "")
            assert torch.equal(p.detach(), own[key].detach()), f"frozen {prefix}.{name} changed"
    lora_b = [p for n, p in gen.unet.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # B starts at 0: every LoRA module trained
    assert not torch.equal(result.generator.prompt.detach(), gen.prompt_embeds)
    disc = result.discriminator
    fresh_disc = DiffusionDiscriminator.from_config(disc.config, seed=None)
    trunk = dict(fresh_disc.named_parameters())
    changed = {n for n, p in disc.named_parameters() if p.requires_grad}
    assert changed and all("lora_" in n or n.startswith("head.") for n in changed)
    for name, p in disc.named_parameters():
        if name not in changed:
            assert p.shape == trunk[name].shape

    # The exported file, loaded as users load weights, reproduces the trainer's generator.
    exported = export(out, assets["root"] / "exported.safetensors")
    loaded = load_generator(exported, assets["base"])
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ours = result.generator.eval().upscale(x)
        theirs = loaded(x)
    delta = (ours - theirs).abs().max().item()
    # merged (load_generator) vs unmerged (peft) LoRA in float32; measured 1.4e-5 for a LoRA
    # that changes the output by up to 1.97 (a one-off check with random B ~ N(0, 0.05))
    assert delta < 1e-4, delta
    assert loaded.config.lora_rank == 4 and loaded.config.timestep == 399


def test_export_of_ema_weights_and_errors(assets, reference_run, tmp_path):
    out, _ = reference_run
    ema = export(
        out / "checkpoints" / f"step-{CKPT_EVERY:08d}", tmp_path / "ema.safetensors", ema=True
    )
    plain = export(out, tmp_path / "plain.safetensors")
    a, b = load_file(ema), load_file(plain)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    from trainer.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        export(tmp_path / "missing", tmp_path / "x.safetensors")


def test_options_bf16_checkpointing_accumulation_device_degradation_r1(assets):
    """The optional paths run together (one step): bf16 autocast with bf16 frozen weights,
    gradient checkpointing (UNet, VAE decoder, discriminator trunk), 2 micro-steps, LR made on
    the device, approximate R1."""
    out = assets["root"] / "run-options"
    cfg = _config(
        assets, out,
        data={"degrade_on": "device", "val_hr_dir": None},
        discriminator={"r1_gamma": 1.0},
        train={"max_steps": 1, "grad_accum": 2, "mixed_precision": "bf16",
               "grad_checkpointing": True, "log_every": 1},
    )  # fmt: skip
    result = train(config_from_dict(cfg))
    assert result.summary["step"] == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in result.summary["losses"].values())
    unet = result.generator.generator.unet
    assert next(p for n, p in unet.named_parameters() if "lora_" not in n).dtype == torch.bfloat16
    assert next(p for n, p in unet.named_parameters() if "lora_" in n).dtype == torch.float32


def test_init_from_an_exported_checkpoint(assets, reference_run, tmp_path):
    from d3sr_core.loading.base import load_base
    from d3sr_core.loading.checkpoint import load_checkpoint
    from d3sr_core.models.generator import GeneratorConfig
    from trainer.models import build_generator_model

    out, _ = reference_run
    file = export(out, tmp_path / "start.safetensors")
    ckpt = load_checkpoint(file)
    base = load_base(assets["base"])
    model = build_generator_model(
        base, ckpt.prompt_embeds, GeneratorConfig(lora_rank=4, lora_alpha=4.0), learn_prompt=True
    )
    model.load_checkpoint_lora(ckpt, str(file))
    again = model.to_checkpoint()
    a, b = again.adapters["unet"].factors, ckpt.adapters["unet"].factors
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
    assert torch.equal(again.prompt_embeds, ckpt.prompt_embeds)
    wrong = build_generator_model(
        load_base(assets["base"]), ckpt.prompt_embeds, GeneratorConfig(lora_rank=8, lora_alpha=4.0)
    )
    from d3sr_core.loading.files import WeightsFileError

    with pytest.raises(WeightsFileError, match="LoRA scale"):
        wrong.load_checkpoint_lora(ckpt, str(file))


# --------------------------------------------------------------------------- kill -9 and resume


@pytest.mark.parametrize("fault", ["during-checkpoint", "after-checkpoint"])
def test_sigkill_then_resume_matches_uninterrupted_run(assets, reference_run, fault):
    """Killed (SIGKILL) while writing the step-4 checkpoint / right after the step-2 one, the
    run resumes from its last complete checkpoint and ends with the uninterrupted run's weights."""
    ref_out, _ = reference_run
    out = assets["root"] / f"run-{fault}"
    config = _write_config(_config(assets, out), assets["root"] / f"{fault}.yaml")
    kill_step = STEPS if fault == "during-checkpoint" else CKPT_EVERY
    env = _env() | {FAULT_ENV: f"{fault}:{kill_step}"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "trainer" / "train.py"), "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = out / "checkpoints"
    latest = latest_checkpoint(ckpts)
    assert latest is not None and latest.name == f"step-{CKPT_EVERY:08d}"
    if fault == "during-checkpoint":
        partial = ckpts / f".tmp-step-{STEPS:08d}"
        assert partial.is_dir() and (partial / "generator_trainable.safetensors").is_file()
        assert not (partial / "meta.json").exists()
    result = train(config_from_dict(_config(assets, out)), resume="latest")
    assert result.summary["step"] == STEPS
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
    ref, got = _final_tensors(ref_out), _final_tensors(out)
    assert ref.keys() == got.keys()
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert worst == 0.0, worst  # bit-identical on CPU with fixed seeds


def test_resume_errors(assets, tmp_path):
    from trainer.checkpoints import CheckpointError, resolve_resume

    (tmp_path / "checkpoints" / "step-00000002").mkdir(parents=True)  # no meta.json
    assert resolve_resume("latest", tmp_path) is None  # incomplete folders are never "latest"
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoints" / "step-00000002"), tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_resume_needs_the_kind_of_run_that_wrote_the_checkpoint(tmp_path):
    """DeepSpeed keeps optimizer states in pytorch_model*/ (one shard per process), data
    parallel in optimizer*.bin: resuming one with the other is a clear error, not a silent
    restart of the optimizers."""
    from trainer.checkpoints import CheckpointError
    from trainer.distributed_backend import check_resume

    ddp, ds = tmp_path / "step-00000001", tmp_path / "step-00000002"
    ddp.mkdir()
    (ds / "pytorch_model").mkdir(parents=True)
    check_resume(ddp, {"world_size": 2}, 4, deepspeed=False)  # DDP may change process count
    check_resume(ds, {"world_size": 2}, 2, deepspeed=True)
    with pytest.raises(CheckpointError, match="step-00000001: written by a data-parallel run"):
        check_resume(ddp, {"world_size": 2}, 2, deepspeed=True)
    with pytest.raises(CheckpointError, match="step-00000002: written by a DeepSpeed run"):
        check_resume(ds, {"world_size": 2}, 2, deepspeed=False)
    with pytest.raises(
        CheckpointError, match="2 DeepSpeed processes, resumed by 4.*--num_processes 2"
    ):
        check_resume(ds, {"world_size": 2}, 4, deepspeed=True)


# --------------------------------------------------------------------------- two processes


def test_two_processes_agree_on_weights(assets):
    """``accelerate launch`` with 2 CPU processes (gloo DDP) and the shipped
    ``accelerate_multi_gpu.yaml``: same weights on both ranks.

    accelerate's ``--cpu --num_processes 2`` starts the extra processes only through mpirun;
    ``MULTI_GPU`` with ``ACCELERATE_USE_CPU=1`` starts them through torchrun on one machine.
    """
    out = assets["root"] / "run-ddp"
    cfg = _config(
        assets, out, train={"max_steps": 2, "ema_decay": 0.0}, loss={"ea_dists_weight": 0}
    )
    config = _write_config(cfg, assets["root"] / "ddp.yaml")
    # the shipped accelerate config (4 GPUs), with the process count overridden
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "trainer" / "configs" / "accelerate_multi_gpu.yaml"), "--num_processes", "2",
        "--main_process_port", "29531", str(ROOT / "trainer" / "train.py"), "--config", str(config),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, env=_env() | {"ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((out / "final.json").read_text())
    assert final["world_size"] == 2 and final["step"] == 2
    a, b = final["checksums"]
    assert a == b and final["weights_agree"]


# --------------------------------------------------------------------------- launch modes


def test_fsdp_is_rejected_before_models_load(assets, tmp_path, monkeypatch):
    """`accelerate launch --use_fsdp` (or an accelerate config choosing FSDP) is a clear error
    naming the mode and pointing to DeepSpeed ZeRO-2, before the Accelerator or any model is
    built (on the CPU accelerate itself would fail in its FSDP plugin)."""
    from accelerate.utils import DistributedType

    from trainer.distributed_backend import check_launch_mode

    with pytest.raises(ConfigError, match="FSDP.*not supported.*accelerate_deepspeed_zero2"):
        check_launch_mode(DistributedType.FSDP)
    for ok in ("MULTI_GPU", "MULTI_CPU", "DEEPSPEED"):
        check_launch_mode(getattr(DistributedType, ok))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = _config(assets, tmp_path / "o")
    cfg["model"]["base"] = str(tmp_path / "no-base")  # would fail later, if reached
    with pytest.raises(ConfigError, match="accelerate FSDP \\(ACCELERATE_USE_FSDP=true\\)"):
        train(config_from_dict(cfg))
    assert not (tmp_path / "o").exists()


def test_deepspeed_launch_without_deepspeed_is_a_clear_error(assets, tmp_path, monkeypatch):
    """A DeepSpeed launch where the package is missing stops before any model loads."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed (tests/test_trainer_deepspeed.py covers it)")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = _config(assets, tmp_path / "o")
    cfg["model"]["base"] = str(tmp_path / "no-base")
    with pytest.raises(ConfigError, match="deepspeed package is not installed.*--extras deepspeed"):
        train(config_from_dict(cfg))
    assert not (tmp_path / "o").exists()


def test_launcher_process_count_is_read_from_the_command_line():
    from trainer.distributed_backend import launcher_num_processes as n

    assert n(["/usr/bin/accelerate", "launch", "--num_processes", "2", "--cpu", "t.py"]) == 2
    assert n(["python", "-m", "accelerate.commands.launch", "--num_processes=4", "t.py"]) == 4
    assert n(["accelerate", "launch", "--num-processes", "3", "t.py"]) == 3
    assert n(["accelerate", "launch", "t.py"]) is None  # count from a config file: not known
    assert n(["bash", "run.sh", "--num_processes", "2"]) is None  # not accelerate's launcher


# --------------------------------------------------------------------------- learning sanity


def test_learning_improves_validation_psnr(assets):
    """Training the tiny model (MSE only, so the test stays short) raises validation PSNR-Y over
    the untrained model (its step-0 validation). Measured on 2 busy cores: 13.84 -> 15.71 dB
    (+1.87 dB) after 60 steps; the assertion asks for more than half of that."""
    out = assets["root"] / "run-learn"
    cfg = _config(
        assets, out,
        model={"learn_prompt": False},
        loss={"ea_dists_weight": 0.0, "adv_weight": 0.0},
        optim={"lr_g": 3e-2},
        train={"max_steps": LEARN_STEPS, "val_every": LEARN_STEPS, "ckpt_every": 10_000,
               "ema_decay": 0.0, "log_every": 20, "batch_size": 1},
        data={"val_hr_dir": str(assets["train"]), "val_max_images": 4},
    )  # fmt: skip
    train(config_from_dict(cfg))
    log = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    psnr = {r["step"]: r["val_psnr_y"] for r in log if "val_psnr_y" in r}
    print(
        f"validation PSNR-Y: step 0 {psnr[0]:.3f} dB -> step {LEARN_STEPS} {psnr[LEARN_STEPS]:.3f} dB"
    )
    assert psnr[LEARN_STEPS] - psnr[0] > LEARN_MARGIN_DB, psnr


LEARN_STEPS = 60
LEARN_MARGIN_DB = 0.9


# --------------------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_and_validation_images(assets):
    """With ``train.tensorboard`` the losses, learning rate and validation metrics are TensorBoard
    scalars and the validation grid (LR | SR | HR) is an image, at the right steps."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = assets["root"] / "run-tb"
    cfg = _config(
        assets, out,
        loss={"ea_dists_weight": 0.0},
        train={"max_steps": 2, "val_every": 1, "ckpt_every": 10_000, "ema_decay": 0.0,
               "tensorboard": True},
    )  # fmt: skip
    train(config_from_dict(cfg))
    run_dir = out / "logs" / "d3sr"  # accelerate: logging_dir / project name (hparams below it)
    assert list(run_dir.glob("events.out.tfevents*")), sorted((out / "logs").rglob("*"))
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("loss_g", "mse", "adv_g", "loss_d", "d_real", "lr_g", "val_psnr_y", "val_dists"):
        assert tag in scalars, (tag, sorted(scalars))
    assert [e.step for e in acc.Scalars("loss_g")] == [1, 2]
    assert [e.step for e in acc.Scalars("val_psnr_y")] == [0, 1, 2]
    logged = json.loads((out / "logs" / "metrics.jsonl").read_text().splitlines()[-1])
    assert acc.Scalars("val_psnr_y")[-1].value == pytest.approx(logged["val_psnr_y"], rel=1e-6)
    images = acc.Images("validation")
    assert [e.step for e in images] == [0, 1, 2]
    # 2 validation images of 64 px: LR | SR | HR side by side, one row each
    assert (images[-1].width, images[-1].height) == (3 * 64, 2 * 64)


# --------------------------------------------------------------------------- config / CLI


def test_config_overrides_and_errors(assets, tmp_path):
    cfg_file = _write_config(_config(assets, tmp_path / "o"), tmp_path / "c.yaml")
    parser = build_parser()
    args = parser.parse_args(
        ["--config", str(cfg_file), "--optim.lr_g", "1e-4", "--data.degradation",
         "{noise_range: [1, 10]}", "--train.mixed_precision", "bf16"]
    )  # fmt: skip
    from trainer.config import overrides_from_args

    cfg = build_config(args.config, overrides_from_args(args))
    assert cfg.optim.lr_g == 1e-4 and cfg.train.mixed_precision == "bf16"
    assert cfg.degradation().noise_range == [1, 10]
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        build_config(cfg_file, {"train": {"mixed_precision": "fp8"}})
    with pytest.raises(ConfigError, match="unknown field train.steps"):
        build_config(cfg_file, {"train": {"steps": 3}})
    with pytest.raises(ConfigError, match="crop_size"):
        build_config(cfg_file, {"data": {"crop_size": 50}})
    with pytest.raises(ConfigError, match="discriminator.weights is required"):
        build_config(cfg_file, {"discriminator": {"base": "sdxl-base"}})
    with pytest.raises(ConfigError, match="data.degradation"):
        build_config(cfg_file, {"data": {"degradation": {"noise": 1}}})
    help_text = parser.format_help()
    for field in (
        "--model.lora_rank",
        "--loss.adv_weight",
        "--data.degradation",
        "--train.ema_decay",
    ):
        assert field in help_text


def test_missing_data_is_an_error_before_models_load(assets, tmp_path, capsys):
    from trainer.train import main

    cfg = _config(assets, tmp_path / "o", data={"hr_dir": str(tmp_path / "nothing")})
    cfg["model"]["base"] = str(tmp_path / "no-base-either")  # would fail later, if reached
    code = main(["--config", str(_write_config(cfg, tmp_path / "c.yaml"))])
    assert code == 2
    assert "nothing does not exist" in capsys.readouterr().err


def test_smoke_config_is_valid():
    cfg = build_config(ROOT / "trainer" / "configs" / "cpu_smoke.yaml", {})
    assert cfg.loss.random_dists and cfg.discriminator.base == "sdxl-tiny"
    for name in ("gpu1.yaml", "multi_gpu.yaml"):
        full = build_config(ROOT / "trainer" / "configs" / name, {})
        assert full.model.lora_rank == 16 and full.discriminator.base == "sdxl-base"


@pytest.fixture(autouse=True, scope="module")
def _cleanup(assets):
    yield
    shutil.rmtree(assets["root"], ignore_errors=True)
