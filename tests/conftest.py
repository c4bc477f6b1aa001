import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# Two threads by default; an explicit OMP_NUM_THREADS wins (on a shared, loaded machine two
# spinning OpenMP threads make the many tiny ops of these tests several times slower).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny SD2.1-style base folder and D3SR checkpoint, written once per test session
    (read-only: tests that change weights files make their own)."""
    from make_tiny_weights import write_tiny_base, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-weights")
    return {
        "base": write_tiny_base(root / "tiny-sd21-base"),
        "weights": write_tiny_checkpoint(root / "d3sr-tiny.safetensors"),
    }
