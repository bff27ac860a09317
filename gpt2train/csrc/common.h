// What decode.cc, scoring.cc and products.cc share: running work on XLA's threads, an AVX-512 exp,
// and 32 x 32 blocks of bfloat16 products by AMX tiles or by vdpbf16ps. native_kernel.py compiles
// the files into one library.
#pragma once

#include <immintrin.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if !defined(__AVX512F__) || !defined(__AVX512BW__)
#error "the native kernels need AVX-512 (native_kernel.py builds them only where the CPU has avx512f and avx512bw)"
#endif

namespace gpt2train {

namespace ffi = xla::ffi;

// Memory aligned to a cache line (64 bytes) for every buffer a kernel packs or copies operands
// into: an AMX tile row or AVX-512 load that starts on a line reads one line, not two. Packed
// operands in plain new/std::vector memory (16-byte aligned) held our tile products to ~600
// GFLOP/s a core on an Intel Xeon with AMX; aligned, the same loops run at ~1,050.
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, std::max<size_t>(64, (n * sizeof(T) + 63) / 64 * 64));
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const AlignedAllocator<U>&) const { return false; }
};
template <typename T>
using aligned_vector = std::vector<T, AlignedAllocator<T>>;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using AlignedArray = std::unique_ptr<T[], FreeDeleter>;

// n T's, 64-byte aligned and not initialised (for buffers every element of which is written).
template <typename T>
AlignedArray<T> aligned_array(size_t n) {
  return AlignedArray<T>(AlignedAllocator<T>().allocate(n));
}

// Runs fn(i0, i1) over [0, n) in chunks, on the calling thread and on XLA's pool. A task that
// starts after the work is done finds no chunk left and returns, so the caller only ever waits
// for chunks already running, never for a task the pool has not started. Several chunks per
// thread even out threads that start late; chunk sizes are multiples of `align`.
template <typename Fn>
void parallel_chunks(ffi::ThreadPool& pool, int64_t n, int64_t align, int64_t min_chunk, Fn fn) {
  struct State {
    State(Fn f, int64_t n, int64_t chunk) : fn(std::move(f)), n(n), chunk(chunk), chunks((n + chunk - 1) / chunk) {}
    Fn fn;
    int64_t n, chunk, chunks;
    std::atomic<int64_t> next{0}, done{0};
    void work() {
      for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
        fn(c * chunk, std::min(n, (c + 1) * chunk));
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads * 4, n / std::max<int64_t>(1, min_chunk)));
  const int64_t chunk = std::max<int64_t>(align, ((n + chunks - 1) / chunks + align - 1) / align * align);
  auto state = std::make_shared<State>(std::move(fn), n, chunk);
  for (int64_t t = 1; t < std::min(threads, state->chunks); ++t) pool.Schedule([state] { state->work(); });
  state->work();
  while (state->done.load(std::memory_order_acquire) < state->chunks) _mm_pause();
}

constexpr int64_t kTransposeBlock = 32;

// Columns [c0, c1) of a [R, C] (16-bit elements) into rows [c0, c1) of t [C, R], by blocks of
// kTransposeBlock rows: each task writes a band of t's rows, so the rows it writes stay in cache.
inline void transpose_columns(const uint16_t* a, uint16_t* t, int64_t R, int64_t C, int64_t c0, int64_t c1) {
  for (int64_t r0 = 0; r0 < R; r0 += kTransposeBlock) {
    const int64_t r1 = std::min(R, r0 + kTransposeBlock);
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t r = r0; r < r1; ++r) t[c * R + r] = a[r * C + c];
  }
}

// b [N, M] bfloat16 packed as the right operand of a product that sums over N: groups [g0, g1) of
// 16 columns, each pair of rows (n, n + 1) interleaved: [b[n][c], b[n + 1][c]] for the 16 columns.
inline void pack_rows(const uint16_t* b, int64_t N, int64_t M, int64_t g0, int64_t g1, uint16_t* packed) {
  for (int64_t r = 0; r < N / 2; ++r)
    for (int64_t g = g0; g < g1; ++g) {
      const __m512i even = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2 * r * M + g * 16)));
      const __m512i odd = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (2 * r + 1) * M + g * 16)));
      _mm512_storeu_si512(packed + (g * N / 2 + r) * 32, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
    }
}

// Sixteen registers of 16 32-bit lanes transposed in place (lane j of register i to lane i of
// register j): four stages, each swapping the off-diagonal s x s sub-blocks of every 2s x 2s block
// (s = 8, 4, 2, 1). Lanes move as bits: any 32-bit contents (a pair of bfloat16s too).
inline void transpose_registers(__m512 r[16]) {
  static const struct Indices {
    __m512i lo[4], hi[4];
    Indices() {
      for (int k = 0; k < 4; ++k) {
        const int s = 8 >> k;
        alignas(64) int32_t l[16], h[16];
        for (int c = 0; c < 16; ++c) {
          l[c] = (c & s) ? 16 + c - s : c;  // row i: its own where c & s is clear, row i + s's c - s else
          h[c] = (c & s) ? 16 + c : c + s;  // row i + s: row i's c + s where c & s is clear, its own else
        }
        lo[k] = _mm512_load_si512(l);
        hi[k] = _mm512_load_si512(h);
      }
    }
  } index;
  for (int k = 0; k < 4; ++k) {
    const int s = 8 >> k;
    for (int i = 0; i < 16; ++i)
      if (!(i & s)) {
        const __m512 x = r[i], y = r[i + s];
        r[i] = _mm512_permutex2var_ps(x, index.lo[k], y);
        r[i + s] = _mm512_permutex2var_ps(x, index.hi[k], y);
      }
  }
}

// A 16 x 16 float32 block at a (rows lda apart) stored transposed at t (rows ldt apart).
// stream: t 64-byte aligned (ldt a multiple of 16), stored past the caches (a large array written
// now and read much later, without first reading the lines it overwrites).
template <bool stream = false>
inline void transpose_16x16(const float* a, int64_t lda, float* t, int64_t ldt) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(a + i * lda);
  transpose_registers(r);
  for (int i = 0; i < 16; ++i) {
    if (stream)
      _mm512_stream_ps(t + i * ldt, r[i]);
    else
      _mm512_storeu_ps(t + i * ldt, r[i]);
  }
}

// A 32 x 32 float32 block stored transposed at t (rows ldt apart), past the caches if stream (t
// 64-byte aligned and ldt a multiple of 16 then).
inline void store_transposed(const float (*block)[32], float* t, int64_t ldt, bool stream) {
  for (int i = 0; i < 32; i += 16)
    for (int j = 0; j < 32; j += 16) {
      if (stream)
        transpose_16x16<true>(&block[i][j], 32, t + j * ldt + i, ldt);
      else
        transpose_16x16(&block[i][j], 32, t + j * ldt + i, ldt);
    }
}

// 16 float32s to p, past the caches if stream (p 64-byte aligned then).
inline void store_ps(float* p, __m512 v, bool stream) {
  if (stream)
    _mm512_stream_ps(p, v);
  else
    _mm512_storeu_ps(p, v);
}

// 16 bfloat16s at p widened to float32 (exact: a bfloat16 is a float32's upper half).
inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// exp(x) for x <= 0 in float32 to about 2 ulp (x = n ln2 + r, |r| <= ln2 / 2, Taylor to r^6,
// times 2^n); 0 below -87, as float32's exp underflows there.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GT_OQ), _mm512_scalef_ps(p, n));
}

// x [B <= 16, K] (rows `stride` elements apart; K by default) laid out as AMX's right operand:
// for each 32-wide block of K, 16 rows (pairs of k) of 16 columns (b) of 2 bfloat16s; rows past
// B are zeros. Each (pair of k) row is one gather of a pair from every x row.
inline void pack_x(const uint16_t* x, int64_t B, int64_t K, uint16_t* xp, int64_t stride = 0) {
  if (stride == 0) stride = K;
  const __mmask16 rows = B >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << B) - 1);
  const __m512i offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(static_cast<int>(stride * 2)));
  for (int64_t pair = 0; pair < K / 2; ++pair)
    _mm512_storeu_si512(xp + pair * 32, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, offsets, x + 2 * pair, 1));
}

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
// AMX tiles are the process's to ask for (Linux 5.16+); XLA's own kernels have usually asked already.
inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct TileConfig {
  uint8_t palette = 0, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads a tile configuration of `tiles` tiles of 16 rows x 64 bytes for the scope, and puts back
// the thread's own (XLA's kernels may hold one) when it ends.
class ScopedTiles {
 public:
  explicit ScopedTiles(int tiles) {
    _tile_storeconfig(&saved_);
    mine_.palette = 1;
    for (int t = 0; t < tiles; ++t) {
      mine_.rows[t] = 16;
      mine_.colsb[t] = 64;
    }
    _tile_loadconfig(&mine_);
  }
  ~ScopedTiles() {
    if (saved_.palette)
      _tile_loadconfig(&saved_);
    else
      _tile_release();
  }

 private:
  alignas(64) TileConfig saved_, mine_;
};

// A 32 x 32 block of products in tiles 0-3 (its four 16 x 16 quarters): rows a0 and a1 (16 each,
// a_stride bytes apart, as they lie) times packed columns b0 and b1 (16 each, pack_x's layout),
// over K (a multiple of 32), with tiles 4-5 and 6-7 holding the operands (ScopedTiles(8)).
inline void block_product(const uint16_t* a0, const uint16_t* a1, int64_t a_stride, const uint16_t* b0,
                          const uint16_t* b1, int64_t K) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = 0; k < K; k += 32) {
    _tile_loadd(4, a0 + k, a_stride);
    _tile_loadd(5, a1 + k, a_stride);
    _tile_loadd(6, b0 + k * 16, 64);
    _tile_loadd(7, b1 + k * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// Tiles 0-3 (a block_product) into c[32][32], rows 128 bytes apart.
inline void store_block(float (*c)[32]) {
  _tile_stored(0, &c[0][0], 128);
  _tile_stored(1, &c[0][16], 128);
  _tile_stored(2, &c[16][0], 128);
  _tile_stored(3, &c[16][16], 128);
}
#else
inline bool amx_permitted() { return false; }
#endif

#if defined(__AVX512BF16__)
// The 32 x 32 block of block_product by vdpbf16ps, for CPUs with AVX-512 BF16 and no AMX, straight
// into c: 8 rows x 32 columns (16 accumulators) at a time, each step a row's k-pair broadcast
// times a packed row of 16 columns' pairs. K goes in chunks whose packed columns stay in L1 while
// the four groups of rows pass over them. Never inlined: inlined into a kernel's loops, GCC spilled
// accumulators to the stack inside the innermost loop (dense at 124M: 450 GFLOP/s against 800).
__attribute__((noinline)) inline void vector_block_product(const uint16_t* a0, const uint16_t* a1, int64_t a_stride, const uint16_t* b0,
                                 const uint16_t* b1, int64_t K, float (*c)[32]) {
  constexpr int64_t kPairsPerChunk = 128;  // 2 x 8 KB of packed columns
  const int64_t row = a_stride / 2;        // elements between rows
  for (int64_t p0 = 0; p0 < K / 2; p0 += kPairsPerChunk) {
    const int64_t p1 = std::min(K / 2, p0 + kPairsPerChunk);
    for (int r0 = 0; r0 < 32; r0 += 8) {
      const uint16_t* a = (r0 < 16 ? a0 + r0 * row : a1 + (r0 - 16) * row);
      __m512 acc[8][2];
      for (int i = 0; i < 8; ++i) {
        acc[i][0] = p0 ? _mm512_load_ps(&c[r0 + i][0]) : _mm512_setzero_ps();
        acc[i][1] = p0 ? _mm512_load_ps(&c[r0 + i][16]) : _mm512_setzero_ps();
      }
      for (int64_t p = p0; p < p1; ++p) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(b0 + p * 32), w1 = (__m512bh)_mm512_loadu_si512(b1 + p * 32);
        for (int i = 0; i < 8; ++i) {
          int32_t pair;
          std::memcpy(&pair, a + i * row + 2 * p, 4);
          const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], x, w0);
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], x, w1);
        }
      }
      for (int i = 0; i < 8; ++i) {
        _mm512_store_ps(&c[r0 + i][0], acc[i][0]);
        _mm512_store_ps(&c[r0 + i][16], acc[i][1]);
      }
    }
  }
}

// How a kernel multiplies its 32 x 32 blocks: start() begins one, finish(c) writes it to c[32][32]
// (64-byte aligned). With tiles (TileBlocks) a block multiplies while the caller works on the
// previous one between the two calls; by vectors (VectorBlocks) finish() does all the work.
struct VectorBlocks {
  static constexpr bool kTiles = false;
  const uint16_t *a0, *a1, *b0, *b1;
  int64_t a_stride, K;
  void start(const uint16_t* a0_, const uint16_t* a1_, int64_t a_stride_, const uint16_t* b0_, const uint16_t* b1_,
             int64_t K_) {
    a0 = a0_, a1 = a1_, a_stride = a_stride_, b0 = b0_, b1 = b1_, K = K_;
  }
  void finish(float (*c)[32]) const { vector_block_product(a0, a1, a_stride, b0, b1, K, c); }
};

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
struct TileBlocks {
  static constexpr bool kTiles = true;
  ScopedTiles tiles{8};
  void start(const uint16_t* a0, const uint16_t* a1, int64_t a_stride, const uint16_t* b0, const uint16_t* b1,
             int64_t K) {
    block_product(a0, a1, a_stride, b0, b1, K);
  }
  void finish(float (*c)[32]) const { store_block(c); }
};
#endif

// Runs fn(blocks) with AMX tiles where the caller asks for them and the process may use them, else
// with vdpbf16ps. `tiles` comes from the caller (Python decides per CPU family at start-up).
template <typename Fn>
void with_blocks(bool tiles, Fn fn) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  if (tiles && amx_permitted()) {
    TileBlocks blocks;
    fn(blocks);
    return;
  }
#endif
  VectorBlocks blocks{};
  fn(blocks);
}
#endif

}  // namespace gpt2train
