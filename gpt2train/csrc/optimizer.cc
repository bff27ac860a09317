// Adam's step for one float32 parameter in one pass over memory (gpt2train/fused_adam.py says when
// it is used and checks it against optax). XLA:CPU compiles optax's chain -- clip to the global norm,
// the two moments, bias correction, decoupled weight decay, the learning rate, apply_updates -- into
// one loop per output (the new moments and the new parameter), each reading the gradient again: about
// 13 passes of every parameter's size where 7 (g, m, v, p in; m, v, p out) would do: at 124M ~100 ms
// of a 1,350 ms bfloat16 training step on 2 cores (AMD EPYC, Zen 5); this kernel takes 72 ms alone.
//
// The arithmetic is optax's, in its order, so the result matches it to rounding (fused_adam.py's
// test): g / divisor (the clip: 1, or norm / grad_clip), m = (1 - b1) g + b1 m,
// v = (1 - b2) g^2 + b2 v, u = (m / bc1) / (sqrt(v / bc2) + eps) + decay p, p = p + (-lr) u.
#include "common.h"

namespace {

using namespace gpt2train;

struct AdamConstants {
  float b1, one_minus_b1, b2, one_minus_b2, eps, decay;
};

// Scalars that change every step, as one float32 array: [divisor, -lr, bc1, bc2]. Written with
// intrinsics: GCC kept the plain loop scalar (std::sqrt's errno branch, and the constants it could
// not prove apart from the stores), 250 ms at 124M where this takes 72.
void adam_range(const AdamConstants& c, const float* scalars, const float* g, float* m, float* v, float* p, int64_t i0,
                int64_t i1) {
  const __m512 divisor = _mm512_set1_ps(scalars[0]), neg_lr = _mm512_set1_ps(scalars[1]),
               bc1 = _mm512_set1_ps(scalars[2]), bc2 = _mm512_set1_ps(scalars[3]), b1 = _mm512_set1_ps(c.b1),
               one_minus_b1 = _mm512_set1_ps(c.one_minus_b1), b2 = _mm512_set1_ps(c.b2),
               one_minus_b2 = _mm512_set1_ps(c.one_minus_b2), eps = _mm512_set1_ps(c.eps),
               decay = _mm512_set1_ps(c.decay);
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 k = i1 - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (i1 - i)) - 1);
    const __m512 gi = _mm512_div_ps(_mm512_maskz_loadu_ps(k, g + i), divisor);
    const __m512 pi = _mm512_maskz_loadu_ps(k, p + i);
    const __m512 mi = _mm512_add_ps(_mm512_mul_ps(one_minus_b1, gi), _mm512_mul_ps(b1, _mm512_maskz_loadu_ps(k, m + i)));
    const __m512 vi = _mm512_add_ps(_mm512_mul_ps(one_minus_b2, _mm512_mul_ps(gi, gi)),
                                    _mm512_mul_ps(b2, _mm512_maskz_loadu_ps(k, v + i)));
    const __m512 step = _mm512_div_ps(_mm512_div_ps(mi, bc1), _mm512_add_ps(_mm512_sqrt_ps(_mm512_div_ps(vi, bc2)), eps));
    const __m512 u = _mm512_add_ps(step, _mm512_mul_ps(decay, pi));
    _mm512_mask_storeu_ps(m + i, k, mi);
    _mm512_mask_storeu_ps(v + i, k, vi);
    _mm512_mask_storeu_ps(p + i, k, _mm512_add_ps(pi, _mm512_mul_ps(neg_lr, u)));
  }
}

// m, v and p are updated in place: the outputs alias those inputs (fused_adam.py's
// input_output_aliases), so their pointers are the same.
ffi::Error AdamUpdateImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> m,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> scalars,
                          ffi::ResultBuffer<ffi::F32> m_out, ffi::ResultBuffer<ffi::F32> v_out,
                          ffi::ResultBuffer<ffi::F32> p_out, float b1, float one_minus_b1, float b2,
                          float one_minus_b2, float eps, float decay) {
  const int64_t n = g.element_count();
  if (m.element_count() != n || v.element_count() != n || p.element_count() != n || scalars.element_count() != 4)
    return ffi::Error::InvalidArgument("adam_update: g, m, v and p of one size, and 4 scalars");
  if (m_out->typed_data() != m.typed_data() || v_out->typed_data() != v.typed_data() ||
      p_out->typed_data() != p.typed_data())
    return ffi::Error::InvalidArgument("adam_update: m, v and p must alias their outputs");
  const AdamConstants c{b1, one_minus_b1, b2, one_minus_b2, eps, decay};
  const float* gs = g.typed_data();
  const float* ss = scalars.typed_data();
  float *ms = m_out->typed_data(), *vs = v_out->typed_data(), *ps = p_out->typed_data();
  parallel_chunks(pool, n, 16, 1 << 16, [=](int64_t i0, int64_t i1) { adam_range(c, ss, gs, ms, vs, ps, i0, i1); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamUpdate, AdamUpdateImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("decay"));
