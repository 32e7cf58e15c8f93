// What every backend shares: the I/O check of a loaded graph against its manifest entry.
#include "backend.h"

#include "error.h"

namespace xp {

static void check_list(const std::vector<IoSpec>& want, const std::vector<IoSpec>& got, const char* kind,
                       const std::string& file) {
  const std::string fix = ": the graph and manifest.json disagree; re-export the folder (or rebuild the plans)";
  if (want.size() != got.size())
    fail(XP_ERR_GRAPH, file + " has " + std::to_string(got.size()) + " " + kind + "s, the manifest lists " +
                           std::to_string(want.size()) + fix);
  for (size_t i = 0; i < want.size(); ++i) {
    const IoSpec &w = want[i], &g = got[i];
    if (w.name != g.name)
      fail(XP_ERR_GRAPH, file + " " + kind + " " + std::to_string(i) + " is '" + g.name + "', the manifest says '" +
                             w.name + "'" + fix);
    if (w.dtype != g.dtype)
      fail(XP_ERR_GRAPH, file + " " + kind + " '" + w.name + "' is " + dtype_name(g.dtype) + ", the manifest says " +
                             dtype_name(w.dtype) + fix);
    if (w.shape != g.shape)
      fail(XP_ERR_GRAPH, file + " " + kind + " '" + w.name + "' has shape " + shape_str(g.shape) +
                             ", the manifest says " + shape_str(w.shape) + fix);
  }
}

void check_io(const GraphEntry& entry, const std::vector<IoSpec>& found_inputs,
              const std::vector<IoSpec>& found_outputs, const std::string& file) {
  check_list(entry.inputs, found_inputs, "input", file);
  check_list(entry.outputs, found_outputs, "output", file);
}

}  // namespace xp
