/* What nextn's kernels take from ONNX Runtime's C API, without its headers (its wheel ships none).
 *
 * ONNX Runtime hands a custom-op library its C API as a table of functions (OrtApi); entries are used by their
 * fixed positions in that table: the API's first version's, which later versions only append to, and
 * KernelContext_ParallelFor of version 18, where the runtime has it. The op descriptor is OrtCustomOp as of
 * version 20 (its fields, too, are only ever appended). Each kernel file defines its ops' descriptors with
 * DEFINE_OP; ort_api.c registers them all in the "nextn" domain. */
#ifndef NEXTN_ORT_API_H
#define NEXTN_ORT_API_H

#include <stddef.h>
#include <stdint.h>

typedef void Status; /* OrtStatus*: NULL is success */
typedef Status *(*GetInputFn)(const void *ctx, size_t index, const void **out);
typedef Status *(*GetOutputFn)(void *ctx, size_t index, const int64_t *dims, size_t ndims, void **out);
typedef Status *(*MutableDataFn)(void *value, void **out);
typedef Status *(*TypeAndShapeFn)(const void *value, void **out);
typedef Status *(*DimsCountFn)(const void *info, size_t *out);
typedef Status *(*DimsFn)(const void *info, int64_t *dims, size_t n);
typedef void (*ReleaseFn)(void *p);
typedef Status *(*AttrIntFn)(const void *info, const char *name, int64_t *out);
typedef Status *(*AttrFloatFn)(const void *info, const char *name, float *out);
typedef Status *(*CreateDomainFn)(const char *domain, void **out);
typedef Status *(*DomainAddFn)(void *domain, const void *op);
typedef Status *(*AddDomainFn)(void *options, void *domain);
typedef Status *(*ParallelForFn)(const void *ctx, void (*fn)(void *, size_t), size_t total, size_t batches, void *usr);

enum {
  API_CREATE_CUSTOM_OP_DOMAIN = 26, API_CUSTOM_OP_DOMAIN_ADD = 27, API_ADD_CUSTOM_OP_DOMAIN = 28,
  API_GET_TENSOR_MUTABLE_DATA = 51, API_GET_DIMENSIONS_COUNT = 61, API_GET_DIMENSIONS = 62,
  API_GET_TENSOR_TYPE_AND_SHAPE = 65, API_KERNEL_INFO_GET_ATTRIBUTE_FLOAT = 85,
  API_KERNEL_INFO_GET_ATTRIBUTE_INT64 = 86, API_KERNEL_CONTEXT_GET_INPUT = 90, API_KERNEL_CONTEXT_GET_OUTPUT = 91,
  API_RELEASE_STATUS = 93, API_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
  API_KERNEL_CONTEXT_PARALLEL_FOR = 274, /* version 18 */
};
enum {
  ELEMENT_FLOAT = 1, ELEMENT_UINT8 = 2, ELEMENT_UINT16 = 4, ELEMENT_INT32 = 6, ELEMENT_INT64 = 7, ELEMENT_BOOL = 9,
  MAX_DIMS = 8
};

#define FN(api, type, index) ((type)((api)[index]))

typedef struct CustomOp {
  uint32_t version;
  void *(*CreateKernel)(const struct CustomOp *op, const void *api, const void *info);
  const char *(*GetName)(const struct CustomOp *op);
  const char *(*GetExecutionProviderType)(const struct CustomOp *op);
  int (*GetInputType)(const struct CustomOp *op, size_t index);
  size_t (*GetInputTypeCount)(const struct CustomOp *op);
  int (*GetOutputType)(const struct CustomOp *op, size_t index);
  size_t (*GetOutputTypeCount)(const struct CustomOp *op);
  void (*KernelCompute)(void *kernel, void *context);
  void (*KernelDestroy)(void *kernel);
  int (*GetInputCharacteristic)(const struct CustomOp *op, size_t index);  /* 0: required */
  int (*GetOutputCharacteristic)(const struct CustomOp *op, size_t index);
  int (*GetInputMemoryType)(const struct CustomOp *op, size_t index);       /* 0: the provider's default */
  int (*GetVariadicInputMinArity)(const struct CustomOp *op);
  int (*GetVariadicInputHomogeneity)(const struct CustomOp *op);
  int (*GetVariadicOutputMinArity)(const struct CustomOp *op);
  int (*GetVariadicOutputHomogeneity)(const struct CustomOp *op);
  Status *(*CreateKernelV2)(const struct CustomOp *op, const void *api, const void *info, void **kernel);
  Status *(*KernelComputeV2)(void *kernel, void *context);
  Status *(*InferOutputShapeFn)(const struct CustomOp *op, void *context);
  int (*GetStartVersion)(const struct CustomOp *op);
  int (*GetEndVersion)(const struct CustomOp *op);
  size_t (*GetMayInplace)(int **inputs, int **outputs);
  void (*ReleaseMayInplace)(int *inputs, int *outputs);
  size_t (*GetAliasMap)(int **inputs, int **outputs);
  void (*ReleaseAliasMap)(int *inputs, int *outputs);
} CustomOp;

/* The callbacks every nextn op shares (ort_api.c). */
const char *op_provider(const CustomOp *op);
int op_float_type(const CustomOp *op, size_t i);
size_t op_one_output(const CustomOp *op);
int op_zero(const CustomOp *op, size_t i);
int op_one(const CustomOp *op);
int op_end_version(const CustomOp *op);
size_t op_no_pairs(int **inputs, int **outputs);
void op_release_pairs(int *inputs, int *outputs);
void op_free_kernel(void *kernel);

/* An op descriptor: its name, input types and count, kernel constructor and compute (one float output). */
#define DEFINE_OP(NAME_FN, INPUT_TYPE_FN, INPUT_COUNT_FN, CREATE_FN, COMPUTE_FN)                                 \
  {20, CREATE_FN, NAME_FN, op_provider, INPUT_TYPE_FN, INPUT_COUNT_FN, op_float_type, op_one_output, COMPUTE_FN,  \
   op_free_kernel, op_zero, op_zero, op_zero, op_one, op_one, op_one, op_one, NULL, NULL, NULL, op_one,           \
   op_end_version, op_no_pairs, op_release_pairs, op_no_pairs, op_release_pairs}

/* The same with OUTPUT_COUNT_FN float outputs. */
#define DEFINE_OP_N(NAME_FN, INPUT_TYPE_FN, INPUT_COUNT_FN, OUTPUT_COUNT_FN, CREATE_FN, COMPUTE_FN)                   \
  {20, CREATE_FN, NAME_FN, op_provider, INPUT_TYPE_FN, INPUT_COUNT_FN, op_float_type, OUTPUT_COUNT_FN, COMPUTE_FN, \
   op_free_kernel, op_zero, op_zero, op_zero, op_one, op_one, op_one, op_one, NULL, NULL, NULL, op_one,           \
   op_end_version, op_no_pairs, op_release_pairs, op_no_pairs, op_release_pairs}

/* Helpers over the API table (ort_api.c). */
void release_status(const void *const *api, Status *s);
int shape_of(const void *const *api, const void *value, int64_t *dims, size_t *ndims); /* 0 on failure */
void *data_of(const void *const *api, const void *value);                               /* NULL on failure */
int inputs_of(const void *const *api, void *ctx, size_t n, const void **in);            /* 0 on failure */
int64_t attribute_int(const void *const *api, const void *info, const char *name, int64_t fallback);
float attribute_float(const void *const *api, const void *info, const char *name, float fallback);
/* fn(usr, i) for i in [0, n) on the session's intra-op threads, or on this thread where the runtime has no
 * KernelContext_ParallelFor or refuses it. */
void parallel_for(const void *const *api, void *ctx, void (*fn)(void *, size_t), size_t n, void *usr);
/* The same where `spread`, else every task on this thread (a call too small for a hand-off to pay). */
void parallel_for_if(const void *const *api, void *ctx, int spread, void (*fn)(void *, size_t), size_t n, void *usr);
/* The product of all but the last of `ndims` dims: the rows of an x [..., K]. */
int64_t leading_rows(const int64_t *dims, size_t ndims);
/* A product's output [..., n] for an x [..., K] of dims xd: its fp32 data, or NULL where the runtime gives none
 * (an empty output, or a failure: then it stays unset, which fails the run). */
float *product_output(const void *const *api, void *ctx, const int64_t *xd, size_t xn, int64_t n);

/* Each kernel file's descriptors, registered by ort_api.c. */
extern CustomOp routed_experts_ops[3];
extern CustomOp latent_attention_ops[2];
extern CustomOp mtp_module_ops[1];
extern CustomOp bf16_matmul_ops[1];
extern CustomOp int8_matmul_ops[1];
extern CustomOp nbits_matmul_ops[1];

#endif
