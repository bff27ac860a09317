// A transposed copy of 16-bit matrices (bfloat16 in training's backward pass; kernels._outer_product_sum
// says why). XLA:CPU's own transposed copies of bfloat16 ran at 1-3 GB/s at the weight gradients'
// shapes (124M, 4 x 256 tokens: 3.3 ms for [1024, 3072], 34-38 ms for the head's [1024, 50304]);
// blocks of 32 x 32 kept in L1 run near the memory's pace.
#include "common.h"

namespace {

using namespace gpt2train;

constexpr int64_t kBlock = 32;
constexpr int64_t kBand = 256;  // columns per task: 512 bytes of each row read at a time

// Columns [c0, c1) of a [R, C] (one matrix of the batch) into rows [c0, c1) of t [C, R], by
// blocks of kBlock x kBlock: the rows written (c1 - c0 of them, R long) stay a few pages, where
// bands of a's rows wrote across all of t (the head's gradient: 103 MB) and missed the TLB.
void transpose_columns(const uint16_t* a, uint16_t* t, int64_t R, int64_t C, int64_t c0, int64_t c1) {
  for (int64_t r0 = 0; r0 < R; r0 += kBlock) {
    const int64_t r1 = std::min(R, r0 + kBlock);
    for (int64_t b0 = c0; b0 < c1; b0 += kBlock)
      for (int64_t c = b0; c < std::min(c1, b0 + kBlock); ++c)
        for (int64_t r = r0; r < r1; ++r) t[c * R + r] = a[r * C + c];
  }
}

ffi::Error TransposeImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::Result<ffi::AnyBuffer> t) {
  auto d = a.dimensions();
  if (d.size() < 2 || ffi::ByteWidth(a.element_type()) != 2 || ffi::ByteWidth(t->element_type()) != 2)
    return ffi::Error::InvalidArgument("transpose: a [..., R, C] of 16-bit elements");
  const int64_t R = d[d.size() - 2], C = d[d.size() - 1], batch = a.element_count() / std::max<int64_t>(1, R * C);
  const auto* as = reinterpret_cast<const uint16_t*>(a.untyped_data());
  auto* ts = reinterpret_cast<uint16_t*>(t->untyped_data());
  const int64_t blocks = (C + kBand - 1) / kBand;  // per matrix: bands of kBand columns
  parallel_chunks(pool, batch * blocks, 1, 1, [=](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, c0 = i % blocks * kBand;
      transpose_columns(as + b * R * C, ts + b * R * C, R, C, c0, std::min(C, c0 + kBand));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Transpose, TransposeImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
