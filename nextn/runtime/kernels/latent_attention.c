/* nextn.LatentAttention(Bf16): MLA's absorbed attention in the latent space, for a few query tokens, as one ONNX
 * Runtime custom op.
 *
 * Why: exported in standard ops, one layer's attention is ~35 ONNX Runtime nodes (reshapes, splits, the per-head
 * products with W_UK and W_UV, the rotary, two score products per cache part, mask, softmax, ...). On the
 * embedded model a decode step is then mostly per-node overhead; on larger ones the per-head products read
 * kv_b_proj through small batched GEMMs. This kernel is one node per layer, and reads kv_b_proj once a call.
 *
 * Inputs (the export's nextn.LatentAttention node, export/latent_attention.py; its ONNX function is the same
 * arithmetic in standard ops):
 *   q       [B, S, nh (dn + D)]  fp32  each head's query: dn "nope" values, then D rotary ones (halves layout)
 *   cos/sin [B, S, D/2]          fp32  the queries' rotary
 *   mask    [B, S, T]            bool  which cache entries each query sees (T = P + N)
 *   past_c  [B, P, R], past_k [B, P, D], new_c [B, N, R], new_k [B, N, D]   fp32: the latent cache, as stored
 *   w       [nh, (dn + dv) R]    kv_b_proj laid out for the kernel (latent_attention.py): per head W_UK [dn, R]
 *                                as stored, then W_UV transposed, [R, dv]; fp32 (LatentAttention) or bf16 bit
 *                                patterns (LatentAttentionBf16: the same values)
 *   attributes num_heads, nope_dim (dn), v_dim (dv), scale
 *   output  [B, S, nh dv]
 * Per query row (s, h):
 *   q_lat = q_nope W_UK[h]                        [R]
 *   q_rot = rotary(q_pe)                          [D]   [x1 c - x2 s | x2 c + x1 s]
 *   score_j = (q_lat . c_j + q_rot . k_j) scale, masked entries -FLT_MAX   (j over past, then new)
 *   o_lat = sum_j softmax(score)_j c_j            [R]   (past and new entries apart, then added, as the graph does)
 *   out   = W_UV[h] o_lat                         [dv]
 * Each row's sums run in a fixed order whatever the other rows and the threads (the tokens' products as in
 * routed_experts.c, scores as score_dot says): a query's output does not depend on how many queries share the
 * call: a verify pass computes each of its rows as that row alone would be, against the same cache (the same
 * past / new split). Tasks are (sequence, group of heads); each reads the sequence's cache once. The function's standard ops sum in other orders: the two agree to fp32 rounding.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ort_api.h"
#include "products.h"
#include "attention.h"

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

/* x1 . y1 + x2 . y2 (a score: latent part and rotary part): the products of whole 16-wide chunks summed in 16
 * lanes (the latent part's pairs of chunks in two accumulators, then added), the lanes added pairwise (8 + 8,
 * 4 + 4, then (0 + 2) + (1 + 3)), then the tails' products (widths that are not a multiple of 16) one by one.
 * A fixed order whatever the other rows; the accumulators stay in registers. */
static inline float score_dot(const float *x1, const float *y1, int64_t n1, const float *x2, const float *y2,
                              int64_t n2) {
  v16 acc = {0}, odd = {0}; /* two chains of FMAs: half the latency */
  int64_t i = 0;
  for (; i + 32 <= n1; i += 32) {
    acc += load16(x1 + i) * load16(y1 + i);
    odd += load16(x1 + i + 16) * load16(y1 + i + 16);
  }
  acc += odd;
  for (; i + 16 <= n1; i += 16) acc += load16(x1 + i) * load16(y1 + i);
  const int64_t tail1 = i;
  for (i = 0; i + 16 <= n2; i += 16) acc += load16(x2 + i) * load16(y2 + i);
  const int64_t tail2 = i;
#if defined(__clang__) || __GNUC__ >= 12 /* in registers */
  v8 lo = __builtin_shufflevector(acc, acc, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 a = __builtin_shufflevector(lo, lo, 0, 1, 2, 3) + __builtin_shufflevector(lo, lo, 4, 5, 6, 7);
#else /* the same sums through memory */
  v8 lo, hi;
  memcpy(&lo, &acc, sizeof lo);
  memcpy(&hi, (const char *)&acc + sizeof lo, sizeof hi);
  lo += hi;
  v4 a, c;
  memcpy(&a, &lo, sizeof a);
  memcpy(&c, (const char *)&lo + sizeof a, sizeof c);
  a += c;
#endif
  float total = (a[0] + a[2]) + (a[1] + a[3]);
  for (i = tail1; i < n1; i++) total += x1[i] * y1[i];
  for (i = tail2; i < n2; i++) total += x2[i] * y2[i];
  return total;
}

/* e^x for x <= 0 in straight-line arithmetic the compiler vectorizes (libm's expf is a call per value):
 * e^x = 2^k e^f, k = round(x / ln 2), |f| <= ln 2 / 2, e^f by its degree-7 Taylor polynomial (relative error
 * < 2e-7 there, about libm's). At -87 and below the result is 0 (e^-87 is 1.6e-38, next to fp32's smallest
 * normal; masked scores are -FLT_MAX). */
static inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float k = nearbyintf(x * 1.44269504f);
  const float f = (x - k * 0.693359375f) + k * 2.12194440e-4f; /* x - k ln 2, ln 2 in two parts */
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = ((int32_t)k + 127) << 23; /* 2^k, k in [-126, 0] */
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return x <= -87.0f ? 0.0f : p * scale;
}

/* The largest of x[0 .. n) (exact in any order), in 16 lanes: one chain of scalar comparisons was a tenth of
 * the kernel's time. */
static inline float max_of(const float *x, int64_t n) {
  float lane[16], top = -FLT_MAX;
  for (int l = 0; l < 16; l++) lane[l] = -FLT_MAX;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; l++) lane[l] = x[j + l] > lane[l] ? x[j + l] : lane[l];
  for (; j < n; j++) top = x[j] > top ? x[j] : top;
  for (int l = 0; l < 16; l++) top = lane[l] > top ? lane[l] : top;
  return top;
}

/* The sum of x[0 .. n) >= 0 in 16 lanes (lane l: x[l], x[l + 16], ...), the lanes then added pairwise (8 + 8, 4 +
 * 4, 2 + 2, 1 + 1). Entries past n would add zeros to their lanes, so a row's total is the same whatever the
 * masked entries after its last one. */
static inline float sum_of(const float *x, int64_t n) {
  float lane[16] = {0};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; l++) lane[l] += x[j + l];
  for (int l = 0; j + l < n; l++) lane[l] += x[j + l];
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; l++) lane[l] += lane[l + w];
  return lane[0];
}

typedef struct {
  const void *const *api;
  AttentionDims dims;
} Kernel;

typedef struct {
  const AttentionDims *a;
  const float *q, *cos, *sin, *past_c, *past_k, *new_c, *new_k;
  const uint8_t *mask;
  const char *w;
  float *out;
  int64_t s, p, n, groups; /* queries, past, new, head groups per sequence */
  const int64_t *tok;      /* 0 .. S nh - 1 */
  float *scratch;          /* per task: per_task floats */
  int64_t per_task;
} Work;

/* The cache entry j: past first, then new. */
static inline const float *entry(const float *past, const float *new_, int64_t j, int64_t p, int64_t width) {
  return j < p ? past + j * width : new_ + (j - p) * width;
}

/* The lanes of four accumulators, each totalled as score_dot totals its one: (8 + 8), (4 + 4), then
 * (0 + 2) + (1 + 3). */
static inline v4 total4(v16 a, v16 b, v16 c, v16 d) {
  const v16 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                 __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const v16 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                 __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const v16 q = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const v16 pairs = q + __builtin_shufflevector(q, q, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  const v16 t = pairs + __builtin_shufflevector(pairs, pairs, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return __builtin_shufflevector(t, t, 0, 4, 8, 12);
}

/* score [rows, T] for R and D multiples of 16: score_dot's sums, in its order, four rows at a time, each cache
 * entry's vectors loaded once for the four (a block past the last row repeats the last row; its sums are
 * dropped). */
static void scores_by_four(const float *q_lat, const float *q_rot, int64_t rows, int64_t gh, int64_t R, int64_t D,
                           const float *past_c, const float *past_k, int64_t P, const float *new_c,
                           const float *new_k, int64_t N, const uint8_t *mask, float scale, float *score) {
  const int64_t T = P + N;
  for (int64_t j = 0; j < T; j++) {
    const float *c = entry(past_c, new_c, j, P, R), *k = entry(past_k, new_k, j, P, D);
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const float *ql[4], *qr[4];
      for (int b = 0; b < 4; b++) {
        const int64_t row = r0 + b < rows ? r0 + b : rows - 1;
        ql[b] = q_lat + row * R;
        qr[b] = q_rot + row * D;
      }
      v16 acc[4] = {{0}}, odd[4] = {{0}};
      int64_t i = 0;
      for (; i + 32 <= R; i += 32) {
        const v16 c0 = load16(c + i), c1 = load16(c + i + 16);
        for (int b = 0; b < 4; b++) {
          acc[b] += load16(ql[b] + i) * c0;
          odd[b] += load16(ql[b] + i + 16) * c1;
        }
      }
      for (int b = 0; b < 4; b++) acc[b] += odd[b];
      for (; i < R; i += 16) {
        const v16 c0 = load16(c + i);
        for (int b = 0; b < 4; b++) acc[b] += load16(ql[b] + i) * c0;
      }
      for (i = 0; i < D; i += 16) {
        const v16 k0 = load16(k + i);
        for (int b = 0; b < 4; b++) acc[b] += load16(qr[b] + i) * k0;
      }
      const v4 t = total4(acc[0], acc[1], acc[2], acc[3]);
      for (int b = 0; b < 4 && r0 + b < rows; b++) {
        const int64_t row = r0 + b;
        score[row * T + j] = mask[(row / gh) * T + j] ? t[b] * scale : -FLT_MAX;
      }
    }
  }
}

/* scores_by_four's sums for R = 16 NR and D = 16 ND known when compiled (small latent widths): two rows' query
 * vectors held in registers against two cache entries at a time, so that each score costs its FMAs and a
 * quarter of the totalling, not reloads of the query (a block past the last row or entry repeats it; its sums
 * are dropped). The same sums in the same order as score_dot. */
static inline __attribute__((always_inline)) void scores_in_registers(
    const int NR, const int ND, const float *q_lat, const float *q_rot, int64_t rows, int64_t gh, const float *past_c,
    const float *past_k, int64_t P, const float *new_c, const float *new_k, int64_t N, const uint8_t *mask,
    float scale, float *score) {
  const int64_t T = P + N, R = 16 * NR, D = 16 * ND;
  for (int64_t r0 = 0; r0 < rows; r0 += 2) {
    const int64_t r1 = r0 + 1 < rows ? r0 + 1 : r0;
    v16 q[2][NR + ND];
    for (int i = 0; i < NR; i++) q[0][i] = load16(q_lat + r0 * R + 16 * i), q[1][i] = load16(q_lat + r1 * R + 16 * i);
    for (int i = 0; i < ND; i++)
      q[0][NR + i] = load16(q_rot + r0 * D + 16 * i), q[1][NR + i] = load16(q_rot + r1 * D + 16 * i);
    const uint8_t *m0 = mask + (r0 / gh) * T, *m1 = mask + (r1 / gh) * T;
    for (int64_t j0 = 0; j0 < T; j0 += 2) {
      const int64_t j1 = j0 + 1 < T ? j0 + 1 : j0;
      const float *c[2] = {entry(past_c, new_c, j0, P, R), entry(past_c, new_c, j1, P, R)};
      const float *k[2] = {entry(past_k, new_k, j0, P, D), entry(past_k, new_k, j1, P, D)};
      v16 acc[4] = {{0}}, odd[4] = {{0}}; /* (row, entry): 2 b + e */
      int i = 0;
      for (; i + 2 <= NR; i += 2)
        for (int e = 0; e < 2; e++) {
          const v16 c0 = load16(c[e] + 16 * i), c1 = load16(c[e] + 16 * i + 16);
          for (int b = 0; b < 2; b++) acc[2 * b + e] += q[b][i] * c0, odd[2 * b + e] += q[b][i + 1] * c1;
        }
      for (int x = 0; x < 4; x++) acc[x] += odd[x];
      for (; i < NR; i++)
        for (int e = 0; e < 2; e++) {
          const v16 c0 = load16(c[e] + 16 * i);
          for (int b = 0; b < 2; b++) acc[2 * b + e] += q[b][i] * c0;
        }
      for (int d = 0; d < ND; d++)
        for (int e = 0; e < 2; e++) {
          const v16 k0 = load16(k[e] + 16 * d);
          for (int b = 0; b < 2; b++) acc[2 * b + e] += q[b][NR + d] * k0;
        }
      const v4 t = total4(acc[0], acc[1], acc[2], acc[3]);
      score[r0 * T + j0] = m0[j0] ? t[0] * scale : -FLT_MAX;
      if (j1 != j0) score[r0 * T + j1] = m0[j1] ? t[1] * scale : -FLT_MAX;
      if (r1 != r0) {
        score[r1 * T + j0] = m1[j0] ? t[2] * scale : -FLT_MAX;
        if (j1 != j0) score[r1 * T + j1] = m1[j1] ? t[3] * scale : -FLT_MAX;
      }
    }
  }
}

/* Asks for `bytes` at p to be brought into L2 (a hint; nothing waits). A head's kv_b_proj slices are 32 KB apart
 * reads in DRAM on large models (issue 14's checkpoint: 16 heads a layer), each one a new stream the hardware
 * prefetcher starts cold on: the attention read them at 9-13 GB/s. */
static inline void prefetch_l2(const char *p, size_t bytes) {
  for (size_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 2);
}

size_t attention_scratch_floats(const AttentionDims *a, int64_t s, int64_t heads, int64_t t) {
  return (size_t)(s * heads * (3 * a->r + a->d + t));
}

void attend_heads(const AttentionDims *a, int64_t h0, int64_t h1, const float *q, const float *cos, const float *sin,
                  const uint8_t *mask, int64_t S, const float *past_c, const float *past_k, int64_t P,
                  const float *new_c, const float *new_k, int64_t N, const char *w, const int64_t *tok,
                  float *scratch, float *out) {
  const int64_t nh = a->heads, gh = h1 - h0, R = a->r, D = a->d, T = P + N, width = nh * (a->nope + D), half = D / 2;
  const int64_t rows = S * gh; /* row (s, h) = s * gh + (h - h0) */
  const size_t elem = a->bf16 ? sizeof(uint16_t) : sizeof(float);
  const TokensTimes times = a->bf16 ? tokens_times_bf16 : tokens_times_f32;
  float *q_lat = scratch, *o_lat = q_lat + rows * R, *o_new = o_lat + rows * R, *q_rot = o_new + rows * R;
  float *score = q_rot + rows * D;
  const size_t uk_bytes = (size_t)(a->nope * R) * elem, uv_bytes = (size_t)(a->v * R) * elem;
  for (int64_t h = h0; h < h1; h++) { /* q_lat rows of head h, strided by gh: W_UK[h] read once for all S */
    const char *w_uk = w + (size_t)(h * (a->nope + a->v) * R) * elem;
    /* the next head's W_UK, or the first W_UV^T, on its way to L2 while this head computes */
    prefetch_l2(h + 1 < h1 ? w_uk + uk_bytes + uv_bytes : w + (size_t)(h0 * (a->nope + a->v) * R) * elem + uk_bytes,
                h + 1 < h1 ? uk_bytes : uv_bytes);
    times(w_uk, a->nope, R, q + h * (a->nope + D), width, tok, S, q_lat + (h - h0) * R, gh * R);
    for (int64_t s = 0; s < S; s++) {
      const float *pe = q + s * width + h * (a->nope + D) + a->nope;
      const float *c = cos + s * half, *sn = sin + s * half;
      float *rot = q_rot + (s * gh + h - h0) * D;
      for (int64_t i = 0; i < half; i++) {
        rot[i] = pe[i] * c[i] - pe[i + half] * sn[i];
        rot[i + half] = pe[i + half] * c[i] + pe[i] * sn[i];
      }
    }
  }
  if (R == 64 && D == 16)
    scores_in_registers(4, 1, q_lat, q_rot, rows, gh, past_c, past_k, P, new_c, new_k, N, mask, a->scale, score);
  else if (R % 16 == 0 && D % 16 == 0)
    scores_by_four(q_lat, q_rot, rows, gh, R, D, past_c, past_k, P, new_c, new_k, N, mask, a->scale, score);
  else
    for (int64_t j = 0; j < T; j++) { /* scores: each cache entry read once for the group's rows */
      const float *c = entry(past_c, new_c, j, P, R), *k = entry(past_k, new_k, j, P, D);
      for (int64_t row = 0; row < rows; row++) {
        const int64_t s = row / gh;
        score[row * T + j] =
            mask[s * T + j] ? score_dot(q_lat + row * R, c, R, q_rot + row * D, k, D) * a->scale : -FLT_MAX;
      }
    }
  for (int64_t row = 0; row < rows; row++) { /* softmax over each row */
    float *sc = score + row * T;
    const float top = max_of(sc, T);
    for (int64_t j = 0; j < T; j++) sc[j] = exp_nonpositive(sc[j] - top);
    const float inv = 1.0f / sum_of(sc, T);
    for (int64_t j = 0; j < T; j++) sc[j] *= inv;
  }
  /* o_lat = p_past past_c + p_new new_c, each part a product over its entries in order (the cache entries
   * are the weights' rows: read once for all rows, each row's sums in registers). */
  tokens_times_f32(past_c, P, R, score, T, tok, rows, o_lat, R);
  tokens_times_f32(new_c, N, R, score + P, T, tok, rows, o_new, R);
  for (int64_t i = 0; i < rows * R; i++) o_lat[i] += o_new[i];
  const int64_t dv = a->v, out_width = nh * dv;
  for (int64_t h = h0; h < h1; h++) { /* out[s, h] = o_lat W_UV^T[h]: W_UV^T[h] read once for the S queries */
    const char *w_uv_t = w + (size_t)((h * (a->nope + dv) + a->nope) * R) * elem;
    if (h + 1 < h1) prefetch_l2(w_uv_t + uk_bytes + uv_bytes, uv_bytes); /* the next head's W_UV^T */
    times(w_uv_t, R, dv, o_lat + (h - h0) * R, gh * R, tok, S, out + h * dv, out_width);
  }
}

static void run_task(void *usr, size_t index) {
  const Work *w = (const Work *)usr;
  const AttentionDims *a = w->a;
  const int64_t b = (int64_t)index / w->groups, g = (int64_t)index % w->groups, nh = a->heads;
  const int64_t S = w->s, R = a->r, D = a->d, T = w->p + w->n;
  attend_heads(a, nh * g / w->groups, nh * (g + 1) / w->groups, w->q + b * S * nh * (a->nope + D),
               w->cos + b * S * (D / 2), w->sin + b * S * (D / 2), w->mask + b * S * T, S, w->past_c + b * w->p * R,
               w->past_k + b * w->p * D, w->p, w->new_c + b * w->n * R, w->new_k + b * w->n * D, w->n, w->w, w->tok,
               w->scratch + (int64_t)index * w->per_task, w->out + b * S * nh * a->v);
}

/* The shapes are checked when latent_attention.py rewrites the graph; a call with others leaves the output
 * unset, which fails the run (a node that reads it, or OrtEngine.run for a graph output). */
static void compute(void *kernel, void *ctx) {
  const Kernel *kn = (const Kernel *)kernel;
  const void *const *api = kn->api;
  const void *in[9];
  if (kn->dims.heads < 1 || kn->dims.nope < 1 || kn->dims.v < 1 || !inputs_of(api, ctx, 9, in)) return;
  int64_t d[9][MAX_DIMS];
  size_t nd[9];
  for (int i = 0; i < 9; i++)
    if (!shape_of(api, in[i], d[i], &nd[i]) || nd[i] != (i == 8 ? 2u : 3u)) return;
  AttentionDims a = kn->dims;
  const int64_t nh = a.heads, B = d[0][0], S = d[0][1], P = d[4][1], N = d[6][1], D = d[7][2];
  const int64_t R = d[8][1] / (a.nope + a.v);
  const int ok = d[0][2] == nh * (a.nope + D) && D % 2 == 0 && d[1][0] == B && d[1][1] == S && d[1][2] == D / 2 &&
                 !memcmp(d[1], d[2], sizeof(int64_t) * 3) && d[3][0] == B && d[3][1] == S && d[3][2] == P + N &&
                 d[4][0] == B && d[4][2] == R && d[5][0] == B && d[5][1] == P && d[5][2] == D && d[6][0] == B &&
                 d[6][2] == R && d[7][0] == B && d[7][1] == N && d[8][0] == nh && d[8][1] % (a.nope + a.v) == 0;
  if (!ok || (B * S != 0 && P + N == 0)) return; /* queries need keys */
  a.r = R;
  a.d = D;
  const int64_t shape[3] = {B, S, nh * a.v};
  void *out = NULL;
  if (B * S == 0) { /* an empty batch: an empty output */
    release_status(api, FN(api, GetOutputFn, API_KERNEL_CONTEXT_GET_OUTPUT)(ctx, 0, shape, 3, &out));
    return;
  }
  /* Head groups: one per sequence where the work is small (a task's hand-off costs more than it saves), up to
   * 4 where it is not; each group reads the sequence's cache once. */
  const int64_t fma = S * nh * (a.nope * R + 2 * (P + N) * (R + D) + a.v * R);
  const int64_t groups = fma < (1 << 18) ? 1 : (nh < 4 ? nh : 4);
  Work w = {&a, data_of(api, in[0]), data_of(api, in[1]), data_of(api, in[2]), data_of(api, in[4]),
            data_of(api, in[5]), data_of(api, in[6]), data_of(api, in[7]), data_of(api, in[3]), data_of(api, in[8]),
            NULL, S, P, N, groups, NULL, NULL,
            (int64_t)attention_scratch_floats(&a, S, (nh + groups - 1) / groups, P + N)};
  if (!w.q || !w.cos || !w.sin || !w.mask || !w.w || (P && (!w.past_c || !w.past_k)) || (N && (!w.new_c || !w.new_k)))
    return;
  /* Everything that can fail before the output exists: a failed call leaves it unset, which fails the run (a node that
   * reads it, or OrtEngine.run for a graph output) (never a partial or zero output). */
  int64_t *tok = malloc(sizeof(int64_t) * (size_t)(S * nh)); /* 0, 1, ...: token and row indices */
  w.scratch = malloc(sizeof(float) * (size_t)(B * groups * w.per_task));
  Status *s = tok && w.scratch ? FN(api, GetOutputFn, API_KERNEL_CONTEXT_GET_OUTPUT)(ctx, 0, shape, 3, &out) : NULL;
  if (s) release_status(api, s);
  else if (out && (w.out = data_of(api, out))) {
    for (int64_t i = 0; i < S * nh; i++) tok[i] = i;
    w.tok = tok;
    parallel_for(api, ctx, run_task, (size_t)(B * groups), &w);
  }
  free(tok);
  free(w.scratch);
}

static const char *name_f32(const CustomOp *op) { (void)op; return "LatentAttention"; }
static const char *name_bf16(const CustomOp *op) { (void)op; return "LatentAttentionBf16"; }
static int input_type(const CustomOp *op, size_t i) {
  return i == 3 ? ELEMENT_BOOL : i == 8 && op == &latent_attention_ops[1] ? ELEMENT_UINT16 : ELEMENT_FLOAT;
}
static size_t input_count(const CustomOp *op) { (void)op; return 9; }

static void *create_kernel(const CustomOp *op, const void *api, const void *info);

CustomOp latent_attention_ops[2] = {DEFINE_OP(name_f32, input_type, input_count, create_kernel, compute),
                                    DEFINE_OP(name_bf16, input_type, input_count, create_kernel, compute)};

static void *create_kernel(const CustomOp *op, const void *api, const void *info) {
  Kernel *kn = calloc(1, sizeof(Kernel));
  if (!kn) return NULL;
  kn->api = (const void *const *)api;
  kn->dims.heads = attribute_int(kn->api, info, "num_heads", 0);
  kn->dims.nope = attribute_int(kn->api, info, "nope_dim", 0);
  kn->dims.v = attribute_int(kn->api, info, "v_dim", 0);
  kn->dims.scale = attribute_float(kn->api, info, "scale", 0.0f);
  kn->dims.bf16 = op == &latent_attention_ops[1];
  return kn;
}
