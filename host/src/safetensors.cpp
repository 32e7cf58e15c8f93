// safetensors reader and writer (see safetensors.h), on top of the host's JSON reader.
#include "safetensors.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "error.h"
#include "json.h"

namespace xp {

std::string read_file(const std::string& path, const std::string& what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(XP_ERR_IO, "cannot open " + what + " '" + path + "': check the path");
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) fail(XP_ERR_IO, "cannot read " + what + " '" + path + "'");
  return ss.str();
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) fail(XP_ERR_IO, "cannot write '" + tmp + "': check that the folder exists and is writable");
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!f) fail(XP_ERR_IO, "short write to '" + tmp + "' (disk full?)");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail(XP_ERR_IO, "cannot rename '" + tmp + "' to '" + path + "'");
}

static DType st_dtype(const std::string& s, const std::string& what) {
  if (s == "F32") return DType::F32;
  if (s == "F16") return DType::F16;
  if (s == "I32") return DType::I32;
  if (s == "I64") return DType::I64;
  fail(XP_ERR_IO, what + ": safetensors dtype " + s + " is not supported (F32, F16, I32, I64)");
}

static const char* st_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
  }
  return "?";
}

std::map<std::string, Tensor> read_safetensors(const std::string& path) {
  const std::string raw = read_file(path, "tensor file");
  auto bad = [&](const std::string& why) {
    fail(XP_ERR_IO, path + ": not a valid safetensors file (" + why + "); regenerate it");
  };
  if (raw.size() < 8) bad("shorter than its 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(raw[static_cast<size_t>(i)]);
  if (n > raw.size() - 8) bad("header length past the end of the file");
  Json header;
  try {
    header = Json::parse(raw.substr(8, n), path + " header");
  } catch (const Error& e) {
    bad(e.what());
  }
  const size_t base = 8 + n, data_size = raw.size() - base;
  std::map<std::string, Tensor> out;
  for (const auto& kv : header.object(path)) {
    if (kv.first == "__metadata__") continue;
    const std::string w = path + ": tensor '" + kv.first + "'";
    Tensor t;
    t.name = kv.first;
    t.dtype = st_dtype(kv.second.at("dtype", w).str(w + ".dtype"), w);
    for (const Json& d : kv.second.at("shape", w).array(w + ".shape")) {
      long long v = d.integer(w + ".shape");
      if (v < 0) bad("negative dim in " + kv.first);
      t.shape.push_back(v);
    }
    const auto& off = kv.second.at("data_offsets", w).array(w + ".data_offsets");
    if (off.size() != 2) bad("data_offsets of " + kv.first + " is not [begin, end]");
    long long b = off[0].integer(w), e = off[1].integer(w);
    if (b < 0 || e < b || static_cast<uint64_t>(e) > data_size) bad("data_offsets of " + kv.first + " out of range");
    if (static_cast<uint64_t>(e - b) != static_cast<uint64_t>(t.count()) * dtype_size(t.dtype))
      bad("size of " + kv.first + " does not match its shape and dtype");
    t.bytes.assign(raw.begin() + static_cast<long>(base + b), raw.begin() + static_cast<long>(base + e));
    out.emplace(kv.first, std::move(t));
  }
  return out;
}

static std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      o += buf;
    } else {
      o += c;
    }
  }
  return o;
}

void write_safetensors(const std::string& path, const std::map<std::string, Tensor>& tensors) {
  std::string header = "{";
  size_t offset = 0;
  for (const auto& kv : tensors) {
    const Tensor& t = kv.second;
    std::string shape;
    for (size_t i = 0; i < t.shape.size(); ++i) shape += (i ? "," : "") + std::to_string(t.shape[i]);
    if (header.size() > 1) header += ",";
    header += "\"" + json_escape(kv.first) + "\":{\"dtype\":\"" + st_name(t.dtype) + "\",\"shape\":[" + shape +
              "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + t.bytes.size()) + "]}";
    offset += t.bytes.size();
  }
  header += "}";
  while (header.size() % 8) header += ' ';  // align the data
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xFF);
  out += header;
  for (const auto& kv : tensors) out.append(reinterpret_cast<const char*>(kv.second.bytes.data()), kv.second.bytes.size());
  write_file_atomic(path, out);
}

}  // namespace xp
