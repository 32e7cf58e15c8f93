// Host tensors: a dtype, a shape and an owned byte buffer, plus the conversions the pipeline needs
// between what it keeps (float32 state) and what a graph takes (fp32/fp16, batch 1 or B).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace xp {

enum class DType { F32, F16, I32, I64 };

DType dtype_from_name(const std::string& name, const std::string& what);  // manifest names ("float16")
const char* dtype_name(DType t);
size_t dtype_size(DType t);

uint16_t f32_to_f16(float f);  // round to nearest even, overflow to inf, NaN kept
float f16_to_f32(uint16_t h);

using Shape = std::vector<int64_t>;
int64_t numel(const Shape& s);
std::string shape_str(const Shape& s);

struct Tensor {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  std::vector<uint8_t> bytes;

  Tensor() = default;
  Tensor(std::string n, DType t, Shape s);  // zero-filled
  int64_t count() const { return numel(shape); }
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
  float* f32() { return reinterpret_cast<float*>(bytes.data()); }
  const float* f32() const { return reinterpret_cast<const float*>(bytes.data()); }
  int32_t* i32() { return reinterpret_cast<int32_t*>(bytes.data()); }
  const int32_t* i32() const { return reinterpret_cast<const int32_t*>(bytes.data()); }
};

// Copy src into dst converting float32 <-> float16 as needed. Shapes must match, except that a
// src with batch (dim 0) 1 is repeated when dst has batch B with the same per-item size.
void convert_into(const Tensor& src, Tensor& dst);
// Values as float32 (any float dtype).
std::vector<float> to_f32(const Tensor& t);

}  // namespace xp
