/* nextn.Int8MatMul: one int8 linear of the static Q/DQ form nextn's int8 calibration writes, in one node.
 *
 *     x -> QuantizeLinear(x_scale, x_zero uint8) -> DequantizeLinear -> MatMul <- DequantizeLinear(W int8 [K, N],
 *                                                                                 w_scale [N], zero 0, axis 1)
 * ONNX Runtime fuses that into QuantizeLinear + MatMulIntegerToFloat: x rounded to uint8, the products summed in
 * int32 (exact), then one multiply per output by x_scale w_scale[n]. This kernel computes the same three steps,
 * so its outputs are ONNX Runtime's bit for bit (tested), and a row's output depends only on that row.
 * Why: MatMulIntegerToFloat read issue 14's int8 linears at 12-16 GB/s at one row (its head 2.1 ms for 33 MB);
 * these loops read one 64-byte vector of weights per VNNI instruction, front to back (BENCHMARKS.md).
 *
 * Inputs (int8_matmul.py rewrites the Q/DQ linears to this op when a session opens):
 *   x      [..., K]         fp32
 *   w      [tiles K4 64]    uint8  W + 128 (W's int8 values as VNNI's unsigned operand) in tiles of 16 columns, each
 *                                  [K4 = ceil(K / 4), 16, 4]: byte (g, c, j) of tile t is column 16 t + c at row
 *                                  4 g + j (W is 0 past K and N)
 *   scale  [N]              fp32   x_scale w_scale[n], the multiply MatMulIntegerToFloat does
 *   zero   [N]              int32  (x_zero - 128) sum_k W[k, n]: what moving the zero point to 128 takes back
 *   attributes n (N), x_scale, x_zero
 *   output [..., N]
 * Tasks are (block of TILES_PER_TASK tiles, group of up to ROWS_PER_TASK rows) on the session's intra-op threads.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ort_api.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define HAVE_VNNI 1
#else
#define HAVE_VNNI 0
#endif

typedef int32_t quad __attribute__((may_alias, aligned(1))); /* four activations read as one operand */

enum {
  TILE = 16, ROWS = 4, TILES_PER_TASK = 4, ROWS_PER_TASK = 64,
  SMALL = 1 << 16 /* weight bytes x rows: under it a call stays on this thread (a hand-off costs more) */
};

typedef struct {
  const void *const *api;
  int64_t n, x_zero;
  float x_scale;
} Kernel;

typedef struct {
  const int8_t *xs;     /* [rows, 4 K4] the rounded activations less 128 */
  const int32_t *xsum;  /* [rows] their sums */
  const uint8_t *w;
  const float *scale;
  const int32_t *zero;
  float *y;
  int64_t k4, n, rows, tiles, blocks;
} Work;

/* x rounded as QuantizeLinear rounds it (x / scale to the nearest integer, ties to even, plus the zero point,
 * saturated to 0 .. 255), less 128: int8, the operand VNNI broadcasts. */
static void quantize_rows(const float *x, int64_t rows, int64_t k, int64_t k4, float scale, int64_t zero, int8_t *xs,
                          int32_t *xsum) {
  for (int64_t r = 0; r < rows; r++) {
    int8_t *q = xs + r * 4 * k4;
    int64_t i = 0;
#if HAVE_VNNI /* 16 at a time: the same division, rounding and saturation */
    const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps((float)zero);
    const __m512 lo = _mm512_setzero_ps(), hi = _mm512_set1_ps(255.0f), mid = _mm512_set1_ps(128.0f);
    for (; i + 16 <= k; i += 16) {
      const __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + r * k + i), s),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 c = _mm512_sub_ps(_mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, z), lo), hi), mid);
      _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c)));
    }
#endif
    for (; i < k; i++) {
      const float v = nearbyintf(x[r * k + i] / scale) + (float)zero;
      q[i] = (int8_t)((v < 0.0f ? 0.0f : v > 255.0f ? 255.0f : v) - 128.0f);
    }
    memset(q + k, 0, (size_t)(4 * k4 - k)); /* rows past K: nothing to add */
    int32_t total = 0;
    for (i = 0; i < k; i++) total += q[i];
    xsum[r] = total;
  }
}

/* One tile (16 columns) for NR rows: the (W + 128) x (x - 128) products summed in int32, four chains per row. */
static inline __attribute__((always_inline)) void tile_sums(const uint8_t *w, int64_t k4, const int8_t *xs,
                                                           int64_t ldq, const int NR, int32_t sums[ROWS][TILE]) {
#if HAVE_VNNI
  __m512i acc[ROWS][4];
  for (int r = 0; r < NR; r++)
    for (int i = 0; i < 4; i++) acc[r][i] = _mm512_setzero_si512();
  int64_t g = 0;
  for (; g + 4 <= k4; g += 4) {
    const __m512i w0 = _mm512_loadu_si512((const void *)(w + (g + 0) * 64));
    const __m512i w1 = _mm512_loadu_si512((const void *)(w + (g + 1) * 64));
    const __m512i w2 = _mm512_loadu_si512((const void *)(w + (g + 2) * 64));
    const __m512i w3 = _mm512_loadu_si512((const void *)(w + (g + 3) * 64));
    for (int r = 0; r < NR; r++) {
      const quad *a = (const quad *)(xs + r * ldq + 4 * g); /* each broadcast to the 16 columns, from memory */
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], w0, _mm512_set1_epi32(a[0]));
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], w1, _mm512_set1_epi32(a[1]));
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], w2, _mm512_set1_epi32(a[2]));
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], w3, _mm512_set1_epi32(a[3]));
    }
  }
  for (; g < k4; g++) {
    const __m512i w0 = _mm512_loadu_si512((const void *)(w + g * 64));
    for (int r = 0; r < NR; r++) {
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], w0, _mm512_set1_epi32(*(const quad *)(xs + r * ldq + 4 * g)));
    }
  }
  for (int r = 0; r < NR; r++)
    _mm512_storeu_si512((void *)sums[r], _mm512_add_epi32(_mm512_add_epi32(acc[r][0], acc[r][1]),
                                                          _mm512_add_epi32(acc[r][2], acc[r][3])));
#else /* the same integer sums, one value at a time */
  for (int r = 0; r < NR; r++)
    for (int c = 0; c < TILE; c++) {
      int32_t s = 0;
      for (int64_t g = 0; g < k4; g++)
        for (int j = 0; j < 4; j++) s += (int32_t)w[g * 64 + 4 * c + j] * (int32_t)xs[r * ldq + 4 * g + j];
      sums[r][c] = s;
    }
#endif
}

/* Rows r0 .. r0 + NR - 1 of tile t: the exact sum of W (x_q - x_zero), times scale, as MatMulIntegerToFloat's
 * output step: (W + 128)(x - 128) less 128 sum(x - 128) is W (x - 128); less zero, W (x - x_zero). */
static inline __attribute__((always_inline)) void tile_rows(const Work *w, int64_t t, int64_t r0, const int NR) {
  int32_t sums[ROWS][TILE];
  const int64_t ldq = 4 * w->k4;
  tile_sums(w->w + t * w->k4 * 64, w->k4, w->xs + r0 * ldq, ldq, NR, sums);
  const int64_t c0 = t * TILE, width = w->n - c0 < TILE ? w->n - c0 : TILE;
  for (int r = 0; r < NR; r++) {
    float *y = w->y + (r0 + r) * w->n + c0;
    const int32_t shift = 128 * w->xsum[r0 + r];
    for (int64_t c = 0; c < width; c++) y[c] = (float)(sums[r][c] - shift - w->zero[c0 + c]) * w->scale[c0 + c];
  }
}

static void run_task(void *usr, size_t index) {
  const Work *w = (const Work *)usr;
  const int64_t b = (int64_t)index % w->blocks, g = (int64_t)index / w->blocks;
  const int64_t t0 = b * TILES_PER_TASK, t1 = t0 + TILES_PER_TASK < w->tiles ? t0 + TILES_PER_TASK : w->tiles;
  const int64_t r0 = g * ROWS_PER_TASK, r1 = r0 + ROWS_PER_TASK < w->rows ? r0 + ROWS_PER_TASK : w->rows;
  for (int64_t r = r0; r < r1; r += ROWS)
    for (int64_t t = t0; t < t1; t++) switch (r1 - r < ROWS ? r1 - r : ROWS) {
        case 4: tile_rows(w, t, r, 4); break;
        case 3: tile_rows(w, t, r, 3); break;
        case 2: tile_rows(w, t, r, 2); break;
        default: tile_rows(w, t, r, 1); break;
      }
}

/* A call with shapes off the contract leaves the output unset, which fails the run. */
static void compute(void *kernel, void *ctx) {
  const Kernel *kn = (const Kernel *)kernel;
  const void *const *api = kn->api;
  const void *in[4];
  if (!inputs_of(api, ctx, 4, in)) return;
  int64_t xd[MAX_DIMS], wd[MAX_DIMS], sd[MAX_DIMS], zd[MAX_DIMS];
  size_t xn, wn, sn, zn;
  if (!shape_of(api, in[0], xd, &xn) || !shape_of(api, in[1], wd, &wn) || !shape_of(api, in[2], sd, &sn) ||
      !shape_of(api, in[3], zd, &zn) || xn < 1 || wn != 1 || sn != 1 || zn != 1)
    return;
  const int64_t k = xd[xn - 1], n = kn->n, k4 = (k + 3) / 4, tiles = (n + TILE - 1) / TILE;
  if (k < 1 || n < 1 || wd[0] != tiles * k4 * 64 || sd[0] != n || zd[0] != n) return;
  const int64_t rows = leading_rows(xd, xn);
  const float *x = data_of(api, in[0]);
  int8_t *xs = rows ? malloc((size_t)(rows * (4 * k4 + 4))) : NULL; /* then the rows' sums */
  float *y = (x && xs) || !rows ? product_output(api, ctx, xd, xn, n) : NULL;
  if (y && rows) {
    int32_t *xsum = (int32_t *)(xs + rows * 4 * k4); /* 4 k4 bytes a row: the sums stay aligned */
    quantize_rows(x, rows, k, k4, kn->x_scale, kn->x_zero, xs, xsum);
    Work work = {xs, xsum, data_of(api, in[1]), data_of(api, in[2]), data_of(api, in[3]), y, k4, n, rows, tiles,
                 (tiles + TILES_PER_TASK - 1) / TILES_PER_TASK};
    const size_t tasks = (size_t)(work.blocks * ((rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK));
    parallel_for_if(api, ctx, rows * k4 * 4 * n >= SMALL, run_task, tasks, &work);
  }
  free(xs);
}

static const char *name(const CustomOp *op) { (void)op; return "Int8MatMul"; }
static int input_type(const CustomOp *op, size_t i) {
  (void)op;
  return i == 1 ? ELEMENT_UINT8 : i == 3 ? ELEMENT_INT32 : ELEMENT_FLOAT;
}
static size_t input_count(const CustomOp *op) { (void)op; return 4; }

static void *create_kernel(const CustomOp *op, const void *api, const void *info) {
  (void)op;
  Kernel *kn = calloc(1, sizeof(Kernel));
  if (!kn) return NULL;
  kn->api = (const void *const *)api;
  kn->n = attribute_int(kn->api, info, "n", 0); /* int8_matmul.py writes n >= 1; compute checks it */
  kn->x_zero = attribute_int(kn->api, info, "x_zero", 0);
  kn->x_scale = attribute_float(kn->api, info, "x_scale", 1.0f);
  return kn;
}

CustomOp int8_matmul_ops[1] = {DEFINE_OP(name, input_type, input_count, create_kernel, compute)};
