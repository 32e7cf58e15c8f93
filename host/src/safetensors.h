// safetensors files (8-byte little-endian header length, JSON header, raw little-endian data):
// the context (context.safetensors), the session noise and the CLI's float dumps. The reader
// checks every offset against the file size; the writer writes a temp file, then renames it.
#pragma once

#include <map>
#include <string>

#include "tensor.h"

namespace xp {

std::map<std::string, Tensor> read_safetensors(const std::string& path);
void write_safetensors(const std::string& path, const std::map<std::string, Tensor>& tensors);

// Read a whole file; throws XP_ERR_IO naming `what` when it is missing or unreadable.
std::string read_file(const std::string& path, const std::string& what);
// Write to path + ".tmp" and rename over path (atomic on one file system).
void write_file_atomic(const std::string& path, const std::string& bytes);

}  // namespace xp
