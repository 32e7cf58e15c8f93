// Image conversions, local hint and PPM IO (see image.h).
#include "image.h"

#include <algorithm>
#include <cmath>
#include <cctype>
#include <cstdio>
#include <stdexcept>

#include "error.h"
#include "safetensors.h"

namespace xp {

Tensor image_to_tensor(const xp_image& img, int h, int w, const std::string& name) {
  if (!img.rgb) fail(XP_ERR_INVALID_ARGUMENT, name + ": image pointer is NULL");
  if (img.width != w || img.height != h)
    fail(XP_ERR_INVALID_ARGUMENT, name + ": image is " + std::to_string(img.width) + "x" + std::to_string(img.height) +
                                      " but the graphs take " + std::to_string(w) + "x" + std::to_string(h) +
                                      ": resize (and crop) it first, see docs/host.md");
  const int stride = img.stride ? img.stride : 3 * w;
  if (stride < 3 * w) fail(XP_ERR_INVALID_ARGUMENT, name + ": stride " + std::to_string(stride) + " < 3 * width");
  Tensor t(name, DType::F32, {1, 3, h, w});
  float* out = t.f32();
  const size_t plane = static_cast<size_t>(h) * static_cast<size_t>(w);
  for (int y = 0; y < h; ++y) {
    const uint8_t* row = img.rgb + static_cast<size_t>(y) * static_cast<size_t>(stride);
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c)
        out[static_cast<size_t>(c) * plane + static_cast<size_t>(y) * static_cast<size_t>(w) + static_cast<size_t>(x)] =
            static_cast<float>(row[3 * x + c]) / 127.5f - 1.0f;
  }
  return t;
}

Tensor local_hint(const Tensor& pose, const int centres[6], const std::string& name) {
  const int h = static_cast<int>(pose.shape[2]), w = static_cast<int>(pose.shape[3]);
  const int hs = w / 8;  // half patch size, from the width like runtime/preprocess.local_patch_hint
  Tensor t(name, DType::F32, pose.shape);
  std::fill(t.f32(), t.f32() + t.count(), -1.0f);
  const size_t plane = static_cast<size_t>(h) * static_cast<size_t>(w);
  for (int k = 0; k < 3; ++k) {
    const int cx = std::clamp(centres[2 * k], hs, w - hs), cy = std::clamp(centres[2 * k + 1], hs, h - hs);
    for (int c = 0; c < 3; ++c)
      for (int y = std::max(cy - hs, 0); y < std::min(cy + hs, h); ++y)
        for (int x = std::max(cx - hs, 0); x < std::min(cx + hs, w); ++x) {
          const size_t i = static_cast<size_t>(c) * plane + static_cast<size_t>(y) * static_cast<size_t>(w) +
                           static_cast<size_t>(x);
          t.f32()[i] = pose.f32()[i];
        }
  }
  return t;
}

void tensor_to_output(const Tensor& img, xp_output* out) {
  const std::vector<float> v = to_f32(img);
  const int h = static_cast<int>(img.shape[2]), w = static_cast<int>(img.shape[3]);
  const size_t plane = static_cast<size_t>(h) * static_cast<size_t>(w);
  const int stride = out->stride ? out->stride : 3 * w;
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x) {
        const size_t i = static_cast<size_t>(c) * plane + static_cast<size_t>(y) * static_cast<size_t>(w) +
                         static_cast<size_t>(x);
        const float f = std::clamp(v[i], -1.0f, 1.0f);  // NaN stays NaN in chw, maps to 0 in rgb
        if (out->chw) out->chw[i] = f;
        if (out->rgb)
          out->rgb[static_cast<size_t>(y) * static_cast<size_t>(stride) + static_cast<size_t>(3 * x + c)] =
              static_cast<uint8_t>(std::isnan(f) ? 0.0f : std::nearbyint((f + 1.0f) * 127.5f));
      }
}

Rgb8 read_ppm(const std::string& path) {
  const std::string raw = read_file(path, "PPM image");
  size_t pos = 0;
  auto token = [&]() -> std::string {
    for (;;) {
      while (pos < raw.size() && std::isspace(static_cast<unsigned char>(raw[pos]))) ++pos;
      if (pos < raw.size() && raw[pos] == '#') {
        while (pos < raw.size() && raw[pos] != '\n') ++pos;
        continue;
      }
      break;
    }
    size_t b = pos;
    while (pos < raw.size() && !std::isspace(static_cast<unsigned char>(raw[pos]))) ++pos;
    return raw.substr(b, pos - b);
  };
  if (token() != "P6") fail(XP_ERR_IO, path + ": not a binary PPM (P6); convert it, e.g. `convert in.png out.ppm`");
  Rgb8 img;
  try {
    img.width = std::stoi(token());
    img.height = std::stoi(token());
    if (std::stoi(token()) != 255) fail(XP_ERR_IO, path + ": only 8-bit PPM (maxval 255) is supported");
  } catch (const std::logic_error&) {
    fail(XP_ERR_IO, path + ": bad PPM header");
  }
  ++pos;  // the single whitespace after maxval
  const size_t n = static_cast<size_t>(img.width) * static_cast<size_t>(img.height) * 3;
  if (img.width <= 0 || img.height <= 0 || raw.size() < pos + n) fail(XP_ERR_IO, path + ": truncated PPM");
  img.data.assign(raw.begin() + static_cast<long>(pos), raw.begin() + static_cast<long>(pos + n));
  return img;
}

void write_ppm(const std::string& path, const uint8_t* rgb, int width, int height) {
  std::string out = "P6\n" + std::to_string(width) + " " + std::to_string(height) + "\n255\n";
  out.append(reinterpret_cast<const char*>(rgb), static_cast<size_t>(width) * static_cast<size_t>(height) * 3);
  write_file_atomic(path, out);
}

}  // namespace xp
