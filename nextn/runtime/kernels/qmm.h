/* Products of fp32 activation rows with a matrix of 4- or 8-bit blockwise weights, shared by nextn.MtpModule
 * (mtp_module.c) and nextn.QRoutedExperts (routed_experts.c).
 *
 * A matrix W [K, N] of 4- or 8-bit values (q - zero) scale per block of rows and per column is stored in tiles of 16
 * columns laid out for VNNI's int8 dot products (qmm_tile; runtime/packed_blocks.py's pack_matrix writes it). As
 * MatMulNBits and QMoE at accuracy level 4 do, each activation row is rounded to int8 per block first
 * (quantize_row): the two agree to fp32 rounding (their sums run in other orders). Each row's result depends only
 * on that row: the same whatever rows share the call.
 */
#ifndef NEXTN_QMM_H
#define NEXTN_QMM_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define HAVE_VNNI 1
#else
#define HAVE_VNNI 0
#endif

typedef struct {
  int64_t k, n, block, blocks, tiles, bits;
  const uint8_t *q; /* tiles x 2 bits K bytes (4 bits: groups of 8 rows in 64 bytes; 8 bits: of 4) */
  const float *s;   /* tiles x blocks x (16 scales, 16 zero * scale) */
} QMat;

enum { TILE = 16, ROWS = 4 };

/* A packed K x N matrix: its bytes (tiles x 2 bits K), its floats (tiles x blocks x 32), and the QMat over them. */
static inline int64_t qmat_bytes(int64_t k, int64_t n, int64_t bits) { return (n + TILE - 1) / TILE * 2 * bits * k; }
static inline int64_t qmat_floats(int64_t k, int64_t n, int64_t block) {
  return (n + TILE - 1) / TILE * ((k + block - 1) / block) * 2 * TILE;
}
static inline QMat qmat(int64_t k, int64_t n, int64_t block, int64_t bits, const uint8_t *q, const float *s) {
  const QMat m = {k, n, block, (k + block - 1) / block, (n + TILE - 1) / TILE, bits, q, s};
  return m;
}

/* An activation row rounded to int8 per block of the matrix (symmetric: scale max|x| / 127), with each block's
 * scale and the sum of its int8 values; MatMulNBits at accuracy level 4 rounds its activations the same way. */
static void quantize_row(const QMat *m, const float *x, int8_t *xq, float *scale, int32_t *sum) {
  for (int64_t blk = 0; blk < m->blocks; blk++) {
    const int64_t k0 = blk * m->block, k1 = k0 + m->block < m->k ? k0 + m->block : m->k;
    float top = 0.0f;
    for (int64_t k = k0; k < k1; k++) top = fabsf(x[k]) > top ? fabsf(x[k]) : top;
    const float inv = top > 0.0f ? 127.0f / top : 0.0f;
    int32_t total = 0;
    for (int64_t k = k0; k < k1; k++) {
      xq[k] = (int8_t)nearbyintf(x[k] * inv);
      total += xq[k];
    }
    scale[blk] = top / 127.0f;
    sum[blk] = total;
  }
}

/* One tile (16 columns) of NR rows: per block, the int8 x 4- or 8-bit products summed in int32 (VNNI: 64 per
 * instruction; 4 bits: byte 4c + j of a group of 8 rows k holds column c's values at rows k + j (low nibble) and
 * k + 4 + j (high nibble); 8 bits: byte 4c + j of a group of 4 rows, column c's value at row k + j), then
 * out += x_scale (dot w_scale - x_sum zero w_scale). */
static inline __attribute__((always_inline)) void qmm_tile(const QMat *m, int64_t t, const int8_t *xq, int64_t ldq,
                                                          const float *xs, const int32_t *xsum, float *y, int64_t ldy,
                                                          const int NR) {
  const uint8_t *q = m->q + t * 2 * m->bits * m->k;
  const float *s = m->s + t * m->blocks * 2 * TILE;
  float out[ROWS][TILE] = {{0}};
#if HAVE_VNNI
  __m512 acc[ROWS];
  for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(15);
  for (int64_t blk = 0; blk < m->blocks; blk++) {
    const int64_t k0 = blk * m->block, k1 = k0 + m->block < m->k ? k0 + m->block : m->k;
    __m512i dl[ROWS], dh[ROWS];
    for (int r = 0; r < NR; r++) dl[r] = dh[r] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 8) {
      __m512i wl, wh; /* rows k .. k + 3 and k + 4 .. k + 7 */
      if (m->bits == 4) {
        const __m512i w = _mm512_loadu_si512((const void *)(q + k * 8));
        wl = _mm512_and_si512(w, low), wh = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
      } else {
        wl = _mm512_loadu_si512((const void *)(q + k * 16));
        wh = _mm512_loadu_si512((const void *)(q + k * 16 + 64));
      }
      for (int r = 0; r < NR; r++) {
        int32_t a, b;
        memcpy(&a, xq + r * ldq + k, 4);
        memcpy(&b, xq + r * ldq + k + 4, 4);
        dl[r] = _mm512_dpbusd_epi32(dl[r], wl, _mm512_set1_epi32(a));
        dh[r] = _mm512_dpbusd_epi32(dh[r], wh, _mm512_set1_epi32(b));
      }
    }
    const __m512 sw = _mm512_loadu_ps(s + blk * 2 * TILE), zs = _mm512_loadu_ps(s + blk * 2 * TILE + TILE);
    for (int r = 0; r < NR; r++) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(dl[r], dh[r]));
      const __m512 part = _mm512_fmsub_ps(dot, sw, _mm512_mul_ps(_mm512_set1_ps((float)xsum[r * m->blocks + blk]), zs));
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xs[r * m->blocks + blk]), part, acc[r]);
    }
  }
  for (int r = 0; r < NR; r++) _mm512_storeu_ps(out[r], acc[r]);
#else /* the same sums, one value at a time */
  for (int64_t blk = 0; blk < m->blocks; blk++) {
    const int64_t k0 = blk * m->block, k1 = k0 + m->block < m->k ? k0 + m->block : m->k;
    for (int r = 0; r < NR; r++)
      for (int c = 0; c < TILE; c++) {
        int32_t dot = 0;
        for (int64_t k = k0; k < k1; k += 8)
          for (int j = 0; j < 4; j++) {
            const int32_t lo = m->bits == 4 ? q[k * 8 + 4 * c + j] & 15 : q[k * 16 + 4 * c + j];
            const int32_t hi = m->bits == 4 ? q[k * 8 + 4 * c + j] >> 4 : q[k * 16 + 64 + 4 * c + j];
            dot += lo * xq[r * ldq + k + j] + hi * xq[r * ldq + k + 4 + j];
          }
        const float *sb = s + blk * 2 * TILE;
        out[r][c] += xs[r * m->blocks + blk] * ((float)dot * sb[c] - (float)xsum[r * m->blocks + blk] * sb[TILE + c]);
      }
  }
#endif
  const int64_t c0 = t * TILE, width = m->n - c0 < TILE ? m->n - c0 : TILE;
  for (int r = 0; r < NR; r++) memcpy(y + r * ldy + c0, out[r], sizeof(float) * (size_t)width);
}

/* y [rows, N] (row stride ldy) = x [rows, K] (row stride ldx) W, ROWS rows at a time. */
static inline void qmm(const QMat *m, const float *x, int64_t ldx, int64_t rows, float *y, int64_t ldy) {
  int8_t xq[ROWS * m->k];
  float xs[ROWS * m->blocks];
  int32_t xsum[ROWS * m->blocks];
  for (int64_t r = 0; r < rows; r += ROWS) {
    const int64_t nr = rows - r < ROWS ? rows - r : ROWS;
    for (int64_t i = 0; i < nr; i++)
      quantize_row(m, x + (r + i) * ldx, xq + i * m->k, xs + i * m->blocks, xsum + i * m->blocks);
    for (int64_t t = 0; t < m->tiles; t++) switch (nr) {
        case 4: qmm_tile(m, t, xq, m->k, xs, xsum, y + r * ldy, ldy, 4); break;
        case 3: qmm_tile(m, t, xq, m->k, xs, xsum, y + r * ldy, ldy, 3); break;
        case 2: qmm_tile(m, t, xq, m->k, xs, xsum, y + r * ldy, ldy, 2); break;
        default: qmm_tile(m, t, xq, m->k, xs, xsum, y + r * ldy, ldy, 1); break;
      }
  }
}

#endif
