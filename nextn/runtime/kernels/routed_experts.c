/* nextn.RoutedExperts(Bf16): DeepSeekMoE's routed experts for a few tokens, as an ONNX Runtime custom op.
 *
 * Why: ONNX Runtime's CPU `MoE` multiplies each picked expert with a general GEMM on the transposed weight,
 * which repacks the expert's weights on every call. Decoding runs 1-8 tokens a step, so that repacking costs
 * more than reading the weights: on the embedded model 8 layers' experts at one token took 472 us in the op
 * where a plain matrix-vector product of the same weights takes about 110 us (BENCHMARKS.md). This kernel
 * reads each picked expert's rows once, front to back, for all the tokens that picked it.
 *
 * Inputs: the ones of com.microsoft.MoE in the form nextn exports (no biases, SwiGLU with alpha 1 and beta 0, no
 * clamp), with each expert's weights transposed so that a token's products read whole rows; both stacks fp32
 * (RoutedExperts), or uint16 holding bfloat16 bit patterns (RoutedExpertsBf16: a bf16 checkpoint's weights in
 * half the bytes; each widens to fp32 exactly, and the arithmetic is fp32 either way):
 *   input        [..., H] fp32        the tokens (any leading shape; N = numel / H rows)
 *   router_probs [N, E]   fp32        a softmax over each row picks the top k experts and weighs them
 *   fc1          [E, P, H, 2J]        per expert and part p of its I = P J units: the gate's J columns, then the
 *                                     up's (units [p J, (p + 1) J)); each [H, 2J] stored in column blocks
 *   fc2          [E, I, H]            each part's [J, H] rows stored in column blocks (blocked_times)
 *   attributes   k, normalize_routing_weights (renormalize the k weights to sum to 1)
 *   output       [..., H]  = sum over the k picked experts e of weight_e * (silu(x fc1_gate) * (x fc1_up)) fc2
 * routed_experts.py lays the MoE's stacks out so when a session opens.
 *
 * Each token's products are computed the same way whatever the other tokens are and whatever the threads, so
 * a token's output does not depend on how many tokens share the call (a verify pass and a one-token step agree
 * bit for bit). The (expert, part) tasks run on the session's intra-op threads.
 *
 * Registered with nextn's other ops by ort_api.c; built by nextn/runtime/native.py with the machine's C
 * compiler.
 */
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

#include "ort_api.h"
#include "products.h"
#include "qmm.h"

/* -- the arithmetic --------------------------------------------------------------------------------------- */
static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline float load_bf16(const uint16_t *p, int64_t i) { /* bf16 is fp32's upper half: exact */
  uint32_t bits = (uint32_t)p[i] << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

/* 16 bf16 weights widened to fp32 lanes (one vector conversion and shift, where a per-element load let the
 * compiler widen them one at a time; fp32 weights: products.h's load16). */
static inline v16 load16_bf16(const uint16_t *p) {
#ifdef __AVX512F__ /* one widening load and a shift (gcc splits the generic form below into 256-bit halves) */
  return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#else
  u16x16 h;
  memcpy(&h, p, sizeof h);
  const u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
  v16 v;
  memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

/* out_t[c0 : c0 + C] = sum over r of x_t[r] * W[r][c0 : c0 + C] for T tokens at once (x_t = x + tok[t] * ldx,
 * out_t = out + t * ldo, W [rows, n] row-major). W's chunk is read once for all T tokens, row by row (each 16
 * weights loaded once for the T tokens), and each token's sums run over r in order: a token's result does not
 * depend on which tokens share the call, nor on the chunk widths. T x C / 16 vector accumulators fit the
 * registers. */
#define DEFINE_CHUNK(NAME, WT, LOAD16, T, C)                                                                     \
  static void NAME##_##T##_##C(const WT *restrict w, int64_t rows, int64_t n, int64_t c0, const float *restrict x, \
                               int64_t ldx, const int64_t *tok, float *restrict out, int64_t ldo) {             \
    v16 acc[T][C / 16];                                                                                          \
    for (int t = 0; t < T; t++)                                                                                  \
      for (int l = 0; l < C / 16; l++) acc[t][l] = (v16){0};                                                     \
    for (int64_t r = 0; r < rows; r++) {                                                                         \
      const WT *wr = w + r * n + c0;                                                                             \
      float xv[T];                                                                                               \
      for (int t = 0; t < T; t++) xv[t] = x[tok[t] * ldx + r];                                                   \
      for (int l = 0; l < C / 16; l++) {                                                                         \
        const v16 wv = LOAD16(wr + 16 * l);                                                                      \
        for (int t = 0; t < T; t++) acc[t][l] += xv[t] * wv;                                                     \
      }                                                                                                          \
    }                                                                                                            \
    for (int t = 0; t < T; t++) memcpy(out + t * ldo + c0, acc[t], sizeof(acc[t]));                              \
  }

/* bf16 weights 32 at a time: one 64-byte load holds 16 pairs of columns (the even column in the lower half), so
 * the even columns widen by a shift and the odd ones by a mask, two operations per 32 weights where widening 16
 * takes two. The even and odd columns' sums are interleaved back when stored: the same products, summed in the
 * same order, as DEFINE_CHUNK's. */
static inline void load32_bf16_pairs(const uint16_t *p, v16 *even, v16 *odd) {
  u32x16 bits;
  memcpy(&bits, p, sizeof bits);
  const u32x16 e = bits << 16, o = bits & 0xffff0000u;
  memcpy(even, &e, sizeof *even);
  memcpy(odd, &o, sizeof *odd);
}
static inline void store_interleaved(float *out, v16 even, v16 odd) {
#if defined(__clang__) || __GNUC__ >= 12
  const v16 lo = __builtin_shufflevector(even, odd, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const v16 hi = __builtin_shufflevector(even, odd, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  memcpy(out, &lo, sizeof lo);
  memcpy(out + 16, &hi, sizeof hi);
#else
  for (int i = 0; i < 16; i++) out[2 * i] = even[i], out[2 * i + 1] = odd[i];
#endif
}
#define DEFINE_CHUNK_PAIRS(NAME, WT, LOAD16, T, C)                                                              \
  static void NAME##_##T##_##C(const WT *restrict w, int64_t rows, int64_t n, int64_t c0, const float *restrict x, \
                               int64_t ldx, const int64_t *tok, float *restrict out, int64_t ldo) {             \
    v16 even[T][C / 32], odd[T][C / 32];                                                                         \
    for (int t = 0; t < T; t++)                                                                                  \
      for (int l = 0; l < C / 32; l++) even[t][l] = odd[t][l] = (v16){0};                                        \
    for (int64_t r = 0; r < rows; r++) {                                                                         \
      const WT *wr = w + r * n + c0;                                                                             \
      float xv[T];                                                                                               \
      for (int t = 0; t < T; t++) xv[t] = x[tok[t] * ldx + r];                                                   \
      for (int l = 0; l < C / 32; l++) {                                                                         \
        v16 e, o;                                                                                                \
        load32_bf16_pairs(wr + 32 * l, &e, &o);                                                                  \
        for (int t = 0; t < T; t++) even[t][l] += xv[t] * e, odd[t][l] += xv[t] * o;                             \
      }                                                                                                          \
    }                                                                                                            \
    for (int t = 0; t < T; t++)                                                                                  \
      for (int l = 0; l < C / 32; l++) store_interleaved(out + t * ldo + c0 + 32 * l, even[t][l], odd[t][l]);    \
  }

/* Columns [c0, n) at the remaining widths, one by one: the last < 16 columns of a row. */
#define DEFINE_TAIL(NAME, WT, LOAD)                                                                              \
  static void NAME##_tail(const WT *w, int64_t rows, int64_t n, int64_t c0, const float *x, int64_t ldx,         \
                          const int64_t *tok, int64_t m, float *out, int64_t ldo) {                             \
    for (; c0 < n; c0++)                                                                                         \
      for (int64_t t = 0; t < m; t++) {                                                                          \
        float a = 0.0f;                                                                                          \
        for (int64_t r = 0; r < rows; r++) a += x[tok[t] * ldx + r] * LOAD(w, r * n + c0);                       \
        out[t * ldo + c0] = a;                                                                                   \
      }                                                                                                          \
  }

/* T tokens over all n columns: the widest chunks first, so that few passes over the rows read them front to
 * back (what the prefetchers follow best when the weights come from memory). */
#define CHUNKS(NAME, T, C)                                                                                       \
  for (; c0 + C <= n; c0 += C) NAME##_##T##_##C(w, rows, n, c0, x, ldx, tok, out, ldo);
#define DEFINE_TOKENS_TIMES(NAME, WT, LOAD, LOAD16, WIDE) /* WIDE: the chunk of C % 32 == 0 columns */        \
  WIDE(NAME, WT, LOAD16, 1, 256) WIDE(NAME, WT, LOAD16, 1, 192) WIDE(NAME, WT, LOAD16, 1, 128)                    \
  WIDE(NAME, WT, LOAD16, 1, 96) WIDE(NAME, WT, LOAD16, 1, 64) DEFINE_CHUNK(NAME, WT, LOAD16, 1, 16)              \
  WIDE(NAME, WT, LOAD16, 2, 128) WIDE(NAME, WT, LOAD16, 2, 96) WIDE(NAME, WT, LOAD16, 2, 64)                     \
  DEFINE_CHUNK(NAME, WT, LOAD16, 2, 16)                                                                          \
  WIDE(NAME, WT, LOAD16, 3, 96) WIDE(NAME, WT, LOAD16, 3, 64) DEFINE_CHUNK(NAME, WT, LOAD16, 3, 16)              \
  WIDE(NAME, WT, LOAD16, 4, 96) WIDE(NAME, WT, LOAD16, 4, 64) DEFINE_CHUNK(NAME, WT, LOAD16, 4, 16)              \
  DEFINE_TAIL(NAME, WT, LOAD)                                                                                    \
  static void NAME##_group(const WT *w, int64_t rows, int64_t n, const float *x, int64_t ldx, const int64_t *tok, \
                           int64_t g, float *out, int64_t ldo) {                                                \
    int64_t c0 = 0;                                                                                              \
    if (g == 1) { CHUNKS(NAME, 1, 256) CHUNKS(NAME, 1, 192) CHUNKS(NAME, 1, 128) CHUNKS(NAME, 1, 96)             \
                  CHUNKS(NAME, 1, 64) CHUNKS(NAME, 1, 16) }                                                      \
    else if (g == 2) { CHUNKS(NAME, 2, 128) CHUNKS(NAME, 2, 96) CHUNKS(NAME, 2, 64) CHUNKS(NAME, 2, 16) }        \
    else if (g == 3) { CHUNKS(NAME, 3, 96) CHUNKS(NAME, 3, 64) CHUNKS(NAME, 3, 16) }                              \
    else { CHUNKS(NAME, 4, 96) CHUNKS(NAME, 4, 64) CHUNKS(NAME, 4, 16) }                                          \
    NAME##_tail(w, rows, n, c0, x, ldx, tok, g, out, ldo);                                                       \
  }                                                                                                              \
  /* out[t] = x[tok[t]] @ W for m tokens, in groups of up to 4. */                                               \
  void NAME(const void *weights, int64_t rows, int64_t n, const float *x, int64_t ldx, const int64_t *tok, \
                   int64_t m, float *out, int64_t ldo) {                                                         \
    for (int64_t j = 0; j < m; j += 4)                                                                           \
      NAME##_group((const WT *)weights, rows, n, x, ldx, tok + j, m - j < 4 ? m - j : 4, out + j * ldo, ldo);    \
  }
DEFINE_TOKENS_TIMES(tokens_times_f32, float, load_f32, load16, DEFINE_CHUNK)
DEFINE_TOKENS_TIMES(tokens_times_bf16, uint16_t, load_bf16, load16_bf16, DEFINE_CHUNK_PAIRS)

/* The top k of a softmax over row [E] -> experts [k], weights [k] (normalized to sum 1 if asked). */
static void route(const float *row, int64_t n_experts, int64_t k, int normalize, int64_t *experts, float *weights) {
  float top = row[0];
  for (int64_t e = 1; e < n_experts; e++) top = row[e] > top ? row[e] : top;
  double total = 0.0;
  for (int64_t e = 0; e < n_experts; e++) total += expf(row[e] - top);
  float picked_sum = 0.0f;
  for (int64_t j = 0; j < k; j++) {
    int64_t best = -1;
    for (int64_t e = 0; e < n_experts; e++) {
      int taken = 0;
      for (int64_t q = 0; q < j; q++) taken |= experts[q] == e;
      if (!taken && (best < 0 || row[e] > row[best])) best = e;
    }
    experts[j] = best;
    weights[j] = (float)(expf(row[best] - top) / total);
    picked_sum += weights[j];
  }
  if (normalize)
    for (int64_t j = 0; j < k; j++) weights[j] /= picked_sum;
}

/* The routed experts' work, in tasks: one per (picked expert, part of its intermediate units). A part of an
 * expert's SwiGLU MLP is a sum over its units, so each task computes its tokens' partial outputs on its own,
 * and ONNX Runtime's intra-op threads share the tasks (KernelContext_ParallelFor). The partial outputs are
 * then added in task order, so the result depends neither on the threads nor on the other tokens. */
typedef struct {
  int64_t expert, part, first, m; /* its tokens: tokens[first : first + m] */
  float *scratch;                 /* TASK_FLOATS(m) floats: x [m, H] (4- and 8-bit only), h1 [m, 2J], act [m, J] */
  float *out;                     /* [m, H] its partial outputs */
} Task;
#define TASK_FLOATS(m, hidden, width) ((m) * (2 * (hidden) + 3 * (width)))

typedef struct {
  TokensTimes times;
  const float *x;
  const char *fc1, *fc2; /* fc1 [E, P, H, 2J]: per part the gate's J columns, then the up's; fc2 [E, I, H] */
  size_t elem;           /* bytes of a weight */
  int64_t hidden, inter, parts, width; /* H, I, P, J = I / P */
  int64_t block;         /* the parts' column blocks (0: whole rows; blocked_times) */
  int64_t bits;          /* 4 or 8: QRoutedExperts' packed parts (run_task_q); 0: fp32 or bf16 stacks */
  const uint8_t *packed; /* QRoutedExperts: weights [E, P, part_bytes], params [E, P, part_floats] */
  const float *params;
  int64_t part_bytes, part_floats;
  const int64_t *tokens;
  Task *tasks;
} Work;

/* times() over a [rows, n] matrix stored in column blocks of `block` (0: whole rows; routed_experts.py lays each
 * expert part's fc1 and fc2 out so where they are large, and says so in the node's block_cols: block b, columns
 * [b block, ...), a row-major [rows, width] array, the blocks one after another). A block's chunks then read
 * memory front to back at every token count; over whole rows the chunk passes of 2-4 tokens read each row in
 * strided pieces, which DRAM-resident weights (issue 14's 1 GB checkpoint) streamed at 12-15 GB/s against 20-24
 * (BENCHMARKS.md). Each column's sums are the same. */
static void blocked_times(TokensTimes times, size_t elem, int64_t block, const char *w, int64_t rows, int64_t n,
                          const float *x, int64_t ldx, const int64_t *tok, int64_t m, float *out, int64_t ldo) {
  if (block <= 0) block = n;
  for (int64_t c0 = 0; c0 < n; c0 += block) {
    const int64_t width = n - c0 < block ? n - c0 : block;
    times(w + (size_t)(rows * c0) * elem, rows, width, x, ldx, tok, m, out + c0, ldo);
  }
}

/* act [m, J] = silu(gate) * up of h1 [m, 2J] (each row: the gate's J columns, then the up's). */
static void swiglu_rows(const float *h1, int64_t m, int64_t width, float *act) {
  for (int64_t r = 0; r < m; r++) {
    const float *g = h1 + r * 2 * width, *u = g + width;
    float *a = act + r * width;
    for (int64_t i = 0; i < width; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
  }
}

static void run_task(void *usr, size_t index) {
  static const int64_t own[4] = {0, 1, 2, 3};
  const Work *w = (const Work *)usr;
  const Task *t = &w->tasks[index];
  const int64_t h = w->hidden, j2 = 2 * w->width, m = t->m;
  float *h1 = t->scratch, *act = h1 + m * j2;
  const char *fc1 = w->fc1 + (size_t)((t->expert * w->parts + t->part) * h * j2) * w->elem;
  const char *fc2 = w->fc2 + (size_t)((t->expert * w->inter + t->part * w->width) * h) * w->elem;
  blocked_times(w->times, w->elem, w->block, fc1, h, j2, w->x, h, w->tokens + t->first, m, h1, j2);
  swiglu_rows(h1, m, w->width, act);
  for (int64_t r = 0; r < m; r += 4) /* act's rows are its own tokens 0..m-1 */
    blocked_times(w->times, w->elem, w->block, fc2, w->width, h, act + r * w->width, w->width, own,
                  m - r < 4 ? m - r : 4, t->out + r * h, h);
}

/* -- 4- and 8-bit experts (QRoutedExperts) ------------------------------------------------------------------
 * Each (expert, part) is two packed matrices (qmm.h), one after the other in weights [E, P, part bytes] and
 * params [E, P, part floats]: fc1's [H, 2J] (the part's gate columns, then its up ones), then fc2's [J, H]
 * (routed_experts.py's quantized_stacks writes them from QMoE's). */
static void run_task_q(void *usr, size_t index) {
  const Work *w = (const Work *)usr;
  const Task *t = &w->tasks[index];
  const int64_t h = w->hidden, j = w->width, m = t->m, part = t->expert * w->parts + t->part;
  const uint8_t *q = w->packed + part * w->part_bytes;
  const float *s = w->params + part * w->part_floats;
  const QMat fc1 = qmat(h, 2 * j, w->block, w->bits, q, s); /* fc2 right after it */
  const QMat fc2 =
      qmat(j, h, w->block, w->bits, q + qmat_bytes(h, 2 * j, w->bits), s + qmat_floats(h, 2 * j, w->block));
  float *x = t->scratch, *h1 = x + m * h, *act = h1 + m * 2 * j;
  for (int64_t r = 0; r < m; r++) memcpy(x + r * h, w->x + w->tokens[t->first + r] * h, sizeof(float) * (size_t)h);
  qmm(&fc1, x, h, m, h1, 2 * j);
  swiglu_rows(h1, m, j, act);
  qmm(&fc2, act, j, m, t->out, h);
}

/* -- the ops ---------------------------------------------------------------------------------------------- */
typedef struct {
  const void *const *api;
  int64_t k, block_cols, bits, block_size, inter;
  int normalize;
  TokensTimes times; /* by the weights' element type */
} Kernel;

/* Route each of the rows to its k experts, run the (expert, part) tasks on the threads and add their outputs in
 * task order into the op's output (shape xd). A call that fails before the output exists leaves it unset, which
 * fails the run (a node that reads it, or OrtEngine.run for a graph output): never a partial or zero output. */
static void run_experts(const Kernel *kn, void *ctx, const int64_t *xd, size_t xn, int64_t rows, const float *probs,
                        int64_t n_experts, Work *w, void (*task)(void *, size_t)) {
  const void *const *api = kn->api;
  const int64_t k = kn->k, hidden = w->hidden, parts = w->parts;
  int64_t *picked = malloc(sizeof(int64_t) * (size_t)(2 * rows * k)), *tokens = picked + rows * k;
  float *weights = malloc(sizeof(float) * (size_t)(2 * rows * k + parts * TASK_FLOATS(rows * k, hidden, w->width)));
  Task *tasks = malloc(sizeof(Task) * (size_t)(n_experts * parts));
  void *out = NULL;
  Status *s = picked && weights && tasks ? FN(api, GetOutputFn, API_KERNEL_CONTEXT_GET_OUTPUT)(ctx, 0, xd, xn, &out)
                                         : NULL;
  float *y = !s && out ? data_of(api, out) : NULL;
  release_status(api, s);
  if (!y) { free(picked); free(weights); free(tasks); return; }
  memset(y, 0, (size_t)(rows * hidden) * sizeof(float));
  float *token_weight = weights + rows * k, *scratch = token_weight + rows * k;
  for (int64_t t = 0; t < rows; t++)
    route(probs + t * n_experts, n_experts, k, kn->normalize, picked + t * k, weights + t * k);
  size_t n_tasks = 0;
  for (int64_t e = 0, used = 0; e < n_experts; e++) { /* each expert once, over its tokens in token order */
    int64_t m = 0;
    for (int64_t t = 0; t < rows; t++)
      for (int64_t j = 0; j < k; j++)
        if (picked[t * k + j] == e) { tokens[used + m] = t; token_weight[used + m] = weights[t * k + j]; m++; }
    for (int64_t p = 0; m && p < parts; p++) {
      tasks[n_tasks++] = (Task){e, p, used, m, scratch, scratch + m * (hidden + 3 * w->width)};
      scratch += TASK_FLOATS(m, hidden, w->width);
    }
    used += m;
  }
  w->tokens = tokens;
  w->tasks = tasks;
  parallel_for(api, ctx, task, n_tasks, w);
  for (size_t i = 0; i < n_tasks; i++) { /* in task order: expert, then part */
    const Task *t = &tasks[i];
    for (int64_t r = 0; r < t->m; r++) {
      float *yt = y + tokens[t->first + r] * hidden;
      const float wr = token_weight[t->first + r], *o = t->out + r * hidden;
      for (int64_t c = 0; c < hidden; c++) yt[c] += wr * o[c];
    }
  }
  free(picked);
  free(weights);
  free(tasks);
}

/* The inputs' shapes and data, checked (routed_experts.py checks them when it rewrites the graph; a call with
 * others leaves the output unset, which fails the run). -> 0 where they do not fit; an empty call gets its
 * empty output here. */
static int read_inputs(const void *const *api, void *ctx, const void **in, int64_t dims[4][MAX_DIMS],
                       size_t ranks[4], const size_t want[4], int64_t *rows) {
  if (!inputs_of(api, ctx, 4, in)) return 0;
  for (int i = 0; i < 4; i++)
    if (!shape_of(api, in[i], dims[i], &ranks[i]) || (want[i] && ranks[i] != want[i])) return 0;
  if (ranks[0] < 1) return 0;
  *rows = leading_rows(dims[0], ranks[0]);
  if (dims[1][0] != *rows) return 0;
  if (*rows == 0) { /* no tokens: an empty output */
    void *out = NULL;
    release_status(api, FN(api, GetOutputFn, API_KERNEL_CONTEXT_GET_OUTPUT)(ctx, 0, dims[0], ranks[0], &out));
    return 0;
  }
  for (int i = 0; i < 4; i++)
    if (!data_of(api, in[i])) return 0;
  return 1;
}

static void compute(void *kernel, void *ctx) {
  const Kernel *kn = (const Kernel *)kernel;
  static const size_t want[4] = {0, 2, 4, 3};
  const void *in[4];
  int64_t d[4][MAX_DIMS], rows;
  size_t nd[4];
  if (!read_inputs(kn->api, ctx, in, d, nd, want, &rows)) return;
  const int64_t hidden = d[0][nd[0] - 1], n_experts = d[2][0], parts = d[2][1], inter = d[3][1], k = kn->k;
  if (d[1][1] != n_experts || parts < 1 || inter % parts || d[2][2] != hidden || d[2][3] != 2 * inter / parts ||
      d[3][0] != n_experts || d[3][2] != hidden || k < 1 || k > n_experts)
    return;
  Work w = {kn->times, data_of(kn->api, in[0]), data_of(kn->api, in[2]), data_of(kn->api, in[3]),
            kn->times == tokens_times_bf16 ? sizeof(uint16_t) : sizeof(float), hidden, inter, parts,
            inter / parts, kn->block_cols, 0, NULL, NULL, 0, 0, NULL, NULL};
  run_experts(kn, ctx, d[0], nd[0], rows, data_of(kn->api, in[1]), n_experts, &w, run_task);
}

/* QRoutedExperts: x, router_probs, weights uint8 [E, P, part bytes], params fp32 [E, P, part floats]; attributes
 * k, normalize_routing_weights, bits, block_size, inter (I, in P parts of J). */
static void compute_q(void *kernel, void *ctx) {
  const Kernel *kn = (const Kernel *)kernel;
  static const size_t want[4] = {0, 2, 3, 3};
  const void *in[4];
  int64_t d[4][MAX_DIMS], rows;
  size_t nd[4];
  if (!read_inputs(kn->api, ctx, in, d, nd, want, &rows)) return;
  const int64_t hidden = d[0][nd[0] - 1], n_experts = d[2][0], parts = d[2][1], inter = kn->inter, k = kn->k;
  const int64_t j = parts > 0 ? inter / parts : 0, bits = kn->bits, block = kn->block_size;
  if (d[1][1] != n_experts || parts < 1 || inter < 1 || inter % parts || j % 8 || hidden % 8 || block < 8 ||
      block % 8 || (parts > 1 && j % block) || (bits != 4 && bits != 8) || k < 1 || k > n_experts ||
      d[3][0] != n_experts || d[3][1] != parts)
    return;
  const int64_t part_bytes = qmat_bytes(hidden, 2 * j, bits) + qmat_bytes(j, hidden, bits);
  const int64_t part_floats = qmat_floats(hidden, 2 * j, block) + qmat_floats(j, hidden, block);
  if (d[2][2] != part_bytes || d[3][2] != part_floats) return;
  Work w = {NULL, data_of(kn->api, in[0]), NULL, NULL, 1, hidden, inter, parts, j, block, bits,
            data_of(kn->api, in[2]), data_of(kn->api, in[3]), part_bytes, part_floats, NULL, NULL};
  run_experts(kn, ctx, d[0], nd[0], rows, data_of(kn->api, in[1]), n_experts, &w, run_task_q);
}

static const char *name_f32(const CustomOp *op) { (void)op; return "RoutedExperts"; }
static const char *name_bf16(const CustomOp *op) { (void)op; return "RoutedExpertsBf16"; }
static const char *name_q(const CustomOp *op) { (void)op; return "QRoutedExperts"; }
static int input_type_bf16(const CustomOp *op, size_t i) { (void)op; return i < 2 ? ELEMENT_FLOAT : ELEMENT_UINT16; }
static int input_type_q(const CustomOp *op, size_t i) { (void)op; return i == 2 ? ELEMENT_UINT8 : ELEMENT_FLOAT; }
static size_t input_count(const CustomOp *op) { (void)op; return 4; }

static void *create_kernel(const CustomOp *op, const void *api, const void *info);

CustomOp routed_experts_ops[3] = {DEFINE_OP(name_f32, op_float_type, input_count, create_kernel, compute),
                                  DEFINE_OP(name_bf16, input_type_bf16, input_count, create_kernel, compute),
                                  DEFINE_OP(name_q, input_type_q, input_count, create_kernel, compute_q)};

static void *create_kernel(const CustomOp *op, const void *api, const void *info) {
  Kernel *kn = calloc(1, sizeof(Kernel));
  if (!kn) return NULL;
  kn->api = (const void *const *)api;
  kn->times = op == &routed_experts_ops[1] ? tokens_times_bf16 : tokens_times_f32;
  kn->k = attribute_int(kn->api, info, "k", 0); /* routed_experts.py rewrites only nodes with 1 <= k; compute checks k <= E */
  kn->normalize = attribute_int(kn->api, info, "normalize_routing_weights", 0) != 0;
  kn->block_cols = attribute_int(kn->api, info, "block_cols", 0); /* routed_experts.py's layout of the stacks */
  kn->bits = attribute_int(kn->api, info, "bits", 0);           /* QRoutedExperts' */
  kn->block_size = attribute_int(kn->api, info, "block_size", 0);
  kn->inter = attribute_int(kn->api, info, "inter", 0);
  return kn;
}
