// ONNX Runtime backend through its C API. libonnxruntime is loaded with dlopen at run time and
// only OrtGetApiBase is looked up, so the host builds with the C API header alone (Debian's
// libonnxruntime-dev, fetched at configure time) and runs with any library whose API version is at
// least the header's (the Python wheel's libonnxruntime.so.1.x by default). Inputs and outputs are
// bound to the host tensors' memory (no copies); outputs are pre-allocated by the pipeline.
#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

#include "backend.h"
#include "error.h"
#include "onnxruntime_c_api.h"

#ifndef XP_ORT_DEFAULT_LIBRARY
#define XP_ORT_DEFAULT_LIBRARY ""
#endif

namespace xp {

namespace {

class OrtRuntime;

ONNXTensorElementDataType ort_type(DType t) {
  switch (t) {
    case DType::F32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case DType::F16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case DType::I32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    case DType::I64: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

bool from_ort_type(ONNXTensorElementDataType t, DType* out) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: *out = DType::F32; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: *out = DType::F16; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: *out = DType::I32; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: *out = DType::I64; return true;
    default: return false;
  }
}

class OrtRuntime : public Runtime {
 public:
  explicit OrtRuntime(const RuntimeOptions& opt) : threads_(opt.threads) {
    std::string lib = opt.ort_library;
    if (lib.empty() && std::getenv("XP_ORT_LIBRARY")) lib = std::getenv("XP_ORT_LIBRARY");
    if (lib.empty()) lib = XP_ORT_DEFAULT_LIBRARY;
    if (lib.empty())
      fail(XP_ERR_BACKEND, "no ONNX Runtime library: set XP_ORT_LIBRARY (or xp_context_params.ort_library) to "
                           "libonnxruntime.so.1.x, e.g. the one in the onnxruntime Python wheel (onnxruntime/capi/)");
    handle_ = dlopen(lib.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle_) fail(XP_ERR_BACKEND, "cannot load ONNX Runtime '" + lib + "': " + dlerror() + "; set XP_ORT_LIBRARY");
    using GetApiBase = const OrtApiBase* (*)();
    auto get = reinterpret_cast<GetApiBase>(dlsym(handle_, "OrtGetApiBase"));
    if (!get) fail(XP_ERR_BACKEND, "'" + lib + "' does not export OrtGetApiBase: not an ONNX Runtime library");
    const OrtApiBase* base = get();
    version_ = base->GetVersionString();
    api_ = base->GetApi(ORT_API_VERSION);
    if (!api_)
      fail(XP_ERR_BACKEND, "ONNX Runtime " + version_ + " at '" + lib + "' is older than the C API header (API " +
                               std::to_string(ORT_API_VERSION) + "): use a newer library or older headers");
    check(api_->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "xportrait-host", &env_), "CreateEnv");
    check(api_->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &mem_), "CreateCpuMemoryInfo");
  }

  ~OrtRuntime() override {
    if (api_ && mem_) api_->ReleaseMemoryInfo(mem_);
    if (api_ && env_) api_->ReleaseEnv(env_);
    // The library stays loaded: ONNX Runtime does not support being unloaded and reloaded.
  }

  std::unique_ptr<Graph> load(const GraphEntry& entry, const std::string& folder) override;
  std::string name() const override { return "onnxruntime " + version_; }

  void check(OrtStatus* st, const std::string& what) const {
    if (!st) return;
    std::string msg = api_->GetErrorMessage(st);
    api_->ReleaseStatus(st);
    fail(XP_ERR_BACKEND, "ONNX Runtime " + what + ": " + msg);
  }

  const OrtApi* api_ = nullptr;
  OrtEnv* env_ = nullptr;
  OrtMemoryInfo* mem_ = nullptr;
  int threads_ = 0;

 private:
  void* handle_ = nullptr;
  std::string version_;
};

class OrtGraph : public Graph {
 public:
  OrtGraph(OrtRuntime& rt, const GraphEntry& entry, const std::string& path) : rt_(rt), entry_(entry) {
    const OrtApi* api = rt.api_;
    OrtSessionOptions* so = nullptr;
    rt.check(api->CreateSessionOptions(&so), "CreateSessionOptions");
    struct Guard {
      const OrtApi* api;
      OrtSessionOptions* so;
      ~Guard() { api->ReleaseSessionOptions(so); }
    } guard{api, so};
    if (rt.threads_ > 0) rt.check(api->SetIntraOpNumThreads(so, rt.threads_), "SetIntraOpNumThreads");
    rt.check(api->SetSessionGraphOptimizationLevel(so, ORT_ENABLE_ALL), "SetSessionGraphOptimizationLevel");
    OrtStatus* st = api->CreateSession(rt.env_, path.c_str(), so, &session_);
    if (st) {
      std::string msg = api->GetErrorMessage(st);
      api->ReleaseStatus(st);
      fail(XP_ERR_GRAPH, "cannot load graph '" + path + "' (" + msg + "): the file is missing or corrupt; re-export it");
    }
    check_io(entry, io(true), io(false), path);
    for (const IoSpec& s : entry.inputs) in_names_.push_back(s.name.c_str());
    for (const IoSpec& s : entry.outputs) out_names_.push_back(s.name.c_str());
  }

  ~OrtGraph() override {
    if (session_) rt_.api_->ReleaseSession(session_);
  }

  void run(const std::vector<const Tensor*>& inputs, const std::vector<Tensor*>& outputs) override {
    const OrtApi* api = rt_.api_;
    std::vector<OrtValue*> in(inputs.size(), nullptr), out(outputs.size(), nullptr);
    struct Values {
      const OrtApi* api;
      std::vector<OrtValue*>* a;
      std::vector<OrtValue*>* b;
      ~Values() {
        for (auto* v : *a) if (v) api->ReleaseValue(v);
        for (auto* v : *b) if (v) api->ReleaseValue(v);
      }
    } release{api, &in, &out};
    for (size_t i = 0; i < inputs.size(); ++i) in[i] = wrap(*const_cast<Tensor*>(inputs[i]));
    for (size_t i = 0; i < outputs.size(); ++i) out[i] = wrap(*outputs[i]);
    rt_.check(api->Run(session_, nullptr, in_names_.data(), in.data(), in.size(), out_names_.data(), out.size(),
                       out.data()),
              "Run(" + entry_.name + ")");
  }

 private:
  OrtValue* wrap(Tensor& t) {
    OrtValue* v = nullptr;
    rt_.check(rt_.api_->CreateTensorWithDataAsOrtValue(rt_.mem_, t.data(), t.bytes.size(), t.shape.data(),
                                                        t.shape.size(), ort_type(t.dtype), &v),
              "CreateTensorWithDataAsOrtValue(" + t.name + ")");
    return v;
  }

  std::vector<IoSpec> io(bool inputs) {
    const OrtApi* api = rt_.api_;
    OrtAllocator* alloc = nullptr;
    rt_.check(api->GetAllocatorWithDefaultOptions(&alloc), "GetAllocatorWithDefaultOptions");
    size_t n = 0;
    rt_.check(inputs ? api->SessionGetInputCount(session_, &n) : api->SessionGetOutputCount(session_, &n), "count");
    std::vector<IoSpec> out;
    const auto& declared = inputs ? entry_.inputs : entry_.outputs;
    for (size_t i = 0; i < n; ++i) {
      char* name = nullptr;
      rt_.check(inputs ? api->SessionGetInputName(session_, i, alloc, &name)
                       : api->SessionGetOutputName(session_, i, alloc, &name), "name");
      IoSpec s;
      s.name = name;
      rt_.check(api->AllocatorFree(alloc, name), "AllocatorFree");
      OrtTypeInfo* ti = nullptr;
      rt_.check(inputs ? api->SessionGetInputTypeInfo(session_, i, &ti) : api->SessionGetOutputTypeInfo(session_, i, &ti),
                "type info");
      const OrtTensorTypeAndShapeInfo* tinfo = nullptr;
      ONNXTensorElementDataType et = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
      size_t nd = 0;
      rt_.check(api->CastTypeInfoToTensorInfo(ti, &tinfo), "CastTypeInfoToTensorInfo");
      if (tinfo) {
        rt_.check(api->GetTensorElementType(tinfo, &et), "GetTensorElementType");
        rt_.check(api->GetDimensionsCount(tinfo, &nd), "GetDimensionsCount");
        s.shape.resize(nd);
        rt_.check(api->GetDimensions(tinfo, s.shape.data(), nd), "GetDimensions");
      }
      api->ReleaseTypeInfo(ti);
      if (!from_ort_type(et, &s.dtype))
        fail(XP_ERR_GRAPH, entry_.name + ": " + s.name + " has an element type the host does not handle; re-export");
      // An output dim the graph leaves symbolic (-1) is checked when Run fills the pre-allocated buffer.
      if (!inputs && i < declared.size() && s.shape.size() == declared[i].shape.size())
        for (size_t d = 0; d < nd; ++d)
          if (s.shape[d] < 0) s.shape[d] = declared[i].shape[d];
      out.push_back(std::move(s));
    }
    return out;
  }

  OrtRuntime& rt_;
  const GraphEntry& entry_;
  OrtSession* session_ = nullptr;
  std::vector<const char*> in_names_, out_names_;
};

std::unique_ptr<Graph> OrtRuntime::load(const GraphEntry& entry, const std::string& folder) {
  return std::make_unique<OrtGraph>(*this, entry, folder + "/" + entry.onnx_file);
}

}  // namespace

std::unique_ptr<Runtime> make_ort_runtime(const RuntimeOptions& opt) { return std::make_unique<OrtRuntime>(opt); }

}  // namespace xp
