// xp-animate: animate a source portrait with a folder of driving frames or a raw RGB24 stream,
// through the C API only (include/xp.h), and print per-stage timings.
//
//   xp-animate --export DIR --source src.ppm --frames drv/ [--local loc/] --out out/
//   ffmpeg -i drv.mp4 -vf scale=128:128 -f rawvideo -pix_fmt rgb24 - |
//     xp-animate --export DIR --source src.ppm --raw 128x128 --centres 40,52,88,52,64,92 --out - |
//     ffmpeg -f rawvideo -pix_fmt rgb24 -s 128x128 -r 25 -i - out.mp4
//
// Frames (PPM P6 files, sorted by name) are the driving frames already re-framed onto the source
// face (the pose hint); the local hint comes from --local (same file names) or from the eye/mouth
// centres (--centres x,y,x,y,x,y). Exit status: 0 ok, 1 error (message on stderr), 2 usage.
#include <dirent.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "error.h"
#include "image.h"
#include "safetensors.h"
#include "xp.h"

namespace {

const char* kUsage =
    "usage: xp-animate --export DIR --source IMG.ppm (--frames DIR [--local DIR] | --raw WxH) [--centres x,y,x,y,x,y]\n"
    "                  --out DIR|- [--dump FILE.safetensors] [--noise FILE] [--seed N] [--cfg S] [--init-noise]\n"
    "                  [--backend auto|ort|trt] [--threads N] [--fps F] [--max-frames N] [--timings]\n";

std::vector<std::string> ppm_files(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = opendir(dir.c_str());
  if (!d) xp::fail(XP_ERR_IO, "cannot open frame folder '" + dir + "'");
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n.size() > 4 && n.compare(n.size() - 4, 4, ".ppm") == 0) out.push_back(n);
  }
  closedir(d);
  std::sort(out.begin(), out.end());
  if (out.empty()) xp::fail(XP_ERR_IO, "no .ppm frames in '" + dir + "'");
  return out;
}

void check(xp_status s) {
  if (s != XP_OK) throw xp::Error(s, xp_last_error());
}

xp_image view(const xp::Rgb8& img) { return xp_image{img.data.data(), img.width, img.height, 0}; }

int run(std::map<std::string, std::string>& a) {
  for (const char* k : {"export", "source", "out"})
    if (!a.count(k)) throw std::invalid_argument(std::string("--") + k + " is required");
  if (a.count("frames") == a.count("raw")) throw std::invalid_argument("give exactly one of --frames and --raw");
  xp_context_params cp = xp_context_default_params();
  const std::string be = a.count("backend") ? a["backend"] : "auto";
  cp.backend = be == "ort" ? XP_BACKEND_ORT : be == "trt" ? XP_BACKEND_TENSORRT : XP_BACKEND_AUTO;
  if (a.count("threads")) cp.threads = std::stoi(a["threads"]);
  xp_context* ctx = nullptr;
  check(xp_context_create(a["export"].c_str(), &cp, &ctx));
  std::unique_ptr<xp_context, void (*)(xp_context*)> ctx_guard(ctx, xp_context_destroy);
  xp_info info;
  check(xp_context_info(ctx, &info));
  std::fprintf(stderr, "xp-animate: %s, %s %s, %d steps, %dx%d, %d ring slots\n", info.backend, info.sampler,
               info.precision, info.steps, info.width, info.height, info.ring_slots);
  xp_state_params sp = xp_state_default_params();
  if (a.count("noise")) sp.noise_file = a["noise"].c_str();
  if (a.count("seed")) sp.seed = std::stoull(a["seed"]);
  if (a.count("cfg")) sp.cfg_scale = std::stof(a["cfg"]);
  sp.init_noise_only = a.count("init-noise") ? 1 : 0;
  sp.timings = a.count("timings") ? 1 : 0;
  xp_state* st = nullptr;
  check(xp_state_create(ctx, &sp, &st));
  std::unique_ptr<xp_state, void (*)(xp_state*)> st_guard(st, xp_state_destroy);

  const xp::Rgb8 src = xp::read_ppm(a["source"]);
  const xp_image src_view = view(src);
  check(xp_set_source(st, &src_view));
  int centres[6];
  const bool has_centres = a.count("centres") &&
      std::sscanf(a["centres"].c_str(), "%d,%d,%d,%d,%d,%d", &centres[0], &centres[1], &centres[2], &centres[3],
                  &centres[4], &centres[5]) == 6;
  if (a.count("centres") && !has_centres) throw std::invalid_argument("--centres needs 6 integers x,y,x,y,x,y");
  const double fps = a.count("fps") ? std::stod(a["fps"]) : 25.0;
  const long max_frames = a.count("max-frames") ? std::stol(a["max-frames"]) : -1;
  const bool to_stdout = a["out"] == "-";
  const int w = info.width, h = info.height;
  std::vector<uint8_t> rgb(static_cast<size_t>(w) * h * 3);
  std::vector<float> chw(static_cast<size_t>(w) * h * 3), dump;
  std::vector<std::string> names = a.count("frames") ? ppm_files(a["frames"]) : std::vector<std::string>{};
  for (long n = 0; max_frames < 0 || n < max_frames; ++n) {
    xp::Rgb8 pose, local;
    if (a.count("frames")) {
      if (static_cast<size_t>(n) >= names.size()) break;
      pose = xp::read_ppm(a["frames"] + "/" + names[static_cast<size_t>(n)]);
      if (a.count("local")) local = xp::read_ppm(a["local"] + "/" + names[static_cast<size_t>(n)]);
    } else {
      pose.width = w, pose.height = h, pose.data.resize(rgb.size());
      if (std::fread(pose.data.data(), 1, pose.data.size(), stdin) != pose.data.size()) break;
    }
    xp_frame f{view(pose), local.data.empty() ? xp_image{nullptr, 0, 0, 0} : view(local), has_centres ? centres : nullptr};
    xp_output out{rgb.data(), 0, chw.data(), 0.0};
    check(xp_push_frame(st, &f, static_cast<double>(n) / fps, &out));
    if (to_stdout) {
      std::fwrite(rgb.data(), 1, rgb.size(), stdout);
      std::fflush(stdout);
    } else {
      char name[32];
      std::snprintf(name, sizeof name, "/frame_%05ld.ppm", n);
      xp::write_ppm(a["out"] + name, rgb.data(), w, h);
    }
    if (a.count("dump")) dump.insert(dump.end(), chw.begin(), chw.end());
  }
  xp_timings t;
  check(xp_state_timings(st, &t));
  std::fprintf(stderr, "xp-animate: %ld frames\n", t.frames);
  if (sp.timings)
    for (int k = 0; k < XP_STAGE_COUNT; ++k)
      if (t.calls[k])
        std::fprintf(stderr, "  %-12s %6ld calls %10.1f ms  %8.2f ms/frame\n", xp_stage_name(k), t.calls[k], t.ms[k],
                     t.frames ? t.ms[k] / static_cast<double>(t.frames) : 0.0);
  if (a.count("dump")) {
    xp::Tensor frames("frames", xp::DType::F32, {t.frames, 3, h, w});
    std::memcpy(frames.f32(), dump.data(), dump.size() * sizeof(float));
    xp::write_safetensors(a["dump"], {{"frames", frames}});
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (k == "-h" || k == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (k.rfind("--", 0) != 0) {
      std::fprintf(stderr, "unexpected argument '%s'\n%s", argv[i], kUsage);
      return 2;
    }
    k = k.substr(2);
    const bool flag = k == "timings" || k == "init-noise";
    if (!flag && i + 1 >= argc) {
      std::fprintf(stderr, "--%s needs a value\n%s", k.c_str(), kUsage);
      return 2;
    }
    a[k] = flag ? "1" : argv[++i];
  }
  try {
    return run(a);
  } catch (const xp::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "error: %s\n%s", e.what(), kUsage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
