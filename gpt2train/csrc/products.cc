// Evaluation's layer products for CPUs with AMX or AVX-512 BF16 (gpt2train/native_kernel.py builds and
// loads this; kernels.native_dense says when it is used: bfloat16 without a gradient).
//
// dense: y = x . w + bias, GELU (tanh form) optionally, rounded to bfloat16 once. XLA:CPU ran these
// products at about 1.0 TFLOP/s on an Intel Xeon with AMX and GELU as a pass of its own over
// c_fc's output, rounding to bfloat16 after each of its operations. Here the float32 weights are
// converted and packed once per call as AMX's right operand, tiles (or vdpbf16ps: common.h's
// TileBlocks, VectorBlocks) multiply 32 tokens by 32 output columns at a time, and the bias and GELU are applied to each 32 x 32 block while it is in L1.
#include <cmath>
#include <vector>

#include "common.h"

namespace {

using namespace gpt2train;

#if defined(__AVX512BF16__)
constexpr int64_t kPanelBytes = 512 * 1024;  // AMX: packed weights per panel of columns, kept in L2
constexpr int64_t kPassRows = 256;             // vdpbf16ps: rows of x per pass, kept in L2

// Two float32 rows (k, k + 1) of 16 columns as AMX's pairs: [c0k, c0k+1, c1k, c1k+1, ...] in bfloat16.
inline __m512i interleave_pair(__m512 row0, __m512 row1) {
  alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(order), (__m512i)_mm512_cvtne2ps_pbh(row1, row0));
}

// Columns [c0, c1) (whole groups of 16) of w [K, M] float32 packed: group g's k-pair row r at
// packed + (g * K / 2 + r) * 32, 16 columns x 2 bfloat16s: one 1 KB tile per 16 k-pairs.
void pack_weights(const float* w, int64_t K, int64_t M, int64_t c0, int64_t c1, uint16_t* packed) {
  for (int64_t g = c0 / 16; g < c1 / 16; ++g)
    for (int64_t r = 0; r < K / 2; ++r)
      _mm512_storeu_si512(packed + (g * K / 2 + r) * 32,
                          interleave_pair(_mm512_loadu_ps(w + 2 * r * M + g * 16), _mm512_loadu_ps(w + (2 * r + 1) * M + g * 16)));
}

// GELU's tanh form as x * sigmoid(2 z), z = sqrt(2 / pi) (x + 0.044715 x^3), by exp of -2|z|.
inline __m512 gelu(__m512 x) {
  const __m512 z = _mm512_mul_ps(_mm512_set1_ps(0.7978845608f),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(x, x), x), _mm512_set1_ps(0.044715f), x));
  const __m512 e = exp_nonpositive(_mm512_mul_ps(_mm512_set1_ps(-2.f), _mm512_abs_ps(z)));
  const __mmask16 positive = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512 numerator = _mm512_mask_blend_ps(positive, e, _mm512_set1_ps(1.f));
  return _mm512_mul_ps(x, _mm512_div_ps(numerator, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
}

// The blocks of rows [t0, t1) x all M columns, in the order each way of multiplying ran fastest:
// fn(a, b, t, col, rows) for x's rows a (32, padded with zeros past t1) and packed columns b.
// AMX (Intel Xeon): panels of columns (packed, at most kPanelBytes) kept in L2 while every row
// passes. vdpbf16ps (AMD EPYC, Zen 5): passes of kPassRows rows kept in L2 while every column
// streams past: 855 GFLOP/s at 124M's c_attn against 616 by panels (XLA: 809).
template <bool kByPanels, typename Fn>
void for_each_block(const uint16_t* x, const uint16_t* packed, int64_t K, int64_t M, int64_t t0, int64_t t1, Fn fn) {
  std::vector<uint16_t> tail;  // the last rows, padded to 32 with zeros: a block reads whole rows
  auto rows_at = [&](int64_t t) {
    if (t1 - t >= 32) return x + t * K;
    tail.assign(32 * K, 0);
    std::copy(x + t * K, x + t1 * K, tail.begin());
    return static_cast<const uint16_t*>(tail.data());
  };
  if (kByPanels) {
    const int64_t panel = std::max<int64_t>(32, std::min<int64_t>(M, kPanelBytes / (K * 2) / 32 * 32));
    for (int64_t p0 = 0; p0 < M; p0 += panel)
      for (int64_t t = t0; t < t1; t += 32) {
        const uint16_t* a = rows_at(t);
        for (int64_t col = p0; col < std::min(M, p0 + panel); col += 32)
          fn(a, packed + (col / 16) * K * 16, t, col, std::min<int64_t>(32, t1 - t));
      }
  } else {
    for (int64_t r0 = t0; r0 < t1; r0 += kPassRows) {
      const int64_t r1 = std::min(t1, r0 + kPassRows);
      if ((r1 - r0) % 32) rows_at(r1 - (r1 - r0) % 32);  // the last pass's tail, copied once
      for (int64_t col = 0; col < M; col += 32)
        for (int64_t t = r0; t < r1; t += 32)
          fn(t1 - t >= 32 ? x + t * K : static_cast<const uint16_t*>(tail.data()), packed + (col / 16) * K * 16, t,
             col, std::min<int64_t>(32, t1 - t));
    }
  }
}

// Rows [t0, t1) of y [N, M] bfloat16, by blocks of 32 rows of x (as they lie) by 32 packed columns.
template <typename Blocks>
void dense_rows(Blocks& blocks, const uint16_t* x, const uint16_t* packed, const float* bias, bool with_gelu, uint16_t* y,
                int64_t K, int64_t M, int64_t t0, int64_t t1) {
  // Software-pipelined: a block's bias and GELU run while the tiles multiply the next block, so the
  // vector units' work overlaps AMX's products (two buffers, c[0] and c[1]).
  alignas(64) float c[2][32][32];
  struct Block {
    int64_t t, col, rows;
  } pending{0, 0, 0};
  int buffer = 0;
  auto finish = [&](const Block& b, const float (*block)[32]) {
    const __m512 bias0 = _mm512_loadu_ps(bias + b.col), bias1 = _mm512_loadu_ps(bias + b.col + 16);
    for (int64_t i = 0; i < b.rows; ++i) {
      __m512 v0 = _mm512_add_ps(_mm512_load_ps(&block[i][0]), bias0), v1 = _mm512_add_ps(_mm512_load_ps(&block[i][16]), bias1);
      if (with_gelu) {
        v0 = gelu(v0);
        v1 = gelu(v1);
      }
      _mm512_storeu_si512(y + (b.t + i) * M + b.col, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
    }
  };
  for_each_block<Blocks::kTiles>(x, packed, K, M, t0, t1,
                                 [&](const uint16_t* a, const uint16_t* b, int64_t t, int64_t col, int64_t rows) {
                                   blocks.start(a, a + 16 * K, K * 2, b, b + K * 16, K);
                                   if (pending.rows) finish(pending, c[1 - buffer]);
                                   blocks.finish(c[buffer]);
                                   pending = {t, col, rows};
                                   buffer = 1 - buffer;
                                 });
  if (pending.rows) finish(pending, c[1 - buffer]);
}
#endif

ffi::Error DenseImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer bias,
                     ffi::Result<ffi::AnyBuffer> y, bool gelu, bool tiles) {
  auto xd = x.dimensions(), wd = w.dimensions(), bd = bias.dimensions();
  if (x.element_type() != ffi::DataType::BF16 || w.element_type() != ffi::DataType::F32 ||
      bias.element_type() != ffi::DataType::F32 || y->element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("dense: x bfloat16, w and bias float32, y bfloat16");
  if (xd.size() != 2 || wd.size() != 2 || bd.size() != 1 || xd[1] != wd[0] || bd[0] != wd[1] || wd[0] % 32 != 0 ||
      wd[1] % 32 != 0)
    return ffi::Error::InvalidArgument("dense: x [N, K], w [K, M], bias [M], K and M multiples of 32");
#if defined(__AVX512BF16__)
  const int64_t N = xd[0], K = xd[1], M = wd[1];
  const auto* xs = reinterpret_cast<const uint16_t*>(x.untyped_data());
  const auto* ws = reinterpret_cast<const float*>(w.untyped_data());
  const auto* bs = reinterpret_cast<const float*>(bias.untyped_data());
  auto* ys = reinterpret_cast<uint16_t*>(y->untyped_data());
  auto packed = std::make_shared<std::vector<uint16_t>>(K * M);
  uint16_t* pw = packed->data();
  parallel_chunks(pool, M, 16, 64, [=](int64_t c0, int64_t c1) { pack_weights(ws, K, M, c0, c1, pw); });
  parallel_chunks(pool, N, 32, 32, [=](int64_t t0, int64_t t1) {
    with_blocks(tiles, [&](auto& blocks) { dense_rows(blocks, xs, pw, bs, gelu, ys, K, M, t0, t1); });
  });
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("dense: this build has no bfloat16 kernels (the CPU lacks AVX-512 BF16)");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dense, DenseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("gelu")
                                  .Attr<bool>("tiles"));
