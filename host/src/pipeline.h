// The streaming pipeline (protocol xportrait-stream/1, docs/host.md) driven by the manifest's
// stages: Context holds the manifest, the loaded graphs, the context tensor and timesteps (shared,
// read-only while running); Session is one stream (what a xp_state wraps): its named tensors
// (source latent, reference K/V per step, ring caches per step and branch, x), its noise and
// counters. Graph stages bind inputs and outputs by name through the stage's patterns, so the only
// protocol knowledge here is the host ops (init, start, ring_write, cfg, sampler_step, ring_advance).
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend.h"
#include "manifest.h"
#include "tensor.h"
#include "xp.h"

namespace xp {

struct Context {
  Manifest m;
  std::unique_ptr<Runtime> runtime;
  std::map<std::string, std::unique_ptr<Graph>> graphs;  // by role
  Tensor context;                                        // (1, 77, C) float32
  std::vector<Tensor> timesteps;                         // per step: (1,) float32
  Shape latent;                                          // (1, 4, h, w): the encoder's output
  int ring_slots = 0;

  Context(const std::string& folder, const xp_context_params& p);
};

class Session {
 public:
  Session(Context& ctx, const xp_state_params& p);
  void set_source(const xp_image& img);
  void push(const xp_frame& frame, double timestamp, xp_output* out);
  void reset();  // zero the rings and counters; keep the source
  const xp_timings& timings() const { return timings_; }

 private:
  void run_stages(const std::string& at_prefix);  // "source" or "frame" (with their *_step stages)
  void run_stage(const Stage& st, int i);
  void run_graph(const Stage& st, int i);
  void run_op(const Stage& st, int i);
  const Tensor& lookup(const std::string& key) const;
  Tensor& store(const std::string& key, DType t, const Shape& s);
  void ring_write(int i);
  void ring_advance();
  bool stage_enabled(const Stage& st) const;
  int stage_kind(const Stage& st) const;

  Context& ctx_;
  float cfg_scale_;
  double init_latent_, init_noise_;
  bool timing_;
  std::map<std::string, Tensor> tensors_;
  std::map<std::string, std::vector<Tensor>> staging_;  // per graph role: converted inputs
  std::vector<std::string> branches_run_;                // ring branches written in the current step
  Tensor noise_init_;
  std::vector<Tensor> noise_step_;
  bool has_source_ = false, has_time_ = false, has_centres_ = false;
  double last_time_ = 0;
  int centres_[6] = {0, 0, 0, 0, 0, 0};
  xp_timings timings_{};
};

}  // namespace xp
