/* Products over weights read front to back, shared by nextn's kernels (defined in routed_experts.c). */
#ifndef NEXTN_PRODUCTS_H
#define NEXTN_PRODUCTS_H

#include <stdint.h>
#include <string.h>

/* 16 fp32 lanes, and 16 floats loaded into them (any alignment). */
typedef float v16 __attribute__((vector_size(64)));
static inline v16 load16(const float *p) {
  v16 v;
  memcpy(&v, p, sizeof v);
  return v;
}

/* out[t * ldo + c] = sum over r of x[tok[t] * ldx + r] * W[r][c], for t < m and c < n; W [rows, n] row-major, of
 * fp32 or of bf16 bit patterns. A token's sums run over r in order, whatever the other tokens of the call: its
 * result does not depend on them. */
typedef void (*TokensTimes)(const void *w, int64_t rows, int64_t n, const float *x, int64_t ldx, const int64_t *tok,
                            int64_t m, float *out, int64_t ldo);
void tokens_times_f32(const void *w, int64_t rows, int64_t n, const float *x, int64_t ldx, const int64_t *tok,
                      int64_t m, float *out, int64_t ldo);
void tokens_times_bf16(const void *w, int64_t rows, int64_t n, const float *x, int64_t ldx, const int64_t *tok,
                       int64_t m, float *out, int64_t ldo);

#endif
