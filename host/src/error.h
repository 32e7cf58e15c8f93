// Errors inside the host: xp::Error carries an xp_status code and a message that names the fix.
// Library code throws; the C API (api.cpp) catches everything and turns it into a code plus
// xp_last_error(), so nothing aborts across the C boundary.
#pragma once

#include <stdexcept>
#include <string>

#include "xp.h"

namespace xp {

class Error : public std::runtime_error {
 public:
  Error(xp_status code, const std::string& msg) : std::runtime_error(msg), code_(code) {}
  xp_status code() const { return code_; }

 private:
  xp_status code_;
};

[[noreturn]] inline void fail(xp_status code, const std::string& msg) { throw Error(code, msg); }

}  // namespace xp
