// TensorRT / TensorRT-RTX backend (NvInfer.h; one source for both, XP_TRT_RTX set by CMake for
// TensorRT-RTX). Compiled only where CMake found the headers, the library and the CUDA runtime.
//
// Per context: one IRuntime, one explicit CUDA stream shared by its graphs (one call at a time per
// context, as xp.h says). Per graph: the plan is checked against the manifest (builder and version
// against the linked library, then I/O names, dtypes and shapes by name), device buffers are
// allocated once and bound by name, so the bindings never change and a CUDA graph can be replayed:
// TensorRT-RTX captures it itself (IRuntimeConfig, kWHOLE_GRAPH_CAPTURE); with full TensorRT the
// enqueue is captured with stream capture after one warm-up run, and replayed after that.
// Host tensors are copied in and out around each run (the pipeline's state lives on the host).
#include <cuda_runtime_api.h>

#include <NvInfer.h>
#include <NvInferVersion.h>

#include <fstream>
#include <iterator>
#include <mutex>
#include <string>
#include <vector>

#include "backend.h"
#include "error.h"
#include "safetensors.h"

namespace xp {

namespace {

#define XP_CUDA(call) cuda_check((call), #call, __FILE__, __LINE__)

void cuda_check(cudaError_t e, const char* what, const char* file, int line) {
  if (e != cudaSuccess)
    fail(XP_ERR_BACKEND, std::string(file) + ":" + std::to_string(line) + ": " + what + " failed: " +
                             cudaGetErrorString(e) + " (is a CUDA GPU visible? check nvidia-smi and the driver)");
}

#ifdef XP_TRT_RTX
constexpr const char* kBuilder = "tensorrt_rtx";
#else
constexpr const char* kBuilder = "tensorrt";
#endif

std::string header_version() {
  return std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) + "." +
         std::to_string(NV_TENSORRT_PATCH);
}

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity > Severity::kWARNING) return;
    std::lock_guard<std::mutex> lock(mu_);
    last_ = msg;
  }
  std::string last() {
    std::lock_guard<std::mutex> lock(mu_);
    return last_;
  }

 private:
  std::mutex mu_;
  std::string last_;
};

bool from_trt(nvinfer1::DataType t, DType* out) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: *out = DType::F32; return true;
    case nvinfer1::DataType::kHALF: *out = DType::F16; return true;
    case nvinfer1::DataType::kINT32: *out = DType::I32; return true;
    case nvinfer1::DataType::kINT64: *out = DType::I64; return true;
    default: return false;
  }
}

class TrtRuntime : public Runtime {
 public:
  explicit TrtRuntime(const RuntimeOptions& opt) : cuda_graphs_(opt.cuda_graphs) {
    XP_CUDA(cudaSetDevice(opt.cuda_device));
    XP_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) fail(XP_ERR_BACKEND, "createInferRuntime failed: " + logger_.last());
  }
  ~TrtRuntime() override {
    if (stream_) cudaStreamDestroy(stream_);
  }

  std::unique_ptr<Graph> load(const GraphEntry& entry, const std::string& folder) override;
  std::string name() const override { return std::string(kBuilder) + " " + header_version(); }

  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  cudaStream_t stream_ = nullptr;
  bool cuda_graphs_;
};

class TrtGraph : public Graph {
 public:
  TrtGraph(TrtRuntime& rt, const GraphEntry& entry, const std::string& folder) : rt_(rt), entry_(entry) {
    const std::string path = folder + "/" + entry.engine_file;
    if (entry.builder != kBuilder)
      fail(XP_ERR_UNSUPPORTED, path + " was built with " + entry.builder + " but this host links " + kBuilder +
                                   ": rebuild the plans with `python -m engines build " + folder + " --trt " + kBuilder +
                                   "`, or use the ONNX Runtime backend");
    if (entry.builder_version.compare(0, header_version().size() + 1, header_version() + ".") != 0 &&
        entry.builder_version != header_version())
      fail(XP_ERR_GRAPH, path + " was built with " + entry.builder + " " + entry.builder_version +
                             " but this host links " + header_version() + ": rebuild the plans with this version");
    const std::string plan = read_file(path, "TensorRT plan");
    engine_.reset(rt.runtime_->deserializeCudaEngine(plan.data(), plan.size()));
    if (!engine_)
      fail(XP_ERR_GRAPH, "cannot deserialize " + path + " (" + rt.logger_.last() +
                             "): the plan is corrupt or for another GPU/version; rebuild it");
    check_io(entry, specs(entry.inputs, true, path), specs(entry.outputs, false, path), path);
#ifdef XP_TRT_RTX
    std::unique_ptr<nvinfer1::IRuntimeConfig> cfg(engine_->createRuntimeConfig());
    if (cfg && rt.cuda_graphs_) cfg->setCudaGraphStrategy(nvinfer1::CudaGraphStrategy::kWHOLE_GRAPH_CAPTURE);
    context_.reset(cfg ? engine_->createExecutionContext(cfg.get()) : engine_->createExecutionContext());
#else
    context_.reset(engine_->createExecutionContext());
#endif
    if (!context_) fail(XP_ERR_BACKEND, path + ": createExecutionContext failed: " + rt.logger_.last());
    for (const auto* list : {&entry.inputs, &entry.outputs})
      for (const IoSpec& s : *list) {
        void* p = nullptr;
        XP_CUDA(cudaMalloc(&p, static_cast<size_t>(numel(s.shape)) * dtype_size(s.dtype)));
        buffers_.push_back(p);
        if (list == &entry.inputs) {
          nvinfer1::Dims d{};
          d.nbDims = static_cast<int32_t>(s.shape.size());
          for (size_t i = 0; i < s.shape.size(); ++i) d.d[i] = s.shape[i];
          if (!context_->setInputShape(s.name.c_str(), d))
            fail(XP_ERR_GRAPH, path + ": setInputShape(" + s.name + ") refused: " + rt.logger_.last());
        }
        if (!context_->setTensorAddress(s.name.c_str(), p))
          fail(XP_ERR_BACKEND, path + ": setTensorAddress(" + s.name + ") failed: " + rt.logger_.last());
      }
  }

  ~TrtGraph() override {
    if (exec_) cudaGraphExecDestroy(exec_);
    for (void* p : buffers_) cudaFree(p);
  }

  void run(const std::vector<const Tensor*>& inputs, const std::vector<Tensor*>& outputs) override {
    cudaStream_t s = rt_.stream_;
    for (size_t i = 0; i < inputs.size(); ++i)
      XP_CUDA(cudaMemcpyAsync(buffers_[i], inputs[i]->data(), inputs[i]->bytes.size(), cudaMemcpyHostToDevice, s));
    enqueue(s);
    for (size_t i = 0; i < outputs.size(); ++i)
      XP_CUDA(cudaMemcpyAsync(outputs[i]->data(), buffers_[inputs.size() + i], outputs[i]->bytes.size(),
                              cudaMemcpyDeviceToHost, s));
    XP_CUDA(cudaStreamSynchronize(s));  // the pipeline reads the outputs on the host next
  }

 private:
  void enqueue(cudaStream_t s) {
#ifndef XP_TRT_RTX
    if (exec_) {
      XP_CUDA(cudaGraphLaunch(exec_, s));
      return;
    }
    if (rt_.cuda_graphs_ && runs_ == 1 && !capture_failed_) {  // capture after one warm-up run
      cudaGraph_t g = nullptr;
      XP_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
      bool ok = context_->enqueueV3(s);
      cudaError_t end = cudaStreamEndCapture(s, &g);
      if (ok && end == cudaSuccess && g && cudaGraphInstantiate(&exec_, g, 0) == cudaSuccess) {
        cudaGraphDestroy(g);
        XP_CUDA(cudaGraphLaunch(exec_, s));
        return;
      }
      if (g) cudaGraphDestroy(g);
      cudaGetLastError();  // clear the capture error; run without graphs from now on
      exec_ = nullptr;
      capture_failed_ = true;
    }
#endif
    if (!context_->enqueueV3(s)) fail(XP_ERR_BACKEND, entry_.name + ": enqueueV3 failed: " + rt_.logger_.last());
    ++runs_;
  }

  std::vector<IoSpec> specs(const std::vector<IoSpec>& declared, bool inputs, const std::string& path) {
    std::vector<IoSpec> out;
    const int n = engine_->getNbIOTensors();
    int count = 0;
    for (int i = 0; i < n; ++i)
      if ((engine_->getTensorIOMode(engine_->getIOTensorName(i)) == nvinfer1::TensorIOMode::kINPUT) == inputs) ++count;
    for (const IoSpec& want : declared) {
      const char* name = want.name.c_str();
      IoSpec s;
      s.name = want.name;
      if (engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kNONE)
        fail(XP_ERR_GRAPH, path + " has no tensor '" + want.name + "': rebuild the plan from this export");
      if (!from_trt(engine_->getTensorDataType(name), &s.dtype))
        fail(XP_ERR_GRAPH, path + ": '" + want.name + "' has a dtype the host does not handle");
      nvinfer1::Dims d = engine_->getTensorShape(name);
      for (int k = 0; k < d.nbDims; ++k) s.shape.push_back(d.d[k]);
      out.push_back(std::move(s));
    }
    if (count != static_cast<int>(declared.size()))
      fail(XP_ERR_GRAPH, path + " has " + std::to_string(count) + (inputs ? " inputs" : " outputs") +
                             ", the manifest lists " + std::to_string(declared.size()) + ": rebuild the plan");
    return out;
  }

  TrtRuntime& rt_;
  const GraphEntry& entry_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  std::vector<void*> buffers_;  // inputs then outputs, in manifest order
  cudaGraphExec_t exec_ = nullptr;
  int runs_ = 0;
  bool capture_failed_ = false;
};

std::unique_ptr<Graph> TrtRuntime::load(const GraphEntry& entry, const std::string& folder) {
  if (!entry.has_plan())
    fail(XP_ERR_GRAPH, folder + ": graph " + entry.name + " has no plan; build them with `python -m engines build " +
                           folder + "` or use the ONNX Runtime backend");
  return std::make_unique<TrtGraph>(*this, entry, folder);
}

}  // namespace

bool trt_built() { return true; }
std::unique_ptr<Runtime> make_trt_runtime(const RuntimeOptions& opt) { return std::make_unique<TrtRuntime>(opt); }

}  // namespace xp
