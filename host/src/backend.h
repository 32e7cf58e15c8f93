// Backends behind one interface (style rule 6): a Runtime loads one Graph per manifest entry and
// checks its I/O names, shapes and dtypes against the manifest; Graph::run takes host tensors in
// the manifest's input order and fills host tensors in its output order. ONNX Runtime (C API,
// loaded with dlopen) is always built; TensorRT / TensorRT-RTX only where NvInfer.h was found.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "manifest.h"
#include "tensor.h"

namespace xp {

class Graph {
 public:
  virtual ~Graph() = default;
  // inputs[i] matches entry.inputs[i] (dtype and shape); outputs[i] matches entry.outputs[i].
  virtual void run(const std::vector<const Tensor*>& inputs, const std::vector<Tensor*>& outputs) = 0;
};

class Runtime {
 public:
  virtual ~Runtime() = default;
  virtual std::unique_ptr<Graph> load(const GraphEntry& entry, const std::string& folder) = 0;
  virtual std::string name() const = 0;  // e.g. "onnxruntime 1.32.0"
};

struct RuntimeOptions {
  std::string ort_library;  // empty: $XP_ORT_LIBRARY, then XP_ORT_DEFAULT_LIBRARY (found at build time)
  int threads = 0;
  int cuda_device = 0;
  bool cuda_graphs = true;
};

std::unique_ptr<Runtime> make_ort_runtime(const RuntimeOptions& opt);
std::unique_ptr<Runtime> make_trt_runtime(const RuntimeOptions& opt);  // XP_ERR_UNSUPPORTED without TensorRT
bool trt_built();

// Compare a loaded graph's I/O with the manifest entry; `found` lists the graph's own view.
void check_io(const GraphEntry& entry, const std::vector<IoSpec>& found_inputs,
              const std::vector<IoSpec>& found_outputs, const std::string& file);

}  // namespace xp
