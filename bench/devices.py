"""Dense peak FLOP/s of the GPUs this project is measured on, with their sources.

`peak_tflops(name, dtype)` turns a measured rate into a share of the device's peak. Values are the
vendor datasheets' dense tensor-core rates (the "with sparsity" figures halved) for fp16/bf16 and TF32,
and the plain (CUDA-core) rate for fp32: PyTorch runs fp32 matmuls without TF32 unless
`torch.backends.cuda.matmul.allow_tf32` is set. They are ceilings on paper; a measured ceiling is
lower (this workplace's H200 ran an 8192^3 bf16 matmul at 769-798 TFLOP/s, against 989 here).
Anything not in the table is "unknown"; the CPU has no entry ("n/a").
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DevicePeak:
    name: str
    match: tuple[str, ...]   # substrings of torch.cuda.get_device_name(), all must be present
    fp32: float              # TFLOP/s, CUDA cores
    tf32: float              # TFLOP/s, tensor cores, dense
    fp16: float              # TFLOP/s, tensor cores, dense, fp32 accumulation
    bf16: float
    source: str


_H100 = "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100), dense = sparse / 2"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200), dense = sparse / 2"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100), dense figures"
_L40S = "NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s), dense = sparse / 2"
_ADA = ("NVIDIA Ada Lovelace GPU Architecture whitepaper, appendix table for the RTX 4090: FP16/BF16 tensor "
        "with FP32 accumulate, dense")

# Order matters: the first entry whose substrings all occur in the device name wins (NVL/PCIe before SXM).
PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("H200 NVL", ("H200", "NVL"), 60.0, 417.5, 835.5, 835.5, _H200),
    DevicePeak("H200 SXM", ("H200",), 67.0, 494.5, 989.5, 989.5, _H200),
    DevicePeak("H100 NVL", ("H100", "NVL"), 60.0, 417.5, 835.5, 835.5, _H100),
    DevicePeak("H100 PCIe", ("H100", "PCIe"), 51.0, 378.0, 756.5, 756.5, _H100),
    DevicePeak("H100 SXM", ("H100",), 67.0, 494.5, 989.5, 989.5, _H100),
    DevicePeak("A100", ("A100",), 19.5, 156.0, 312.0, 312.0, _A100),
    DevicePeak("L40S", ("L40S",), 91.6, 183.0, 362.0, 362.0, _L40S),
    DevicePeak("RTX 4090", ("RTX 4090",), 82.6, 82.6, 165.2, 165.2, _ADA),
)


def lookup(device_name: str) -> DevicePeak | None:
    """The table entry for a CUDA device name (torch.cuda.get_device_name()), or None if unknown."""
    for entry in PEAKS:
        if all(s.lower() in device_name.lower() for s in entry.match):
            return entry
    return None


def peak_tflops(device_name: str | None, dtype: str, tf32: bool = False) -> float | None:
    """Dense peak TFLOP/s for `dtype` ('fp32', 'fp16', 'bf16') on the named device; None: CPU or unknown."""
    entry = lookup(device_name) if device_name else None
    if entry is None:
        return None
    if dtype == "fp32":
        return entry.tf32 if tf32 else entry.fp32
    if dtype not in ("fp16", "bf16"):
        raise ValueError(f"dtype {dtype!r}: choose fp32, fp16 or bf16")
    return getattr(entry, dtype)


def describe(device_name: str | None) -> dict:
    """JSON-ready description of the peak table entry used (or why there is none)."""
    if not device_name:
        return {"device": "cpu", "peak": "n/a (CPU: no peak table; shares of peak are not reported)"}
    entry = lookup(device_name)
    if entry is None:
        return {"device": device_name, "peak": "unknown (not in bench/devices.py; add its datasheet figures)"}
    return {"device": device_name, "peak_entry": entry.name, "tflops_dense": {
        "fp32": entry.fp32, "tf32": entry.tf32, "fp16": entry.fp16, "bf16": entry.bf16}, "source": entry.source}
