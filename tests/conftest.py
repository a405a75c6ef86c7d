"""Test setup: without a GPU, every Triton kernel runs in Triton's interpreter on CPU tensors."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when tlcore.kernels are first imported

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 convs and matmuls in IEEE precision. On a GPU torch defaults its convs to TF32, and
    tlcore's fp32 conv follows torch.backends.cudnn.allow_tf32: both would then miss the fp32
    tests' tolerances by ~1e-3. (The interpreter on CPU ignores TF32 either way.)"""
    from tlcore.benchmark.suites import ieee_fp32  # (imported after TRITON_INTERPRET is set)

    with ieee_fp32():
        yield
