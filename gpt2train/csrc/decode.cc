// Decoding's kernels for CPUs with AVX-512 (gpt2train/native_kernel.py builds and loads this;
// kernels.native_rows and kernels.native_cached_attention say when each is used).
//
// rows_matmul: a few rows (1-16) of activations times a kernel laid out [out, in], accumulated
// in float32; bfloat16 (where the CPU has AVX-512 BF16) or float32. In float32, XLA:CPU's
// products of a few rows are compute-bound; this one streams the weights by FMA. Decoding multiplies a few rows by every weight once per
// token, so its speed is how fast the weights stream from memory. XLA:CPU multiplies a single
// bfloat16 row in float32 (weights converted to float32 and streamed as such) and its bfloat16
// kernels for a few rows pack the weights first, streaming about half as fast as its float32
// one: holding the weights in bfloat16 bought little. In bfloat16 this kernel reads each weight once,
// straight from the layout it lies in -- by vdpbf16ps for one row, by AMX tiles for more where
// the CPU has them -- and spreads output columns over XLA's own threads. Each pass over a pair (or
// block of 16) of kernel rows asks for the next pair's (block's) lines as it reads its own: the
// hardware's prefetchers lost the streams at every new pair or block, and each began waiting on
// memory (124M generation, AMD EPYC, Zen 5, in-process A/B: batch 1 bfloat16 137 -> 164 tokens/s,
// float32 83 -> 90; batch 8 bfloat16 744 -> 855, float32 282 -> 400). AMX's path is left as it was
// measured on Intel.
//
// cached_attention: each head's query row against its bfloat16 key/value cache. XLA:CPU
// multiplies a single bfloat16 row in float32, so it converted every cache to float32 at every
// token; this reads the caches' bits as they lie, one (head, position) row per task, asking for
// the slots ahead (124M, batch 8, 256 slots, 12 layers on an AMD EPYC, Zen 5: 2.3-2.6 ms a step
// against 6.2-7.2 without, which waited on each slot's load).
#include <cmath>
#include <vector>

#include "common.h"

namespace {

using namespace gpt2train;

constexpr int64_t kGroup = 8;  // rows multiplied per pass over a pair of kernel rows

// The bfloat16 kernels need AVX-512 BF16 too; kernels.py asks for them only where the CPU has it.
// The two group_pair kernels below are written out per type: one template over both, with masked
// loads throughout, ran float32's 8-row products 27% slower (37.2 against 29.2 ms chained at 124M).

#if defined(__AVX512BF16__)
// bfloat16: G rows of x against kernel rows n and n + 1: 2 * G accumulators of 16 lanes, each
// step multiplying 32 bfloat16 pairs (vdpbf16ps) into float32.
template <int G>
void group_pair(const uint16_t* x, const uint16_t* w0, const uint16_t* w1, int64_t K, float* y0, float* y1,
                int64_t y_stride, const uint16_t* ahead = nullptr) {
  __m512 a0[G], a1[G];
  for (int g = 0; g < G; ++g) a0[g] = a1[g] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (ahead) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead + K + k), _MM_HINT_T0);
    }
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
#endif

// float32: G rows of x against kernel rows n and n + 1, 16 products per step by FMA.
template <int G>
void group_pair(const float* x, const float* w0, const float* w1, int64_t K, float* y0, float* y1,
                int64_t y_stride, const float* ahead = nullptr) {
  __m512 a0[G], a1[G];
  for (int g = 0; g < G; ++g) a0[g] = a1[g] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (ahead) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead + K + k), _MM_HINT_T0);
    }
    const __m512 v0 = _mm512_loadu_ps(w0 + k), v1 = _mm512_loadu_ps(w1 + k);
    for (int g = 0; g < G; ++g) {
      const __m512 xv = _mm512_loadu_ps(x + g * K + k);
      a0[g] = _mm512_fmadd_ps(xv, v0, a0[g]);
      a1[g] = _mm512_fmadd_ps(xv, v1, a1[g]);
    }
  }
  if (k < K) {
    const __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
    const __m512 v0 = _mm512_maskz_loadu_ps(m, w0 + k), v1 = _mm512_maskz_loadu_ps(m, w1 + k);
    for (int g = 0; g < G; ++g) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + g * K + k);
      a0[g] = _mm512_fmadd_ps(xv, v0, a0[g]);
      a1[g] = _mm512_fmadd_ps(xv, v1, a1[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    y0[g * y_stride] = _mm512_reduce_add_ps(a0[g]);
    if (y1) y1[g * y_stride] = _mm512_reduce_add_ps(a1[g]);
  }
}

// One row of x against four kernel rows (decoding one text): four streams from memory in flight
// instead of a pair's two; each output's products are summed in group_pair's order, so a text
// decodes to the same bits alone and in a batch. `ahead`: the next four rows, asked for meanwhile.
#if defined(__AVX512BF16__)
inline void one_row_quad(const uint16_t* x, const uint16_t* w, int64_t K, float* y, const uint16_t* ahead) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (ahead)
      for (int r = 0; r < 4; ++r) _mm_prefetch(reinterpret_cast<const char*>(ahead + r * K + k), _MM_HINT_T0);
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
    for (int r = 0; r < 4; ++r) a[r] = _mm512_dpbf16_ps(a[r], xv, (__m512bh)_mm512_loadu_si512(w + r * K + k));
  }
  if (k < K) {
    const __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);
    const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + k);
    for (int r = 0; r < 4; ++r) a[r] = _mm512_dpbf16_ps(a[r], xv, (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * K + k));
  }
  for (int r = 0; r < 4; ++r) y[r] = _mm512_reduce_add_ps(a[r]);
}
#endif

inline void one_row_quad(const float* x, const float* w, int64_t K, float* y, const float* ahead) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (ahead)
      for (int r = 0; r < 4; ++r) _mm_prefetch(reinterpret_cast<const char*>(ahead + r * K + k), _MM_HINT_T0);
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < 4; ++r) a[r] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + r * K + k), a[r]);
  }
  if (k < K) {
    const __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
    for (int r = 0; r < 4; ++r) a[r] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, w + r * K + k), a[r]);
  }
  for (int r = 0; r < 4; ++r) y[r] = _mm512_reduce_add_ps(a[r]);
}

template <typename T>
using GroupFn = void (*)(const T*, const T*, const T*, int64_t, float*, float*, int64_t, const T*);
template <typename T>
constexpr GroupFn<T> kGroupFns[kGroup + 1] = {nullptr,          group_pair<1>, group_pair<2>, group_pair<3>,
                                              group_pair<4>,    group_pair<5>, group_pair<6>, group_pair<7>,
                                              group_pair<8>};

// Output columns [n0, n1) of y [B, N] = x [B, K] . w [N, K]^T; T is uint16_t (bfloat16 bits) or float.
// Each row of x has its own accumulators, summed in the same order whatever B is: a text decodes
// to the same bits alone and in a batch.
template <typename T>
void columns(const T* x, const T* w, float* y, int64_t B, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  if (B == 1)  // four kernel rows at a time (124M, bfloat16, in-process A/B: 150 -> 164 tokens/s median)
    for (; n0 + 4 <= n1; n0 += 4) one_row_quad(x, w + n0 * K, K, y + n0, n0 + 8 <= N ? w + (n0 + 4) * K : nullptr);
  for (int64_t n = n0; n < n1; n += 2) {
    const bool pair = n + 1 < n1;
    const T* w0 = w + n * K;
    const T* w1 = pair ? w0 + K : w0;
    const T* ahead = n + 3 < N ? w0 + 2 * K : nullptr;  // the next pair's rows, asked for as these stream
    for (int64_t b = 0; b < B; b += kGroup) {  // the kernel rows stay in L1 between groups
      const int64_t g = std::min(kGroup, B - b);
      kGroupFns<T>[g](x + b * K, w0, w1, K, y + b * N + n, pair ? y + b * N + n + 1 : nullptr, N, b == 0 ? ahead : nullptr);
    }
  }
}


#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
constexpr bool kHasAmx = true;

// Output columns [n0, n1) -- whole blocks of 16 -- of y [B, N] by AMX: tile 0 accumulates
// [16 kernel rows, 16 x rows] in float32, tile 1 holds 16 kernel rows as they lie, tile 2 the
// packed x. One block of 16 kernel rows at a time: 16 streams from memory, which the hardware
// prefetchers follow (blocks of 64 rows, 64 streams, read 124M's weights 13% slower at 8 rows).
// The thread's own tile configuration (XLA's kernels may hold one) is put back afterwards.
void columns_amx(const uint16_t* xp, const uint16_t* w, float* y, int64_t B, int64_t K, int64_t N, int64_t n0,
                 int64_t n1) {
  ScopedTiles tiles(3);
  alignas(64) float c[16][16];
  for (int64_t n = n0; n + 16 <= n1; n += 16) {
    _tile_zero(0);
    for (int64_t k = 0; k < K; k += 32) {
      _tile_loadd(2, xp + k * 16, 64);
      _tile_loadd(1, w + n * K + k, K * 2);
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, c, 64);
    for (int64_t b = 0; b < B; ++b)
      for (int m = 0; m < 16; ++m) y[b * N + n + m] = c[m][b];
  }
}
#else
constexpr bool kHasAmx = false;
void columns_amx(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t, int64_t, int64_t) {}
#endif

#if defined(__AVX512BF16__)
// Several rows by vdpbf16ps where there is no AMX. Each row of x gets G = 16 / (B rounded up to a
// power of two) lanes of the 16, so no lane is idle at 2, 4 or 8 rows: vector q of the packed x
// holds, for each row b, x[b]'s pairs qG .. qG + G - 1 in lanes bG .. bG + G - 1 (rows past B
// zeros), and a kernel row's same G pairs are broadcast to every row's lanes. A row's G lanes
// are summed at the end, in the same order whatever the other rows hold.
void pack_lanes(const uint16_t* x, int64_t B, int64_t K, int64_t G, uint16_t* xp) {
  const int64_t rows = 16 / G, width = 2 * G;  // bfloat16s of a row per vector
  for (int64_t q = 0; q < K / width; ++q)
    for (int64_t b = 0; b < rows; ++b) {
      uint16_t* to = xp + q * 32 + b * width;
      if (b < B)
        std::copy(x + b * K + q * width, x + b * K + (q + 1) * width, to);
      else
        std::fill(to, to + width, uint16_t{0});
    }
}

template <int G>
inline __m512bh broadcast_pairs(const uint16_t* w) {
  if constexpr (G == 1) {
    int32_t v;
    std::memcpy(&v, w, 4);
    return (__m512bh)_mm512_set1_epi32(v);
  } else if constexpr (G == 2) {
    int64_t v;
    std::memcpy(&v, w, 8);
    return (__m512bh)_mm512_set1_epi64(v);
  } else if constexpr (G == 4) {
    return (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  } else {
    return (__m512bh)_mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  }
}

// Output columns [n0, n1) -- whole blocks of 16 -- of y [B, N]: 16 kernel rows (16 accumulators,
// 16 streams from memory, as columns_amx) against the packed x. Out of line, so GCC keeps the
// accumulators in registers (inlined into a kernel's loops it spilled them in scoring's kernels).
template <int G>
__attribute__((noinline)) void columns_lanes(const uint16_t* xp, const uint16_t* w, float* y, int64_t B, int64_t K,
                                             int64_t N, int64_t n0, int64_t n1) {
  alignas(64) float c[16][16];
  for (int64_t n = n0; n + 16 <= n1; n += 16) {
    __m512 acc[16];
    for (auto& a : acc) a = _mm512_setzero_ps();
    const uint16_t* rows = w + n * K;
    const char* ahead = reinterpret_cast<const char*>(rows + 16 * K);  // the next block: 16 x K contiguous
    const bool fetch = n + 32 <= N;
    for (int64_t q = 0; q < K / (2 * G); ++q) {
      if (fetch)
        for (int j = 0; j < G; ++j) _mm_prefetch(ahead + (q * G + j) * 64, _MM_HINT_T0);  // as fast as this one's read
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + q * 32);
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], broadcast_pairs<G>(rows + r * K + q * 2 * G), xv);
    }
    for (int r = 0; r < 16; ++r) _mm512_store_ps(c[r], acc[r]);
    for (int64_t b = 0; b < B; ++b)
      for (int r = 0; r < 16; ++r) {
        float sum = 0.f;
        for (int j = 0; j < G; ++j) sum += c[r][b * G + j];
        y[b * N + n + r] = sum;
      }
  }
}

void columns_lanes(int64_t G, const uint16_t* xp, const uint16_t* w, float* y, int64_t B, int64_t K, int64_t N,
                   int64_t n0, int64_t n1) {
  switch (G) {
    case 1: return columns_lanes<1>(xp, w, y, B, K, N, n0, n1);
    case 2: return columns_lanes<2>(xp, w, y, B, K, N, n0, n1);
    case 4: return columns_lanes<4>(xp, w, y, B, K, N, n0, n1);
    default: return columns_lanes<8>(xp, w, y, B, K, N, n0, n1);
  }
}

// The lanes each of B rows gets (1, 2, 4 or 8; B from 2 to 16).
int64_t lanes_per_row(int64_t B) {
  int64_t rows = 2;
  while (rows < B) rows *= 2;
  return 16 / rows;
}
#endif

// From this many rows on, AMX multiplies where the CPU has it (124M's products chained, Intel Xeon:
// 2 rows 10.1 ms against 13.8 by vdpbf16ps, 8 rows 10.3 against 31.1, XLA's bfloat16 17.8).
constexpr int64_t kAmxMinRows = 2;

ffi::Error RowsMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  const bool f32 = x.element_type() == ffi::DataType::F32 && w.element_type() == ffi::DataType::F32;
  const bool bf16 = x.element_type() == ffi::DataType::BF16 &&
                    (w.element_type() == ffi::DataType::BF16 || w.element_type() == ffi::DataType::U16);
  if (!(f32 || bf16) || y->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument(
        "rows_matmul: x and w float32, or x bfloat16 and w bfloat16 (or its bits, uint16); result float32");
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("rows_matmul: x [B, K] and w [N, K] expected");
  auto* ys = reinterpret_cast<float*>(y->untyped_data());
  const int64_t B = xd[0], K = xd[1], N = wd[0];
  if (f32) {
    const auto* xs = reinterpret_cast<const float*>(x.untyped_data());
    const auto* ws = reinterpret_cast<const float*>(w.untyped_data());
    parallel_chunks(pool, N, 2, 64, [=](int64_t n0, int64_t n1) { columns(xs, ws, ys, B, K, N, n0, n1); });
    return ffi::Error::Success();
  }
#if defined(__AVX512BF16__)
  const auto* xs = reinterpret_cast<const uint16_t*>(x.untyped_data());
  const auto* ws = reinterpret_cast<const uint16_t*>(w.untyped_data());
  const bool amx = kHasAmx && B >= kAmxMinRows && B <= 16 && K % 32 == 0 && N >= 16 && amx_permitted();
  const int64_t G = B >= 2 && B <= 16 ? lanes_per_row(B) : 0;
  const bool lanes = !amx && G && K % (2 * G) == 0 && N >= 16;
  auto xp = std::make_shared<aligned_vector<uint16_t>>(amx || lanes ? K * 16 : 0);  // x packed for AMX or lanes
  if (amx) pack_x(xs, B, K, xp->data());
  if (lanes) pack_lanes(xs, B, K, G, xp->data());
  // Chunks of whole blocks (16 kernel rows), or of even sizes that keep kernel rows paired.
  parallel_chunks(pool, N, amx || lanes ? 16 : 2, 64, [=](int64_t n0, int64_t n1) {
    const int64_t whole = amx || lanes ? n0 + (n1 - n0) / 16 * 16 : n0;
    if (amx) columns_amx(xp->data(), ws, ys, B, K, N, n0, whole);
    if (lanes) columns_lanes(G, xp->data(), ws, ys, B, K, N, n0, whole);
    columns(xs, ws, ys, B, K, N, whole, n1);
  });
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("rows_matmul: this build has no bfloat16 kernels (the CPU lacks AVX-512 BF16)");
#endif
}


// ----------------------------------------------------------------------------- cached_attention
#if defined(__AVX512BF16__)
// One query row (head bh, position t) against the first S slots of its caches: softmax of the
// scaled scores of the slots the mask allows (others -1e30, as the model's XLA path floors them,
// so a row that may read nothing averages every slot instead of turning into NaN), times v.
void attend_row(const uint16_t* q, const uint16_t* k, const uint16_t* v, const bool* mask, float* out,
                int64_t S, int64_t Dh, float* scores) {
  const int64_t blocks = (Dh + 31) / 32;
  const float scale = 1.f / std::sqrt(static_cast<float>(Dh));
  float top = -1e30f;
  for (int64_t s = 0; s < S; ++s) {
    if (!mask[s]) {
      scores[s] = -1e30f;
      continue;
    }
    // The caches stream from memory a slot at a time: ask for slots ahead (the loads' latency, not
    // the bandwidth, bounded this loop), and for v's rows now, for the second loop.
    _mm_prefetch(reinterpret_cast<const char*>(k + (s + 8) * Dh), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(k + (s + 8) * Dh) + 64, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(v + s * Dh), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(v + s * Dh) + 64, _MM_HINT_T1);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < blocks; ++j) {
      const __mmask32 m = Dh - j * 32 >= 32 ? ~__mmask32{0} : (__mmask32)((1u << (Dh - j * 32)) - 1);
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(m, q + j * 32),
                             (__m512bh)_mm512_maskz_loadu_epi16(m, k + s * Dh + j * 32));
    }
    scores[s] = _mm512_reduce_add_ps(acc) * scale;
    top = std::max(top, scores[s]);
  }
  __m512 total = _mm512_setzero_ps();
  int64_t s = 0;
  for (; s + 16 <= S; s += 16) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + s), _mm512_set1_ps(top)));
    _mm512_storeu_ps(scores + s, e);
    total = _mm512_add_ps(total, e);
  }
  if (s < S) {
    const __mmask16 m = (__mmask16)((1u << (S - s)) - 1);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + s), _mm512_set1_ps(top)));
    _mm512_mask_storeu_ps(scores + s, m, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
  }
  const float inv = 1.f / _mm512_reduce_add_ps(total);
  if (Dh == 64) {  // every GPT-2's head size: one pass over v, its four accumulators in registers
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t s = 0; s < S; ++s) {
      if (scores[s] == 0.f) continue;
      const __m512 p = _mm512_set1_ps(scores[s]);
      for (int j = 0; j < 4; ++j)
        acc[j] = _mm512_fmadd_ps(p, _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + s * 64 + j * 16))), acc[j]);
    }
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + j * 16, _mm512_mul_ps(acc[j], _mm512_set1_ps(inv)));
    return;
  }
  for (int64_t j = 0; j < Dh; j += 16) {
    const __mmask16 m = Dh - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (Dh - j)) - 1);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; ++s) {
      if (scores[s] == 0.f) continue;  // masked (or negligible) slots add nothing
      const __m512 vs = _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(m, v + s * Dh + j));
      acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[s]), vs, acc);
    }
    _mm512_mask_storeu_ps(out + j, m, _mm512_mul_ps(acc, _mm512_set1_ps(inv)));
  }
}

#endif

ffi::Error CachedAttentionImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                               ffi::AnyBuffer mask, ffi::Result<ffi::AnyBuffer> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  if (q.element_type() != ffi::DataType::BF16 || k.element_type() != ffi::DataType::U16 ||
      v.element_type() != ffi::DataType::U16 || mask.element_type() != ffi::DataType::PRED ||
      out->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("cached_attention: q bfloat16, caches uint16 (bfloat16 bits), mask bool");
  if (qd.size() != 3 || kd.size() != 3 || md.size() != 3 || kd[0] != qd[0] || kd[2] != qd[2] || md[1] != qd[1] ||
      md[0] == 0 || qd[0] % md[0] != 0 || md[2] > kd[1] || v.dimensions().size() != 3 ||
      v.dimensions()[0] != kd[0] || v.dimensions()[1] != kd[1] || v.dimensions()[2] != kd[2])
    return ffi::Error::InvalidArgument("cached_attention: q [B*H, T, Dh], caches [B*H, L, Dh], mask [B, T, S <= L]");
#if !defined(__AVX512BF16__)
  return ffi::Error::InvalidArgument("cached_attention: this build has no bfloat16 kernels (no AVX-512 BF16)");
#else
  const auto* qs = reinterpret_cast<const uint16_t*>(q.untyped_data());
  const auto* ks = reinterpret_cast<const uint16_t*>(k.untyped_data());
  const auto* vs = reinterpret_cast<const uint16_t*>(v.untyped_data());
  const auto* ms = reinterpret_cast<const bool*>(mask.untyped_data());
  auto* os = reinterpret_cast<float*>(out->untyped_data());
  // Queries read the first S slots (the mask's width) of caches L slots long.
  const int64_t BH = qd[0], T = qd[1], Dh = qd[2], S = md[2], L = kd[1], H = BH / md[0];
  parallel_chunks(pool, BH * T, 1, 4, [=](int64_t i0, int64_t i1) {
    aligned_vector<float> scores(S);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bh = i / T, t = i % T;
      attend_row(qs + i * Dh, ks + bh * L * Dh, vs + bh * L * Dh, ms + ((bh / H) * T + t) * S, os + i * Dh, S, Dh,
                 scores.data());
    }
  });
  return ffi::Error::Success();
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsMatmul, RowsMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CachedAttention, CachedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
