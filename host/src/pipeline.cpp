// The streaming pipeline (see pipeline.h). Stage order, graph names and every tensor binding come
// from manifest.json; this file implements the host ops of protocol xportrait-stream/1.
#include "pipeline.h"

#include <cmath>
#include <cstring>

#include "error.h"
#include "image.h"
#include "safetensors.h"

namespace xp {

namespace {

// "ref[i].ref_k_00" at step 2 -> "ref[2].ref_k_00"
std::string at_step(std::string key, int i) {
  for (size_t p = key.find("[i]"); p != std::string::npos; p = key.find("[i]")) key.replace(p, 3, "[" + std::to_string(i) + "]");
  return key;
}

// Standard normal noise from a seed: splitmix64 + Box-Muller (the host need not match torch's RNG;
// pass a noise file to reproduce a Python run).
void fill_normal(Tensor& t, uint64_t& state) {
  auto next = [&state]() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  };
  float* p = t.f32();
  for (int64_t k = 0; k < t.count(); k += 2) {
    double u1 = (static_cast<double>(next() >> 11) + 1.0) / 9007199254740993.0;  // (0, 1]
    double u2 = static_cast<double>(next() >> 11) / 9007199254740992.0;
    double r = std::sqrt(-2.0 * std::log(u1)), a = 6.283185307179586 * u2;
    p[k] = static_cast<float>(r * std::cos(a));
    if (k + 1 < t.count()) p[k + 1] = static_cast<float>(r * std::sin(a));
  }
}

const char* kRoles[] = {"encoder", "reference", "hint", "control", "unet", "unet_uncond", "decoder"};

}  // namespace

// ------------------------------------------------------------------------------------ context
Context::Context(const std::string& folder, const xp_context_params& p) : m(load_manifest(folder)) {
  RuntimeOptions opt;
  opt.ort_library = p.ort_library ? p.ort_library : "";
  opt.threads = p.threads;
  opt.cuda_device = p.cuda_device;
  opt.cuda_graphs = p.cuda_graphs != 0;
  bool plans = true;
  for (const char* role : kRoles)
    if (m.has_role(role)) plans = plans && m.graph_for(role).has_plan();
  const bool trt = p.backend == XP_BACKEND_TENSORRT || (p.backend == XP_BACKEND_AUTO && plans && trt_built());
  runtime = trt ? make_trt_runtime(opt) : make_ort_runtime(opt);
  for (const char* role : kRoles)
    if (m.has_role(role)) graphs[role] = runtime->load(m.graph_for(role), folder);

  auto file = read_safetensors(folder + "/" + m.context_file);
  auto it = file.find(m.context_key);
  if (it == file.end()) fail(XP_ERR_IO, folder + "/" + m.context_file + " has no tensor '" + m.context_key + "'; re-export");
  context = it->second;
  context.name = "context";
  if (context.dtype != DType::F32) context = Tensor("context", DType::F32, it->second.shape), convert_into(it->second, context);
  for (long long t : m.sampler.timesteps) {
    Tensor ts("t", DType::F32, {1});
    ts.f32()[0] = static_cast<float>(t);
    timesteps.push_back(ts);
  }
  latent = m.graph_for("encoder").outputs.at(0).shape;
  for (const IoSpec& s : m.graph_for("unet").inputs) {
    if (s.name == "x" && (s.shape.empty() || s.shape[0] != 1))
      fail(XP_ERR_UNSUPPORTED, "unet_stream takes a batch of " + std::to_string(s.shape.empty() ? 0 : s.shape[0]) +
                                   " streams; a host state is one stream: export with --batch 1");
    if (s.name.rfind("k_cache_", 0) == 0 && ring_slots == 0) ring_slots = static_cast<int>(s.shape.at(0));
  }
  if (ring_slots < 2) fail(XP_ERR_MANIFEST, "unet_stream has no k_cache_* input with >= 2 slots; re-export");
}

// ------------------------------------------------------------------------------------ session
Session::Session(Context& ctx, const xp_state_params& p) : ctx_(ctx), timing_(p.timings != 0) {
  cfg_scale_ = p.cfg_scale > 0 ? p.cfg_scale : static_cast<float>(ctx.m.sampler.cfg_scale);
  if (cfg_scale_ != 1.0f && !ctx.m.has_role("unet_uncond"))
    fail(XP_ERR_INVALID_ARGUMENT, "CFG scale " + std::to_string(cfg_scale_) +
                                      " needs the unconditional graph: export unet_stream_uncond, or use scale 1");
  init_latent_ = p.init_noise_only ? ctx.m.sampler.noise_only_latent : ctx.m.sampler.init_latent;
  init_noise_ = p.init_noise_only ? ctx.m.sampler.noise_only_noise : ctx.m.sampler.init_noise;
  const size_t steps = ctx.m.sampler.timesteps.size();
  Shape step_shape = ctx.latent;  // (S, 4, h, w): one latent-sized noise per step
  step_shape[0] = static_cast<int64_t>(steps);
  if (p.noise_file) {
    auto f = read_safetensors(p.noise_file);
    for (const char* k : {"init", "step"})
      if (!f.count(k) || f[k].dtype != DType::F32)
        fail(XP_ERR_INVALID_ARGUMENT, std::string(p.noise_file) + ": needs float32 tensors 'init' " + shape_str(ctx.latent) +
                                          " and 'step' " + shape_str(step_shape) + " (docs/host.md)");
    if (f["init"].shape != ctx.latent || f["step"].shape != step_shape)
      fail(XP_ERR_INVALID_ARGUMENT, std::string(p.noise_file) + ": 'init' is " + shape_str(f["init"].shape) + " and 'step' " +
                                        shape_str(f["step"].shape) + ", expected " + shape_str(ctx.latent) + " and " +
                                        shape_str(step_shape));
    noise_init_ = f["init"];
    const size_t per = static_cast<size_t>(numel(ctx.latent));
    for (size_t i = 0; i < steps; ++i) {
      Tensor t("noise_step", DType::F32, ctx.latent);
      std::memcpy(t.f32(), f["step"].f32() + i * per, per * sizeof(float));
      noise_step_.push_back(std::move(t));
    }
  } else {
    uint64_t state = p.seed;
    noise_init_ = Tensor("noise_init", DType::F32, ctx.latent);
    fill_normal(noise_init_, state);
    for (size_t i = 0; i < steps; ++i) {
      noise_step_.emplace_back("noise_step", DType::F32, ctx.latent);
      fill_normal(noise_step_.back(), state);
    }
  }
  reset();
}

void Session::reset() {
  // Zero every ring tensor (caches and counters) of every step and branch the unet stages read.
  for (const Stage& st : ctx_.m.stages) {
    if ((st.graph != "unet" && st.graph != "unet_uncond") || !stage_enabled(st)) continue;
    const GraphEntry& g = ctx_.m.graph_for(st.graph);
    for (const IoSpec& s : g.inputs) {
      const std::string key = resolve_name(st.inputs, s.name);
      if (key.rfind("ring[", 0) != 0) continue;
      for (size_t i = 0; i < ctx_.timesteps.size(); ++i) store(at_step(key, static_cast<int>(i)), s.dtype, s.shape);
    }
  }
  for (auto& kv : tensors_)
    if (kv.first.rfind("ring[", 0) == 0) std::memset(kv.second.data(), 0, kv.second.bytes.size());
  has_time_ = false;
}

Tensor& Session::store(const std::string& key, DType t, const Shape& s) {
  Tensor& dst = tensors_[key];
  if (dst.dtype != t || dst.shape != s || dst.bytes.empty()) dst = Tensor(key, t, s);
  return dst;
}

const Tensor& Session::lookup(const std::string& key) const {
  if (key == "context") return ctx_.context;
  const std::string ts = "sampler.timesteps[";
  if (key.rfind(ts, 0) == 0) return ctx_.timesteps.at(static_cast<size_t>(std::stoi(key.substr(ts.size()))));
  auto it = tensors_.find(key);
  if (it == tensors_.end())
    fail(XP_ERR_STATE, "pipeline state '" + key + "' was never written: call xp_set_source before xp_push_frame "
                       "(or the manifest's stages read a tensor no earlier stage writes; re-export)");
  return it->second;
}

void Session::set_source(const xp_image& img) {
  tensors_["host.source"] = image_to_tensor(img, ctx_.m.image_h, ctx_.m.image_w, "source");
  has_source_ = false;
  run_stages("source");
  reset();
  has_source_ = true;
}

void Session::push(const xp_frame& frame, double timestamp, xp_output* out) {
  if (!has_source_) fail(XP_ERR_STATE, "no source image yet: call xp_set_source first");
  if (has_time_ && !(timestamp > last_time_))
    fail(XP_ERR_INVALID_ARGUMENT, "timestamp " + std::to_string(timestamp) + " is not after the previous frame's " +
                                      std::to_string(last_time_) + ": drop stale frames, or call xp_reset for a new clip");
  const int h = ctx_.m.image_h, w = ctx_.m.image_w;
  Tensor pose = image_to_tensor(frame.pose, h, w, "pose_hint");
  if (frame.local.rgb) {
    tensors_["host.local_hint"] = image_to_tensor(frame.local, h, w, "local_hint");
  } else {
    if (frame.centres) std::memcpy(centres_, frame.centres, sizeof centres_), has_centres_ = true;
    if (!has_centres_)
      fail(XP_ERR_INVALID_ARGUMENT, "no local hint: give xp_frame.local or the eye and mouth centres "
                                    "(xp_frame.centres) at least once");
    tensors_["host.local_hint"] = local_hint(pose, centres_, "local_hint");
  }
  tensors_["host.pose_hint"] = std::move(pose);
  run_stages("frame");
  has_time_ = true;
  last_time_ = timestamp;
  ++timings_.frames;
  if (out) {
    tensor_to_output(lookup("host.output"), out);
    out->timestamp = timestamp;
  }
}

void Session::run_stages(const std::string& at) {
  const auto& stages = ctx_.m.stages;
  const int steps = static_cast<int>(ctx_.timesteps.size());
  for (size_t k = 0; k < stages.size();) {
    if (stages[k].at == at) {
      run_stage(stages[k], 0);
      ++k;
      continue;
    }
    if (stages[k].at != at + "_step") {
      ++k;
      continue;
    }
    size_t end = k;  // a run of consecutive per-step stages loops over the steps together
    while (end < stages.size() && stages[end].at == at + "_step") ++end;
    for (int i = 0; i < steps; ++i) {
      branches_run_.clear();
      for (size_t j = k; j < end; ++j) run_stage(stages[j], i);
    }
    k = end;
  }
}

bool Session::stage_enabled(const Stage& st) const {
  if (st.when.empty()) return true;
  if (st.when == "sampler.cfg.scale != 1") return cfg_scale_ != 1.0f;
  fail(XP_ERR_MANIFEST, "stage condition '" + st.when + "' is not known to this host; re-export or update the host");
}

int Session::stage_kind(const Stage& st) const {
  static const std::map<std::string, int> kinds = {
      {"encoder", XP_STAGE_ENCODE}, {"reference", XP_STAGE_REFERENCE}, {"hint", XP_STAGE_HINT},
      {"control", XP_STAGE_CONTROL}, {"unet", XP_STAGE_UNET}, {"unet_uncond", XP_STAGE_UNET_UNCOND},
      {"decoder", XP_STAGE_DECODE}};
  auto it = kinds.find(st.graph);
  return it == kinds.end() ? XP_STAGE_SAMPLER : it->second;
}

void Session::run_stage(const Stage& st, int i) {
  if (!stage_enabled(st)) return;
  const auto t0 = std::chrono::steady_clock::now();
  if (!st.graph.empty()) run_graph(st, i);
  else run_op(st, i);
  if (timing_) {
    const int k = stage_kind(st);
    timings_.ms[k] += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    ++timings_.calls[k];
  }
}

void Session::run_graph(const Stage& st, int i) {
  const GraphEntry& g = ctx_.m.graph_for(st.graph);
  std::vector<Tensor>& staging = staging_[st.graph];
  if (staging.empty())
    for (const IoSpec& s : g.inputs) staging.emplace_back(s.name, s.dtype, s.shape);
  std::vector<const Tensor*> ins;
  for (size_t k = 0; k < g.inputs.size(); ++k) {
    const IoSpec& s = g.inputs[k];
    const std::string key = resolve_name(st.inputs, s.name);
    if (key.empty())
      fail(XP_ERR_MANIFEST, "pipeline stage '" + st.graph + "' maps no source to input '" + s.name + "'; re-export");
    const Tensor& src = lookup(at_step(key, i));
    if (src.dtype == s.dtype && src.shape == s.shape) {
      ins.push_back(&src);
    } else {
      convert_into(src, staging[k]);
      ins.push_back(&staging[k]);
    }
  }
  std::vector<Tensor*> outs;
  for (const IoSpec& s : g.outputs) {
    std::string key = resolve_name(st.outputs, s.name);
    key = key.empty() ? "scratch." + st.graph + "." + s.name : at_step(key, i);
    outs.push_back(&store(key, s.dtype, s.shape));
  }
  ctx_.graphs.at(st.graph)->run(ins, outs);
  if (st.graph == "unet") branches_run_.push_back("cond");
  if (st.graph == "unet_uncond") branches_run_.push_back("uncond");
}

void Session::run_op(const Stage& st, int i) {
  if (st.op == "init") {  // x_T = a * z_src + b * noise_init
    const std::vector<float> z = to_f32(lookup("z_src"));
    Tensor& xt = store("x_T", DType::F32, ctx_.latent);
    if (z.size() != static_cast<size_t>(xt.count())) fail(XP_ERR_GRAPH, "encoder latent and x differ in size; re-export");
    for (size_t k = 0; k < z.size(); ++k)
      xt.f32()[k] = static_cast<float>(init_latent_ * z[k] + init_noise_ * noise_init_.f32()[k]);
  } else if (st.op == "start") {
    store("x", DType::F32, ctx_.latent) = lookup("x_T");
    tensors_["x"].name = "x";
  } else if (st.op == "ring_write") {
    ring_write(i);
  } else if (st.op == "cfg") {
    Tensor& eps = store("eps", DType::F32, ctx_.latent);
    const std::vector<float> c = to_f32(lookup("eps_cond"));
    if (cfg_scale_ == 1.0f) {
      std::memcpy(eps.f32(), c.data(), c.size() * sizeof(float));
    } else {
      const std::vector<float> u = to_f32(lookup("eps_uncond"));
      for (size_t k = 0; k < c.size(); ++k) eps.f32()[k] = u[k] + cfg_scale_ * (c[k] - u[k]);
    }
  } else if (st.op == "sampler_step") {
    const Sampler& s = ctx_.m.sampler;
    const auto si = static_cast<size_t>(i);
    Tensor& x = tensors_.at("x");
    const float* eps = lookup("eps").f32();
    const float* noise = noise_step_[si].f32();
    for (int64_t k = 0; k < x.count(); ++k)
      x.f32()[k] = static_cast<float>(s.x[si] * x.f32()[k] + s.eps[si] * eps[k] + s.noise[si] * noise[k]);
  } else if (st.op == "ring_advance") {
    ring_advance();
  } else {
    fail(XP_ERR_MANIFEST, "pipeline op '" + st.op + "' is not known to this host; update the host");
  }
}

// k_new/v_new of each branch that ran at step i -> slot write_slot[e] of its cache, per element e.
void Session::ring_write(int i) {
  for (const std::string& branch : branches_run_) {
    const std::string prefix = "ring[" + std::to_string(i) + "]." + branch + ".";
    const Tensor& ws = lookup(prefix + "write_slot");
    for (auto& kv : tensors_) {
      const std::string& key = kv.first;
      if (key.compare(0, prefix.size(), prefix) != 0) continue;
      const size_t p = key.find("_new_", prefix.size());
      if (p == std::string::npos) continue;
      const Tensor& fresh = kv.second;
      Tensor& cache = tensors_.at(std::string(key).replace(p, 5, "_cache_"));
      const int64_t slots = cache.shape.at(0), rows = fresh.shape.at(0), elements = ws.count();
      if (cache.dtype != fresh.dtype || numel(cache.shape) != slots * numel(fresh.shape) || rows % elements)
        fail(XP_ERR_GRAPH, key + " " + shape_str(fresh.shape) + " does not fit its ring " + shape_str(cache.shape) +
                               "; re-export");
      const size_t row_bytes = fresh.bytes.size() / static_cast<size_t>(rows);
      const size_t elem_bytes = row_bytes * static_cast<size_t>(rows / elements);
      for (int64_t e = 0; e < elements; ++e) {
        const int64_t slot = ((ws.i32()[e] % slots) + slots) % slots;
        std::memcpy(cache.bytes.data() + static_cast<size_t>(slot) * fresh.bytes.size() + static_cast<size_t>(e) * elem_bytes,
                    fresh.bytes.data() + static_cast<size_t>(e) * elem_bytes, elem_bytes);
      }
    }
  }
}

void Session::ring_advance() {
  const int L = ctx_.ring_slots;
  for (auto& kv : tensors_) {
    const std::string& key = kv.first;
    if (key.rfind("ring[", 0) != 0) continue;
    const bool ws = key.size() > 11 && key.compare(key.size() - 11, 11, ".write_slot") == 0;
    const bool np = key.size() > 7 && key.compare(key.size() - 7, 7, ".n_past") == 0;
    for (int64_t e = 0; (ws || np) && e < kv.second.count(); ++e) {
      int32_t& v = kv.second.i32()[e];
      v = ws ? (v + 1) % L : std::min(v + 1, L - 1);
    }
  }
}

}  // namespace xp
