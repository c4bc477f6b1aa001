"""``d3sr upscale`` over two processes (accelerate launch, torchrun) on the CPU.

``accelerate launch --cpu --num_processes 2`` starts a single process unless an MPI host
file is given (accelerate 1.x hands multi-process CPU runs to mpirun), so two CPU processes
are started the way accelerate starts two GPU processes (``--multi_gpu``); on this
CPU-only torch every process then runs on the CPU.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from make_tiny_weights import write_test_image, write_tiny_base, write_tiny_checkpoint

from d3sr_core import cli

REPO = Path(__file__).resolve().parent.parent
SIZES = [(8, 8), (24, 16), (12, 20), (9, 7), (16, 16), (10, 6)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "d3sr_core", "upscale", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate not installed")
def test_two_processes_match_one_and_resume(tmp_path):
    base = write_tiny_base(tmp_path / "base")
    weights = write_tiny_checkpoint(tmp_path / "w.safetensors")
    folder = tmp_path / "in"
    folder.mkdir()
    for i, size in enumerate(SIZES):
        write_test_image(folder / f"im{i}.png", size)
    common = ["--weights", str(weights), "--base", str(base), "--device", "cpu"]

    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes (OMP_NUM_THREADS=1)
    try:
        assert cli.main(["upscale", str(folder), "-o", str(single), *common, "-q"]) == 0
    finally:
        torch.set_num_threads(threads)

    multi = tmp_path / "multi"
    accelerate = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(free_port())]  # fmt: skip
    result = launch(accelerate, [str(folder), "-o", str(multi), *common])
    assert result.returncode == 0, result.stderr
    summaries = [line for line in result.stderr.splitlines() if " written, " in line]
    assert summaries == [f"6 written, 0 skipped, 0 failed -> {multi} (2 processes)"]
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
    for out in single.iterdir():
        assert (multi / out.name).read_bytes() == out.read_bytes(), out.name

    # a run that stopped half-way (outputs are complete or absent) resumes with torchrun
    for name in ("im1.png", "im4.png"):
        (multi / name).unlink()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]  # fmt: skip
    result = launch(torchrun, [str(folder), "-o", str(multi), *common, "--skip-existing"])
    assert result.returncode == 0, result.stderr
    assert f"2 written, 4 skipped, 0 failed -> {multi} (2 processes)" in result.stderr
    for out in single.iterdir():
        assert (multi / out.name).read_bytes() == out.read_bytes(), out.name
