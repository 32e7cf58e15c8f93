"""Shared fixtures: the golden set location, tiny models, seeds."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Triton fixes interpreter mode at its first import: on a machine without CUDA, run kernels in the
# CPU interpreter (kernel tests, golden parity with --kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOLDEN = Path(os.environ.get("XPORTRAIT_GOLDEN", ROOT.parent / "shared" / "golden" / "xportrait"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "state.safetensors").is_file():
        pytest.skip(f"golden set not found at {GOLDEN} (set XPORTRAIT_GOLDEN to its directory)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_cfg(golden_dir):
    from models.config import XPortraitConfig
    return XPortraitConfig.from_golden_json(golden_dir / "config.json")


@pytest.fixture()
def tiny_model():
    from models.config import XPortraitConfig
    from models.init import init_random_
    from models.xportrait import XPortrait
    torch.manual_seed(0)
    return init_random_(XPortrait(XPortraitConfig.from_name("tiny"), with_text_encoder=True), seed=1).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny graphs gain nothing from 2 threads and lose a lot when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
