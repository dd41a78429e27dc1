// calibjax's CPU kernel: batched small float32 matrix products for the run-batched dense layers.
//
// One XLA FFI handler, calibjax_batched_matmul: for every batch index b,
//   C[b] (M x N) = op(A[b]) @ op(B[b]),  op = identity or transpose (attributes trans_a, trans_b),
// where every leading dimension is a batch dimension shared by A, B and C (vmap's broadcast_all).
//
// Numbers: every element of C is one fused multiply-add chain over k = 0 .. K-1 in order,
//   acc = 0; acc = fma(a(i, k), b(k, j), acc),
// whichever code path (vector tile, narrower tile, scalar edge) computes it. So an element's bits
// depend on its row of op(A) and column of op(B) only: not on the tile sizes, M, N, the batch size,
// the element's position in the batch or its batch mates. That is what makes a run's numbers
// independent of how runs are batched (calibjax's bit-identity contract).
//
// Speed: AVX2 + FMA tiles of up to 6 rows x 16 columns (12 ymm accumulators); op(A) is read by
// broadcasts (any layout is free), op(B) by vector loads along j, so a transposed B is first packed
// into a per-thread buffer. Single-threaded: calibjax runs one XLA CPU device per core, so each
// core's device calls its own products.
//
// Built by calibjax.cpu_kernel with g++ -O3 -mavx2 -mfma (no -ffast-math: the order above is kept).

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A strided view: element (i, k) of op(A) is a[i * rs + k * cs].
struct View {
  const float* a;
  int64_t rs, cs;
};

// Rows [i0, i0 + MR) x columns [j, j + 8 * NV) of C. b: row-major K x ldb (op(B), packed if needed).
template <int MR, int NV>
inline void tile(int64_t K, View A, int64_t i0, const float* b, int64_t ldb, int64_t j, float* c, int64_t ldc) {
  __m256 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  const float* arow[MR];
  for (int r = 0; r < MR; ++r) arow[r] = A.a + (i0 + r) * A.rs;
  const float* bp = b + j;
  for (int64_t k = 0; k < K; ++k, bp += ldb) {
    __m256 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(bp + 8 * v);
    for (int r = 0; r < MR; ++r) {
      __m256 av = _mm256_broadcast_ss(arow[r] + k * A.cs);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + (i0 + r) * ldc + j + 8 * v, acc[r][v]);
}

// Columns [j, j + 8 * NV) for every row: 6-row tiles, then the remaining rows.
template <int NV>
inline void panel(int64_t M, int64_t K, View A, const float* b, int64_t ldb, int64_t j, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) tile<6, NV>(K, A, i, b, ldb, j, c, ldc);
  switch (M - i) {
    case 5: tile<5, NV>(K, A, i, b, ldb, j, c, ldc); break;
    case 4: tile<4, NV>(K, A, i, b, ldb, j, c, ldc); break;
    case 3: tile<3, NV>(K, A, i, b, ldb, j, c, ldc); break;
    case 2: tile<2, NV>(K, A, i, b, ldb, j, c, ldc); break;
    case 1: tile<1, NV>(K, A, i, b, ldb, j, c, ldc); break;
    default: break;
  }
}

void product(int64_t M, int64_t N, int64_t K, View A, const float* b, int64_t ldb, float* c) {
  int64_t j = 0;
  for (; j + 16 <= N; j += 16) panel<2>(M, K, A, b, ldb, j, c, N);
  for (; j + 8 <= N; j += 8) panel<1>(M, K, A, b, ldb, j, c, N);
  for (; j < N; ++j)  // the last N % 8 columns: the same fma chain, one element at a time
    for (int64_t i = 0; i < M; ++i) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(A.a[i * A.rs + k * A.cs], b[k * ldb + j], acc);
      c[i * N + j] = acc;
    }
}

ffi::Error BatchedMatmul(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                         int32_t trans_a, int32_t trans_b) {
  auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  size_t rank = da.size();
  if (rank < 2 || db.size() != rank || dc.size() != rank)
    return ffi::Error::InvalidArgument("calibjax_batched_matmul: operands need the same rank >= 2");
  int64_t batch = 1;
  for (size_t d = 0; d + 2 < rank; ++d) {
    if (da[d] != db[d] || da[d] != dc[d])
      return ffi::Error::InvalidArgument("calibjax_batched_matmul: batch dimensions differ");
    batch *= da[d];
  }
  const int64_t ra = da[rank - 2], ca = da[rank - 1], rb = db[rank - 2], cb = db[rank - 1];
  const int64_t M = trans_a ? ca : ra, K = trans_a ? ra : ca;
  const int64_t Kb = trans_b ? cb : rb, N = trans_b ? rb : cb;
  if (K != Kb || dc[rank - 2] != M || dc[rank - 1] != N)
    return ffi::Error::InvalidArgument("calibjax_batched_matmul: inner or output dimensions do not match");

  const float* pa = a.typed_data();
  const float* pb = b.typed_data();
  float* pc = c->typed_data();
  thread_local std::vector<float> packed;
  if (trans_b) packed.resize(static_cast<size_t>(K * N));
  for (int64_t s = 0; s < batch; ++s) {
    const float* as = pa + s * ra * ca;
    const float* bs = pb + s * rb * cb;
    View A{as, trans_a ? 1 : K, trans_a ? M : 1};
    const float* bk = bs;
    if (trans_b) {  // op(B) = B^T: B is N x K; pack it as K x N
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) packed[k * N + n] = bs[n * K + k];
      bk = packed.data();
    }
    product(M, N, K, A, bk, N, pc + s * M * N);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CalibjaxBatchedMatmul, BatchedMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("trans_a")
                                  .Attr<int32_t>("trans_b"));

// 1 when this CPU runs the code above (AVX2 and FMA), else 0: checked before the handler is registered.
extern "C" __attribute__((visibility("default"))) int calibjax_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
