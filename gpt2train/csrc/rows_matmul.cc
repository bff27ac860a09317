// A few rows of bfloat16 activations times a bfloat16 kernel laid out [out, in], accumulated in
// float32: the matrix products of decoding one text on CPUs with AVX-512 bfloat16
// (gpt2train/native_kernel.py builds and loads this; kernels.py says when it is used).
//
// Decoding one text multiplies one row by every weight once per token, so its speed is how
// fast the weights stream from memory. XLA:CPU multiplies a single bfloat16 row in float32
// (weights converted to float32 and streamed as such) and its bfloat16 kernels for a few rows
// stream about half as fast as its float32 one, so holding the weights in bfloat16 bought
// nothing. This kernel reads each weight once, straight from the layout it lies in, with
// vdpbf16ps, and spreads output columns over XLA's own threads.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kGroup = 8;  // rows multiplied per pass over a pair of kernel rows

#if !defined(__AVX512BF16__) || !defined(__AVX512BW__)
#error "rows_matmul needs AVX-512 with bfloat16 (native_kernel.py builds it only where the CPU has avx512_bf16)"
#endif

// G rows of x against kernel rows n and n + 1: 2 * G accumulators of 16 lanes, each step
// multiplying 32 bfloat16 pairs (vdpbf16ps) into float32.
template <int G>
void group_pair(const uint16_t* x, const uint16_t* w0, const uint16_t* w1, int64_t K, float* y0, float* y1,
                int64_t y_stride) {
  __m512 a0[G], a1[G];
  for (int g = 0; g < G; ++g) a0[g] = a1[g] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh v0 = (__m512bh)_mm512_loadu_si512(w0 + k);
    __m512bh v1 = (__m512bh)_mm512_loadu_si512(w1 + k);
    for (int g = 0; g < G; ++g) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + g * K + k);
      a0[g] = _mm512_dpbf16_ps(a0[g], xv, v0);
      a1[g] = _mm512_dpbf16_ps(a1[g], xv, v1);
    }
  }
  if (k < K) {  // the tail, by masked loads (zeros multiply to nothing)
    __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);
    __m512bh v0 = (__m512bh)_mm512_maskz_loadu_epi16(m, w0 + k);
    __m512bh v1 = (__m512bh)_mm512_maskz_loadu_epi16(m, w1 + k);
    for (int g = 0; g < G; ++g) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + g * K + k);
      a0[g] = _mm512_dpbf16_ps(a0[g], xv, v0);
      a1[g] = _mm512_dpbf16_ps(a1[g], xv, v1);
    }
  }
  for (int g = 0; g < G; ++g) {
    y0[g * y_stride] = _mm512_reduce_add_ps(a0[g]);
    if (y1) y1[g * y_stride] = _mm512_reduce_add_ps(a1[g]);
  }
}
using GroupFn = void (*)(const uint16_t*, const uint16_t*, const uint16_t*, int64_t, float*, float*, int64_t);
constexpr GroupFn kGroupFns[kGroup + 1] = {nullptr,         group_pair<1>, group_pair<2>, group_pair<3>, group_pair<4>,
                                           group_pair<5>, group_pair<6>, group_pair<7>, group_pair<8>};

// Output columns [n0, n1) of y [B, N] = x [B, K] . w [N, K]^T.
void columns(const uint16_t* x, const uint16_t* w, float* y, int64_t B, int64_t K, int64_t N, int64_t n0,
             int64_t n1) {
  for (int64_t n = n0; n < n1; n += 2) {
    const bool pair = n + 1 < n1;
    const uint16_t* w0 = w + n * K;
    const uint16_t* w1 = pair ? w0 + K : w0;
    for (int64_t b = 0; b < B; b += kGroup) {  // the kernel rows stay in L1 between groups
      const int64_t g = std::min(kGroup, B - b);
      kGroupFns[g](x + b * K, w0, w1, K, y + b * N + n, pair ? y + b * N + n + 1 : nullptr, N);
    }
  }
}

// Work shared between the calling thread and the tasks it schedules on XLA's pool. A task
// that starts after the work is done finds no chunk left and returns, so the caller only ever
// waits for chunks already running, never for a task the pool has not started.
struct Shared {
  const uint16_t* x;
  const uint16_t* w;
  float* y;
  int64_t B, K, N, chunk, chunks;
  std::atomic<int64_t> next{0}, done{0};

  void work() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      const int64_t n0 = c * chunk;
      columns(x, w, y, B, K, N, n0, std::min(N, n0 + chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error RowsMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (x.element_type() != ffi::DataType::BF16 || w.element_type() != ffi::DataType::BF16 ||
      y->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("rows_matmul: x and w must be bfloat16 and the result float32");
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("rows_matmul: x [B, K] and w [N, K] expected");
  auto shared = std::make_shared<Shared>();
  shared->x = reinterpret_cast<const uint16_t*>(x.untyped_data());
  shared->w = reinterpret_cast<const uint16_t*>(w.untyped_data());
  shared->y = reinterpret_cast<float*>(y->untyped_data());
  shared->B = xd[0];
  shared->K = xd[1];
  shared->N = wd[0];
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Several chunks per thread even out threads that start late; even sizes keep kernel rows paired.
  const int64_t chunks = std::min<int64_t>(threads * 4, std::max<int64_t>(1, shared->N / 64));
  shared->chunk = ((shared->N + chunks - 1) / chunks + 1) & ~int64_t{1};
  shared->chunks = (shared->N + shared->chunk - 1) / shared->chunk;
  for (int64_t t = 1; t < std::min(threads, shared->chunks); ++t) pool.Schedule([shared] { shared->work(); });
  shared->work();
  while (shared->done.load(std::memory_order_acquire) < shared->chunks) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsMatmul, RowsMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
