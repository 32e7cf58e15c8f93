// Host tensors and dtype conversion (see tensor.h). fp16 conversion is written out bit by bit so the
// host needs no F16C or compiler extension.
#include "tensor.h"

#include <cstring>

#include "error.h"

namespace xp {

DType dtype_from_name(const std::string& name, const std::string& what) {
  if (name == "float32") return DType::F32;
  if (name == "float16") return DType::F16;
  if (name == "int32") return DType::I32;
  if (name == "int64") return DType::I64;
  fail(XP_ERR_GRAPH, what + ": dtype '" + name + "' is not supported by the host (float32, float16, int32, int64)");
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
  }
  return "?";
}

size_t dtype_size(DType t) { return t == DType::F16 ? 2 : t == DType::I64 ? 8 : 4; }

uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t exp = (x >> 23) & 0xFFu;
  uint32_t man = x & 0x7FFFFFu;
  if (exp == 0xFF) return static_cast<uint16_t>(sign | 0x7C00u | (man ? 0x200u : 0u));  // inf / NaN
  int e = static_cast<int>(exp) - 127 + 15;
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7C00u);  // overflow -> inf
  if (e <= 0) {                                                 // subnormal or zero
    if (e < -10) return static_cast<uint16_t>(sign);
    man |= 0x800000u;
    int shift = 14 - e;
    uint32_t half = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1);
    uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(e) << 10) | (man >> 13);
  uint32_t rem = man & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;  // may carry into the exponent: correct
  return static_cast<uint16_t>(half);
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t x;
  if (exp == 0) {
    if (man == 0) {
      x = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400u));
      x = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    x = sign | 0x7F800000u | (man << 13);
  } else {
    x = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::string shape_str(const Shape& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

Tensor::Tensor(std::string n, DType t, Shape s)
    : name(std::move(n)), dtype(t), shape(std::move(s)), bytes(static_cast<size_t>(numel(shape)) * dtype_size(t)) {}

static bool broadcastable(const Shape& src, const Shape& dst) {
  if (src == dst) return true;
  if (src.size() != dst.size() || src.empty() || src[0] != 1) return false;
  for (size_t i = 1; i < src.size(); ++i)
    if (src[i] != dst[i]) return false;
  return true;
}

static bool is_float(DType t) { return t == DType::F32 || t == DType::F16; }

void convert_into(const Tensor& src, Tensor& dst) {
  if (!broadcastable(src.shape, dst.shape))
    fail(XP_ERR_GRAPH, "tensor '" + src.name + "' " + shape_str(src.shape) + " cannot feed '" + dst.name + "' " +
                           shape_str(dst.shape) + ": re-export so the graphs agree");
  if (src.dtype != dst.dtype && !(is_float(src.dtype) && is_float(dst.dtype)))
    fail(XP_ERR_GRAPH, "tensor '" + src.name + "' is " + dtype_name(src.dtype) + " but '" + dst.name + "' wants " +
                           dtype_name(dst.dtype));
  const int64_t n = src.count();
  const int64_t reps = dst.count() / (n ? n : 1);
  for (int64_t r = 0; r < reps; ++r) {
    uint8_t* out = dst.bytes.data() + static_cast<size_t>(r * n) * dtype_size(dst.dtype);
    if (src.dtype == dst.dtype) {
      std::memcpy(out, src.bytes.data(), src.bytes.size());
    } else if (src.dtype == DType::F32) {
      const float* s = src.f32();
      uint16_t* d = reinterpret_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(s[i]);
    } else {
      const uint16_t* s = reinterpret_cast<const uint16_t*>(src.bytes.data());
      float* d = reinterpret_cast<float*>(out);
      for (int64_t i = 0; i < n; ++i) d[i] = f16_to_f32(s[i]);
    }
  }
}

std::vector<float> to_f32(const Tensor& t) {
  std::vector<float> out(static_cast<size_t>(t.count()));
  if (t.dtype == DType::F32) {
    std::memcpy(out.data(), t.bytes.data(), t.bytes.size());
  } else if (t.dtype == DType::F16) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(t.bytes.data());
    for (size_t i = 0; i < out.size(); ++i) out[i] = f16_to_f32(s[i]);
  } else {
    fail(XP_ERR_INTERNAL, "tensor '" + t.name + "' is " + dtype_name(t.dtype) + ", not a float tensor");
  }
  return out;
}

}  // namespace xp
