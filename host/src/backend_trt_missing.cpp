// Built instead of backend_trt.cpp when CMake found no TensorRT headers/library: the TensorRT
// backend reports itself missing, and a request for it is a clear XP_ERR_UNSUPPORTED.
#include "backend.h"
#include "error.h"

namespace xp {

bool trt_built() { return false; }

std::unique_ptr<Runtime> make_trt_runtime(const RuntimeOptions&) {
  fail(XP_ERR_UNSUPPORTED,
       "this host was built without TensorRT, so it cannot load TensorRT plans: rebuild it where NvInfer.h and "
       "libnvinfer (or libtensorrt_rtx) are found (cmake -DXP_TENSORRT_ROOT=DIR, docs/host.md), or use the ONNX "
       "Runtime backend (XP_BACKEND_ORT / --backend ort)");
}

}  // namespace xp
