/* xp.h: the C API of the xportrait-live C++ host.
 *
 * Embeds the graphs (ONNX Runtime) or plans (TensorRT) of an export folder and runs the streaming
 * X-Portrait pipeline from its manifest.json alone (schema xportrait-engines/2, protocol
 * xportrait-stream/1; docs/host.md). Context/state split as in whisper.cpp: an xp_context holds the
 * loaded graphs and is shared; each xp_state is one stream (source latent, reference K/V, temporal
 * ring caches, noise). A context may serve several states, one call at a time per context.
 *
 *   xp_context_params cp = xp_context_default_params();
 *   xp_context* ctx; if (xp_context_create("artifacts/onnx/fp32", &cp, &ctx)) puts(xp_last_error());
 *   xp_state_params sp = xp_state_default_params();
 *   xp_state* st;    xp_state_create(ctx, &sp, &st);
 *   xp_set_source(st, &source_image);
 *   for each driving frame: xp_push_frame(st, &frame, t_seconds, &out);   // out: the animated frame
 *   xp_state_destroy(st); xp_context_destroy(ctx);
 *
 * Every function returns XP_OK (0) or an error code; xp_last_error() then holds a message for the
 * calling thread that names the problem and the fix. No function aborts or throws across this API.
 * Images are interleaved RGB8 (row stride in bytes) at the size the graphs were exported for
 * (xp_context_info); see docs/host.md for what the pose and local hints are.
 */
#ifndef XP_H
#define XP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  XP_OK = 0,
  XP_ERR_INVALID_ARGUMENT = 1, /* a NULL pointer, a wrong image size, a non-increasing timestamp */
  XP_ERR_IO = 2,               /* a file or folder that is missing or unreadable */
  XP_ERR_MANIFEST = 3,         /* manifest.json of another schema, or missing what the pipeline needs */
  XP_ERR_GRAPH = 4,            /* a graph or plan whose names, shapes or dtypes differ from the manifest */
  XP_ERR_BACKEND = 5,          /* ONNX Runtime or TensorRT failed (message from the library) */
  XP_ERR_UNSUPPORTED = 6,      /* e.g. a TensorRT plan in a build without TensorRT */
  XP_ERR_STATE = 7,            /* call order: a frame before xp_set_source */
  XP_ERR_INTERNAL = 8
} xp_status;

typedef enum { XP_BACKEND_AUTO = 0, XP_BACKEND_ORT = 1, XP_BACKEND_TENSORRT = 2 } xp_backend;

typedef struct {
  xp_backend backend;      /* AUTO: TensorRT when the manifest has plans and the host was built with it */
  int threads;             /* ONNX Runtime intra-op threads; 0: ONNX Runtime's default */
  const char* ort_library; /* libonnxruntime.so to load; NULL: $XP_ORT_LIBRARY, then the one found at build time */
  int cuda_device;         /* TensorRT: CUDA device index */
  int cuda_graphs;         /* TensorRT: replay CUDA graphs where the library supports them (default 1) */
} xp_context_params;

typedef struct {
  float cfg_scale;        /* <= 0: the manifest's sampler.cfg.scale; 1: no unconditional pass */
  int init_noise_only;    /* 0: the manifest's default x_T (official: source latent noised to t=999); 1: pure noise */
  uint64_t seed;          /* noise when noise_file is NULL (the host's own generator, not torch's) */
  const char* noise_file; /* safetensors with "init" (1,4,h,w) and "step" (S,4,h,w) float32; NULL: draw */
  int timings;            /* 1: accumulate per-stage wall time (xp_state_timings); syncs per stage on a GPU */
} xp_state_params;

typedef struct {
  const uint8_t* rgb; /* interleaved RGB8 */
  int width, height;
  int stride; /* bytes per row; 0: 3 * width */
} xp_image;

/* One driving frame, already re-framed onto the source face (docs/host.md). The local hint is
 * either given as an image, or built from `centres` (x, y of left eye, right eye, mouth, in pixels
 * of the frame), or, when both are absent, built from the last centres given to this state. */
typedef struct {
  xp_image pose;
  xp_image local;     /* local.rgb NULL: build it from centres */
  const int* centres; /* 6 ints or NULL */
} xp_frame;

typedef struct {
  uint8_t* rgb;    /* caller's buffer, height * stride bytes; NULL: skip */
  int stride;      /* bytes per row; 0: 3 * width */
  float* chw;      /* optional caller's buffer of 3 * height * width floats in [-1, 1] (NCHW); NULL: skip */
  double timestamp; /* set to the pushed frame's timestamp */
} xp_output;

typedef struct {
  int width, height;      /* image size the graphs take and return */
  int latent_h, latent_w; /* latent size */
  int steps;              /* sampler steps per frame */
  int ring_slots;         /* temporal ring slots L (L - 1 past frames) */
  float cfg_scale;        /* the manifest's default */
  char sampler[16];       /* e.g. "lcm" */
  char backend[64];       /* e.g. "onnxruntime 1.32.0" */
  char precision[16];     /* the manifest's preset.precision, e.g. "fp32" */
} xp_info;

enum { XP_STAGE_ENCODE, XP_STAGE_REFERENCE, XP_STAGE_HINT, XP_STAGE_CONTROL, XP_STAGE_UNET, XP_STAGE_UNET_UNCOND,
       XP_STAGE_SAMPLER, XP_STAGE_DECODE, XP_STAGE_COUNT };

typedef struct {
  double ms[XP_STAGE_COUNT]; /* accumulated wall time per stage */
  long calls[XP_STAGE_COUNT];
  long frames;
} xp_timings;

const char* xp_last_error(void);
const char* xp_stage_name(int stage);
int xp_has_tensorrt(void); /* 1 if this build has the TensorRT backend */

xp_context_params xp_context_default_params(void);
xp_state_params xp_state_default_params(void);

typedef struct xp_context xp_context;
typedef struct xp_state xp_state;

xp_status xp_context_create(const char* folder, const xp_context_params* params, xp_context** out);
void xp_context_destroy(xp_context* ctx);
xp_status xp_context_info(const xp_context* ctx, xp_info* out);

xp_status xp_state_create(xp_context* ctx, const xp_state_params* params, xp_state** out);
void xp_state_destroy(xp_state* st);

/* Encode the source, run the reference net once per sampler step, build x_T; resets the rings. */
xp_status xp_set_source(xp_state* st, const xp_image* source);
/* Animate one driving frame; timestamps (seconds) must increase within a clip (xp_reset starts a new one). */
xp_status xp_push_frame(xp_state* st, const xp_frame* frame, double timestamp, xp_output* out);
/* Forget the past frames (temporal rings and counters); the source stays. */
xp_status xp_reset(xp_state* st);
xp_status xp_state_timings(const xp_state* st, xp_timings* out);

#ifdef __cplusplus
}
#endif

#endif /* XP_H */
