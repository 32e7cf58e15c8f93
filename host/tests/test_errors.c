/* C-level tests of the C API's error contract (plain C, so they also check that xp.h is C):
 * codes plus messages, never an abort. Needs an export folder in $XP_TEST_EXPORT (fp32 tiny
 * preset, tests/test_host.py sets it); exits 77 (skipped) without one. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xp.h"

static int failures = 0;

static void expect(xp_status got, xp_status want, const char* needle, int line) {
  if (got != want || (needle && !strstr(xp_last_error(), needle))) {
    fprintf(stderr, "test_errors.c:%d: got %d '%s', wanted %d with '%s'\n", line, (int)got, xp_last_error(), (int)want,
            needle ? needle : "");
    ++failures;
  }
}
#define EXPECT(call, code, needle) expect((call), (code), (needle), __LINE__)

int main(void) {
  const char* folder = getenv("XP_TEST_EXPORT");
  xp_context* ctx = NULL;
  xp_state* st = NULL;
  xp_info info;
  EXPECT(xp_context_create(NULL, NULL, &ctx), XP_ERR_INVALID_ARGUMENT, "folder is NULL");
  EXPECT(xp_context_create("/no/such/export", NULL, &ctx), XP_ERR_IO, "/no/such/export/manifest.json");
  if (ctx != NULL) ++failures;
  EXPECT(xp_push_frame(NULL, NULL, 0.0, NULL), XP_ERR_INVALID_ARGUMENT, "state is NULL");
  if (!folder) {
    printf("skipped: set XP_TEST_EXPORT to an fp32 export folder\n");
    return failures ? 1 : 77;
  }
  xp_context_params cp = xp_context_default_params();
  cp.backend = XP_BACKEND_TENSORRT;
  if (!xp_has_tensorrt()) EXPECT(xp_context_create(folder, &cp, &ctx), XP_ERR_UNSUPPORTED, "built without TensorRT");
  cp.backend = XP_BACKEND_ORT;
  cp.threads = 1;
  EXPECT(xp_context_create(folder, &cp, &ctx), XP_OK, "");
  if (!ctx) return 1;
  EXPECT(xp_context_info(ctx, &info), XP_OK, "");
  xp_state_params sp = xp_state_default_params();
  sp.noise_file = "/no/such/noise.safetensors";
  EXPECT(xp_state_create(ctx, &sp, &st), XP_ERR_IO, "noise.safetensors");
  sp = xp_state_default_params();
  EXPECT(xp_state_create(ctx, &sp, &st), XP_OK, "");

  size_t n = (size_t)info.width * (size_t)info.height * 3;
  unsigned char* rgb = calloc(n, 1);
  unsigned char* out_rgb = calloc(n, 1);
  xp_image img = {rgb, info.width, info.height, 0};
  xp_image small = {rgb, info.width / 2, info.height / 2, 0};
  int centres[6] = {info.width / 3, info.height / 3, 2 * info.width / 3, info.height / 3, info.width / 2,
                    2 * info.height / 3};
  xp_frame frame = {img, {NULL, 0, 0, 0}, centres};
  xp_output out = {out_rgb, 0, NULL, 0.0};
  EXPECT(xp_push_frame(st, &frame, 0.0, &out), XP_ERR_STATE, "xp_set_source");
  EXPECT(xp_set_source(st, &small), XP_ERR_INVALID_ARGUMENT, "resize");
  EXPECT(xp_set_source(st, &img), XP_OK, "");
  xp_frame no_local = {img, {NULL, 0, 0, 0}, NULL};
  EXPECT(xp_push_frame(st, &no_local, 0.0, &out), XP_ERR_INVALID_ARGUMENT, "centres");
  EXPECT(xp_push_frame(st, &frame, 0.0, &out), XP_OK, "");
  if (out.timestamp != 0.0) ++failures;
  EXPECT(xp_push_frame(st, &no_local, 0.0, &out), XP_ERR_INVALID_ARGUMENT, "not after the previous");
  EXPECT(xp_push_frame(st, &no_local, 0.04, &out), XP_OK, ""); /* reuses the last centres */
  EXPECT(xp_reset(st), XP_OK, "");
  EXPECT(xp_push_frame(st, &frame, 0.0, &out), XP_OK, ""); /* a new clip may restart its clock */
  xp_timings t;
  EXPECT(xp_state_timings(st, &t), XP_OK, "");
  if (t.frames != 3) ++failures;
  xp_state_destroy(st);
  xp_context_destroy(ctx);
  free(rgb);
  free(out_rgb);
  printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
