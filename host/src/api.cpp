// The extern "C" API of include/xp.h: every entry point catches every exception and turns it into
// an xp_status plus a per-thread message, so nothing throws or aborts across the C boundary.
#include <cstring>
#include <new>
#include <string>

#include "error.h"
#include "pipeline.h"
#include "xp.h"

struct xp_context {
  xp::Context impl;
  xp_context(const char* folder, const xp_context_params& p) : impl(folder, p) {}
};

struct xp_state {
  xp::Session impl;
  xp_state(xp::Context& c, const xp_state_params& p) : impl(c, p) {}
};

namespace {

thread_local std::string g_error;

template <class F>
xp_status guard(F&& f) {
  try {
    f();
    g_error.clear();
    return XP_OK;
  } catch (const xp::Error& e) {
    g_error = e.what();
    return e.code();
  } catch (const std::bad_alloc&) {
    g_error = "out of memory";
    return XP_ERR_INTERNAL;
  } catch (const std::exception& e) {
    g_error = std::string("internal error: ") + e.what();
    return XP_ERR_INTERNAL;
  } catch (...) {
    g_error = "internal error: unknown exception";
    return XP_ERR_INTERNAL;
  }
}

void need(const void* p, const char* what) {
  if (!p) xp::fail(XP_ERR_INVALID_ARGUMENT, std::string(what) + " is NULL");
}

void copy_str(char* dst, size_t n, const std::string& s) {
  std::strncpy(dst, s.c_str(), n - 1);
  dst[n - 1] = '\0';
}

}  // namespace

extern "C" {

const char* xp_last_error(void) { return g_error.c_str(); }

const char* xp_stage_name(int stage) {
  static const char* names[] = {"encode", "reference", "hint", "control", "unet", "unet_uncond", "sampler", "decode"};
  return stage >= 0 && stage < XP_STAGE_COUNT ? names[stage] : "?";
}

int xp_has_tensorrt(void) { return xp::trt_built() ? 1 : 0; }

xp_context_params xp_context_default_params(void) {
  xp_context_params p;
  p.backend = XP_BACKEND_AUTO;
  p.threads = 0;
  p.ort_library = nullptr;
  p.cuda_device = 0;
  p.cuda_graphs = 1;
  return p;
}

xp_state_params xp_state_default_params(void) {
  xp_state_params p;
  p.cfg_scale = 0.0f;
  p.init_noise_only = 0;
  p.seed = 0;
  p.noise_file = nullptr;
  p.timings = 0;
  return p;
}

xp_status xp_context_create(const char* folder, const xp_context_params* params, xp_context** out) {
  return guard([&] {
    need(folder, "folder");
    need(out, "out");
    *out = nullptr;
    const xp_context_params p = params ? *params : xp_context_default_params();
    *out = new xp_context(folder, p);
  });
}

void xp_context_destroy(xp_context* ctx) { delete ctx; }

xp_status xp_context_info(const xp_context* ctx, xp_info* out) {
  return guard([&] {
    need(ctx, "ctx");
    need(out, "out");
    const xp::Context& c = ctx->impl;
    *out = xp_info{};
    out->width = c.m.image_w;
    out->height = c.m.image_h;
    out->latent_h = static_cast<int>(c.latent.at(2));
    out->latent_w = static_cast<int>(c.latent.at(3));
    out->steps = static_cast<int>(c.timesteps.size());
    out->ring_slots = c.ring_slots;
    out->cfg_scale = static_cast<float>(c.m.sampler.cfg_scale);
    copy_str(out->sampler, sizeof out->sampler, c.m.sampler.name);
    copy_str(out->backend, sizeof out->backend, c.runtime->name());
    copy_str(out->precision, sizeof out->precision, c.m.precision);
  });
}

xp_status xp_state_create(xp_context* ctx, const xp_state_params* params, xp_state** out) {
  return guard([&] {
    need(ctx, "ctx");
    need(out, "out");
    *out = nullptr;
    const xp_state_params p = params ? *params : xp_state_default_params();
    *out = new xp_state(ctx->impl, p);
  });
}

void xp_state_destroy(xp_state* st) { delete st; }

xp_status xp_set_source(xp_state* st, const xp_image* source) {
  return guard([&] {
    need(st, "state");
    need(source, "source");
    st->impl.set_source(*source);
  });
}

xp_status xp_push_frame(xp_state* st, const xp_frame* frame, double timestamp, xp_output* out) {
  return guard([&] {
    need(st, "state");
    need(frame, "frame");
    st->impl.push(*frame, timestamp, out);
  });
}

xp_status xp_reset(xp_state* st) {
  return guard([&] {
    need(st, "state");
    st->impl.reset();
  });
}

xp_status xp_state_timings(const xp_state* st, xp_timings* out) {
  return guard([&] {
    need(st, "state");
    need(out, "out");
    *out = st->impl.timings();
  });
}

}  // extern "C"
