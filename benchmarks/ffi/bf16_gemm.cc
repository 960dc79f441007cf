// A bf16 x bf16 -> f32 GEMM for XLA:CPU through the XLA FFI, calling MKL's cblas_gemm_bf16bf16f32: oneMKL runs it
// on AMX tiles where the CPU has them (Sapphire Rapids and later) and on AVX512-BF16 dot products elsewhere.
// A prototype for benchmarks/bf16_gemm.py (issue 18): built there with g++ against jaxlib's FFI headers and the
// `mkl` / `mkl-include` wheels; pixelgpt itself does not depend on it.
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" {
// From mkl_cblas.h (LP64: MKL_INT is int), declared here so that only the wheel's runtime library is needed.
typedef uint16_t MKL_BF16;
enum CBLAS_LAYOUT { CblasRowMajor = 101 };
enum CBLAS_TRANSPOSE { CblasNoTrans = 111, CblasTrans = 112 };
void cblas_gemm_bf16bf16f32(CBLAS_LAYOUT layout, CBLAS_TRANSPOSE transa, CBLAS_TRANSPOSE transb, int m,
                            int n, int k, float alpha, const MKL_BF16* a, int lda, const MKL_BF16* b,
                            int ldb, float beta, float* c, int ldc);
}

// C [M, N] = op(A) op(B), row-major; op transposes when the attribute says so, which is how the backward pass's
// dots (dX = dY W^T, dW = X^T dY) read their operands without a transposed copy.
static ffi::Error Bf16Gemm(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b, ffi::ResultBuffer<ffi::F32> c,
                           bool transpose_a, bool transpose_b) {
  auto a_dims = a.dimensions(), b_dims = b.dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2) return ffi::Error::InvalidArgument("bf16_gemm takes 2-D operands");
  const int64_t m = transpose_a ? a_dims[1] : a_dims[0], k = transpose_a ? a_dims[0] : a_dims[1];
  const int64_t n = transpose_b ? b_dims[0] : b_dims[1];
  if ((transpose_b ? b_dims[1] : b_dims[0]) != k) return ffi::Error::InvalidArgument("bf16_gemm: K differs");
  cblas_gemm_bf16bf16f32(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
                         transpose_b ? CblasTrans : CblasNoTrans, m, n, k, 1.0f,
                         reinterpret_cast<const MKL_BF16*>(a.typed_data()), a_dims[1],
                         reinterpret_cast<const MKL_BF16*>(b.typed_data()), b_dims[1], 0.0f, c->typed_data(), n);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Bf16GemmHandler, Bf16Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
