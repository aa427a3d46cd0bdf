/* nextn.NBitsMatMul: ONNX Runtime's MatMulNBits (4 or 8 bits, accuracy level 4) on nextn's VNNI products (qmm.h).
 *
 * Why: in a quantized trunk's decode step ONNX Runtime's MatMulNBits read issue 14's int4 linears at ~13 GB/s and
 * its 8-bit head at ~21 (BENCHMARKS.md). The products are the ones nextn.MtpModule and nextn.QRoutedExperts run:
 * each activation row rounded to int8 per block as MatMulNBits at accuracy level 4 does, the same weights, sums in
 * int32 per block; the two agree to fp32 rounding (their sums run in other orders), and a row's output depends only
 * on that row, whatever the other rows of the call and the threads.
 *
 * Inputs (nbits_matmul.py rewrites MatMulNBits nodes to this op when a session opens):
 *   x      [..., K]  fp32
 *   q      [bytes]   uint8  the weights in qmm.h's tiles (packed_blocks.pack_matrix): qmat_bytes(K, N, bits)
 *   s      [floats]  fp32   per tile and block 16 scales, then 16 zero * scale: qmat_floats(K, N, block)
 *   attributes k, n, block, bits
 *   output [..., N]
 * Tasks are (block of TILES_PER_TASK tiles, group of up to ROWS_PER_TASK rows) on the session's intra-op threads.
 */
#include <stdlib.h>

#include "ort_api.h"
#include "qmm.h"

enum {
  TILES_PER_TASK = 4, ROWS_PER_TASK = 64,
  SMALL = 1 << 16 /* weight bytes x rows: under it a call stays on this thread (a hand-off costs more) */
};

typedef struct {
  const void *const *api;
  int64_t k, n, block, bits;
} Kernel;

typedef struct {
  QMat m;
  const int8_t *xq;   /* [rows, K] */
  const float *xs;    /* [rows, blocks] */
  const int32_t *xsum; /* [rows, blocks] */
  float *y;
  int64_t rows, blocks;
} Work;

static void run_task(void *usr, size_t index) {
  const Work *w = (const Work *)usr;
  const QMat *m = &w->m;
  const int64_t b = (int64_t)index % w->blocks, g = (int64_t)index / w->blocks;
  const int64_t t0 = b * TILES_PER_TASK, t1 = t0 + TILES_PER_TASK < m->tiles ? t0 + TILES_PER_TASK : m->tiles;
  const int64_t r0 = g * ROWS_PER_TASK, r1 = r0 + ROWS_PER_TASK < w->rows ? r0 + ROWS_PER_TASK : w->rows;
  for (int64_t r = r0; r < r1; r += ROWS) {
    const int8_t *xq = w->xq + r * m->k;
    const float *xs = w->xs + r * m->blocks;
    const int32_t *xsum = w->xsum + r * m->blocks;
    float *y = w->y + r * m->n;
    for (int64_t t = t0; t < t1; t++) switch (r1 - r < ROWS ? r1 - r : ROWS) {
        case 4: qmm_tile(m, t, xq, m->k, xs, xsum, y, m->n, 4); break;
        case 3: qmm_tile(m, t, xq, m->k, xs, xsum, y, m->n, 3); break;
        case 2: qmm_tile(m, t, xq, m->k, xs, xsum, y, m->n, 2); break;
        default: qmm_tile(m, t, xq, m->k, xs, xsum, y, m->n, 1); break;
      }
  }
}

/* A call with shapes off the contract leaves the output unset, which fails the run. */
static void compute(void *kernel, void *ctx) {
  const Kernel *kn = (const Kernel *)kernel;
  const void *const *api = kn->api;
  const void *in[3];
  if (!inputs_of(api, ctx, 3, in)) return;
  int64_t xd[MAX_DIMS], qd[MAX_DIMS], sd[MAX_DIMS];
  size_t xn, qn, sn;
  if (!shape_of(api, in[0], xd, &xn) || !shape_of(api, in[1], qd, &qn) || !shape_of(api, in[2], sd, &sn) || xn < 1 ||
      qn != 1 || sn != 1)
    return;
  if (xd[xn - 1] != kn->k || kn->k % 8 || kn->block < 8 || kn->block % 8 || kn->n < 1 ||
      (kn->bits != 4 && kn->bits != 8) || qd[0] != qmat_bytes(kn->k, kn->n, kn->bits) ||
      sd[0] != qmat_floats(kn->k, kn->n, kn->block))
    return;
  const QMat m = qmat(kn->k, kn->n, kn->block, kn->bits, data_of(api, in[1]), data_of(api, in[2]));
  const int64_t rows = leading_rows(xd, xn);
  const float *x = data_of(api, in[0]);
  /* the rounded rows, then per row and block their scales and sums */
  int8_t *xq = rows ? malloc((size_t)(rows * (m.k + 8 * m.blocks))) : NULL;
  float *y = (x && xq) || !rows ? product_output(api, ctx, xd, xn, m.n) : NULL;
  if (y && rows) {
    float *xs = (float *)(xq + rows * m.k); /* K is a multiple of 8: aligned for floats */
    int32_t *xsum = (int32_t *)(xs + rows * m.blocks);
    for (int64_t r = 0; r < rows; r++)
      quantize_row(&m, x + r * m.k, xq + r * m.k, xs + r * m.blocks, xsum + r * m.blocks);
    Work work = {m, xq, xs, xsum, y, rows, (m.tiles + TILES_PER_TASK - 1) / TILES_PER_TASK};
    const size_t tasks = (size_t)(work.blocks * ((rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK));
    parallel_for_if(api, ctx, rows * m.k * m.n * m.bits / 8 >= SMALL, run_task, tasks, &work);
  }
  free(xq);
}

static const char *name(const CustomOp *op) { (void)op; return "NBitsMatMul"; }
static int input_type(const CustomOp *op, size_t i) { (void)op; return i == 1 ? ELEMENT_UINT8 : ELEMENT_FLOAT; }
static size_t input_count(const CustomOp *op) { (void)op; return 3; }

static void *create_kernel(const CustomOp *op, const void *api, const void *info) {
  (void)op;
  Kernel *kn = calloc(1, sizeof(Kernel));
  if (!kn) return NULL;
  kn->api = (const void *const *)api;
  /* nbits_matmul.py writes them; compute checks them against the inputs */
  kn->k = attribute_int(kn->api, info, "k", 0);
  kn->n = attribute_int(kn->api, info, "n", 0);
  kn->block = attribute_int(kn->api, info, "block", 0);
  kn->bits = attribute_int(kn->api, info, "bits", 0);
  return kn;
}

CustomOp nbits_matmul_ops[1] = {DEFINE_OP(name, input_type, input_count, create_kernel, compute)};
