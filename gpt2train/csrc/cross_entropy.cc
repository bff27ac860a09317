// Cross-entropy of float32 logits over the real vocabulary and its gradient, for float32 training
// (kernels.native_cross_entropy says when). XLA:CPU made five passes over the [tokens, V_pad]
// logits after their product -- the padded vocabulary's mask added, the maximum, the exponentials
// written out, their sum, and the gradient -- where this takes one forward (a row's maximum and
// sum of exponentials, the row in L2) and one backward (the gradient written once). The small
// training shape (4 x 128, vocabulary 50,257, 768 tokens) spent ~75 ms of a ~235 ms step in them
// on an Intel Xeon.
#include "common.h"

#include <cmath>

namespace {

using namespace gpt2train;

inline __mmask16 first(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << std::max<int64_t>(0, n)) - 1); }

// A row's logsumexp over its first n_vocab logits: the maximum, then the sum of exp(l - max).
// A NaN logit makes it NaN, as XLA's would be (the exponential below would drop it).
inline float row_logsumexp(const float* row, int64_t n_vocab) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (int64_t v = 0; v < n_vocab; v += 16) {
    const __m512 l = _mm512_mask_loadu_ps(mx, first(n_vocab - v), row + v);
    nan |= _mm512_cmp_ps_mask(l, l, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, l);
  }
  if (nan) return NAN;
  const float m = _mm512_reduce_max_ps(mx);
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t v = 0; v < n_vocab; v += 16)
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(first(n_vocab - v), exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + v), mv))));
  return m + std::log(_mm512_reduce_add_ps(sum));
}

ffi::Error check(ffi::AnyBuffer& logits, ffi::AnyBuffer& targets, int64_t n_vocab, int64_t* N, int64_t* V) {
  auto d = logits.dimensions();
  if (logits.element_type() != ffi::F32 || targets.element_type() != ffi::S32 || d.size() != 2 ||
      targets.element_count() != d[0] || n_vocab < 1 || n_vocab > d[1])
    return ffi::Error::InvalidArgument("cross_entropy: logits [N, V_pad] float32, targets [N] int32, 1 <= n_vocab <= V_pad");
  *N = d[0], *V = d[1];
  return ffi::Error::Success();
}

// losses = logsumexp(row) - row[target], and the logsumexp, which the gradient takes.
ffi::Error CrossEntropyImpl(ffi::ThreadPool pool, ffi::AnyBuffer logits, ffi::AnyBuffer targets,
                            ffi::ResultBuffer<ffi::F32> losses, ffi::ResultBuffer<ffi::F32> lse, int64_t n_vocab) {
  int64_t N, V;
  if (auto error = check(logits, targets, n_vocab, &N, &V); error.failure()) return error;
  const float* ls = reinterpret_cast<const float*>(logits.untyped_data());
  const int32_t* ts = reinterpret_cast<const int32_t*>(targets.untyped_data());
  float *out = losses->typed_data(), *lses = lse->typed_data();
  parallel_chunks(pool, N, 1, 4, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = ls + r * V;
      const float z = row_logsumexp(row, n_vocab);
      lses[r] = z;
      const int32_t t = ts[r];
      out[r] = t >= 0 && t < n_vocab ? z - row[t] : NAN;  // a target outside the vocabulary has no loss
    }
  });
  return ffi::Error::Success();
}

// dlogits = (exp(l - lse) - one-hot(target)) * dl over the real vocabulary, zero past it.
ffi::Error CrossEntropyBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer logits, ffi::AnyBuffer targets,
                                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dl,
                                    ffi::ResultBuffer<ffi::F32> dlogits, int64_t n_vocab) {
  int64_t N, V;
  if (auto error = check(logits, targets, n_vocab, &N, &V); error.failure()) return error;
  if (lse.element_count() != N || dl.element_count() != N || dlogits->element_count() != N * V)
    return ffi::Error::InvalidArgument("cross_entropy_backward: lse and dl [N], dlogits like logits");
  const float* ls = reinterpret_cast<const float*>(logits.untyped_data());
  const int32_t* ts = reinterpret_cast<const int32_t*>(targets.untyped_data());
  const float *z = lse.typed_data(), *d = dl.typed_data();
  float* out = dlogits->typed_data();
  parallel_chunks(pool, N, 1, 4, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = ls + r * V;
      float* grad = out + r * V;
      const __m512 zv = _mm512_set1_ps(z[r]), dv = _mm512_set1_ps(d[r]);
      for (int64_t v = 0; v < V; v += 16) {
        const __mmask16 real = first(n_vocab - v), whole = first(V - v);
        const __m512 p = _mm512_maskz_mov_ps(real, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(whole, row + v), zv)));
        _mm512_mask_storeu_ps(grad + v, whole, _mm512_mul_ps(p, dv));
      }
      const int32_t t = ts[r];
      if (t >= 0 && t < n_vocab) grad[t] -= d[r];
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrossEntropy, CrossEntropyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n_vocab"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrossEntropyBackward, CrossEntropyBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n_vocab"));
