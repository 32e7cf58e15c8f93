// manifest.json (schema xportrait-engines/2) as the host needs it: the graphs with their I/O, the
// pipeline stages (protocol xportrait-stream/1), the sampler's per-step affine update and x_T, the
// context file and the image size. Everything the host runs comes from here; docs/engines.md
// describes the fields and docs/host.md the protocol.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "tensor.h"

namespace xp {

constexpr const char* kSchema = "xportrait-engines/2";
constexpr const char* kProtocol = "xportrait-stream/1";

struct IoSpec {
  std::string name;
  DType dtype;
  Shape shape;
};

struct GraphEntry {
  std::string name, runs, onnx_file;
  std::vector<IoSpec> inputs, outputs;
  std::string engine_file, builder, builder_version;  // empty when no plan was built
  bool has_plan() const { return !engine_file.empty(); }
};

// One pipeline stage: a graph role or a host op, with name patterns ("ref_*") mapped to state keys.
struct Stage {
  std::string at, graph, op, when;
  std::vector<std::pair<std::string, std::string>> inputs, outputs;
};

struct Sampler {
  std::string name;
  std::vector<long long> timesteps;
  std::vector<double> x, eps, noise;  // x_next = x[i]*x + eps[i]*eps + noise[i]*noise_step[i]
  double init_latent = 0, init_noise = 1, noise_only_latent = 0, noise_only_noise = 1;
  double cfg_scale = 1;
};

struct Manifest {
  std::string folder, precision;
  std::vector<GraphEntry> graphs;
  std::map<std::string, std::string> roles;  // role -> graph name ("" for null)
  std::vector<Stage> stages;
  Sampler sampler;
  std::string context_file, context_key;
  int image_h = 0, image_w = 0;

  const GraphEntry& graph_for(const std::string& role) const;  // throws when the role has no graph
  bool has_role(const std::string& role) const;
};

// Reads and checks FOLDER/manifest.json: schema, protocol, static shapes, roles, sampler lengths.
Manifest load_manifest(const std::string& folder);

// Resolve a graph I/O name through a stage's patterns: "ref_k_03" with {"ref_*": "ref[i].ref_*"}
// gives "ref[i].ref_k_03"; returns "" when no pattern matches.
std::string resolve_name(const std::vector<std::pair<std::string, std::string>>& map, const std::string& name);

}  // namespace xp
