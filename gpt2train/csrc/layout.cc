// A transposed copy of 16-bit matrices (bfloat16 in training's backward pass; kernels._outer_product_sum
// says why). XLA:CPU's reordering copies of bfloat16 were slow at the weight gradients' shapes (124M,
// 4 x 256 tokens, AMD EPYC Zen 5: 3.4 ms for c_proj's [1024, 3072], here 0.9), and a plain transposed
// copy XLA folds back into the product, which then runs in float32.
#include "common.h"

namespace {

using namespace gpt2train;

ffi::Error TransposeImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::Result<ffi::AnyBuffer> t) {
  auto d = a.dimensions();
  if (d.size() < 2 || ffi::ByteWidth(a.element_type()) != 2 || ffi::ByteWidth(t->element_type()) != 2)
    return ffi::Error::InvalidArgument("transpose: a [..., R, C] of 16-bit elements");
  const int64_t R = d[d.size() - 2], C = d[d.size() - 1], batch = a.element_count() / std::max<int64_t>(1, R * C);
  const auto* as = reinterpret_cast<const uint16_t*>(a.untyped_data());
  auto* ts = reinterpret_cast<uint16_t*>(t->untyped_data());
  const int64_t blocks = (C + kTransposeBlock - 1) / kTransposeBlock;  // per matrix: bands of kTransposeBlock columns
  parallel_chunks(pool, batch * blocks, 1, 1, [=](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, c0 = i % blocks * kTransposeBlock;
      transpose_columns(as + b * R * C, ts + b * R * C, R, C, c0, std::min(C, c0 + kTransposeBlock));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Transpose, TransposeImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
