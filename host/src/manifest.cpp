// manifest.json reader for the host (see manifest.h). Every problem is an XP_ERR_MANIFEST that
// names the field and the fix; the Python side (engines/manifest.py) validates the same file.
#include "manifest.h"

#include "error.h"
#include "json.h"
#include "safetensors.h"

namespace xp {

namespace {

const char* kReexport = "; re-export with `python -m export --preset NAME --out DIR` (docs/export.md)";

// The stage sequence this host implements for protocol xportrait-stream/1 ("at:graph" or "at:op").
const std::vector<std::string> kStages = {
    "source:encoder",      "source_step:reference",  "source:init",        "frame:hint",
    "frame:start",         "frame_step:control",     "frame_step:unet",    "frame_step:unet_uncond",
    "frame_step:ring_write", "frame_step:cfg",       "frame_step:sampler_step", "frame:ring_advance",
    "frame:decoder"};

std::vector<IoSpec> io_list(const Json& list, const std::string& what) {
  std::vector<IoSpec> out;
  const auto& items = list.array(what);
  for (size_t i = 0; i < items.size(); ++i) {
    const std::string w = what + "[" + std::to_string(i) + "]";
    IoSpec s;
    s.name = items[i].at("name", w).str(w + ".name");
    s.dtype = dtype_from_name(items[i].at("dtype", w).str(w + ".dtype"), w + ".dtype");
    for (const Json& d : items[i].at("shape", w).array(w + ".shape")) {
      if (d.is_string())
        fail(XP_ERR_UNSUPPORTED, w + " (" + s.name + "): dynamic dim '" + d.str(w) +
                                     "'; the host runs static exports: export without --dynamic");
      s.shape.push_back(d.integer(w + ".shape"));
    }
    out.push_back(std::move(s));
  }
  return out;
}

std::vector<std::pair<std::string, std::string>> name_map(const Json& st, const char* key, const std::string& w) {
  std::vector<std::pair<std::string, std::string>> out;
  if (!st.has(key)) return out;
  for (const auto& kv : st.at(key, w).object(w + "." + key)) out.emplace_back(kv.first, kv.second.str(w + "." + key));
  return out;
}

std::vector<double> numbers(const Json& j, const std::string& what, size_t n) {
  std::vector<double> out;
  for (const Json& v : j.array(what)) out.push_back(v.number(what));
  if (out.size() != n)
    fail(XP_ERR_MANIFEST, what + ": " + std::to_string(out.size()) + " numbers for " + std::to_string(n) + " steps" +
                              kReexport);
  return out;
}

void read_sampler(const Json& s, Sampler& out) {
  out.name = s.at("name", "sampler").str("sampler.name");
  for (const Json& t : s.at("timesteps", "sampler").array("sampler.timesteps"))
    out.timesteps.push_back(t.integer("sampler.timesteps"));
  const size_t n = out.timesteps.size();
  if (n == 0) fail(XP_ERR_MANIFEST, std::string("sampler.timesteps: empty") + kReexport);
  const Json& step = s.at("step", "sampler");
  out.x = numbers(step.at("x", "sampler.step"), "sampler.step.x", n);
  out.eps = numbers(step.at("eps", "sampler.step"), "sampler.step.eps", n);
  out.noise = numbers(step.at("noise", "sampler.step"), "sampler.step.noise", n);
  const Json& init = s.at("init", "sampler");
  const std::string def = init.at("default", "sampler.init").str("sampler.init.default");
  const Json& d = init.at(def, "sampler.init");
  out.init_latent = d.at("latent", "sampler.init." + def).number("sampler.init.latent");
  out.init_noise = d.at("noise", "sampler.init." + def).number("sampler.init.noise");
  const Json& pure = init.at("noise", "sampler.init");
  out.noise_only_latent = pure.at("latent", "sampler.init.noise").number("sampler.init.noise.latent");
  out.noise_only_noise = pure.at("noise", "sampler.init.noise").number("sampler.init.noise.noise");
  out.cfg_scale = s.at("cfg", "sampler").at("scale", "sampler.cfg").number("sampler.cfg.scale");
}

void read_pipeline(const Json& p, Manifest& m) {
  const std::string protocol = p.at("protocol", "pipeline").str("pipeline.protocol");
  if (protocol != kProtocol)
    fail(XP_ERR_MANIFEST, "pipeline.protocol is '" + protocol + "' but this host runs '" + kProtocol + "'" + kReexport +
                              " or rebuild the host from the same commit");
  for (const auto& kv : p.at("graphs", "pipeline").object("pipeline.graphs"))
    m.roles[kv.first] = kv.second.is_null() ? "" : kv.second.str("pipeline.graphs." + kv.first);
  for (const char* role : {"encoder", "reference", "hint", "control", "unet", "decoder"})
    if (m.roles[role].empty()) fail(XP_ERR_MANIFEST, std::string("pipeline.graphs.") + role + ": no graph" + kReexport);
  std::vector<std::string> want;
  for (const std::string& s : kStages)
    if (s != "frame_step:unet_uncond" || !m.roles["unet_uncond"].empty()) want.push_back(s);
  const auto& stages = p.at("stages", "pipeline").array("pipeline.stages");
  std::vector<std::string> got;
  for (size_t i = 0; i < stages.size(); ++i) {
    const std::string w = "pipeline.stages[" + std::to_string(i) + "]";
    Stage st;
    st.at = stages[i].at("at", w).str(w + ".at");
    if (stages[i].has("graph")) st.graph = stages[i].at("graph", w).str(w + ".graph");
    if (stages[i].has("op")) st.op = stages[i].at("op", w).str(w + ".op");
    if (stages[i].has("when")) st.when = stages[i].at("when", w).str(w + ".when");
    st.inputs = name_map(stages[i], "inputs", w);
    st.outputs = name_map(stages[i], "outputs", w);
    got.push_back(st.at + ":" + (st.graph.empty() ? st.op : st.graph));
    m.stages.push_back(std::move(st));
  }
  if (got != want) {
    std::string g, e;
    for (const auto& s : got) g += " " + s;
    for (const auto& s : want) e += " " + s;
    fail(XP_ERR_MANIFEST, "pipeline.stages are [" + g + " ] but protocol " + kProtocol + " in this host is [" + e +
                              " ]" + kReexport);
  }
}

}  // namespace

std::string resolve_name(const std::vector<std::pair<std::string, std::string>>& map, const std::string& name) {
  for (const auto& kv : map) {
    const std::string& pat = kv.first;
    if (pat == name) return kv.second;
    if (!pat.empty() && pat.back() == '*' && name.compare(0, pat.size() - 1, pat, 0, pat.size() - 1) == 0) {
      const std::string rest = name.substr(pat.size() - 1);
      std::string key = kv.second;
      size_t star = key.find('*');
      if (star != std::string::npos) key.replace(star, 1, rest);
      return key;
    }
  }
  return "";
}

const GraphEntry& Manifest::graph_for(const std::string& role) const {
  auto it = roles.find(role);
  if (it != roles.end() && !it->second.empty())
    for (const GraphEntry& g : graphs)
      if (g.name == it->second) return g;
  fail(XP_ERR_MANIFEST, folder + "/manifest.json: no graph for role '" + role + "'" + kReexport);
}

bool Manifest::has_role(const std::string& role) const {
  auto it = roles.find(role);
  return it != roles.end() && !it->second.empty();
}

Manifest load_manifest(const std::string& folder) {
  Manifest m;
  m.folder = folder;
  const std::string path = folder + "/manifest.json";
  const Json doc = Json::parse(read_file(path, "manifest (is this an export folder?)"), path);
  const std::string schema = doc.at("schema", path).str("schema");
  if (schema != kSchema)
    fail(XP_ERR_MANIFEST, path + ": schema '" + schema + "' but this host reads '" + kSchema + "'" + kReexport);
  const auto& engines = doc.at("engines", path).array("engines");
  for (size_t i = 0; i < engines.size(); ++i) {
    const std::string w = "engines[" + std::to_string(i) + "]";
    GraphEntry g;
    g.name = engines[i].at("name", w).str(w + ".name");
    g.runs = engines[i].at("runs", w).str(w + ".runs");
    g.onnx_file = engines[i].at("onnx", w).at("file", w + ".onnx").str(w + ".onnx.file");
    g.inputs = io_list(engines[i].at("inputs", w), w + ".inputs");
    g.outputs = io_list(engines[i].at("outputs", w), w + ".outputs");
    if (engines[i].has("engine") && !engines[i].at("engine", w).is_null()) {
      g.engine_file = engines[i].at("engine", w).at("file", w + ".engine").str(w + ".engine.file");
      const Json& b = engines[i].at("build", w);
      g.builder = b.at("builder", w + ".build").str(w + ".build.builder");
      g.builder_version = b.at("builder_version", w + ".build").str(w + ".build.builder_version");
    }
    m.graphs.push_back(std::move(g));
  }
  if (!doc.has("pipeline") || !doc.has("sampler"))
    fail(XP_ERR_MANIFEST, path + ": no 'pipeline'/'sampler' block" + kReexport);
  read_pipeline(doc.at("pipeline", path), m);
  read_sampler(doc.at("sampler", path), m.sampler);
  const Json& ctx = doc.at("caches", path).at("context", "caches");
  m.context_file = ctx.at("file", "caches.context").str("caches.context.file");
  m.context_key = ctx.at("key", "caches.context").str("caches.context.key");
  const auto& size = doc.at("pipeline", path).at("images", "pipeline").at("size", "pipeline.images")
                         .array("pipeline.images.size");
  if (size.size() != 2) fail(XP_ERR_MANIFEST, std::string("pipeline.images.size: expected [H, W]") + kReexport);
  m.image_h = static_cast<int>(size[0].integer("pipeline.images.size"));
  m.image_w = static_cast<int>(size[1].integer("pipeline.images.size"));
  if (doc.has("preset") && doc.at("preset", path).has("precision"))
    m.precision = doc.at("preset", path).at("precision", "preset").str("preset.precision");
  return m;
}

}  // namespace xp
