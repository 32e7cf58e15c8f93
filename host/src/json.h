// Minimal JSON reader (RFC 8259 subset the manifest and safetensors headers use): objects, arrays,
// strings with escapes (\uXXXX to UTF-8), numbers as double, true/false/null. Enough to read
// manifest.json and safetensors headers without a third-party dependency. Errors throw xp::Error
// with the byte offset.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace xp {

class Json {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  static Json parse(const std::string& text, const std::string& where);

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  // Typed accessors; `what` names the field in the error ("engines[2].inputs").
  double number(const std::string& what) const;
  long long integer(const std::string& what) const;  // a number with no fractional part
  const std::string& str(const std::string& what) const;
  bool boolean(const std::string& what) const;
  const std::vector<Json>& array(const std::string& what) const;
  const std::map<std::string, Json>& object(const std::string& what) const;

  bool has(const std::string& key) const;
  // Member of an object; throws naming `what.key` when absent.
  const Json& at(const std::string& key, const std::string& what) const;

 private:
  Type type_ = Type::Null;
  bool b_ = false;
  double num_ = 0;
  std::string s_;
  std::vector<Json> arr_;
  std::map<std::string, Json> obj_;
  friend class JsonParser;
};

}  // namespace xp
