// Minimal recursive-descent JSON reader (see json.h). Depth is limited so a hostile file cannot
// overflow the stack.
#include "json.h"

#include <cmath>
#include <cstdlib>

#include "error.h"

namespace xp {

class JsonParser {
 public:
  JsonParser(const std::string& text, const std::string& where) : s_(text), where_(where) {}

  Json document() {
    Json v = value(0);
    skip_ws();
    if (pos_ != s_.size()) error("trailing characters after the JSON value");
    return v;
  }

 private:
  const std::string& s_;
  const std::string& where_;
  size_t pos_ = 0;

  [[noreturn]] void error(const std::string& what) const {
    fail(XP_ERR_MANIFEST, where_ + ": invalid JSON at byte " + std::to_string(pos_) + ": " + what +
                              "; fix or regenerate the file");
  }
  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) ++pos_;
  }
  char peek() {
    skip_ws();
    if (pos_ >= s_.size()) error("unexpected end of input");
    return s_[pos_];
  }
  void expect(const char* word) {
    for (const char* c = word; *c; ++c, ++pos_)
      if (pos_ >= s_.size() || s_[pos_] != *c) error(std::string("expected '") + word + "'");
  }

  Json value(int depth) {
    if (depth > 64) error("nesting deeper than 64");
    Json v;
    char c = peek();
    if (c == '{') {
      v.type_ = Json::Type::Object;
      ++pos_;
      if (peek() == '}') { ++pos_; return v; }
      for (;;) {
        if (peek() != '"') error("expected a string key");
        std::string key = string();
        if (peek() != ':') error("expected ':'");
        ++pos_;
        v.obj_[key] = value(depth + 1);
        char d = peek();
        ++pos_;
        if (d == '}') return v;
        if (d != ',') error("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.type_ = Json::Type::Array;
      ++pos_;
      if (peek() == ']') { ++pos_; return v; }
      for (;;) {
        v.arr_.push_back(value(depth + 1));
        char d = peek();
        ++pos_;
        if (d == ']') return v;
        if (d != ',') error("expected ',' or ']'");
      }
    }
    if (c == '"') { v.type_ = Json::Type::String; v.s_ = string(); return v; }
    if (c == 't') { expect("true"); v.type_ = Json::Type::Bool; v.b_ = true; return v; }
    if (c == 'f') { expect("false"); v.type_ = Json::Type::Bool; return v; }
    if (c == 'n') { expect("null"); return v; }
    if (c == '-' || (c >= '0' && c <= '9')) { v.type_ = Json::Type::Number; v.num_ = number(); return v; }
    error(std::string("unexpected character '") + c + "'");
  }

  double number() {
    const char* begin = s_.c_str() + pos_;
    char* end = nullptr;
    double d = std::strtod(begin, &end);
    if (end == begin || !std::isfinite(d)) error("bad number");
    pos_ += static_cast<size_t>(end - begin);
    return d;
  }

  static void utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  unsigned hex4() {
    if (pos_ + 4 > s_.size()) error("short \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      char h = s_[pos_++];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= static_cast<unsigned>(h - '0');
      else if (h >= 'a' && h <= 'f') v |= static_cast<unsigned>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') v |= static_cast<unsigned>(h - 'A' + 10);
      else error("bad \\u escape");
    }
    return v;
  }

  std::string string() {
    ++pos_;  // opening quote
    std::string out;
    while (pos_ < s_.size()) {
      char c = s_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) error("control character in a string");
      if (c != '\\') { out += c; continue; }
      if (pos_ >= s_.size()) break;
      char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && pos_ + 6 <= s_.size() && s_[pos_] == '\\' && s_[pos_ + 1] == 'u') {
            pos_ += 2;
            unsigned lo = hex4();
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          utf8(out, cp);
          break;
        }
        default: error("bad escape");
      }
    }
    error("unterminated string");
  }
};

Json Json::parse(const std::string& text, const std::string& where) { return JsonParser(text, where).document(); }

static const char* type_name(Json::Type t) {
  switch (t) {
    case Json::Type::Null: return "null";
    case Json::Type::Bool: return "a boolean";
    case Json::Type::Number: return "a number";
    case Json::Type::String: return "a string";
    case Json::Type::Array: return "an array";
    case Json::Type::Object: return "an object";
  }
  return "?";
}

static void want(const Json& j, Json::Type t, const std::string& what) {
  if (j.type() != t)
    fail(XP_ERR_MANIFEST, what + ": expected " + type_name(t) + ", got " + type_name(j.type()));
}

double Json::number(const std::string& what) const { want(*this, Type::Number, what); return num_; }

long long Json::integer(const std::string& what) const {
  want(*this, Type::Number, what);
  if (num_ != std::floor(num_) || std::fabs(num_) > 9.0e15) fail(XP_ERR_MANIFEST, what + ": expected an integer");
  return static_cast<long long>(num_);
}

const std::string& Json::str(const std::string& what) const { want(*this, Type::String, what); return s_; }
bool Json::boolean(const std::string& what) const { want(*this, Type::Bool, what); return b_; }
const std::vector<Json>& Json::array(const std::string& what) const { want(*this, Type::Array, what); return arr_; }
const std::map<std::string, Json>& Json::object(const std::string& what) const {
  want(*this, Type::Object, what);
  return obj_;
}

bool Json::has(const std::string& key) const { return type_ == Type::Object && obj_.count(key) > 0; }

const Json& Json::at(const std::string& key, const std::string& what) const {
  const auto& o = object(what);
  auto it = o.find(key);
  if (it == o.end()) fail(XP_ERR_MANIFEST, what + "." + key + ": missing; re-export with the current exporter");
  return it->second;
}

}  // namespace xp
