/* nextn.MtpModule: a whole MTP module with 4- or 8-bit blockwise weights (an int4 draft graph) as one ONNX Runtime op.
 *
 * Why: an MTP module is one decoder layer and a head, but its graph is ~72 ONNX Runtime nodes (the mask, the
 * rotary, the rows wanted, nine MatMulNBits, QMoE, norms, ...). On the embedded model a draft then cost 0.35 of
 * a whole trunk step, most of it per-node overhead, where its arithmetic is about a tenth of a trunk step. Here
 * the module is one call: its products read each weight once for all of a sequence's rows.
 *
 * Inputs (runtime/mtp_module.py rewrites the graph to this node; the graph's own I/O contract, export/io.py):
 *   0 input_ids [B, S] int64      1 hidden [B, S, H]         2 position_ids [B, S] int64
 *   3 attention_mask [B, P + S] int64                        4 past_c [B, P, R]    5 past_k [B, P, D]
 *   6 output_rows [B, N] int64 (rows < S)                    7 embedding [V, H] fp32 (the graph's own)
 *   8 packed 4- and 8-bit weights uint8, 9 fp32 parameters, 10 meta int64: dimensions and where each part lies
 *     (layout below; mtp_module.py writes it, META_* positions are the contract between the two)
 * Outputs: logits [B, N, V], hidden_out [B, N, H], new_c [B, S, R], new_k [B, S, D].
 *
 * Per sequence (the reference's MtpModule, model/reference.py, in the graph's form):
 *   x   = eh_proj([rms(embed(ids), enorm); rms(hidden, hnorm)])          all S rows
 *   xn  = rms(x, input_ln); [c | k] = kv_a(xn); new_c = rms(c, kv_ln); new_k = rotary(k)   all S rows
 *   for the N output rows: q = q_b(rms(q_a(xn), q_ln)); a = attention(q, past + new)   (attention.h)
 *   x1  = x + o_proj(a); h = rms(x1, post_ln)
 *   y   = routed_scale sum_k w_k expert_k(h) + shared(h)  (noaux_tc routing; experts silu(gate) * up)
 *   hidden_out = rms(x1 + y, head_ln); logits = head(hidden_out)
 * The matrices are the graph's own 4- or 8-bit blockwise ones, multiplied as qmm.h says (activations rounded to
 * int8 per block, as MatMulNBits and QMoE at accuracy level 4 do); a draft's value only ever decides whether it is
 * accepted.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "ort_api.h"
#include "qmm.h"

/* meta[]: what mtp_module.py's META_FIELDS lists, in this order (tests/runtime/test_mtp_module.py checks). */
enum {
  META_VERSION, META_H, META_V, META_R, META_D, META_NOPE, META_DV, META_HEADS, META_Q_LORA, META_E, META_TOPK,
  META_N_GROUP, META_TOPK_GROUP, META_I, META_I_SHARED, META_F_ENORM, META_F_HNORM, META_F_IN_LN, META_F_KV_LN,
  META_F_Q_LN, META_F_POST_LN, META_F_HEAD_LN, META_F_INV_FREQ, META_F_ROUTER, META_F_BIAS, META_F_KV_B,
  META_F_SCALARS, META_MATRICES /* then per matrix: K, N, block, bits, byte offset, float offset */
};
enum { MAT_EH, MAT_KV_A, MAT_Q_A, MAT_Q_B, MAT_O, MAT_SHARED_GU, MAT_SHARED_DOWN, MAT_HEAD, MAT_EXPERTS };
enum { SCALAR_EPS, SCALAR_SOFTMAX, SCALAR_ROUTED, SCALAR_ROPE, SCALARS };
#define META_VERSION_1 1
#define MAT_FIELDS 6

static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *y) {
  float ss = 0.0f;
  for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
  const float inv = 1.0f / sqrtf(ss / (float)n + eps);
  for (int64_t i = 0; i < n; i++) y[i] = x[i] * inv * w[i];
}

/* act[r, i] = silu(gu[r, i]) gu[r, I + i]: the gate's columns first, then the up ones. */
static void swiglu(const float *gu, int64_t rows, int64_t inter, float *act) {
  for (int64_t r = 0; r < rows; r++)
    for (int64_t i = 0; i < inter; i++) {
      const float g = gu[r * 2 * inter + i];
      act[r * inter + i] = g / (1.0f + expf(-g)) * gu[r * 2 * inter + inter + i];
    }
}

typedef struct {
  const int64_t *meta;
  const float *f, *embed;
  QMat mat[MAT_EXPERTS + 2 * 256];
  AttentionDims attn;
  int64_t h, v, r, d, q_lora, e, top_k, n_group, topk_group, inter, shared;
  float eps, routed, rope;
} Module;

/* noaux_tc routing of one row h [H]: sigmoid scores plus the correction bias pick topk_group groups by their top-2
 * sum, then top_k experts among them (ties: the lower index); weights are their scores over the scores' sum. */
static void route(const Module *md, const float *h, float *score, int64_t *ids, float *wts) {
  const int64_t E = md->e, G = md->n_group, per = E / G;
  const float *router = md->f + md->meta[META_F_ROUTER], *bias = md->f + md->meta[META_F_BIAS];
  float *choice = score + E, *group = choice + E;
  for (int64_t e = 0; e < E; e++) {
    float dot = 0.0f;
    for (int64_t i = 0; i < md->h; i++) dot += h[i] * router[e * md->h + i];
    score[e] = 1.0f / (1.0f + expf(-dot));
    choice[e] = score[e] + bias[e];
  }
  if (G > 1) {
    for (int64_t g = 0; g < G; g++) { /* the sum of the group's top two (one where a group has one expert) */
      float a = -INFINITY, b = -INFINITY;
      for (int64_t e = g * per; e < (g + 1) * per; e++) {
        if (choice[e] > a) { b = a; a = choice[e]; }
        else if (choice[e] > b) b = choice[e];
      }
      group[g] = per > 1 ? a + b : a;
    }
    for (int64_t pick = 0; pick < md->topk_group; pick++) { /* kept groups are marked +inf */
      int64_t best = -1;
      for (int64_t g = 0; g < G; g++)
        if (group[g] != INFINITY && (best < 0 || group[g] > group[best])) best = g;
      group[best] = INFINITY;
    }
    for (int64_t e = 0; e < E; e++)
      if (group[e / per] != INFINITY) choice[e] = -INFINITY;
  }
  float total = 0.0f;
  for (int64_t k = 0; k < md->top_k; k++) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; e++)
      if (choice[e] != -INFINITY && (best < 0 || choice[e] > choice[best])) best = e;
    if (best < 0) best = 0; /* fewer candidates than top_k: cannot happen for configs the rewrite accepts */
    ids[k] = best;
    wts[k] = score[best];
    total += score[best];
    choice[best] = -INFINITY;
  }
  for (int64_t k = 0; k < md->top_k; k++) wts[k] /= total + 1e-20f;
}

typedef struct {
  const Module *md;
  const int64_t *ids, *pos, *mask, *rows;
  const float *hidden, *past_c, *past_k;
  float *logits, *hidden_out, *new_c, *new_k;
  int64_t s, p, n;
  float *scratch;
  int64_t per_task;
  const int64_t *tok;
  int64_t head_from; /* the first output row whose logits are computed (the node: 0; a catch-up's draft: N - 1) */
} Work;

static int64_t task_floats(const Module *md, int64_t S, int64_t N, int64_t T) {
  const int64_t H = md->h, wide = 2 * (md->inter > md->shared ? md->inter : md->shared);
  const int64_t qw = md->attn.heads * (md->attn.nope + md->d);
  return S * (2 * H + H + H + md->r + md->d + md->d) +
         N * (2 * md->q_lora + qw + md->d + T + md->attn.heads * md->attn.v) +
         N * (6 * H + 2 * wide + 2 * md->top_k) + 3 * md->e +
         (int64_t)attention_scratch_floats(&md->attn, N, md->attn.heads, T);
}

/* Scratch floats of one sequence's call: task_floats, and the routing's ids, rows and weights. */
static int64_t scratch_floats(const Module *md, int64_t S, int64_t N, int64_t T) {
  return task_floats(md, S, N, T) + 2 * N * (md->top_k + 2) + 2;
}

/* The scratch of `sequences` tasks (w's shapes) and the row indices 0, 1, ... the attention reads; 0, nothing left
 * allocated, where memory runs out. */
static int alloc_work(Work *w, int64_t sequences) {
  const int64_t count = w->n * w->md->attn.heads + 1;
  int64_t *tok = malloc(sizeof(int64_t) * (size_t)count);
  w->per_task = scratch_floats(w->md, w->s, w->n, w->p + w->s);
  w->scratch = tok ? malloc(sizeof(float) * (size_t)(sequences * w->per_task + 1)) : NULL;
  if (!w->scratch) {
    free(tok);
    return 0;
  }
  for (int64_t i = 0; i < count; i++) tok[i] = i;
  w->tok = tok;
  return 1;
}

static void free_work(Work *w) {
  free((void *)w->tok);
  free(w->scratch);
}

/* One sequence, all of its rows (the comment at the top). */
static void run_sequence(void *usr, size_t index) {
  const Work *w = (const Work *)usr;
  const Module *md = w->md;
  const int64_t b = (int64_t)index, S = w->s, P = w->p, N = w->n, T = P + S, H = md->h, R = md->r, D = md->d;
  const int64_t half = D / 2, qw = md->attn.heads * (md->attn.nope + D), ow = md->attn.heads * md->attn.v;
  const int64_t wide = 2 * (md->inter > md->shared ? md->inter : md->shared);
  const float *f = md->f, eps = md->eps;
  const int64_t *meta = md->meta;
  float *cat = w->scratch + b * w->per_task, *x = cat + S * 2 * H, *xn = x + S * H, *kv = xn + S * H;
  float *cos_s = kv + S * (R + D), *sin_s = cos_s + S * half;
  float *qa = sin_s + S * half, *qn = qa + N * md->q_lora, *q = qn + N * md->q_lora, *cos_q = q + N * qw;
  float *sin_q = cos_q + N * half, *maskf = sin_q + N * half, *att = maskf + N * T, *xq = att + N * ow;
  float *x1 = xq + N * H, *h2 = x1 + N * H, *moe = h2 + N * H, *gath = moe + N * H, *eo = gath + N * H;
  float *gu = eo + N * H, *act = gu + N * wide, *wts = act + N * wide, *score = wts + N * md->top_k;
  float *weight = score + 3 * md->e;                             /* per row that picked an expert: N */
  int64_t *picked = (int64_t *)(weight + N + ((weight + N - w->scratch) & 1)); /* N top_k ids, then N rows */
  int64_t *which = picked + N * md->top_k;
  float *attn_scratch = (float *)(which + N);
  uint8_t *mask = (uint8_t *)maskf;
  const int64_t *ids = w->ids + b * S, *pos = w->pos + b * S, *amask = w->mask + b * T, *rows = w->rows + b * N;
  float *new_c = w->new_c + b * S * R, *new_k = w->new_k + b * S * D;

  for (int64_t s = 0; s < S; s++) { /* eh_proj's input: [rms(embed); rms(hidden)] */
    rms_norm(md->embed + ids[s] * H, f + meta[META_F_ENORM], H, eps, cat + s * 2 * H);
    rms_norm(w->hidden + (b * S + s) * H, f + meta[META_F_HNORM], H, eps, cat + s * 2 * H + H);
  }
  qmm(&md->mat[MAT_EH], cat, 2 * H, S, x, H);
  for (int64_t s = 0; s < S; s++) rms_norm(x + s * H, f + meta[META_F_IN_LN], H, eps, xn + s * H);
  qmm(&md->mat[MAT_KV_A], xn, H, S, kv, R + D);
  const float *inv_freq = f + meta[META_F_INV_FREQ];
  for (int64_t s = 0; s < S; s++) { /* the cache entries: rms(c), and k rotated (halves layout) */
    for (int64_t i = 0; i < half; i++) {
      const float a = (float)pos[s] * inv_freq[i];
      cos_s[s * half + i] = cosf(a) * md->rope;
      sin_s[s * half + i] = sinf(a) * md->rope;
    }
    rms_norm(kv + s * (R + D), f + meta[META_F_KV_LN], R, eps, new_c + s * R);
    const float *k = kv + s * (R + D) + R, *c = cos_s + s * half, *sn = sin_s + s * half;
    for (int64_t i = 0; i < half; i++) {
      new_k[s * D + i] = k[i] * c[i] - k[i + half] * sn[i];
      new_k[s * D + i + half] = k[i + half] * c[i] + k[i] * sn[i];
    }
  }
  if (N == 0) return;
  for (int64_t r = 0; r < N; r++) { /* the output rows' queries, rotary and mask (causal, and the padding) */
    const int64_t s = rows[r];
    memcpy(xq + r * H, xn + s * H, sizeof(float) * (size_t)H);
    memcpy(cos_q + r * half, cos_s + s * half, sizeof(float) * (size_t)half);
    memcpy(sin_q + r * half, sin_s + s * half, sizeof(float) * (size_t)half);
    for (int64_t j = 0; j < T; j++) mask[r * T + j] = j <= P + s && amask[j] != 0;
  }
  qmm(&md->mat[MAT_Q_A], xq, H, N, qa, md->q_lora);
  for (int64_t r = 0; r < N; r++)
    rms_norm(qa + r * md->q_lora, f + meta[META_F_Q_LN], md->q_lora, eps, qn + r * md->q_lora);
  qmm(&md->mat[MAT_Q_B], qn, md->q_lora, N, q, qw);
  attend_heads(&md->attn, 0, md->attn.heads, q, cos_q, sin_q, mask, N, w->past_c + b * P * R, w->past_k + b * P * D, P,
               new_c, new_k, S, (const char *)(f + meta[META_F_KV_B]), w->tok, attn_scratch, att);
  qmm(&md->mat[MAT_O], att, ow, N, x1, H);
  for (int64_t r = 0; r < N; r++) { /* x1 = x + o; h2 = rms(x1) */
    for (int64_t i = 0; i < H; i++) x1[r * H + i] = x[rows[r] * H + i] + x1[r * H + i];
    rms_norm(x1 + r * H, f + meta[META_F_POST_LN], H, eps, h2 + r * H);
    route(md, h2 + r * H, score, picked + r * md->top_k, wts + r * md->top_k);
  }
  memset(moe, 0, sizeof(float) * (size_t)(N * H));
  for (int64_t e = 0; e < md->e; e++) { /* each expert once, on the rows that picked it */
    int64_t n_e = 0; /* <= N: a row picks an expert once */
    for (int64_t r = 0; r < N; r++)
      for (int64_t k = 0; k < md->top_k; k++)
        if (picked[r * md->top_k + k] == e) {
          memcpy(gath + n_e * H, h2 + r * H, sizeof(float) * (size_t)H);
          which[n_e] = r;
          weight[n_e++] = wts[r * md->top_k + k];
        }
    if (!n_e) continue; /* nobody picked it: its weights are not read */
    qmm(&md->mat[MAT_EXPERTS + 2 * e], gath, H, n_e, gu, 2 * md->inter);
    swiglu(gu, n_e, md->inter, act);
    qmm(&md->mat[MAT_EXPERTS + 2 * e + 1], act, md->inter, n_e, eo, H);
    for (int64_t j = 0; j < n_e; j++)
      for (int64_t i = 0; i < H; i++) moe[which[j] * H + i] += weight[j] * eo[j * H + i];
  }
  qmm(&md->mat[MAT_SHARED_GU], h2, H, N, gu, 2 * md->shared);
  swiglu(gu, N, md->shared, act);
  qmm(&md->mat[MAT_SHARED_DOWN], act, md->shared, N, eo, H);
  float *hid = w->hidden_out + b * N * H;
  for (int64_t r = 0; r < N; r++) {
    for (int64_t i = 0; i < H; i++) gath[i] = x1[r * H + i] + (moe[r * H + i] * md->routed + eo[r * H + i]);
    rms_norm(gath, f + meta[META_F_HEAD_LN], H, eps, hid + r * H);
  }
  const int64_t from = w->head_from < N ? w->head_from : N - 1; /* rows before it: hidden_out only */
  qmm(&md->mat[MAT_HEAD], hid + from * H, H, N - from, w->logits + (b * N + from) * md->v, md->v);
}

/* The module's parts from meta, checked against the sizes of the weights they lie in; 0 where any does not fit. */
static int read_module(Module *md, const int64_t *meta, int64_t n_meta, const uint8_t *q, int64_t n_q, const float *f,
                       int64_t n_f) {
  if (n_meta < META_MATRICES || meta[META_VERSION] != META_VERSION_1) return 0;
  md->meta = meta;
  md->f = f;
  md->h = meta[META_H], md->v = meta[META_V], md->r = meta[META_R], md->d = meta[META_D];
  md->q_lora = meta[META_Q_LORA], md->e = meta[META_E], md->top_k = meta[META_TOPK];
  md->n_group = meta[META_N_GROUP], md->topk_group = meta[META_TOPK_GROUP];
  md->inter = meta[META_I], md->shared = meta[META_I_SHARED];
  const AttentionDims a = {meta[META_HEADS], meta[META_NOPE], meta[META_DV], md->r, md->d, 0.0f, 0};
  md->attn = a;
  if (md->h < 1 || md->v < 1 || md->r < 1 || md->d < 2 || md->d % 2 || md->q_lora < 1 || a.heads < 1 || a.nope < 1 ||
      a.v < 1 || md->e < 1 || md->e > 256 || md->top_k < 1 || md->top_k > md->e || md->n_group < 1 ||
      md->e % md->n_group || md->topk_group < 1 || md->topk_group > md->n_group || md->inter < 1 || md->shared < 1)
    return 0;
  const int64_t n_mat = MAT_EXPERTS + 2 * md->e, qw = a.heads * (a.nope + md->d);
  if (n_meta != META_MATRICES + MAT_FIELDS * n_mat) return 0;
  const int64_t shapes[MAT_EXPERTS][2] = {{2 * md->h, md->h}, {md->h, md->r + md->d}, {md->h, md->q_lora},
                                          {md->q_lora, qw}, {a.heads * a.v, md->h}, {md->h, 2 * md->shared},
                                          {md->shared, md->h}, {md->h, md->v}};
  for (int64_t i = 0; i < n_mat; i++) {
    const int64_t *m = meta + META_MATRICES + MAT_FIELDS * i;
    const int64_t k = m[0], n = m[1], block = m[2], bits = m[3];
    const int64_t want_k = i < MAT_EXPERTS ? shapes[i][0] : (i - MAT_EXPERTS) % 2 ? md->inter : md->h;
    const int64_t want_n = i < MAT_EXPERTS ? shapes[i][1] : (i - MAT_EXPERTS) % 2 ? md->h : 2 * md->inter;
    if (k != want_k || n != want_n || block < 1 || (bits != 4 && bits != 8)) return 0;
    if (k % 8 || block % 8 || m[4] < 0 || m[5] < 0 || m[4] + qmat_bytes(k, n, bits) > n_q ||
        m[5] + qmat_floats(k, n, block) > n_f)
      return 0;
    md->mat[i] = qmat(k, n, block, bits, q + m[4], f + m[5]);
  }
  const int64_t floats[][2] = {{META_F_ENORM, md->h}, {META_F_HNORM, md->h}, {META_F_IN_LN, md->h},
                               {META_F_KV_LN, md->r}, {META_F_Q_LN, md->q_lora}, {META_F_POST_LN, md->h},
                               {META_F_HEAD_LN, md->h}, {META_F_INV_FREQ, md->d / 2}, {META_F_ROUTER, md->e * md->h},
                               {META_F_BIAS, md->e}, {META_F_KV_B, a.heads * (a.nope + a.v) * md->r},
                               {META_F_SCALARS, SCALARS}};
  for (size_t i = 0; i < sizeof floats / sizeof floats[0]; i++)
    if (meta[floats[i][0]] < 0 || meta[floats[i][0]] + floats[i][1] > n_f) return 0;
  const float *sc = f + meta[META_F_SCALARS];
  md->eps = sc[SCALAR_EPS], md->attn.scale = sc[SCALAR_SOFTMAX];
  md->routed = sc[SCALAR_ROUTED], md->rope = sc[SCALAR_ROPE];
  return 1;
}

typedef struct {
  const void *const *api;
} Kernel;

enum { IN_IDS, IN_HIDDEN, IN_POS, IN_MASK, IN_PAST_C, IN_PAST_K, IN_ROWS, IN_EMBED, IN_Q, IN_F, IN_META, INPUTS };

/* A call whose shapes, meta or indices do not fit leaves its outputs unset, which fails the run
 * (OrtEngine.run: never a partial or zero output). */
static void compute(void *kernel, void *ctx) {
  const void *const *api = ((const Kernel *)kernel)->api;
  const void *in[INPUTS];
  int64_t d[INPUTS][MAX_DIMS];
  size_t nd[INPUTS];
  if (!inputs_of(api, ctx, INPUTS, in)) return;
  static const size_t ranks[INPUTS] = {2, 3, 2, 2, 3, 3, 2, 2, 1, 1, 1};
  for (int i = 0; i < INPUTS; i++)
    if (!shape_of(api, in[i], d[i], &nd[i]) || nd[i] != ranks[i]) return;
  Module *md = malloc(sizeof(Module));
  if (!md) return;
  const int ok_meta = read_module(md, data_of(api, in[IN_META]), d[IN_META][0], data_of(api, in[IN_Q]), d[IN_Q][0],
                                  data_of(api, in[IN_F]), d[IN_F][0]);
  md->embed = data_of(api, in[IN_EMBED]);
  const int64_t B = d[IN_IDS][0], S = d[IN_IDS][1], P = d[IN_PAST_C][1], N = d[IN_ROWS][1];
  Work w = {md, data_of(api, in[IN_IDS]), data_of(api, in[IN_POS]), data_of(api, in[IN_MASK]),
            data_of(api, in[IN_ROWS]), data_of(api, in[IN_HIDDEN]), data_of(api, in[IN_PAST_C]),
            data_of(api, in[IN_PAST_K]), NULL, NULL, NULL, NULL, S, P, N, NULL, 0, NULL};
  int ok = ok_meta && md->embed && d[IN_EMBED][0] == md->v && d[IN_EMBED][1] == md->h && d[IN_HIDDEN][0] == B &&
           d[IN_HIDDEN][1] == S && d[IN_HIDDEN][2] == md->h && d[IN_POS][0] == B && d[IN_POS][1] == S &&
           d[IN_MASK][0] == B && d[IN_MASK][1] == P + S && d[IN_PAST_C][0] == B && d[IN_PAST_C][2] == md->r &&
           d[IN_PAST_K][0] == B && d[IN_PAST_K][1] == P && d[IN_PAST_K][2] == md->d && d[IN_ROWS][0] == B &&
           N <= S && (B * S == 0 || (w.ids && w.pos && w.mask && w.hidden && (P == 0 || (w.past_c && w.past_k))));
  for (int64_t i = 0; ok && i < B * S; i++) ok = w.ids[i] >= 0 && w.ids[i] < md->v;
  for (int64_t i = 0; ok && i < B * N; i++) ok = w.rows && w.rows[i] >= 0 && w.rows[i] < S;
  ok = ok && alloc_work(&w, B);
  const int64_t shapes[4][3] = {{B, N, ok ? md->v : 0}, {B, N, ok ? md->h : 0}, {B, S, ok ? md->r : 0},
                                {B, S, ok ? md->d : 0}};
  void *out[4] = {NULL};
  float **dest[4] = {&w.logits, &w.hidden_out, &w.new_c, &w.new_k};
  for (int i = 0; ok && i < 4; i++) {
    Status *s = FN(api, GetOutputFn, API_KERNEL_CONTEXT_GET_OUTPUT)(ctx, (size_t)i, shapes[i], 3, &out[i]);
    if (s) { release_status(api, s); out[i] = NULL; }
    *dest[i] = out[i] ? data_of(api, out[i]) : NULL;
  }
  if (ok && (B * S == 0 || (w.new_c && w.new_k && (N == 0 || (w.logits && w.hidden_out)))))
    parallel_for(api, ctx, run_sequence, (size_t)B, &w);
  if (ok) free_work(&w);
  free(md);
}

static const char *name(const CustomOp *op) { (void)op; return "MtpModule"; }
static int input_type(const CustomOp *op, size_t i) {
  (void)op;
  return i == IN_HIDDEN || i == IN_PAST_C || i == IN_PAST_K || i == IN_EMBED || i == IN_F ? ELEMENT_FLOAT
         : i == IN_Q                                                                    ? ELEMENT_UINT8
                                                                                        : ELEMENT_INT64;
}
static size_t input_count(const CustomOp *op) { (void)op; return INPUTS; }
static size_t output_count(const CustomOp *op) { (void)op; return 4; }

static void *create_kernel(const CustomOp *op, const void *api, const void *info) {
  (void)op;
  (void)info;
  Kernel *kn = calloc(1, sizeof(Kernel));
  if (kn) kn->api = (const void *const *)api;
  return kn;
}

CustomOp mtp_module_ops[1] = {DEFINE_OP_N(name, input_type, input_count, output_count, create_kernel, compute)};

/* -- all of a step's drafts in one call (runtime/mtp_module.py's NativeDrafter) ------------------------- */

/* One MTP module's packed weights (the node's inputs 7 to 10), as mtp_module.py holds them. */
typedef struct {
  const int64_t *meta;
  int64_t n_meta;
  const uint8_t *q;
  int64_t n_q;
  const float *f;
  int64_t n_f;
  const float *embed;
  int64_t vocab, hidden;
} MtpWeights;

/* One sequence's call of module md: S rows at cache slots P .. P + S - 1 (all earlier slots its past, none
 * padded), the outputs of rows[0 .. N): every row's hidden_out, the logits of the last only (the draft; a
 * catch-up's earlier rows feed the next depth through hidden_out, and their head was most of a prompt's
 * catch-up). 0 where memory runs out. */
static int call_module(const Module *md, const int64_t *ids, const float *hidden, const int64_t *pos,
                       const int64_t *mask, int64_t S, const float *past_c, const float *past_k, int64_t P,
                       const int64_t *rows, int64_t N, float *logits, float *hidden_out, float *new_c, float *new_k) {
  Work w = {md, ids, pos, mask, rows, hidden, past_c, past_k, logits, hidden_out, new_c, new_k, S, P, N, NULL, 0, NULL,
            N - 1};
  if (!alloc_work(&w, 1)) return 0;
  run_sequence(&w, 0);
  free_work(&w);
  return 1;
}

static int64_t argmax(const float *x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; i++) best = x[i] > x[best] ? i : best;
  return best;
}

/* The decoder's drafting (runtime/decoder.py, Decoder._draft_tokens) for one sequence, every MTP call on this
 * kernel: module k catches its cache up over slots valid[k] .. n - 1 (chunks of `chunk` slots; token t_{i+k+1}
 * and module k-1's hidden, the trunk's for k = 0, per slot i; t_{n+j} is draft j), its last row's argmax is a
 * draft, and valid[k] becomes n - k; past the last module L, module L-1 runs again one slot further per draft on
 * its own hidden. tokens[i - lo] is t_i for lo <= i <= n; each module's cache (cache_c [max_len, R], cache_k
 * [max_len, D]) and hidden_out (hidden [max_len, H]) are the sequence's own, written in place. -> the number of
 * drafts written to drafts[], or -1 (a meta that does not fit, a slot past max_len, memory). */
int64_t nextn_mtp_draft(const MtpWeights *mw, int64_t n_mods, float *const *cache_c, float *const *cache_k,
                        float *const *hidden, const int64_t *tokens, int64_t lo, int64_t n, const float *trunk_hidden,
                        int64_t *valid, int64_t k_total, int64_t chunk, int64_t max_len, int64_t *drafts) {
  if (n_mods < 1 || n_mods > 16 || chunk < 1 || n < 1 || k_total < 0 || n + k_total > max_len) return -1;
  Module *md = malloc(sizeof(Module) * (size_t)n_mods);
  const int64_t rows_max = chunk < max_len ? chunk : max_len;
  int64_t *ints = malloc(sizeof(int64_t) * (size_t)(3 * rows_max + max_len));
  float *logits = NULL;
  int64_t done = -1;
  int ok = md && ints;
  for (int64_t m = 0; ok && m < n_mods; m++) {
    ok = read_module(&md[m], mw[m].meta, mw[m].n_meta, mw[m].q, mw[m].n_q, mw[m].f, mw[m].n_f) &&
         mw[m].embed && mw[m].vocab == md[m].v && mw[m].hidden == md[m].h && md[m].h == md[0].h &&
         md[m].r == md[0].r && md[m].d == md[0].d && md[m].v == md[0].v;
    md[m].embed = mw[m].embed;
  }
  if (ok) logits = malloc(sizeof(float) * (size_t)(rows_max * md[0].v));
  if (!ok || !logits) goto out;
  const int64_t H = md[0].h, R = md[0].r, D = md[0].d, V = md[0].v, L = n_mods;
  int64_t *ids = ints, *pos = ids + rows_max, *rows = pos + rows_max, *mask = rows + rows_max, nd = 0;
  for (int64_t i = 0; i < max_len; i++) mask[i] = 1;
  const float *last = NULL;
  for (int64_t k = 0; k < (k_total < L ? k_total : L); k++) {
    const float *src = k ? hidden[k - 1] : trunk_hidden;
    if (valid[k] < 0 || valid[k] >= n) goto out;
    int64_t b = valid[k], N = 0;
    for (int64_t a = valid[k]; a < n; a += chunk) {
      b = a + chunk < n ? a + chunk : n;
      const int64_t S = b - a, first = k == L - 1 ? b - 1 : a;
      N = b - first;
      for (int64_t i = a; i < b; i++) {
        const int64_t idx = i + k + 1;
        if (idx <= n && idx < lo) goto out;
        ids[i - a] = idx <= n ? tokens[idx - lo] : drafts[idx - n - 1];
        pos[i - a] = idx;
      }
      for (int64_t r = 0; r < N; r++) rows[r] = first - a + r;
      if (!call_module(&md[k], ids, src + a * H, pos, mask, S, cache_c[k], cache_k[k], a, rows, N, logits,
                       hidden[k] + first * H, cache_c[k] + a * R, cache_k[k] + a * D))
        goto out;
    }
    drafts[nd++] = argmax(logits + (N - 1) * V, V);
    valid[k] = n - k > 0 ? n - k : 0;
    last = hidden[k] + (b - 1) * H;
  }
  for (int64_t j = L, m = L - 1; j < k_total; j++) { /* recursion with the last module */
    const int64_t slot = n - 1 + (j - m), zero = 0;
    ids[0] = drafts[j - 1];
    pos[0] = slot + m + 1;
    if (!call_module(&md[m], ids, last, pos, mask, 1, cache_c[m], cache_k[m], slot, &zero, 1, logits,
                     hidden[m] + slot * H, cache_c[m] + slot * R, cache_k[m] + slot * D))
      goto out;
    drafts[nd++] = argmax(logits, V);
    last = hidden[m] + slot * H;
  }
  done = nd;
out:
  free(md);
  free(ints);
  free(logits);
  return done;
}
