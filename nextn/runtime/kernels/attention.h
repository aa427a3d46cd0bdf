/* MLA's absorbed attention for one sequence's queries (latent_attention.c), shared by the kernels that attend. */
#ifndef NEXTN_ATTENTION_H
#define NEXTN_ATTENTION_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
  int64_t heads, nope, v; /* nh, dn, dv */
  int64_t r, d;           /* latent width R, rotary width D */
  float scale;            /* softmax scale */
  int bf16;               /* w holds bf16 bit patterns */
} AttentionDims;

/* Floats of scratch attend_heads needs for S queries of `heads` heads against T cache entries. */
size_t attention_scratch_floats(const AttentionDims *a, int64_t s, int64_t heads, int64_t t);

/* Heads [h0, h1) of one sequence's S queries: q [S, nh (dn + D)], cos / sin [S, D/2], mask [S, P + N] (nonzero:
 * attend), the cache as past_c [P, R], past_k [P, D] then new_c [N, R], new_k [N, D]; w: kv_b_proj in the
 * kernel's layout (latent_attention.py); tok: 0, 1, ... (at least S nh of them); out [S, nh dv] (those
 * heads' columns written). A row's sums run in a fixed order whatever the other rows and heads. */
void attend_heads(const AttentionDims *a, int64_t h0, int64_t h1, const float *q, const float *cos, const float *sin,
                  const uint8_t *mask, int64_t S, const float *past_c, const float *past_k, int64_t P,
                  const float *new_c, const float *new_k, int64_t N, const char *w, const int64_t *tok,
                  float *scratch, float *out);

#endif
