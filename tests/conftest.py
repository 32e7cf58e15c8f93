"""Shared fixtures (golden set, tiny models, threads) and the test-tier policy.

Tiers (README "Tests"):
- CPU tier: everything not marked. It needs the golden set and the test extras (`pip install -e
  .[test]`: triton, onnx, onnxruntime, transformers, tensorrt_rtx, av, opencv). Outside CI a missing
  one skips with the reason; under CI=true (what .ci/run runs) it is a FAILURE naming what to
  install, never a skip.
- `gpu` (needs a CUDA GPU) and `trt` (needs full TensorRT): this file skips them, with the reason,
  where the hardware or library is absent. These are the only tests that may skip under CI=true.
  `pytest -m gpu` on a GPU machine selects exactly them.

Under CI=true any other skip (a stray importorskip, a missing sample file) is turned into a
failure by the report hooks below, so CI cannot stay green by skipping.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import NoReturn

import pytest
import torch

# Triton fixes interpreter mode at its first import: on a machine without CUDA, run kernels in the
# CPU interpreter (kernel tests, golden parity with --kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOLDEN = Path(os.environ.get("XPORTRAIT_GOLDEN", ROOT.parent / "shared" / "golden" / "xportrait"))
CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
HARDWARE_MARKS = ("gpu", "trt")
# import name -> what to install (all are in the `test` extra)
REQUIRED = {"triton": "triton", "onnx": "onnx", "onnxruntime": "onnxruntime", "transformers": "transformers",
            "tensorrt_rtx": "tensorrt-rtx-cu13==1.7.1.116", "av": "av", "cv2": "opencv-python-headless",
            "yuface": "yuface==2023.5.1"}
INSTALL = "pip install -e .[test]"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # one device per test: inputs and kernels together


def missing(reason: str) -> NoReturn:
    """A required test input is absent: a failure under CI=true, a skip (with the reason) elsewhere."""
    if CI:
        pytest.fail(f"{reason} [CI=true: a required test input is a failure, not a skip]", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str):
    """Import a required test dependency (pytest.importorskip's replacement): see missing()."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        error = e
    missing(f"{module} is not importable ({error}): pip install {REQUIRED.get(module, module)} (or {INSTALL})")


def has_full_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


# ------------------------------------------------------------------------------------ tier hooks
def pytest_collection_modifyitems(config, items):
    reasons = {"gpu": None if torch.cuda.is_available() else
               "needs a CUDA GPU (marked gpu: run `pytest -m gpu` on a GPU machine)",
               "trt": None if has_full_tensorrt() else
               "needs full TensorRT (marked trt): pip install tensorrt on a machine with an NVIDIA GPU"}
    for item in items:
        for mark in HARDWARE_MARKS:
            if reasons[mark] and item.get_closest_marker(mark):
                item.add_marker(pytest.mark.skip(reason=reasons[mark]))
                break


def _skip_reason(rep) -> str:
    return rep.longrepr[2] if isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3 else str(rep.longrepr)


class _Message:
    """A report body that is one message (shown in the failure section and in the short summary)."""

    def __init__(self, text: str):
        self.text = text
        self.reprcrash = self  # the short summary reads longrepr.reprcrash.message

    @property
    def message(self) -> str:
        return self.text

    def toterminal(self, tw) -> None:
        tw.line(self.text)

    def __str__(self) -> str:
        return self.text


def _fail_skip(rep) -> None:
    reason = _skip_reason(rep).removeprefix("Skipped: ")
    rep.outcome = "failed"
    rep.longrepr = _Message(f"skipped under CI=true, where only tests marked gpu/trt may skip: {reason}. Fix: "
                            f"install what it names ({INSTALL}) or provide the golden set (XPORTRAIT_GOLDEN)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if CI and rep.skipped and not hasattr(rep, "wasxfail") and not any(item.get_closest_marker(m)
                                                                       for m in HARDWARE_MARKS):
        _fail_skip(rep)
    return rep


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    rep = yield
    if CI and rep.skipped:  # a whole module skipped at import (importorskip / skip(allow_module_level))
        _fail_skip(rep)
    return rep


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if not hasattr(r, "wasxfail")]
    if not skipped:
        return
    kind = [next((m for m in HARDWARE_MARKS if m in getattr(r, "keywords", {})), "other") for r in skipped]
    terminalreporter.write_line(f"skipped: {kind.count('gpu')} marked gpu (need a CUDA GPU), {kind.count('trt')} "
                                f"marked trt only (need full TensorRT), {kind.count('other')} other (missing test "
                                "inputs: a failure under CI=true)")


# -------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "state.safetensors").is_file():
        missing(f"golden set not found at {GOLDEN}: set XPORTRAIT_GOLDEN to the folder holding config.json, "
                "state.safetensors, io.safetensors and README.json")
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
