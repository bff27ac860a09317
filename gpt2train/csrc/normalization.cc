// LayerNorm of bfloat16 rows and its gradient, for bfloat16 training (kernels.layer_norm says when).
// XLA:CPU ran the forward as two reductions and an elementwise pass, and the backward as five
// passes and four reductions, the two over tokens (the scale's and the bias's gradients) on one
// thread: about 0.1 s of a 1.2 s step at 124M, 4 x 256, on an Intel Xeon with AMX. Here each is one
// pass over its rows, the statistics in float32 as model.layer_norm computes them (mean, then the
// mean of squared deviations, eps inside the square root). add_layer_norm also adds the residual
// branch that comes before each LayerNorm of a block (s = x + a, rounded to bfloat16 as XLA's add
// is) and its gradient adds the residual's (ds) into dx: XLA:CPU ran each of those adds as a pass
// of its own, ~0.65 ms apiece, 48 of them in a 124M step.
#include <cmath>

#include "common.h"

namespace {

using namespace gpt2train;

// The row's parts that parallel_chunks hands out: fixed, so the gradient's sums over rows are
// added in the same order whatever the number of threads.
constexpr int64_t kParts = 16;

// Rounded to the nearest bfloat16, ties to even (what XLA's convert does), NaN kept NaN.
inline void store_bf16(uint16_t* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}

// One row's mean and 1 / sqrt(variance + eps).
inline void row_statistics(const uint16_t* x, int64_t D, float eps, float* mean, float* rstd) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) sum = _mm512_add_ps(sum, load_bf16(x + d));
  const float m = _mm512_reduce_add_ps(sum) / static_cast<float>(D);
  const __m512 mv = _mm512_set1_ps(m);
  __m512 squares = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __m512 c = _mm512_sub_ps(load_bf16(x + d), mv);
    squares = _mm512_fmadd_ps(c, c, squares);
  }
  *mean = m;
  *rstd = 1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(D) + eps);
}

// y = LayerNorm(x) of N rows of D; with a (not null), of s = x + a rounded to bfloat16, written to s.
ffi::Error layer_norm(ffi::ThreadPool& pool, const uint16_t* xs, const uint16_t* as, const float* sc, const float* bi,
                      uint16_t* ss, uint16_t* ys, float* st, int64_t N, int64_t D, float eps) {
  parallel_chunks(pool, N, 1, 16, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* row = xs + r * D;
      if (as) {
        for (int64_t d = 0; d < D; d += 16) store_bf16(ss + r * D + d, _mm512_add_ps(load_bf16(row + d), load_bf16(as + r * D + d)));
        row = ss + r * D;
      }
      float mean, rstd;
      row_statistics(row, D, eps, &mean, &rstd);
      st[2 * r] = mean, st[2 * r + 1] = rstd;
      const __m512 mv = _mm512_set1_ps(mean), rv = _mm512_set1_ps(rstd);
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 normal = _mm512_mul_ps(_mm512_sub_ps(load_bf16(row + d), mv), rv);
        store_bf16(ys + r * D + d, _mm512_add_ps(_mm512_mul_ps(normal, _mm512_loadu_ps(sc + d)), _mm512_loadu_ps(bi + d)));
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error LayerNormImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                         ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> y,
                         ffi::ResultBuffer<ffi::F32> stats, float eps) {
  auto dims = x.dimensions();
  const int64_t D = dims.size() ? dims.back() : 0, N = D ? x.element_count() / D : 0;
  if (x.element_type() != ffi::BF16 || y->element_type() != ffi::BF16 || D % 16 || D == 0 ||
      scale.element_count() != D || bias.element_count() != D || stats->element_count() != 2 * N)
    return ffi::Error::InvalidArgument("layer_norm: x [N, D] bfloat16 (D a multiple of 16), scale and bias [D]");
  return layer_norm(pool, reinterpret_cast<const uint16_t*>(x.untyped_data()), nullptr, scale.typed_data(),
                    bias.typed_data(), nullptr, reinterpret_cast<uint16_t*>(y->untyped_data()), stats->typed_data(), N, D, eps);
}

ffi::Error AddLayerNormImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer a, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> s, ffi::Result<ffi::AnyBuffer> y,
                            ffi::ResultBuffer<ffi::F32> stats, float eps) {
  auto dims = x.dimensions();
  const int64_t D = dims.size() ? dims.back() : 0, N = D ? x.element_count() / D : 0;
  if (x.element_type() != ffi::BF16 || a.element_type() != ffi::BF16 || s->element_type() != ffi::BF16 ||
      y->element_type() != ffi::BF16 || D % 16 || D == 0 || a.element_count() != N * D || scale.element_count() != D ||
      bias.element_count() != D || stats->element_count() != 2 * N)
    return ffi::Error::InvalidArgument("add_layer_norm: x and a [N, D] bfloat16 (D a multiple of 16), scale and bias [D]");
  return layer_norm(pool, reinterpret_cast<const uint16_t*>(x.untyped_data()), reinterpret_cast<const uint16_t*>(a.untyped_data()),
                    scale.typed_data(), bias.typed_data(), reinterpret_cast<uint16_t*>(s->untyped_data()),
                    reinterpret_cast<uint16_t*>(y->untyped_data()), stats->typed_data(), N, D, eps);
}

// dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy scale, xhat = (x - mean) rstd, plus ds
// where it is not null (add_layer_norm's residual), rounded once; the scale's gradient sums dy xhat
// over rows and the bias's dy, by parts of rows, then the parts.
ffi::Error layer_norm_backward(ffi::ThreadPool& pool, const uint16_t* xs, const float* sc, const float* st,
                               const uint16_t* dys, const uint16_t* dss, uint16_t* dxs, float* ds, float* db, int64_t N,
                               int64_t D) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(kParts, N));
  std::unique_ptr<float[]> partial(new float[parts * 2 * D]());  // per part: dscale then dbias
  float* ps = partial.get();
  parallel_chunks(pool, parts, 1, 1, [=](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float *gs = ps + p * 2 * D, *gb = gs + D;
      for (int64_t r = N * p / parts; r < N * (p + 1) / parts; ++r) {
        const uint16_t *row = xs + r * D, *drow = dys + r * D;
        const __m512 mv = _mm512_set1_ps(st[2 * r]), rv = _mm512_set1_ps(st[2 * r + 1]);
        __m512 sum_g = _mm512_setzero_ps(), sum_gx = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
          const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(load_bf16(row + d), mv), rv), g = load_bf16(drow + d);
          const __m512 gscaled = _mm512_mul_ps(g, _mm512_loadu_ps(sc + d));
          sum_g = _mm512_add_ps(sum_g, gscaled);
          sum_gx = _mm512_fmadd_ps(gscaled, xhat, sum_gx);
          _mm512_storeu_ps(gs + d, _mm512_fmadd_ps(g, xhat, _mm512_loadu_ps(gs + d)));
          _mm512_storeu_ps(gb + d, _mm512_add_ps(g, _mm512_loadu_ps(gb + d)));
        }
        const __m512 a = _mm512_set1_ps(_mm512_reduce_add_ps(sum_g) / static_cast<float>(D));
        const __m512 b = _mm512_set1_ps(_mm512_reduce_add_ps(sum_gx) / static_cast<float>(D));
        for (int64_t d = 0; d < D; d += 16) {
          const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(load_bf16(row + d), mv), rv);
          const __m512 gscaled = _mm512_mul_ps(load_bf16(drow + d), _mm512_loadu_ps(sc + d));
          const __m512 grad = _mm512_mul_ps(rv, _mm512_sub_ps(_mm512_sub_ps(gscaled, a), _mm512_mul_ps(xhat, b)));
          store_bf16(dxs + r * D + d, dss ? _mm512_add_ps(grad, load_bf16(dss + r * D + d)) : grad);
        }
      }
    }
  });
  for (int64_t d = 0; d < D; ++d) ds[d] = db[d] = 0.f;
  for (int64_t p = 0; p < parts; ++p)
    for (int64_t d = 0; d < D; ++d) ds[d] += ps[p * 2 * D + d], db[d] += ps[p * 2 * D + D + d];
  return ffi::Error::Success();
}

ffi::Error LayerNormBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                                 ffi::Buffer<ffi::F32> stats, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx,
                                 ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias) {
  auto dims = x.dimensions();
  const int64_t D = dims.size() ? dims.back() : 0, N = D ? x.element_count() / D : 0;
  if (x.element_type() != ffi::BF16 || dy.element_type() != ffi::BF16 || dx->element_type() != ffi::BF16 ||
      D % 16 || D == 0 || dy.element_count() != N * D || scale.element_count() != D || stats.element_count() != 2 * N ||
      dscale->element_count() != D || dbias->element_count() != D)
    return ffi::Error::InvalidArgument("layer_norm_backward: x and dy [N, D] bfloat16, scale [D], stats [N, 2]");
  return layer_norm_backward(pool, reinterpret_cast<const uint16_t*>(x.untyped_data()), scale.typed_data(), stats.typed_data(),
                             reinterpret_cast<const uint16_t*>(dy.untyped_data()), nullptr,
                             reinterpret_cast<uint16_t*>(dx->untyped_data()), dscale->typed_data(), dbias->typed_data(), N, D);
}

// add_layer_norm's gradients: s (its sum), dy and ds (the sum's own cotangent) -> dx (for x and a alike).
ffi::Error AddLayerNormBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer s, ffi::Buffer<ffi::F32> scale,
                                    ffi::Buffer<ffi::F32> stats, ffi::AnyBuffer dy, ffi::AnyBuffer ds,
                                    ffi::Result<ffi::AnyBuffer> dx, ffi::ResultBuffer<ffi::F32> dscale,
                                    ffi::ResultBuffer<ffi::F32> dbias) {
  auto dims = s.dimensions();
  const int64_t D = dims.size() ? dims.back() : 0, N = D ? s.element_count() / D : 0;
  if (s.element_type() != ffi::BF16 || dy.element_type() != ffi::BF16 || ds.element_type() != ffi::BF16 ||
      dx->element_type() != ffi::BF16 || D % 16 || D == 0 || dy.element_count() != N * D || ds.element_count() != N * D ||
      scale.element_count() != D || stats.element_count() != 2 * N || dscale->element_count() != D ||
      dbias->element_count() != D)
    return ffi::Error::InvalidArgument("add_layer_norm_backward: s, dy and ds [N, D] bfloat16, scale [D], stats [N, 2]");
  return layer_norm_backward(pool, reinterpret_cast<const uint16_t*>(s.untyped_data()), scale.typed_data(), stats.typed_data(),
                             reinterpret_cast<const uint16_t*>(dy.untyped_data()),
                             reinterpret_cast<const uint16_t*>(ds.untyped_data()),
                             reinterpret_cast<uint16_t*>(dx->untyped_data()), dscale->typed_data(), dbias->typed_data(), N, D);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerNorm, LayerNormImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerNormBackward, LayerNormBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AddLayerNorm, AddLayerNormImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AddLayerNormBackward, AddLayerNormBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
