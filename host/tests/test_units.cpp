// C-level unit tests of the host's building blocks (no export folder needed): JSON, fp16,
// safetensors round trip and corruption, name patterns, the local-patch hint, image conversion.
// Expected values are written out by hand from the formats' definitions. Exit 0 = all passed.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "error.h"
#include "image.h"
#include "json.h"
#include "manifest.h"
#include "safetensors.h"
#include "tensor.h"

static int failures = 0;
#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                          \
    }                                                                      \
  } while (0)

template <class F>
static bool throws(F&& f, xp_status code, const char* needle) {
  try {
    f();
  } catch (const xp::Error& e) {
    if (e.code() == code && std::strstr(e.what(), needle)) return true;
    std::fprintf(stderr, "  got code %d: %s\n", e.code(), e.what());
    return false;
  }
  return false;
}

static void test_json() {
  xp::Json j = xp::Json::parse(R"({"a": [1, 2.5, -3e2], "s": "x\"\u00e9\n", "n": null, "t": true, "o": {}})", "t");
  CHECK(j.at("a", "t").array("a").size() == 3);
  CHECK(j.at("a", "t").array("a")[2].number("a") == -300.0);
  CHECK(j.at("s", "t").str("s") == "x\"\xc3\xa9\n");
  CHECK(j.at("n", "t").is_null() && j.at("t", "t").boolean("t"));
  CHECK(throws([] { xp::Json::parse("{\"a\": [1, }", "bad.json"); }, XP_ERR_MANIFEST, "bad.json: invalid JSON at byte"));
  CHECK(throws([] { xp::Json::parse("{} x", "t"); }, XP_ERR_MANIFEST, "trailing"));
  CHECK(throws([&] { j.at("missing", "root"); }, XP_ERR_MANIFEST, "root.missing: missing"));
  CHECK(throws([&] { j.at("s", "t").integer("s"); }, XP_ERR_MANIFEST, "expected a number"));
}

static void test_fp16() {
  // IEEE half bit patterns from the format's definition
  CHECK(xp::f32_to_f16(1.0f) == 0x3C00 && xp::f32_to_f16(-2.0f) == 0xC000 && xp::f32_to_f16(65504.0f) == 0x7BFF);
  CHECK(xp::f32_to_f16(1e6f) == 0x7C00);                 // overflow -> inf
  CHECK(xp::f32_to_f16(5.960464477539063e-08f) == 0x0001);  // smallest subnormal
  CHECK(xp::f32_to_f16(1.0f + 1.0f / 2048) == 0x3C00);   // tie to even (down)
  CHECK(xp::f32_to_f16(1.0f + 3.0f / 2048) == 0x3C02);   // tie to even (up)
  CHECK(xp::f16_to_f32(0x3555) == 0.333251953125f && xp::f16_to_f32(0x0001) == 5.960464477539063e-08f);
  for (uint32_t h = 0; h < 0x7C00; ++h) CHECK(xp::f32_to_f16(xp::f16_to_f32(static_cast<uint16_t>(h))) == h);
}

static void test_safetensors() {
  const std::string path = "test_units.safetensors";
  xp::Tensor a("a", xp::DType::F32, {2, 3});
  for (int i = 0; i < 6; ++i) a.f32()[i] = static_cast<float>(i) - 2.5f;
  xp::Tensor b("b", xp::DType::I32, {4});
  for (int i = 0; i < 4; ++i) b.i32()[i] = -i;
  xp::write_safetensors(path, {{"a", a}, {"b", b}});
  auto r = xp::read_safetensors(path);
  CHECK(r.at("a").shape == xp::Shape({2, 3}) && r.at("a").bytes == a.bytes);
  CHECK(r.at("b").dtype == xp::DType::I32 && r.at("b").bytes == b.bytes);
  std::string raw = xp::read_file(path, "t");
  xp::write_file_atomic(path, raw.substr(0, raw.size() - 4));  // truncated data
  CHECK(throws([&] { xp::read_safetensors(path); }, XP_ERR_IO, "out of range"));
  xp::write_file_atomic(path, std::string("\xff\xff\xff\xff\0\0\0\0{}", 10));
  CHECK(throws([&] { xp::read_safetensors(path); }, XP_ERR_IO, "header length past the end"));
  CHECK(throws([] { xp::read_safetensors("no/such/file.safetensors"); }, XP_ERR_IO, "cannot open"));
  std::remove(path.c_str());
}

static void test_convert_and_patterns() {
  xp::Tensor one("src", xp::DType::F32, {1, 2});
  one.f32()[0] = 1.0f, one.f32()[1] = -0.5f;
  xp::Tensor three("dst", xp::DType::F16, {3, 2});
  xp::convert_into(one, three);  // batch 1 -> 3, fp32 -> fp16
  const uint16_t* h = reinterpret_cast<const uint16_t*>(three.data());
  CHECK(h[0] == 0x3C00 && h[1] == 0xB800 && h[4] == 0x3C00 && h[5] == 0xB800);
  xp::Tensor wrong("w", xp::DType::F32, {2, 3});
  CHECK(throws([&] { xp::convert_into(one, wrong); }, XP_ERR_GRAPH, "cannot feed"));
  std::vector<std::pair<std::string, std::string>> map = {{"x", "x"}, {"ref_*", "ref[i].ref_*"}};
  CHECK(xp::resolve_name(map, "ref_k_03") == "ref[i].ref_k_03");
  CHECK(xp::resolve_name(map, "x") == "x" && xp::resolve_name(map, "t").empty());
}

static void test_images() {
  const int n = 16;  // 16x16 frame: patches of 4x4 (half size 2), centres clipped to [2, 14]
  std::vector<uint8_t> rgb(n * n * 3);
  for (int i = 0; i < n * n * 3; ++i) rgb[i] = static_cast<uint8_t>(i % 251);
  xp_image img{rgb.data(), n, n, 0};
  xp::Tensor t = xp::image_to_tensor(img, n, n, "pose");
  CHECK(t.f32()[0] == 0.0f / 127.5f - 1.0f && t.f32()[n * n] == 1.0f / 127.5f - 1.0f);  // R then G of pixel 0
  const int centres[6] = {0, 0, 8, 8, 20, 3};  // clipped to (2,2), (8,8), (14,3)
  xp::Tensor loc = xp::local_hint(t, centres, "local");
  auto at = [&](const xp::Tensor& x, int c, int y, int xx) { return x.f32()[(c * n + y) * n + xx]; };
  CHECK(at(loc, 0, 0, 0) == at(t, 0, 0, 0) && at(loc, 1, 3, 3) == at(t, 1, 3, 3));  // patch (2,2): rows/cols 0..3
  CHECK(at(loc, 0, 4, 4) == -1.0f && at(loc, 2, 6, 6) == at(t, 2, 6, 6) && at(loc, 2, 9, 9) == at(t, 2, 9, 9));
  CHECK(at(loc, 0, 10, 10) == -1.0f && at(loc, 0, 1, 15) == at(t, 0, 1, 15) && at(loc, 0, 5, 15) == -1.0f);
  std::vector<uint8_t> back(rgb.size());
  std::vector<float> chw(rgb.size());
  xp_output out{back.data(), 0, chw.data(), 0};
  xp::tensor_to_output(t, &out);
  CHECK(back == rgb);  // u8 -> [-1, 1] -> u8 is exact
  CHECK(throws([&] { xp::image_to_tensor(img, 32, 32, "source"); }, XP_ERR_INVALID_ARGUMENT, "the graphs take 32x32"));
  xp::write_ppm("test_units.ppm", rgb.data(), n, n);
  xp::Rgb8 p = xp::read_ppm("test_units.ppm");
  CHECK(p.width == n && p.height == n && p.data == rgb);
  std::remove("test_units.ppm");
}

int main() {
  test_json();
  test_fp16();
  test_safetensors();
  test_convert_and_patterns();
  test_images();
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
