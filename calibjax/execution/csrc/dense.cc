// calibjax's CPU kernel: the dense layers' products, and the whole training step of a ReLU MLP.
//
// Two XLA FFI handlers (jax.ffi; every leading dimension is a batch of runs, vmap's broadcast_all):
// - calibjax_batched_matmul: C[b] (M x N) = op(A[b]) @ op(B[b]), op = identity or transpose
//   (attributes trans_a, trans_b): the forward product and both gradients of a dense layer, any
//   width (a thin output, N < 8, by the 8-lane dots of mlp_step's logits).
// - calibjax_mlp_step: per run, the weighted mean cross-entropy of a ReLU MLP on a batch and its
//   gradient for every weight and bias (forward and backward pass in one call).
//
// Numbers: every element of a product is one fused multiply-add chain over k = 0 .. K-1 in order,
//   acc = 0; acc = fma(a(i, k), b(k, j), acc),
// whichever code path (8 x 32 or 6 x 16 tile, narrower tile, scalar edge) computes it (a product
// fewer than 8 wide with A untransposed, the logits or a thin layer's input gradient, uses 8-lane
// partial sums instead, fixed for its shape).
// Elementwise parts are plain loops in a fixed order. So a run's bits depend on its own numbers and
// shapes only: not on the batch size, its position in the batch or its batch mates (calibjax's
// bit-identity contract), nor on the CPU, as long as it has AVX2 and FMA: unlike XLA's dot, whose
// order follows the CPU model it compiles for.
//
// Speed: AVX2 + FMA tiles of up to 6 rows x 16 columns (12 ymm accumulators); built with AVX-512
// (the "avx512" variant), blocks of 8 rows x 32 columns in 16 zmm accumulators first. op(A) is read
// by broadcasts from a k-major panel (packed unless op(A) = A^T already is one), op(B) by vector
// loads along j, so a transposed B is first transposed into a per-thread buffer (8 x 8 blocks).
// Single-threaded: calibjax runs one XLA CPU device per core, and each device calls its own runs.
// Both variants compute every element by the same chain, so they give the same bits (tested).
//
// Built by calibjax.cpu_kernel with g++ -O3 -mavx2 -mfma -ffp-contract=off, plus -mavx512f for the
// avx512 variant (no -ffast-math: the order above is kept).

#include <immintrin.h>

#include <algorithm>
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

// MR rows x 8 * NV columns of C = A B, one fma chain over k per element. Element (r, k) of the
// rows of A is ap[k * astep + r] (a packed panel, or rows that are contiguous in A^T); b: row k
// of B's columns starts at b + k * ldb.
template <int MR, int NV>
inline void tile(int64_t K, const float* ap, int64_t astep, const float* b, int64_t ldb, float* c, int64_t ldc) {
  __m256 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k, ap += astep, b += ldb) {
    __m256 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + 8 * v);
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(ap + r);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + r * ldc + 8 * v, acc[r][v]);
}

// tile<6, 2> written out: twelve named accumulators, which GCC keeps in registers when K is only
// known at run time (the array version spilled them to the stack in every k step: half the speed).
inline void tile_6x16(int64_t K, const float* ap, int64_t astep, const float* b, int64_t ldb, float* c,
                      int64_t ldc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < K; ++k, ap += astep, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 a = _mm256_broadcast_ss(ap);
    c00 = _mm256_fmadd_ps(a, b0, c00), c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(ap + 1);
    c10 = _mm256_fmadd_ps(a, b0, c10), c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(ap + 2);
    c20 = _mm256_fmadd_ps(a, b0, c20), c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(ap + 3);
    c30 = _mm256_fmadd_ps(a, b0, c30), c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(ap + 4);
    c40 = _mm256_fmadd_ps(a, b0, c40), c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(ap + 5);
    c50 = _mm256_fmadd_ps(a, b0, c50), c51 = _mm256_fmadd_ps(a, b1, c51);
  }
  _mm256_storeu_ps(c, c00), _mm256_storeu_ps(c + 8, c01), c += ldc;
  _mm256_storeu_ps(c, c10), _mm256_storeu_ps(c + 8, c11), c += ldc;
  _mm256_storeu_ps(c, c20), _mm256_storeu_ps(c + 8, c21), c += ldc;
  _mm256_storeu_ps(c, c30), _mm256_storeu_ps(c + 8, c31), c += ldc;
  _mm256_storeu_ps(c, c40), _mm256_storeu_ps(c + 8, c41), c += ldc;
  _mm256_storeu_ps(c, c50), _mm256_storeu_ps(c + 8, c51);
}

#ifdef __AVX512F__
// The avx512 variant's tile: 8 rows x 32 columns in sixteen zmm accumulators (of 32 registers),
// named for the reason above. The same fma chain per element as every other tile.
inline void tile_8x32(int64_t K, const float* ap, int64_t astep, const float* b, int64_t ldb, float* c,
                      int64_t ldc) {
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  __m512 c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00, c70 = c00, c71 = c00;
  for (int64_t k = 0; k < K; ++k, ap += astep, b += ldb) {
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    __m512 a = _mm512_set1_ps(ap[0]);
    c00 = _mm512_fmadd_ps(a, b0, c00), c01 = _mm512_fmadd_ps(a, b1, c01);
    a = _mm512_set1_ps(ap[1]);
    c10 = _mm512_fmadd_ps(a, b0, c10), c11 = _mm512_fmadd_ps(a, b1, c11);
    a = _mm512_set1_ps(ap[2]);
    c20 = _mm512_fmadd_ps(a, b0, c20), c21 = _mm512_fmadd_ps(a, b1, c21);
    a = _mm512_set1_ps(ap[3]);
    c30 = _mm512_fmadd_ps(a, b0, c30), c31 = _mm512_fmadd_ps(a, b1, c31);
    a = _mm512_set1_ps(ap[4]);
    c40 = _mm512_fmadd_ps(a, b0, c40), c41 = _mm512_fmadd_ps(a, b1, c41);
    a = _mm512_set1_ps(ap[5]);
    c50 = _mm512_fmadd_ps(a, b0, c50), c51 = _mm512_fmadd_ps(a, b1, c51);
    a = _mm512_set1_ps(ap[6]);
    c60 = _mm512_fmadd_ps(a, b0, c60), c61 = _mm512_fmadd_ps(a, b1, c61);
    a = _mm512_set1_ps(ap[7]);
    c70 = _mm512_fmadd_ps(a, b0, c70), c71 = _mm512_fmadd_ps(a, b1, c71);
  }
  _mm512_storeu_ps(c, c00), _mm512_storeu_ps(c + 16, c01), c += ldc;
  _mm512_storeu_ps(c, c10), _mm512_storeu_ps(c + 16, c11), c += ldc;
  _mm512_storeu_ps(c, c20), _mm512_storeu_ps(c + 16, c21), c += ldc;
  _mm512_storeu_ps(c, c30), _mm512_storeu_ps(c + 16, c31), c += ldc;
  _mm512_storeu_ps(c, c40), _mm512_storeu_ps(c + 16, c41), c += ldc;
  _mm512_storeu_ps(c, c50), _mm512_storeu_ps(c + 16, c51), c += ldc;
  _mm512_storeu_ps(c, c60), _mm512_storeu_ps(c + 16, c61), c += ldc;
  _mm512_storeu_ps(c, c70), _mm512_storeu_ps(c + 16, c71);
}
constexpr int MR_MAX = 8;  // rows per block
#else
constexpr int MR_MAX = 6;
#endif

// MR rows of C, every column: the widest tiles first (32 columns in the avx512 variant's 8-row
// blocks, else 16), an 8-wide one, then the last N % 8 columns one element at a time (the same fma
// chain).
template <int MR>
void rows(int64_t N, int64_t K, const float* ap, int64_t astep, const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t j = 0;
#ifdef __AVX512F__
  if constexpr (MR == 8) {
    for (; j + 32 <= N; j += 32) tile_8x32(K, ap, astep, b + j, ldb, c + j, ldc);
  }
#endif
  if constexpr (MR == 6) {
    for (; j + 16 <= N; j += 16) tile_6x16(K, ap, astep, b + j, ldb, c + j, ldc);
  }
  for (; j + 16 <= N; j += 16) tile<MR, 2>(K, ap, astep, b + j, ldb, c + j, ldc);
  for (; j + 8 <= N; j += 8) tile<MR, 1>(K, ap, astep, b + j, ldb, c + j, ldc);
  for (; j < N; ++j)
    for (int r = 0; r < MR; ++r) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(ap[k * astep + r], b[k * ldb + j], acc);
      c[r * ldc + j] = acc;
    }
}

// The k-major panel of MR rows of A (row r at a + r * rs, contiguous in k): panel[k * MR + r].
template <int MR>
inline void pack(int64_t K, const float* __restrict a, int64_t rs, float* __restrict panel) {
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < MR; ++r) panel[k * MR + r] = a[r * rs + k];
}

// MR rows of C = op(A) B starting at row i: op(A)'s rows are read in place when they are
// contiguous (op(A) = A^T), else packed k-major first, so the tiles read every broadcast at a fixed
// offset from one pointer.
template <int MR>
void block(int64_t i, int64_t N, int64_t K, View A, const float* b, int64_t ldb, float* c, float* panel) {
  const float* ap = A.a + i * A.rs;
  int64_t astep = A.cs;
  if (A.rs != 1) {
    if (A.cs == 1) {
      pack<MR>(K, ap, A.rs, panel);
    } else {
      for (int64_t k = 0; k < K; ++k)
        for (int r = 0; r < MR; ++r) panel[k * MR + r] = ap[r * A.rs + k * A.cs];
    }
    ap = panel, astep = MR;
  }
  rows<MR>(N, K, ap, astep, b, ldb, c + i * N, N);
}

// C (M x N, row-major) = op(A) B, b row-major K x N with row stride ldb: blocks of MR_MAX rows,
// then the last M % MR_MAX rows as one block.
void product(int64_t M, int64_t N, int64_t K, View A, const float* b, int64_t ldb, float* c) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(MR_MAX * K)) buffer.resize(static_cast<size_t>(MR_MAX * K));
  float* panel = buffer.data();
  int64_t i = 0;
  for (; i + MR_MAX <= M; i += MR_MAX) block<MR_MAX>(i, N, K, A, b, ldb, c, panel);
  switch (M - i) {
    case 7: block<7>(i, N, K, A, b, ldb, c, panel); break;
    case 6: block<6>(i, N, K, A, b, ldb, c, panel); break;
    case 5: block<5>(i, N, K, A, b, ldb, c, panel); break;
    case 4: block<4>(i, N, K, A, b, ldb, c, panel); break;
    case 3: block<3>(i, N, K, A, b, ldb, c, panel); break;
    case 2: block<2>(i, N, K, A, b, ldb, c, panel); break;
    case 1: block<1>(i, N, K, A, b, ldb, c, panel); break;
    default: break;
  }
}

// t (cols x rows) = m^T, m (rows x cols) row-major: 8 x 8 blocks in registers, then the edges.
inline void transpose(const float* __restrict m, float* __restrict t, int64_t rows, int64_t cols) {
  const int64_t r8 = rows - rows % 8, q8 = cols - cols % 8;
  for (int64_t r = 0; r < r8; r += 8)
    for (int64_t q = 0; q < q8; q += 8) {
      __m256 v[8], u[8];
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(m + (r + i) * cols + q);
      for (int i = 0; i < 8; i += 2) u[i] = _mm256_unpacklo_ps(v[i], v[i + 1]), u[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
      for (int i = 0; i < 8; i += 4) {
        v[i] = _mm256_shuffle_ps(u[i], u[i + 2], 0x44), v[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], 0xEE);
        v[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0x44), v[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(t + (q + i) * rows + r, _mm256_permute2f128_ps(v[i], v[i + 4], 0x20));
        _mm256_storeu_ps(t + (q + i + 4) * rows + r, _mm256_permute2f128_ps(v[i], v[i + 4], 0x31));
      }
    }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = (r < r8 ? q8 : 0); q < cols; ++q) t[q * rows + r] = m[r * cols + q];
}

// z (B x n) = a (B x K) @ W (K x n) for a narrow n (< 8, the logits): each element an 8-lane fma
// dot over k, then the lanes summed in a fixed order. wt: W^T (n x K).
inline void narrow_product(const float* a, const float* wt, float* z, int64_t B, int64_t K, int64_t n) {
  for (int64_t i = 0; i < B; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const float* ai = a + i * K;
      const float* wj = wt + j * K;
      __m256 acc = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(ai + k), _mm256_loadu_ps(wj + k), acc);
      alignas(32) float lane[8];
      _mm256_store_ps(lane, acc);
      float v = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
      for (; k < K; ++k) v = std::fma(ai[k], wj[k], v);
      z[i * n + j] = v;
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
  const bool narrow = !trans_a && N < 8;  // a thin output (the logits): by mlp_step's 8-lane dots
  if (trans_b || narrow) packed.resize(static_cast<size_t>(K * N));
  for (int64_t s = 0; s < batch; ++s) {
    const float* as = pa + s * ra * ca;
    const float* bs = pb + s * rb * cb;
    if (narrow) {  // narrow_product reads op(B)^T (N x K): B itself when transposed, else B transposed
      const float* bt = bs;
      if (!trans_b) transpose(bs, packed.data(), K, N), bt = packed.data();
      narrow_product(as, bt, pc + s * M * N, M, K, N);
      continue;
    }
    View A{as, trans_a ? 1 : K, trans_a ? M : 1};
    const float* bk = bs;
    if (trans_b) {  // op(B) = B^T: B is N x K; pack it as K x N
      transpose(bs, packed.data(), N, K);
      bk = packed.data();
    }
    product(M, N, K, A, bk, N, pc + s * M * N);
  }
  return ffi::Error::Success();
}

// z (B x n) += b per row, then ReLU if relu (NaN stays NaN, as XLA's max(z, 0)).
inline void bias_relu(float* __restrict z, const float* __restrict b, int64_t B, int64_t n, bool relu) {
  for (int64_t i = 0; i < B; ++i, z += n)
    for (int64_t j = 0; j < n; ++j) {
      const float v = z[j] + b[j];
      z[j] = (relu && v < 0.0f) ? 0.0f : v;
    }
}

// g (n) = column sums of d (B x n), each summed over rows in order.
inline void column_sums(const float* __restrict d, float* __restrict g, int64_t B, int64_t n) {
  for (int64_t j = 0; j < n; ++j) g[j] = 0.0f;
  for (int64_t i = 0; i < B; ++i, d += n)
    for (int64_t j = 0; j < n; ++j) g[j] += d[j];
}

// out (B x n) = da where a > 0, else 0: the ReLU's backward pass.
inline void relu_mask(const float* __restrict a, const float* __restrict da, float* __restrict out, int64_t size) {
  for (int64_t i = 0; i < size; ++i) out[i] = a[i] > 0.0f ? da[i] : 0.0f;
}

struct StepScratch {
  std::vector<float> z, dz, da, t;
  std::vector<int64_t> offset;
};

// One run's step: n = widths (D, hidden..., C); W[l] (n[l] x n[l+1]) and b[l]; x (B x D), c, w (B).
// Writes the weighted mean cross-entropy and the gradients gW[l], gb[l].
void mlp_step(int64_t B, const std::vector<int64_t>& n, const float* x, const int32_t* c, const float* w,
              const float* const* W, const float* const* b, float* loss, float* const* gW, float* const* gb,
              StepScratch& s) {
  const size_t layers = n.size() - 1;
  const int64_t C = n[layers];
  s.offset.assign(layers + 1, 0);
  int64_t widest = 0;
  for (size_t l = 0; l < layers; ++l) s.offset[l + 1] = s.offset[l] + B * n[l + 1];
  for (auto v : n) widest = std::max(widest, v);
  s.z.resize(s.offset[layers]), s.dz.resize(B * widest), s.da.resize(B * widest);
  s.t.resize(std::max(widest * widest, B * widest));
  // Forward: z_l = a_{l-1} W_l + b_l; a_l = relu(z_l) is kept in place of z_l (a_l > 0 exactly
  // where z_l > 0, the mask of the backward pass).
  const float* a = x;
  for (size_t l = 0; l < layers; ++l) {
    float* zl = s.z.data() + s.offset[l];
    if (n[l + 1] < 8) {
      transpose(W[l], s.t.data(), n[l], n[l + 1]);
      narrow_product(a, s.t.data(), zl, B, n[l], n[l + 1]);
    } else {
      product(B, n[l + 1], n[l], View{a, n[l], 1}, W[l], n[l + 1], zl);
    }
    bias_relu(zl, b[l], B, n[l + 1], l + 1 < layers);
    a = zl;
  }
  // Loss: w_i (logsumexp(z_i) - z_i[c_i]), averaged over the batch; its gradient in dz.
  const float* logits = a;
  float* dz = s.dz.data();
  float total = 0.0f;
  for (int64_t i = 0; i < B; ++i) {
    const float* zi = logits + i * C;
    float m = zi[0];
    for (int64_t j = 1; j < C; ++j) m = std::max(m, zi[j]);
    float sum = 0.0f;
    float* di = dz + i * C;
    for (int64_t j = 0; j < C; ++j) sum += (di[j] = std::exp(zi[j] - m));
    const float lse = m + std::log(sum);
    total += w[i] * (lse - zi[c[i]]);
    const float scale = w[i] / static_cast<float>(B);
    for (int64_t j = 0; j < C; ++j) di[j] = scale * (di[j] / sum - (j == c[i] ? 1.0f : 0.0f));  // softmax - onehot
  }
  *loss = total / static_cast<float>(B);
  // Backward, last layer first: dW_l = a_{l-1}^T dz_l, db_l = column sums of dz_l,
  // dz_{l-1} = (dz_l W_l^T) where a_{l-1} > 0.
  for (size_t l = layers; l-- > 0;) {
    const int64_t in = n[l], out = n[l + 1];
    const float* al = l ? s.z.data() + s.offset[l - 1] : x;
    if (out < 8) {  // dW^T (out x in) = dz^T a, by full-width tiles along in; then transposed
      product(out, in, B, View{dz, 1, out}, al, in, s.t.data());
      transpose(s.t.data(), gW[l], out, in);
    } else {
      product(in, out, B, View{al, 1, in}, dz, out, gW[l]);
    }
    column_sums(dz, gb[l], B, out);
    if (l == 0) break;
    transpose(W[l], s.t.data(), in, out);  // W_l^T (out x in): the K x N operand of dz_l W_l^T
    product(B, in, out, View{dz, out, 1}, s.t.data(), in, s.da.data());
    relu_mask(al, s.da.data(), dz, B * in);
  }
}

// The loss and every gradient of one training step of a ReLU MLP with cross-entropy, for a batch
// of runs: per run, x (B, D), labels c (B), example weights w (B) and the layers' (W, b) pairs;
// returns the weighted mean loss () and the gradients, shaped as the parameters. Each run is
// computed by mlp_step alone, so nothing depends on its batch mates.
ffi::Error MlpStep(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> c, ffi::Buffer<ffi::F32> w,
                   ffi::RemainingArgs params, ffi::ResultBuffer<ffi::F32> loss, ffi::RemainingRets grads) {
  const auto dc = c.dimensions();
  if (dc.size() < 1 || params.size() < 2 || params.size() % 2 || grads.size() != params.size())
    return ffi::Error::InvalidArgument("calibjax_mlp_step: expected x, c, w, then (W, b) per layer");
  const int64_t B = dc.back();
  const int64_t batch = B ? static_cast<int64_t>(c.element_count()) / B : 0;
  if (batch == 0) return ffi::Error::Success();
  const int64_t D = static_cast<int64_t>(x.element_count()) / (batch * B);
  const size_t layers = params.size() / 2;
  std::vector<const float*> W(layers), bias(layers), Ws(layers), bs(layers);
  std::vector<float*> gW(layers), gb(layers), gWs(layers), gbs(layers);
  std::vector<int64_t> n(layers + 1);
  n[0] = D;
  for (size_t l = 0; l < layers; ++l) {
    auto pw = params.get<ffi::Buffer<ffi::F32>>(2 * l), pb = params.get<ffi::Buffer<ffi::F32>>(2 * l + 1);
    auto rw = grads.get<ffi::Buffer<ffi::F32>>(2 * l), rb = grads.get<ffi::Buffer<ffi::F32>>(2 * l + 1);
    if (!pw.has_value() || !pb.has_value() || !rw.has_value() || !rb.has_value())
      return ffi::Error::InvalidArgument("calibjax_mlp_step: parameters and gradients must be float32");
    n[l + 1] = static_cast<int64_t>(pb->element_count()) / batch;
    if (static_cast<int64_t>(pw->element_count()) != batch * n[l] * n[l + 1] ||
        (*rw)->element_count() != pw->element_count() || (*rb)->element_count() != pb->element_count())
      return ffi::Error::InvalidArgument("calibjax_mlp_step: layer shapes do not chain");
    W[l] = pw->typed_data(), bias[l] = pb->typed_data(), gW[l] = (*rw)->typed_data(), gb[l] = (*rb)->typed_data();
  }
  if (static_cast<int64_t>(loss->element_count()) != batch)
    return ffi::Error::InvalidArgument("calibjax_mlp_step: one loss per run expected");
  thread_local StepScratch scratch;
  for (int64_t s = 0; s < batch; ++s) {
    for (size_t l = 0; l < layers; ++l) {
      const int64_t size = n[l] * n[l + 1];
      Ws[l] = W[l] + s * size, bs[l] = bias[l] + s * n[l + 1], gWs[l] = gW[l] + s * size, gbs[l] = gb[l] + s * n[l + 1];
    }
    mlp_step(B, n, x.typed_data() + s * B * D, c.typed_data() + s * B, w.typed_data() + s * B, Ws.data(), bs.data(),
             loss->typed_data() + s, gWs.data(), gbs.data(), scratch);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(CalibjaxMlpStep, MlpStep,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets());

// 1 when this CPU runs the code above (AVX2 and FMA; AVX-512 F for the avx512 variant), else 0:
// checked before the handler is registered.
extern "C" __attribute__((visibility("default"))) int calibjax_cpu_supported() {
  __builtin_cpu_init();
#ifdef __AVX512F__
  if (!__builtin_cpu_supports("avx512f")) return 0;
#endif
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
