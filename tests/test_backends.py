"""runtime/backends.py: one call signature; Torch vs ONNX Runtime parity (CPU), TensorRT parity (GPU)."""

import warnings

import pytest
import torch

from engines import trt_import
from runtime.backends import OrtBackend, TorchBackend, TrtBackend


class TwoInTwoOut(torch.nn.Module):
    """conv + matmul + softmax, with a second input and a second output to exercise name mapping."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, scale):  # x: (B, 4, 8, 8), scale: (B, 1, 1)
        y = self.conv(x).flatten(2).transpose(1, 2)  # (B, 64, 8)
        probs = torch.softmax(self.lin(y) * scale, dim=-1)  # (B, 64, 8)
        return probs, y.mean(dim=(1, 2))  # (B, 64, 8), (B,)


NAMES_IN, NAMES_OUT = ["x", "scale"], ["probs", "pooled"]


def export(path, dtype=torch.float32):
    torch.manual_seed(0)
    m = TwoInTwoOut().eval().to(dtype)
    args = (torch.randn(2, 4, 8, 8, dtype=dtype), torch.ones(2, 1, 1, dtype=dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(m, args, str(path), input_names=NAMES_IN, output_names=NAMES_OUT, opset_version=18,
                          dynamo=False, dynamic_axes={n: {0: "B"} for n in NAMES_IN + NAMES_OUT})
    return m


def feed(batch=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(batch, 4, 8, 8, generator=g).to(dtype),
            "scale": (torch.rand(batch, 1, 1, generator=g) + 0.5).to(dtype)}


def max_rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_torch_vs_ort_parity_fp32(tmp_path):
    module = export(tmp_path / "m.onnx")
    torch_be = TorchBackend(module, NAMES_IN, NAMES_OUT)
    ort_be = OrtBackend(tmp_path / "m.onnx")
    assert (ort_be.input_names, ort_be.output_names) == (NAMES_IN, NAMES_OUT)
    f = feed(batch=3)  # a batch size other than the export's: dynamic axis works
    ref, out = torch_be(f), ort_be(f)
    for n in NAMES_OUT:
        err = max_rel_err(out[n], ref[n])
        print(f"{n}: max rel err {err:.2e}")
        assert out[n].dtype == ref[n].dtype == torch.float32 and out[n].shape == ref[n].shape
        assert err <= 1e-4


def test_ort_keeps_fp16(tmp_path):
    export(tmp_path / "m16.onnx", torch.float16)
    out = OrtBackend(tmp_path / "m16.onnx")(feed(dtype=torch.float16))
    assert out["probs"].dtype == torch.float16
    with pytest.raises(TypeError, match="the graph wants tensor\\(float16\\)"):
        OrtBackend(tmp_path / "m16.onnx")(feed(dtype=torch.float32))


def test_torch_backend_call_styles():
    module = TwoInTwoOut().eval()
    f = feed()
    kw = TorchBackend(module, NAMES_IN, NAMES_OUT)(f)
    pos = TorchBackend(lambda a, b: module(a, b), NAMES_IN, NAMES_OUT, positional=True)(f)
    as_dict = TorchBackend(lambda x, scale: dict(zip(NAMES_OUT, module(x, scale))), NAMES_IN, NAMES_OUT)(f)
    for n in NAMES_OUT:
        assert torch.equal(kw[n], pos[n]) and torch.equal(kw[n], as_dict[n])
    single = TorchBackend(lambda x, scale: x.sum() * scale, NAMES_IN, ["y"])(f)
    assert list(single) == ["y"]


def test_backends_reject_wrong_names(tmp_path):
    module = export(tmp_path / "m.onnx")
    bad = {"x": feed()["x"], "sigma": torch.ones(3, 1, 1)}
    for be in (TorchBackend(module, NAMES_IN, NAMES_OUT), OrtBackend(tmp_path / "m.onnx")):
        with pytest.raises(KeyError, match=r"missing \['scale'\] and has unexpected \['sigma'\]"):
            be(bad)
    with pytest.raises(ValueError, match="returned 2 outputs"):
        TorchBackend(module, NAMES_IN, ["probs"])(feed())


def _trt_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "TensorRT parity needs a CUDA GPU"
    flavour = trt_import.available()
    if flavour is None:
        return "TensorRT parity needs tensorrt or tensorrt_rtx"
    if flavour == "tensorrt_rtx" and torch.cuda.get_device_capability()[0] in (9, 10):
        return "tensorrt_rtx plans do not run on data-center GPUs (Hopper/Blackwell B200); install tensorrt"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_trt_skip_reason() is not None, reason=str(_trt_skip_reason()))
def test_trt_vs_torch_parity_fp16(tmp_path):
    from engines.build import BuildConfig, build_engine

    module = export(tmp_path / "m.onnx", torch.float16).cuda()
    profile = {"x": ((1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 8, 8)), "scale": ((1, 1, 1), (2, 1, 1), (4, 1, 1))}
    build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", profile, BuildConfig(opt_level=0, workspace_mib=256))
    trt_be = TrtBackend(tmp_path / "m.plan")
    f = {k: v.cuda() for k, v in feed(dtype=torch.float16).items()}
    ref32 = TorchBackend(module.float(), NAMES_IN, NAMES_OUT)({k: v.float() for k, v in f.items()})
    ref16 = TorchBackend(module.half(), NAMES_IN, NAMES_OUT)(f)
    with torch.cuda.stream(torch.cuda.Stream()):
        out = {k: v.clone() for k, v in trt_be(f).items()}
    torch.cuda.synchronize()
    for n in NAMES_OUT:  # tolerance relative to torch's own fp16 error (style rule 10)
        tol = 2 * max_rel_err(ref16[n], ref32[n]) + 1e-3
        assert max_rel_err(out[n], ref32[n]) <= tol
