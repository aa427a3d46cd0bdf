/* The helpers over ONNX Runtime's C API table that nextn's kernels share, and the library's entry point. */
#include "ort_api.h"

#include <stdlib.h>

static int have_parallel_for; /* set once when the library registers: ONNX Runtime's C API is version 18 or later */

void release_status(const void *const *api, Status *s) {
  if (s) FN(api, ReleaseFn, API_RELEASE_STATUS)(s);
}

int shape_of(const void *const *api, const void *value, int64_t *dims, size_t *ndims) {
  void *info = NULL;
  Status *s = FN(api, TypeAndShapeFn, API_GET_TENSOR_TYPE_AND_SHAPE)(value, &info);
  if (s) { release_status(api, s); return 0; }
  int ok = !(s = FN(api, DimsCountFn, API_GET_DIMENSIONS_COUNT)(info, ndims)) && *ndims <= MAX_DIMS &&
           !(s = FN(api, DimsFn, API_GET_DIMENSIONS)(info, dims, *ndims));
  release_status(api, s);
  FN(api, ReleaseFn, API_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO)(info);
  return ok;
}

void *data_of(const void *const *api, const void *value) {
  void *p = NULL;
  Status *s = FN(api, MutableDataFn, API_GET_TENSOR_MUTABLE_DATA)((void *)value, &p);
  if (s) { release_status(api, s); return NULL; }
  return p;
}

int inputs_of(const void *const *api, void *ctx, size_t n, const void **in) {
  for (size_t i = 0; i < n; i++) {
    Status *s = FN(api, GetInputFn, API_KERNEL_CONTEXT_GET_INPUT)(ctx, i, &in[i]);
    if (s) { release_status(api, s); return 0; }
  }
  return 1;
}

int64_t attribute_int(const void *const *api, const void *info, const char *name, int64_t fallback) {
  int64_t v = 0;
  Status *s = FN(api, AttrIntFn, API_KERNEL_INFO_GET_ATTRIBUTE_INT64)(info, name, &v);
  if (s) { release_status(api, s); return fallback; }
  return v;
}

float attribute_float(const void *const *api, const void *info, const char *name, float fallback) {
  float v = 0.0f;
  Status *s = FN(api, AttrFloatFn, API_KERNEL_INFO_GET_ATTRIBUTE_FLOAT)(info, name, &v);
  if (s) { release_status(api, s); return fallback; }
  return v;
}

int64_t leading_rows(const int64_t *dims, size_t ndims) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < ndims; i++) rows *= dims[i];
  return rows;
}

float *product_output(const void *const *api, void *ctx, const int64_t *xd, size_t xn, int64_t n) {
  int64_t yd[MAX_DIMS];
  for (size_t i = 0; i < xn; i++) yd[i] = xd[i];
  yd[xn - 1] = n;
  void *out = NULL;
  Status *s = FN(api, GetOutputFn, API_KERNEL_CONTEXT_GET_OUTPUT)(ctx, 0, yd, xn, &out);
  float *y = !s && out ? data_of(api, out) : NULL;
  release_status(api, s);
  return y;
}

void parallel_for_if(const void *const *api, void *ctx, int spread, void (*fn)(void *, size_t), size_t n, void *usr) {
  if (spread)
    parallel_for(api, ctx, fn, n, usr);
  else
    for (size_t i = 0; i < n; i++) fn(usr, i);
}

void parallel_for(const void *const *api, void *ctx, void (*fn)(void *, size_t), size_t n, void *usr) {
  Status *s = NULL;
  if (have_parallel_for && n > 1)
    s = FN(api, ParallelForFn, API_KERNEL_CONTEXT_PARALLEL_FOR)(ctx, fn, n, n, usr);
  if (s || !have_parallel_for || n <= 1) /* not run in parallel (or refused): on this thread */
    for (size_t i = 0; i < n; i++) fn(usr, i);
  release_status(api, s);
}

const char *op_provider(const CustomOp *op) { (void)op; return "CPUExecutionProvider"; }
int op_float_type(const CustomOp *op, size_t i) { (void)op; (void)i; return ELEMENT_FLOAT; }
size_t op_one_output(const CustomOp *op) { (void)op; return 1; }
int op_zero(const CustomOp *op, size_t i) { (void)op; (void)i; return 0; }
int op_one(const CustomOp *op) { (void)op; return 1; }
int op_end_version(const CustomOp *op) { (void)op; return 0x7fffffff; }
size_t op_no_pairs(int **inputs, int **outputs) { *inputs = NULL; *outputs = NULL; return 0; }
void op_release_pairs(int *inputs, int *outputs) { (void)inputs; (void)outputs; }
void op_free_kernel(void *kernel) { free(kernel); }

typedef struct {
  const void *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} ApiBase;

/* ONNX Runtime's entry point for a custom op library: the "nextn" domain with every op. The domain lives as long
 * as the process (sessions keep pointers to it). */
Status *RegisterCustomOps(void *options, const ApiBase *base) {
  const void *const *api = (const void *const *)base->GetApi(1);
  if (!api) return NULL;
  have_parallel_for = base->GetApi(18) != NULL;
  void *domain = NULL;
  Status *s = FN(api, CreateDomainFn, API_CREATE_CUSTOM_OP_DOMAIN)("nextn", &domain);
  for (int i = 0; !s && i < 3; i++) s = FN(api, DomainAddFn, API_CUSTOM_OP_DOMAIN_ADD)(domain, &routed_experts_ops[i]);
  for (int i = 0; !s && i < 2; i++) s = FN(api, DomainAddFn, API_CUSTOM_OP_DOMAIN_ADD)(domain, &latent_attention_ops[i]);
  if (!s) s = FN(api, DomainAddFn, API_CUSTOM_OP_DOMAIN_ADD)(domain, &mtp_module_ops[0]);
  if (!s) s = FN(api, DomainAddFn, API_CUSTOM_OP_DOMAIN_ADD)(domain, &bf16_matmul_ops[0]);
  if (!s) s = FN(api, DomainAddFn, API_CUSTOM_OP_DOMAIN_ADD)(domain, &int8_matmul_ops[0]);
  if (!s) s = FN(api, DomainAddFn, API_CUSTOM_OP_DOMAIN_ADD)(domain, &nbits_matmul_ops[0]);
  return s ? s : FN(api, AddDomainFn, API_ADD_CUSTOM_OP_DOMAIN)(options, domain);
}
