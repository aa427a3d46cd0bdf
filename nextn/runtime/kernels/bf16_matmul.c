/* nextn.Bf16MatMul: y = x W for a constant W whose values are all bfloat16 ones, read as bf16.
 *
 * Why: a bf16 checkpoint (DeepSeek-V3's, the embedded model's) exported in fp32 has weights whose low 16 bits
 * are zero. ONNX Runtime's MatMul reads them as fp32: twice the bytes a decode step needs to read. This kernel
 * reads the bf16 bit patterns and widens them to the same fp32 values (exact), so the arithmetic is fp32 as
 * before, over half the bytes. Measured on the embedded model's shapes (one thread, weights in cache): 0.4-0.5x
 * MLAS's time at one row, 0.85-0.9x at four (BENCHMARKS.md).
 *
 * Inputs (bf16_matmul.py rewrites MatMul nodes to this op when a session opens):
 *   x  [..., K]  fp32
 *   w  [K N]     uint16  W's bf16 bit patterns in column blocks of `block` columns: block b holds columns
 *                        [b block, min(N, (b + 1) block)) as a row-major [K, width] array, the blocks one after
 *                        another, so a task reads its block front to back
 *   attributes n: N; block: the blocks' width (bf16_matmul.py's BLOCK)
 *   output  [..., N]
 * Tasks are (column block, group of up to ROWS_PER_TASK rows), on the session's intra-op threads. Each output
 * value is a sum over K in order (products.h), whatever the other rows of the call and the threads: a row's
 * output does not depend on how many rows share the call (a verify pass and a one-token step agree bit for bit).
 */
#include <stdlib.h>

#include "ort_api.h"
#include "products.h"

enum {
  ROWS_PER_TASK = 64,
  SMALL = 1 << 18 /* multiply-adds: under it a call stays on this thread (a hand-off costs more) */
};

typedef struct {
  const void *const *api;
  int64_t n, block;
  int64_t tok[ROWS_PER_TASK]; /* 0 .. ROWS_PER_TASK - 1: a task's rows, as tokens_times indexes them */
} Kernel;

typedef struct {
  const float *x;
  const uint16_t *w;
  float *y;
  int64_t k, n, rows, block, blocks;
  const int64_t *tok; /* 0 .. ROWS_PER_TASK - 1 */
} Work;

static void run_task(void *usr, size_t index) {
  const Work *w = (const Work *)usr;
  const int64_t b = (int64_t)index % w->blocks, r0 = (int64_t)index / w->blocks * ROWS_PER_TASK;
  const int64_t c0 = b * w->block, width = w->n - c0 < w->block ? w->n - c0 : w->block;
  const int64_t m = w->rows - r0 < ROWS_PER_TASK ? w->rows - r0 : ROWS_PER_TASK;
  tokens_times_bf16(w->w + w->k * c0, w->k, width, w->x + r0 * w->k, w->k, w->tok, m, w->y + r0 * w->n + c0, w->n);
}

/* A call with shapes off the contract leaves the output unset, which fails the run. */
static void compute(void *kernel, void *ctx) {
  const Kernel *kn = (const Kernel *)kernel;
  const void *const *api = kn->api;
  const void *in[2];
  if (!inputs_of(api, ctx, 2, in)) return;
  int64_t xd[MAX_DIMS], wd[MAX_DIMS];
  size_t xn, wn;
  if (!shape_of(api, in[0], xd, &xn) || !shape_of(api, in[1], wd, &wn) || xn < 1 || wn != 1) return;
  const int64_t k = xd[xn - 1], n = kn->n, block = kn->block;
  if (k < 1 || n < 1 || block < 1 || wd[0] != k * n) return;
  const int64_t rows = leading_rows(xd, xn);
  const float *x = data_of(api, in[0]);
  const uint16_t *w = data_of(api, in[1]);
  float *y = (x || !rows) && w ? product_output(api, ctx, xd, xn, n) : NULL;
  if (y && rows) {
    Work work = {x, w, y, k, n, rows, block, (n + block - 1) / block, kn->tok};
    const size_t tasks = (size_t)(work.blocks * ((rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK));
    parallel_for_if(api, ctx, rows * k * n >= SMALL, run_task, tasks, &work);
  }
}

static const char *name(const CustomOp *op) { (void)op; return "Bf16MatMul"; }
static int input_type(const CustomOp *op, size_t i) { (void)op; return i == 1 ? ELEMENT_UINT16 : ELEMENT_FLOAT; }
static size_t input_count(const CustomOp *op) { (void)op; return 2; }

static void *create_kernel(const CustomOp *op, const void *api, const void *info) {
  (void)op;
  Kernel *kn = calloc(1, sizeof(Kernel));
  if (!kn) return NULL;
  kn->api = (const void *const *)api;
  kn->n = attribute_int(kn->api, info, "n", 0); /* bf16_matmul.py writes n, block >= 1; compute checks them */
  kn->block = attribute_int(kn->api, info, "block", 0);
  for (int64_t i = 0; i < ROWS_PER_TASK; i++) kn->tok[i] = i;
  return kn;
}

CustomOp bf16_matmul_ops[1] = {DEFINE_OP(name, input_type, input_count, create_kernel, compute)};
