// Layer products for CPUs with AMX or AVX-512 BF16 (gpt2train/native_kernel.py builds and loads this;
// kernels.native_dense says when it is used: bfloat16 without a gradient, and on CPUs with AMX under
// one too, kernels.native_dense_training, with dense_backward and head_grads as the gradients).
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
constexpr int64_t kSumSpan = 2048;             // head_grads' dx: vocabulary rows summed per pass
constexpr int64_t kPackPairs = 8;              // pack_weights: pairs of w's rows packed per band

// Two float32 rows (k, k + 1) of 16 columns as AMX's pairs: [c0k, c0k+1, c1k, c1k+1, ...] in bfloat16.
inline __m512i interleave_pair(__m512 row0, __m512 row1) {
  alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(order), (__m512i)_mm512_cvtne2ps_pbh(row1, row0));
}

// Columns [c0, c1) (whole groups of 16) of w [K, M] float32 packed: group g's k-pair row r at
// packed + (g * K / 2 + r) * 32, 16 columns x 2 bfloat16s: one 1 KB tile per 16 k-pairs. By bands
// of kPackPairs k-pairs across every group: a group at a time down all of K read w a 64-byte piece
// per row, a row apart (a page apart at c_fc's 3,072 columns): 1.04 ms for c_fc on one core of an
// Intel Xeon with AMX, 0.46 by bands.
void pack_weights(const float* w, int64_t K, int64_t M, int64_t c0, int64_t c1, uint16_t* packed) {
  for (int64_t r0 = 0; r0 < K / 2; r0 += kPackPairs)
    for (int64_t g = c0 / 16; g < c1 / 16; ++g)
      for (int64_t r = r0; r < std::min(K / 2, r0 + kPackPairs); ++r)
        _mm512_storeu_si512(packed + (g * K / 2 + r) * 32,
                            interleave_pair(_mm512_loadu_ps(w + 2 * r * M + g * 16), _mm512_loadu_ps(w + (2 * r + 1) * M + g * 16)));
}

// sigmoid(2 z), z = sqrt(2 / pi) (x + 0.044715 x^3), by exp of -2|z|: GELU's tanh form is x times it.
inline __m512 gelu_gate(__m512 x) {
  const __m512 z = _mm512_mul_ps(_mm512_set1_ps(0.7978845608f),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(x, x), x), _mm512_set1_ps(0.044715f), x));
  const __m512 e = exp_nonpositive(_mm512_mul_ps(_mm512_set1_ps(-2.f), _mm512_abs_ps(z)));
  const __mmask16 positive = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512 numerator = _mm512_mask_blend_ps(positive, e, _mm512_set1_ps(1.f));
  return _mm512_div_ps(numerator, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

inline __m512 gelu(__m512 x) { return _mm512_mul_ps(x, gelu_gate(x)); }

// The blocks of rows [t0, t1) x all M columns, in the order each way of multiplying ran fastest:
// fn(a, b, t, col, rows) for x's rows a (32, padded with zeros past t1) and packed columns b.
// x's rows are lda elements apart and packed's groups of 16 columns ldb apart (0: K and K * 16,
// whole arrays; more: a span of K within longer rows, as a product over part of its sum takes).
// AMX (Intel Xeon): panels of columns (packed, at most kPanelBytes) kept in L2 while every row
// passes. vdpbf16ps (AMD EPYC, Zen 5): passes of kPassRows rows kept in L2 while every column
// streams past: 855 GFLOP/s at 124M's c_attn against 616 by panels (XLA: 809).
template <bool kByPanels, typename Fn>
void for_each_block(const uint16_t* x, const uint16_t* packed, int64_t K, int64_t M, int64_t t0, int64_t t1, Fn fn,
                    int64_t lda = 0, int64_t ldb = 0) {
  if (lda == 0) lda = K;
  if (ldb == 0) ldb = K * 16;
  aligned_vector<uint16_t> tail;  // the last rows, padded to 32 with zeros: a block reads whole rows
  auto rows_at = [&](int64_t t) {
    if (t1 - t >= 32) return x + t * lda;
    tail.assign(32 * lda, 0);
    for (int64_t r = t; r < t1; ++r) std::copy(x + r * lda, x + r * lda + K, tail.begin() + (r - t) * lda);
    return static_cast<const uint16_t*>(tail.data());
  };
  if (kByPanels) {
    const int64_t panel = std::max<int64_t>(32, std::min<int64_t>(M, kPanelBytes / (K * 2) / 32 * 32));
    for (int64_t p0 = 0; p0 < M; p0 += panel)
      for (int64_t t = t0; t < t1; t += 32) {
        const uint16_t* a = rows_at(t);
        for (int64_t col = p0; col < std::min(M, p0 + panel); col += 32)
          fn(a, packed + (col / 16) * ldb, t, col, std::min<int64_t>(32, t1 - t));
      }
  } else {
    for (int64_t r0 = t0; r0 < t1; r0 += kPassRows) {
      const int64_t r1 = std::min(t1, r0 + kPassRows);
      if ((r1 - r0) % 32) rows_at(r1 - (r1 - r0) % 32);  // the last pass's tail, copied once
      for (int64_t col = 0; col < M; col += 32)
        for (int64_t t = r0; t < r1; t += 32)
          fn(t1 - t >= 32 ? x + t * lda : static_cast<const uint16_t*>(tail.data()), packed + (col / 16) * ldb, t,
             col, std::min<int64_t>(32, t1 - t));
    }
  }
}

// Rows [t0, t1) of a . b, a [N, K] bfloat16 (rows as they lie), b packed (pack_weights' layout) into
// [K, M], by blocks of 32 x 32: finish(block, t, col, rows) takes each block's float32 products.
// Software-pipelined: a block's finish runs while the tiles multiply the next block, so the vector
// units' work overlaps AMX's products (two buffers, c[0] and c[1]).
template <typename Blocks, typename Finish>
void product_rows(Blocks& blocks, const uint16_t* a, const uint16_t* packed, int64_t K, int64_t M, int64_t t0, int64_t t1,
                  Finish finish, int64_t lda = 0, int64_t ldb = 0) {
  if (lda == 0) lda = K;
  if (ldb == 0) ldb = K * 16;
  alignas(64) float c[2][32][32];
  struct Block {
    int64_t t, col, rows;
  } pending{0, 0, 0};
  int buffer = 0;
  for_each_block<Blocks::kTiles>(a, packed, K, M, t0, t1,
                                 [&](const uint16_t* rows_a, const uint16_t* b, int64_t t, int64_t col, int64_t rows) {
                                   blocks.start(rows_a, rows_a + 16 * lda, lda * 2, b, b + ldb, K);
                                   if (pending.rows) finish(c[1 - buffer], pending.t, pending.col, pending.rows);
                                   blocks.finish(c[buffer]);
                                   pending = {t, col, rows};
                                   buffer = 1 - buffer;
                                 }, lda, ldb);
  if (pending.rows) finish(c[1 - buffer], pending.t, pending.col, pending.rows);
}

// Rows [t0, t1) of y [N, M] bfloat16 = x . w + bias, through GELU if asked, rounded once; and
// (pre, unless null) x . w + bias before GELU, rounded to bfloat16: GELU's gradient takes it.
template <typename Blocks>
void dense_rows(Blocks& blocks, const uint16_t* x, const uint16_t* packed, const float* bias, bool with_gelu, uint16_t* y,
                int64_t K, int64_t M, int64_t t0, int64_t t1, uint16_t* pre = nullptr) {
  product_rows(blocks, x, packed, K, M, t0, t1, [&](const float (*block)[32], int64_t t, int64_t col, int64_t rows) {
    const __m512 bias0 = _mm512_loadu_ps(bias + col), bias1 = _mm512_loadu_ps(bias + col + 16);
    for (int64_t i = 0; i < rows; ++i) {
      __m512 v0 = _mm512_add_ps(_mm512_load_ps(&block[i][0]), bias0), v1 = _mm512_add_ps(_mm512_load_ps(&block[i][16]), bias1);
      if (pre) _mm512_storeu_si512(pre + (t + i) * M + col, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
      if (with_gelu) {
        v0 = gelu(v0);
        v1 = gelu(v1);
      }
      _mm512_storeu_si512(y + (t + i) * M + col, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
    }
  });
}

// Rows [t0, t1) of a [N, K] . b (packed by pairs of K's rows, pack_rows' layout) rounded to bfloat16
// into out [N, M], the sum over K taken in spans of kSumSpan with the partial sums in float32 at
// partial [N, M] (unused when K fits one span): over a long sum at once, each 32 x 32 block's rows
// of a and packed columns of b came from memory rather than L2 (head_grads' dx at 124M, 1,024 tokens,
// Intel Xeon with AMX: 70-77 ms; by spans of 2,048, 42-44).
template <typename Blocks>
void product_rows_by_spans(Blocks& blocks, const uint16_t* a, const uint16_t* packed, int64_t K, int64_t M, int64_t t0,
                           int64_t t1, float* partial, uint16_t* out) {
  for (int64_t k0 = 0; k0 < K; k0 += kSumSpan) {
    const int64_t span = std::min(kSumSpan, K - k0);
    const bool first = k0 == 0, last = k0 + span >= K;
    product_rows(blocks, a + k0, packed + k0 * 16, span, M, t0, t1,
                 [&](const float (*block)[32], int64_t t, int64_t col, int64_t rows) {
                   for (int64_t i = 0; i < rows; ++i) {
                     float* sums = partial + (t + i) * M + col;
                     __m512 lo = _mm512_load_ps(&block[i][0]), hi = _mm512_load_ps(&block[i][16]);
                     if (!first) lo = _mm512_add_ps(lo, _mm512_loadu_ps(sums)), hi = _mm512_add_ps(hi, _mm512_loadu_ps(sums + 16));
                     if (last) {
                       _mm512_storeu_si512(out + (t + i) * M + col, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
                     } else {
                       _mm512_storeu_ps(sums, lo);
                       _mm512_storeu_ps(sums + 16, hi);
                     }
                   }
                 }, K, K * 16);
  }
}

// w^T packed as the right operand of dy . w^T: w [K, M] float32, groups [g0, g1) of 16 of its rows
// (dx's columns), each pair of w's columns (the sum's k-pairs) as pack_x lays out 16 rows: 16 rows
// by 32 columns, rounded to pairs of bfloat16s, are a 16 x 16 transpose of 32-bit lanes.
void pack_weights_transposed(const float* w, int64_t K, int64_t M, int64_t g0, int64_t g1, uint16_t* packed) {
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t m = 0; m < M; m += 32) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const float* row = w + (g * 16 + i) * M + m;
        r[i] = (__m512)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 16), _mm512_loadu_ps(row));
      }
      transpose_registers(r);
      for (int j = 0; j < 16; ++j) _mm512_storeu_ps(reinterpret_cast<float*>(packed + g * M * 16 + (m / 2 + j) * 32), r[j]);
    }
}

// Column sums of b [N, M] bfloat16 in float32 for groups [g0, g1) of 16 columns: a bias's gradient.
void column_sums(const uint16_t* b, int64_t N, int64_t M, int64_t g0, int64_t g1, float* sums) {
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t n = 0; n < N; ++n) acc = _mm512_add_ps(acc, load_bf16(b + n * M + g * 16));
    _mm512_storeu_ps(sums + g * 16, acc);
  }
}

// The head's logit gradients for tokens' rows: c [32 tokens][32 vocabulary columns from col] holds
// logits, rewritten in place to g = (softmax - one-hot(target)) * dl, zero past n_vocab.
inline void logit_gradients(float (*c)[32], int64_t t, int64_t col, const float* lse, const float* dl, const int32_t* targets,
                            int64_t n_vocab) {
  for (int64_t i = 0; i < 32; ++i) {
    const __m512 l = _mm512_set1_ps(lse[t + i]), d = _mm512_set1_ps(dl[t + i]);
    for (int h = 0; h < 32; h += 16) {
      const int64_t v = col + h, valid = std::max<int64_t>(0, std::min<int64_t>(16, n_vocab - v));
      __m512 p = _mm512_maskz_mov_ps(valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1),
                                     exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(&c[i][h]), l)));
      const int64_t target = targets[t + i] - v;
      if (target >= 0 && target < 16) p = _mm512_mask_sub_ps(p, (__mmask16)(1u << target), p, _mm512_set1_ps(1.f));
      _mm512_store_ps(&c[i][h], _mm512_mul_ps(p, d));
    }
  }
}
#endif

// pre: null, or where x . w + bias goes before GELU (dense_gelu, training's forward).
ffi::Error dense(ffi::ThreadPool& pool, ffi::AnyBuffer& x, ffi::AnyBuffer& w, ffi::AnyBuffer& bias, ffi::AnyBuffer& y,
                 ffi::AnyBuffer* pre, bool gelu, bool tiles) {
  auto xd = x.dimensions(), wd = w.dimensions(), bd = bias.dimensions();
  if (x.element_type() != ffi::DataType::BF16 || w.element_type() != ffi::DataType::F32 ||
      bias.element_type() != ffi::DataType::F32 || y.element_type() != ffi::DataType::BF16 ||
      (pre && (pre->element_type() != ffi::DataType::BF16 || pre->element_count() != y.element_count())))
    return ffi::Error::InvalidArgument("dense: x bfloat16, w and bias float32, y (and the pre-activation) bfloat16");
  if (xd.size() != 2 || wd.size() != 2 || bd.size() != 1 || xd[1] != wd[0] || bd[0] != wd[1] || wd[0] % 32 != 0 ||
      wd[1] % 32 != 0)
    return ffi::Error::InvalidArgument("dense: x [N, K], w [K, M], bias [M], K and M multiples of 32");
#if defined(__AVX512BF16__)
  const int64_t N = xd[0], K = xd[1], M = wd[1];
  const auto* xs = reinterpret_cast<const uint16_t*>(x.untyped_data());
  const auto* ws = reinterpret_cast<const float*>(w.untyped_data());
  const auto* bs = reinterpret_cast<const float*>(bias.untyped_data());
  auto* ys = reinterpret_cast<uint16_t*>(y.untyped_data());
  auto* hs = pre ? reinterpret_cast<uint16_t*>(pre->untyped_data()) : nullptr;
  AlignedArray<uint16_t> packed = aligned_array<uint16_t>(K * M);  // not zeroed: all written
  uint16_t* pw = packed.get();
  parallel_chunks(pool, M, 16, 64, [=](int64_t c0, int64_t c1) { pack_weights(ws, K, M, c0, c1, pw); });
  parallel_chunks(pool, N, 32, 32, [=](int64_t t0, int64_t t1) {
    with_blocks(tiles, [&](auto& blocks) { dense_rows(blocks, xs, pw, bs, gelu, ys, K, M, t0, t1, hs); });
  });
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("dense: this build has no bfloat16 kernels (the CPU lacks AVX-512 BF16)");
#endif
}

ffi::Error DenseImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer bias,
                     ffi::Result<ffi::AnyBuffer> y, bool gelu, bool tiles) {
  return dense(pool, x, w, bias, *y, nullptr, gelu, tiles);
}

// Training's c_fc: y = GELU(x . w + bias) and the pre-activation h, both bfloat16, in one pass; under
// jax.vjp XLA:CPU's GELU wrote its tanh out in float32 and read it back (124M's c_fc at 1,024
// tokens, Intel Xeon with AMX: product and GELU 7.6-9.0 ms, here ~3.5).
ffi::Error DenseGeluImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer bias,
                         ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> pre, bool tiles) {
  return dense(pool, x, w, bias, *y, &*pre, true, tiles);
}

// GELU's gradient for training: gh = g * GELU'(h), h and g [N, M] bfloat16, in float32, rounded once.
// With s = sigmoid(2 z), z = sqrt(2 / pi) (h + 0.044715 h^3): GELU(h) = h s, and
// GELU'(h) = s + 2 h s (1 - s) sqrt(2 / pi) (1 + 3 * 0.044715 h^2). XLA:CPU read a float32 tanh the
// forward had written (~2 ms a layer at 124M's c_fc and 1,024 tokens, Intel Xeon with AMX).
ffi::Error GeluBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer h, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> gh) {
  if (h.element_type() != ffi::DataType::BF16 || g.element_type() != ffi::DataType::BF16 ||
      gh->element_type() != ffi::DataType::BF16 || g.element_count() != h.element_count() ||
      gh->element_count() != h.element_count() || h.element_count() % 16 != 0)
    return ffi::Error::InvalidArgument("gelu_backward: h, g and gh bfloat16 of one size, a multiple of 16");
#if defined(__AVX512BF16__)
  const auto* hs = reinterpret_cast<const uint16_t*>(h.untyped_data());
  const auto* gs = reinterpret_cast<const uint16_t*>(g.untyped_data());
  auto* out = reinterpret_cast<uint16_t*>(gh->untyped_data());
  parallel_chunks(pool, h.element_count(), 32, 16384, [=](int64_t i0, int64_t i1) {
    const __m512 c = _mm512_set1_ps(0.7978845608f), a = _mm512_set1_ps(0.044715f), one = _mm512_set1_ps(1.f);
    for (int64_t i = i0; i < i1; i += 16) {
      const __m512 x = load_bf16(hs + i), x2 = _mm512_mul_ps(x, x), s = gelu_gate(x);
      const __m512 dz = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(3.f), a), x2, one));
      const __m512 slope = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(2.f), x), _mm512_mul_ps(s, _mm512_sub_ps(one, s))),
                                           dz, s);
      const __m512 v = _mm512_mul_ps(load_bf16(gs + i), slope);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)_mm512_cvtneps_pbh(v));
    }
  });
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("gelu_backward: this build has no bfloat16 kernels (the CPU lacks AVX-512 BF16)");
#endif
}


// The gradients of y = x . w + bias (dense without GELU) for training: dx = dy . w^T rounded to
// bfloat16, dw = x^T . dy and db = dy's column sums in float32 (XLA's reduction of them took ~30 ms
// of a 124M step at 4 x 256, Intel Xeon with AMX; here they are summed as dy is packed). Every product
// runs as dense's does, by 32 x 32 blocks: dy's rows as they lie times w^T packed from w; x
// transposed (its rows become the sum over tokens) times dy packed by pairs of rows.
ffi::Error DenseBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer dy,
                             ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dw, ffi::Result<ffi::AnyBuffer> db,
                             bool tiles) {
  auto xd = x.dimensions(), wd = w.dimensions(), dyd = dy.dimensions();
  if (x.element_type() != ffi::DataType::BF16 || w.element_type() != ffi::DataType::F32 ||
      dy.element_type() != ffi::DataType::BF16 || dx->element_type() != ffi::DataType::BF16 ||
      dw->element_type() != ffi::DataType::F32 || db->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("dense_backward: x and dy bfloat16, w float32; dx bfloat16, dw and db float32");
  if (xd.size() != 2 || wd.size() != 2 || dyd.size() != 2 || xd[1] != wd[0] || dyd[0] != xd[0] || dyd[1] != wd[1] ||
      xd[0] % 32 != 0 || wd[0] % 32 != 0 || wd[1] % 32 != 0 || db->element_count() != wd[1])
    return ffi::Error::InvalidArgument("dense_backward: x [N, K], w [K, M], dy [N, M], db [M], N, K and M multiples of 32");
#if defined(__AVX512BF16__)
  const int64_t N = xd[0], K = xd[1], M = wd[1];
  const auto* xs = reinterpret_cast<const uint16_t*>(x.untyped_data());
  const auto* ws = reinterpret_cast<const float*>(w.untyped_data());
  const auto* dys = reinterpret_cast<const uint16_t*>(dy.untyped_data());
  auto* dxs = reinterpret_cast<uint16_t*>(dx->untyped_data());
  auto* dws = reinterpret_cast<float*>(dw->untyped_data());
  auto* dbs = reinterpret_cast<float*>(db->untyped_data());
  // dx [N, K] = dy [N, M] . w^T, summing over M (in one span: by spans, c_fc's 3,072 ran no faster).
  AlignedArray<uint16_t> packed = aligned_array<uint16_t>(K * M);  // not zeroed: all written
  uint16_t* p = packed.get();
  parallel_chunks(pool, K / 16, 1, 2, [=](int64_t g0, int64_t g1) { pack_weights_transposed(ws, K, M, g0, g1, p); });
  parallel_chunks(pool, N, 32, 32, [=](int64_t t0, int64_t t1) {
    with_blocks(tiles, [&](auto& blocks) {
      product_rows(blocks, dys, p, M, K, t0, t1, [&](const float (*block)[32], int64_t t, int64_t col, int64_t rows) {
        for (int64_t i = 0; i < rows; ++i)
          _mm512_storeu_si512(dxs + (t + i) * K + col,
                              (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(&block[i][16]), _mm512_load_ps(&block[i][0])));
      });
    });
  });
  // dw [K, M] = x^T [K, N] . dy [N, M], summing over N: the narrower of x and dy transposed (its
  // rows become the sum over tokens), the other packed by pairs of rows. Where x is the wider (the
  // MLP's c_proj, K = 3,072 against M = 768), dw^T = dy^T . x, each block stored transposed: x's
  // transpose took 1.4-2.9 ms of that product's 8-9 at 124M, 1,024 tokens (Intel Xeon with AMX).
  const bool by_x = K <= M;
  const int64_t rows = by_x ? K : M, cols = by_x ? M : K;  // of the product computed: dw or dw^T
  const uint16_t *narrow = by_x ? xs : dys, *wide = by_x ? dys : xs;
  AlignedArray<uint16_t> transposed = aligned_array<uint16_t>(rows * N), pairs = aligned_array<uint16_t>(N * cols);
  uint16_t *ts = transposed.get(), *ps = pairs.get();
  parallel_chunks(pool, rows / kTransposeBlock, 1, 1, [=](int64_t b0, int64_t b1) {
    transpose_columns(narrow, ts, N, rows, b0 * kTransposeBlock, b1 * kTransposeBlock);
  });
  parallel_chunks(pool, cols / 16, 1, 2, [=](int64_t g0, int64_t g1) { pack_rows(wide, N, cols, g0, g1, ps); });
  parallel_chunks(pool, M / 16, 1, 2, [=](int64_t g0, int64_t g1) { column_sums(dys, N, M, g0, g1, dbs); });
  // dw is stored past the caches where XLA's buffer allows (64-byte aligned): it is read next by the
  // optimizer, and a plain store would read each line of it from memory first.
  const bool stream = reinterpret_cast<uintptr_t>(dws) % 64 == 0;
  parallel_chunks(pool, rows, 32, 32, [=](int64_t t0, int64_t t1) {
    with_blocks(tiles, [&](auto& blocks) {
      product_rows(blocks, ts, ps, N, cols, t0, t1, [&](const float (*block)[32], int64_t t, int64_t col, int64_t) {
        if (by_x) {
          for (int64_t i = 0; i < 32; ++i)
            for (int h = 0; h < 32; h += 16) store_ps(dws + (t + i) * M + col + h, _mm512_load_ps(&block[i][h]), stream);
        } else {  // block [32 of M from t][32 of K from col] into dw [K, M]
          store_transposed(block, dws + col * M + t, M, stream);
        }
      });
    });
    _mm_sfence();
  });
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("dense_backward: this build has no bfloat16 kernels (the CPU lacks AVX-512 BF16)");
#endif
}


// The gradients of the head's token losses (head_losses in scoring.cc) for training: x [N, K] and
// w [V_pad, K] bfloat16, targets [N], each token's logsumexp lse [N] (from the forward) and its
// loss's cotangent dl [N] -> dx [N, K] bfloat16, dw [V_pad, K] float32. The logits are computed
// again by blocks and turned into their gradients g [N, V_pad] (bfloat16) while in L1, written out
// twice: as rows (dx = g . w) and packed by pairs of tokens (dw^T = x^T . g, stored transposed).
// XLA:CPU wrote [N, V] float32 logits and their gradient out, copied g transposed and ran the three
// products well below AMX's pace (124M at 4 x 256, Intel Xeon with AMX: ~0.59 s of a 1.4 s step).
// logits: empty, or the forward's (head_losses_kept's layout), which then are not computed again.
ffi::Error HeadGradsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer targets,
                         ffi::AnyBuffer lse, ffi::AnyBuffer dl, ffi::AnyBuffer logits, ffi::Result<ffi::AnyBuffer> dx,
                         ffi::Result<ffi::AnyBuffer> dw, int64_t n_vocab, bool tiles) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (x.element_type() != ffi::DataType::BF16 ||
      (w.element_type() != ffi::DataType::BF16 && w.element_type() != ffi::DataType::U16) ||
      targets.element_type() != ffi::DataType::S32 || lse.element_type() != ffi::DataType::F32 ||
      dl.element_type() != ffi::DataType::F32 || dx->element_type() != ffi::DataType::BF16 ||
      dw->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("head_grads: x, w bfloat16, targets int32, lse and dl float32");
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || xd[0] % 32 != 0 || xd[1] % 32 != 0 || wd[0] % 32 != 0 ||
      targets.element_count() != xd[0] || lse.element_count() != xd[0] || dl.element_count() != xd[0] ||
      n_vocab < 1 || n_vocab > wd[0])
    return ffi::Error::InvalidArgument("head_grads: x [N, K], w [V_pad, K], targets, lse, dl [N]; N, K, V_pad multiples of 32");
  const int64_t kept_blocks = (n_vocab + 31) / 32;  // blocks of 32 vocabulary rows the forward kept
  if (logits.element_count() != 0 &&
      (logits.element_type() != ffi::DataType::F32 || logits.element_count() != xd[0] * kept_blocks * 32))
    return ffi::Error::InvalidArgument("head_grads: logits empty or float32 [N / 32, n_vocab rounded up to 32 / 32, 32, 32]");
#if defined(__AVX512BF16__)
  const int64_t N = xd[0], K = xd[1], V = wd[0];
  const auto* xs = reinterpret_cast<const uint16_t*>(x.untyped_data());
  const auto* ws = reinterpret_cast<const uint16_t*>(w.untyped_data());
  const auto* ts = reinterpret_cast<const int32_t*>(targets.untyped_data());
  const auto* ls = reinterpret_cast<const float*>(lse.untyped_data());
  const auto* ds = reinterpret_cast<const float*>(dl.untyped_data());
  auto* dxs = reinterpret_cast<uint16_t*>(dx->untyped_data());
  auto* dws = reinterpret_cast<float*>(dw->untyped_data());
  // Not zeroed (std::vector would clear ~360 MB at 124M's vocabulary and 1,024 tokens): all written.
  AlignedArray<uint16_t> w_by_rows = aligned_array<uint16_t>(logits.element_count() ? 0 : V * K), w_by_pairs = aligned_array<uint16_t>(V * K),
                         g = aligned_array<uint16_t>(N * V), g_pairs = aligned_array<uint16_t>(N * V),
                         xt = aligned_array<uint16_t>(K * N);
  uint16_t *wr = w_by_rows.get(), *wp = w_by_pairs.get(), *gs = g.get(), *gp = g_pairs.get(), *xts = xt.get();
  // g's block of 32 tokens from t by 32 vocabulary columns from col, from its logits c (rewritten),
  // stored as rows (gs) and by pairs of tokens (gp), past the caches: both are read back only after
  // every block is written (the chunk's sfence orders the stores before its end).
  auto store_gradients = [=](float (*c)[32], int64_t t, int64_t col) {
    logit_gradients(c, t, col, ls, ds, ts, n_vocab);
    for (int64_t i = 0; i < 32; ++i)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(gs + (t + i) * V + col),
                          (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(&c[i][16]), _mm512_load_ps(&c[i][0])));
    for (int64_t r = 0; r < 16; ++r)
      for (int h = 0; h < 2; ++h)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(gp + ((col / 16 + h) * N / 2 + t / 2 + r) * 32),
                            interleave_pair(_mm512_load_ps(&c[2 * r][16 * h]), _mm512_load_ps(&c[2 * r + 1][16 * h])));
  };
  // w as the right operand of g . w (pairs of vocabulary rows), and of x . w^T (16 rows a group)
  // where the logits are computed again.
  parallel_chunks(pool, K / 16, 1, 1, [=](int64_t g0, int64_t g1) { pack_rows(ws, V, K, g0, g1, wp); });
  if (logits.element_count() != 0) {
    // g = (softmax - one-hot) * dl from the forward's logits; rows past them are padding (g = 0).
    const auto* kept = reinterpret_cast<const float*>(logits.untyped_data());
    parallel_chunks(pool, V / 32, 1, V / 64, [=](int64_t b0, int64_t b1) {
      alignas(64) float c[32][32];
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t t = 0; t < N; t += 32) {
          if (b < kept_blocks)
            std::memcpy(c, kept + (t / 32 * kept_blocks + b) * 1024, sizeof c);
          else
            std::memset(c, 0, sizeof c);
          store_gradients(c, t, b * 32);
        }
      _mm_sfence();
    });
  } else {
    parallel_chunks(pool, V / 16, 1, 2, [=](int64_t g0, int64_t g1) {
      for (int64_t grp = g0; grp < g1; ++grp) pack_x(ws + grp * 16 * K, 16, K, wr + grp * 16 * K);
    });
    // g = (softmax(x . w^T) - one-hot) * dl, by blocks of 32 tokens x 32 vocabulary columns; each
    // thread takes a range of the vocabulary and every token, so the packed table is read once (by
    // ranges of tokens, each read it again: 77 against 57 ms at 124M, 1,024 tokens).
    parallel_chunks(pool, V / 32, 1, V / 64, [=](int64_t b0, int64_t b1) {
      with_blocks(tiles, [&](auto& blocks) {
        const int64_t c0 = b0 * 32;
        product_rows(blocks, xs, wr + c0 * K, K, (b1 - b0) * 32, 0, N,
                     [&](const float (*block)[32], int64_t t, int64_t col, int64_t) {
                       store_gradients(const_cast<float (*)[32]>(block), t, col + c0);
                     });
      });
      _mm_sfence();
    });
  }
  // dx = g . w, summing over the vocabulary by spans.
  AlignedArray<float> partial = aligned_array<float>(N * K);
  float* dxp = partial.get();
  parallel_chunks(pool, N, 32, 32, [=](int64_t t0, int64_t t1) {
    with_blocks(tiles, [&](auto& blocks) { product_rows_by_spans(blocks, gs, wp, V, K, t0, t1, dxp, dxs); });
  });
  // dw^T = x^T . g, summing over tokens, each block stored transposed into dw.
  parallel_chunks(pool, K / kTransposeBlock, 1, 1, [=](int64_t b0, int64_t b1) {
    transpose_columns(xs, xts, N, K, b0 * kTransposeBlock, b1 * kTransposeBlock);
  });
  // Past the caches where XLA's buffer allows, as dense_backward's dw.
  const bool stream = reinterpret_cast<uintptr_t>(dws) % 64 == 0;
  parallel_chunks(pool, K, 32, 32, [=](int64_t t0, int64_t t1) {
    with_blocks(tiles, [&](auto& blocks) {
      product_rows(blocks, xts, gp, N, V, t0, t1, [&](const float (*block)[32], int64_t t, int64_t col, int64_t) {
        store_transposed(block, dws + col * K + t, K, stream);
      });
    });
    _mm_sfence();
  });
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("head_grads: this build has no bfloat16 kernels (the CPU lacks AVX-512 BF16)");
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(DenseGelu, DenseGeluImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("tiles"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GeluBackward, GeluBackwardImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DenseBackward, DenseBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("tiles"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(HeadGrads, HeadGradsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("n_vocab")
                                  .Attr<bool>("tiles"));
