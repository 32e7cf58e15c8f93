// Images at the API boundary: RGB8 <-> the graphs' NCHW float in [-1, 1] (v = u8 / 127.5 - 1,
// u8 = round((clamp(v) + 1) * 127.5), manifest pipeline.images), the local-patch hint, and binary
// PPM (P6) files for the CLI and tests.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tensor.h"
#include "xp.h"

namespace xp {

struct Rgb8 {
  int width = 0, height = 0;
  std::vector<uint8_t> data;  // interleaved, stride 3 * width
};

// (1, 3, H, W) float32 named `name`; checks the size against (h, w).
Tensor image_to_tensor(const xp_image& img, int h, int w, const std::string& name);
// -1 canvas with the (H/4)^2 patches of `pose` (1, 3, H, W) at (x, y) centres (left eye, right eye,
// mouth, pasted in that order), each clipped to [H/8, H - H/8] like runtime/preprocess.py.
Tensor local_hint(const Tensor& pose, const int centres[6], const std::string& name);
// (1, 3, H, W) float (any float dtype) -> interleaved RGB8 and/or clamped float CHW.
void tensor_to_output(const Tensor& img, xp_output* out);

Rgb8 read_ppm(const std::string& path);
void write_ppm(const std::string& path, const uint8_t* rgb, int width, int height);

}  // namespace xp
