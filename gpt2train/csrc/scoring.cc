// Scoring's kernels for CPUs with AMX or AVX-512 BF16 (gpt2train/native_kernel.py builds and loads
// this; kernels.native_head_losses and kernels.native_causal_attention say when each is used:
// bfloat16 without a gradient, and head_losses under one on CPUs with AMX, with products.cc's
// head_grads as its backward). Their 32 x 32 blocks of products go to AMX tiles or to vdpbf16ps
// (common.h's TileBlocks and VectorBlocks), as the caller's `tiles` says.
//
// head_losses: each token's cross-entropy under the tied output head, -log softmax(x . wte^T)[target],
// without the logits ever reaching memory. XLA:CPU writes the [tokens, vocabulary] float32 logits
// out (412 MB per 2,048 tokens at GPT-2's vocabulary) and reads them back for the padding mask, the
// maximum, the sum of exponentials and the target's logit; on an Intel Xeon with AMX those passes
// and its head product (0.5 TFLOP/s) were half of a 124M evaluation step. Here 32 vocabulary rows
// are multiplied by 32 tokens at a time, and each 32 x 32 block of logits is folded into the
// tokens' running maximum and sum of exponentials while it is in L1.
//
// causal_attention: flash attention over blocks of 32 keys with a running maximum per query; XLA:CPU
// wrote each block's float32 scores out between the product and the softmax (95 ms a layer at
// 124M, 8 x 1024, against 27 here). For training (kernels.native_attention_training, CPUs with
// AMX) causal_attention_lse also keeps each query's logsumexp, and causal_attention_backward
// computes the probabilities again from it, block by block, for dq, dk and dv (a layer's attention,
// forward and backward, at 124M, 4 x 256: 11-12 ms by XLA, 3.9 here).
#include <cmath>
#include <vector>

#include "common.h"

namespace {

using namespace gpt2train;

#if defined(__AVX512BF16__)
constexpr int64_t kPassTokens = 256;  // tokens whose packed rows stay in L2 while the head streams past

// Folds a block of logits c [rows <= 32 vocabulary rows][32 tokens] into the tokens' running
// maximum m and sum of exp(logit - m), 16 tokens to a vector.
inline void fold_block(const float (*c)[32], int rows, float* m, float* s) {
  for (int h = 0; h < 32; h += 16) {
    __m512 top = _mm512_load_ps(&c[0][h]);
    for (int r = 1; r < rows; ++r) top = _mm512_max_ps(top, _mm512_load_ps(&c[r][h]));
    const __m512 old = _mm512_loadu_ps(m + h);
    top = _mm512_max_ps(top, old);
    __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(s + h), exp_nonpositive(_mm512_sub_ps(old, top)));
    for (int r = 0; r < rows; ++r) sum = _mm512_add_ps(sum, exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(&c[r][h]), top)));
    _mm512_storeu_ps(m + h, top);
    _mm512_storeu_ps(s + h, sum);
  }
}

// Losses of tokens [t0, t1) (t1 - t0 <= kPassTokens): x [N, K] and w [>= V rounded up to 32, K]
// as bfloat16 bits, K a multiple of 32; blocks of 32 vocabulary rows (as they lie) by 32 packed tokens.
// Training's forward (head_losses_kept) also takes each token's logsumexp into lses and keeps every
// block of logits, transposed to [32 tokens][32 vocabulary rows], at kept + (t / 32 * vocabulary
// blocks + v / 32) * 1,024 (t0 and t1 multiples of 32 then).
template <typename Blocks>
void pass_losses(Blocks& blocks, const uint16_t* x, const uint16_t* w, const int32_t* targets, float* losses, int64_t K, int64_t V,
                 int64_t t0, int64_t t1, float* lses = nullptr, float* kept = nullptr) {
  const int64_t groups = (t1 - t0 + 31) / 32 * 2, group_size = K * 16;  // packed elements per 16 tokens
  aligned_vector<uint16_t> xp(groups * group_size);
  for (int64_t g = 0; g < groups; ++g)
    pack_x(x + (t0 + g * 16) * K, std::max<int64_t>(0, std::min<int64_t>(16, t1 - t0 - g * 16)), K,
           xp.data() + g * group_size);
  aligned_vector<float> m(groups * 16, -1e30f), s(groups * 16, 0.f), picked(groups * 16, 0.f);
  // Software-pipelined: a block's logits are folded while the tiles multiply the next block, so
  // the vector units' exponentials overlap AMX's products (two buffers of logits, c[0] and c[1]);
  // by vectors, the same order costs nothing.
  alignas(64) float c[2][32][32];
  struct Block {
    int64_t v, g;
    int rows;
  } pending{0, 0, 0};
  int buffer = 0;
  const int64_t vocabulary_blocks = (V + 31) / 32;
  const bool stream = reinterpret_cast<uintptr_t>(kept) % 64 == 0;  // past the caches where aligned
  auto fold = [&](const Block& b, const float (*block)[32]) {
    if (kept)
      store_transposed(block, kept + ((t0 + b.g * 16) / 32 * vocabulary_blocks + b.v / 32) * 1024, 32, stream);
    fold_block(block, b.rows, m.data() + b.g * 16, s.data() + b.g * 16);
    for (int64_t i = 0; i < 32 && t0 + b.g * 16 + i < t1; ++i) {
      const int64_t d = targets[t0 + b.g * 16 + i] - b.v;
      if (d >= 0 && d < b.rows) picked[b.g * 16 + i] = block[d][i];
    }
  };
  for (int64_t v = 0; v < V; v += 32) {
    const uint16_t *a0 = w + v * K, *a1 = a0 + 16 * K;
    const int rows = static_cast<int>(std::min<int64_t>(32, V - v));
    for (int64_t g = 0; g < groups; g += 2) {
      const uint16_t* b = xp.data() + g * group_size;
      blocks.start(a0, a1, K * 2, b, b + group_size, K);
      if (pending.rows) fold(pending, c[1 - buffer]);
      blocks.finish(c[buffer]);
      pending = {v, g, rows};
      buffer = 1 - buffer;
    }
  }
  if (pending.rows) fold(pending, c[1 - buffer]);
  for (int64_t i = 0; i < t1 - t0; ++i) {
    const float lse = m[i] + std::log(s[i]);
    losses[t0 + i] = lse - picked[i];
    if (lses) lses[t0 + i] = lse;
  }
}

// ----------------------------------------------------------------------------- causal_attention
// One head's operands laid out for tiles: keys [Tp, Dh] as they are (left operand of
// S^T = K Q^T), queries packed as right operands (pack_x, 16 queries a group), values transposed
// [Dh, Tp] (left operand of O^T = V^T P^T); Tp is T rounded up to 32, the rows past T zeros.
// Transposed products put the keys on rows and the queries on lanes, so the softmax over keys
// is vertical: maxima and sums across rows, no horizontal reductions.
struct HeadOperands {
  aligned_vector<uint16_t> keys, queries, values_t;
  HeadOperands(const uint16_t* qkv, int64_t T, int64_t H, int64_t Dh, int64_t Tp)
      : keys(Tp * Dh, 0), queries(Tp * Dh, 0), values_t(Dh * Tp, 0) {
    const int64_t row = 3 * H * Dh;  // elements between positions in qkv [T, 3, H, Dh]
    const uint16_t *q = qkv, *k = qkv + H * Dh, *v = qkv + 2 * H * Dh;
    for (int64_t t = 0; t < T; ++t) std::copy(k + t * row, k + t * row + Dh, keys.begin() + t * Dh);
    for (int64_t g = 0; g < Tp / 16; ++g)
      pack_x(q + g * 16 * row, std::max<int64_t>(0, std::min<int64_t>(16, T - g * 16)), Dh,
             queries.data() + g * 16 * Dh, row);
    // values_t by gathers: each lane one position's pair (d, d + 1), split into the two rows.
    const __m512i offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32(static_cast<int>(row * 2)));
    for (int64_t t = 0; t < T; t += 16) {
      const __mmask16 in = T - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (T - t)) - 1);
      for (int64_t d = 0; d < Dh; d += 2) {
        const __m512i pair = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), in, offsets, v + t * row + d, 1);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(values_t.data() + d * Tp + t), _mm512_cvtepi32_epi16(pair));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(values_t.data() + (d + 1) * Tp + t),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(pair, 16)));
      }
    }
  }
};

// p [32 keys][32 queries] (float32) as two right operands (16 queries each) of bfloat16 key pairs.
inline void pack_probs(const float (*p)[32], uint16_t* packed) {
  alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(order);
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < 16; ++r) {
      const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_load_ps(&p[2 * r + 1][h * 16]), _mm512_load_ps(&p[2 * r][h * 16]));
      _mm512_store_si512(packed + (h * 16 + r) * 32, _mm512_permutexvar_epi16(interleave, (__m512i)pair));
    }
}

// Query block qb (32 queries) of one head against the keys it may see, by blocks of 32 keys with
// a running maximum and sum per query (flash attention); writes out rows [q0, min(q0 + 32, T)).
// lse (training's forward; null otherwise): each query's logsumexp of its scaled scores, for the backward.
template <typename Blocks>
void attend_block(Blocks& blocks, const HeadOperands& op, int64_t qb, int64_t T, int64_t Dh, int64_t Tp, uint16_t* out,
                  int64_t out_row, float* lse) {
  const int64_t q0 = qb * 32;
  const float scale = 1.f / std::sqrt(static_cast<float>(Dh));
  alignas(64) float s[32][32], pv[128][32], o[128][32];  // Dh <= 128
  alignas(64) uint16_t packed[2 * 16 * 32];
  alignas(64) float m[32], l[32], alpha[32];
  std::fill(&o[0][0], &o[0][0] + Dh * 32, 0.f);
  std::fill(m, m + 32, -1e30f);
  std::fill(l, l + 32, 0.f);
  const uint16_t* qp = op.queries.data() + q0 * Dh;
  for (int64_t j = 0; j <= qb; ++j) {
    const uint16_t* kp = op.keys.data() + j * 32 * Dh;
    blocks.start(kp, kp + 16 * Dh, Dh * 2, qp, qp + 16 * Dh, Dh);
    blocks.finish(s);
    const int64_t keys = std::min<int64_t>(32, T - j * 32);  // keys past T are padding
    for (int h = 0; h < 2; ++h) {
      __mmask16 visible[32];
      for (int r = 0; r < 32; ++r) {
        // Query lane q sees key r of this block unless the block is the diagonal one and r > h*16 + q.
        const int64_t first = j == qb ? std::max<int64_t>(0, r - h * 16) : 0;
        visible[r] = r >= keys || first >= 16 ? 0 : (__mmask16)(0xFFFF << first);
      }
      const __m512 old = _mm512_load_ps(m + h * 16);
      __m512 top = old;
      for (int r = 0; r < 32; ++r) {
        const __m512 x = _mm512_mask_mul_ps(_mm512_set1_ps(-1e30f), visible[r], _mm512_load_ps(&s[r][h * 16]),
                                            _mm512_set1_ps(scale));
        _mm512_store_ps(&s[r][h * 16], x);
        top = _mm512_max_ps(top, x);
      }
      const __m512 a = exp_nonpositive(_mm512_sub_ps(old, top));
      __m512 sum = _mm512_mul_ps(_mm512_load_ps(l + h * 16), a);
      for (int r = 0; r < 32; ++r) {
        const __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(&s[r][h * 16]), top));
        _mm512_store_ps(&s[r][h * 16], p);
        sum = _mm512_add_ps(sum, p);
      }
      _mm512_store_ps(m + h * 16, top);
      _mm512_store_ps(l + h * 16, sum);
      _mm512_store_ps(alpha + h * 16, a);
    }
    pack_probs(s, packed);
    for (int64_t d = 0; d < Dh; d += 32) {  // pv^T rows d..d+31: values_t's rows by the packed P^T
      const uint16_t* vt = op.values_t.data() + d * Tp + j * 32;
      blocks.start(vt, vt + 16 * Tp, Tp * 2, packed, packed + 16 * 32, 32);
      blocks.finish(pv + d);
    }
    const __m512 a0 = _mm512_load_ps(alpha), a1 = _mm512_load_ps(alpha + 16);
    for (int64_t d = 0; d < Dh; ++d) {
      _mm512_store_ps(&o[d][0], _mm512_fmadd_ps(_mm512_load_ps(&o[d][0]), a0, _mm512_load_ps(&pv[d][0])));
      _mm512_store_ps(&o[d][16], _mm512_fmadd_ps(_mm512_load_ps(&o[d][16]), a1, _mm512_load_ps(&pv[d][16])));
    }
  }
  alignas(64) uint16_t rounded[32];
  const __m512 inv0 = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_load_ps(l));
  const __m512 inv1 = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_load_ps(l + 16));
  const int64_t queries = std::min<int64_t>(32, T - q0);
  for (int64_t d = 0; d < Dh; ++d) {
    const __m512bh r = _mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_load_ps(&o[d][16]), inv1),
                                           _mm512_mul_ps(_mm512_load_ps(&o[d][0]), inv0));
    _mm512_store_si512(rounded, (__m512i)r);
    for (int64_t q = 0; q < queries; ++q) out[(q0 + q) * out_row + d] = rounded[q];
  }
  if (lse)
    for (int64_t q = 0; q < queries; ++q) lse[q0 + q] = m[q] + std::log(l[q]);
}

// ----------------------------------------------------------------------------- attention's gradient
// One head's operands for the backward pass, T rounded up to Tp (a multiple of 32, zeros past T):
// keys and values as rows [Tp, Dh] (left operands of S^T = K Q^T and dP^T = V dO^T); queries and
// the output's cotangent packed 16 a group (pack_x: those products' right operands) and by pairs of
// rows (pack_rows: right operands of dK = dS^T Q and dV = P^T dO, sums over queries); keys
// transposed [Dh, Tp] (left operand of dQ^T = K^T dS^T); each query's logsumexp and
// delta = sum_d dO . O (the softmax's gradient needs both).
struct HeadGradOperands {
  aligned_vector<uint16_t> keys, values, queries, douts, query_pairs, dout_pairs, keys_t;
  aligned_vector<float> lse, delta;
  HeadGradOperands(const uint16_t* qkv, const uint16_t* out, const uint16_t* dout, const float* head_lse, int64_t T,
                   int64_t H, int64_t Dh, int64_t Tp)
      : keys(Tp * Dh, 0), values(Tp * Dh, 0), queries(Tp * Dh), douts(Tp * Dh), query_pairs(Tp * Dh), dout_pairs(Tp * Dh),
        keys_t(Dh * Tp), lse(Tp, 0.f), delta(Tp, 0.f) {
    const int64_t row = 3 * H * Dh, out_row = H * Dh;
    aligned_vector<uint16_t> q_rows(Tp * Dh, 0), do_rows(Tp * Dh, 0);
    for (int64_t t = 0; t < T; ++t) {
      std::copy(qkv + t * row, qkv + t * row + Dh, q_rows.begin() + t * Dh);
      std::copy(qkv + t * row + H * Dh, qkv + t * row + H * Dh + Dh, keys.begin() + t * Dh);
      std::copy(qkv + t * row + 2 * H * Dh, qkv + t * row + 2 * H * Dh + Dh, values.begin() + t * Dh);
      std::copy(dout + t * out_row, dout + t * out_row + Dh, do_rows.begin() + t * Dh);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t d = 0; d < Dh; d += 16) {
        sum = _mm512_fmadd_ps(load_bf16(dout + t * out_row + d), load_bf16(out + t * out_row + d), sum);
      }
      delta[t] = _mm512_reduce_add_ps(sum);
      lse[t] = head_lse[t];
    }
    for (int64_t g = 0; g < Tp / 16; ++g) {
      pack_x(q_rows.data() + g * 16 * Dh, 16, Dh, queries.data() + g * 16 * Dh);
      pack_x(do_rows.data() + g * 16 * Dh, 16, Dh, douts.data() + g * 16 * Dh);
    }
    pack_rows(q_rows.data(), Tp, Dh, 0, Dh / 16, query_pairs.data());
    pack_rows(do_rows.data(), Tp, Dh, 0, Dh / 16, dout_pairs.data());
    transpose_columns(keys.data(), keys_t.data(), Tp, Dh, 0, Dh);
  }
};

// 32 float32 values as bfloat16s at out.
inline void store_rounded(const float* v, uint16_t* out) {
  _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(v + 16), _mm512_load_ps(v)));
}

// One head's dQ, dK and dV (rows `out_row` elements apart, bfloat16) by blocks of 32 keys x 32
// queries (flash attention's backward): each block's probabilities come again from the scores and
// the forward's logsumexp, P^T and dS^T stay in L1 as float32 and leave as bfloat16 rows of the key
// block (for dV and dK, summed over queries by the tiles) and packed by key pairs (for dQ, summed
// over keys after every key block is done). dS carries the scores' scale.
template <typename Blocks>
void head_backward(Blocks& blocks, const HeadGradOperands& op, int64_t T, int64_t Dh, int64_t Tp, uint16_t* dq,
                   uint16_t* dk, uint16_t* dv, int64_t out_row) {
  const int64_t blocks_n = Tp / 32;
  const float scale = 1.f / std::sqrt(static_cast<float>(Dh));
  aligned_vector<uint16_t> p_rows(32 * Tp), ds_rows(32 * Tp), ds_packed(Tp * Tp);
  alignas(64) float s[32][32], dp[32][32], acc[32][32];
  alignas(64) uint16_t packed[2 * 16 * 32];
  for (int64_t j = 0; j < blocks_n; ++j) {
    const uint16_t *kj = op.keys.data() + j * 32 * Dh, *vj = op.values.data() + j * 32 * Dh;
    for (int64_t i = j; i < blocks_n; ++i) {
      const uint16_t *qp = op.queries.data() + i * 32 * Dh, *dop = op.douts.data() + i * 32 * Dh;
      blocks.start(kj, kj + 16 * Dh, Dh * 2, qp, qp + 16 * Dh, Dh);
      blocks.finish(s);
      blocks.start(vj, vj + 16 * Dh, Dh * 2, dop, dop + 16 * Dh, Dh);
      blocks.finish(dp);
      for (int h = 0; h < 2; ++h) {
        const int64_t q = i * 32 + h * 16;  // the first query on this half's lanes
        const __m512 lse = _mm512_loadu_ps(op.lse.data() + q), delta = _mm512_loadu_ps(op.delta.data() + q);
        const __mmask16 real = T - q >= 16 ? (__mmask16)0xFFFF : T - q <= 0 ? (__mmask16)0 : (__mmask16)((1u << (T - q)) - 1);
        for (int r = 0; r < 32; ++r) {
          // Key j*32 + r is seen by the queries at or after it.
          const int64_t first = std::max<int64_t>(0, j * 32 + r - q);
          const __mmask16 visible = first >= 16 || j * 32 + r >= T ? (__mmask16)0 : (__mmask16)(real & (0xFFFF << first));
          const __m512 p = _mm512_maskz_mov_ps(
              visible, exp_nonpositive(_mm512_fmsub_ps(_mm512_load_ps(&s[r][h * 16]), _mm512_set1_ps(scale), lse)));
          const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_load_ps(&dp[r][h * 16]), delta)),
                                          _mm512_set1_ps(scale));
          _mm512_store_ps(&s[r][h * 16], p);
          _mm512_store_ps(&dp[r][h * 16], ds);
        }
      }
      for (int r = 0; r < 32; ++r) {
        store_rounded(s[r], p_rows.data() + r * Tp + i * 32);
        store_rounded(dp[r], ds_rows.data() + r * Tp + i * 32);
      }
      pack_probs(dp, packed);  // query group 2i + h, key pairs of block j
      for (int h = 0; h < 2; ++h)
        std::copy(packed + h * 512, packed + (h + 1) * 512, ds_packed.data() + ((2 * i + h) * Tp / 2 + j * 16) * 32);
    }
    // dV_j = P^T_j . dO and dK_j = dS^T_j . Q over the queries from block j on.
    const int64_t keys = std::min<int64_t>(32, T - j * 32), from = j * 32, span = Tp - from;
    for (int part = 0; part < 2; ++part) {
      const uint16_t* a = (part ? ds_rows : p_rows).data() + from;
      const uint16_t* b = (part ? op.query_pairs : op.dout_pairs).data() + from * 16;
      uint16_t* grad = part ? dk : dv;
      for (int64_t d = 0; d < Dh; d += 32) {
        blocks.start(a, a + 16 * Tp, Tp * 2, b + d * Tp, b + (d + 16) * Tp, span);
        blocks.finish(acc);
        for (int64_t r = 0; r < keys; ++r) store_rounded(acc[r], grad + (from + r) * out_row + d);
      }
    }
  }
  // dQ^T_i = K^T . dS^T_i over the keys up to block i, stored transposed.
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(32));
  alignas(64) float rowv[32];
  for (int64_t i = 0; i < blocks_n; ++i) {
    const int64_t queries = std::min<int64_t>(32, T - i * 32);
    for (int64_t d = 0; d < Dh; d += 32) {
      const uint16_t* kt = op.keys_t.data() + d * Tp;
      const uint16_t* b = ds_packed.data() + 2 * i * Tp * 16;
      blocks.start(kt, kt + 16 * Tp, Tp * 2, b, b + Tp * 16, (i + 1) * 32);
      blocks.finish(acc);
      for (int64_t q = 0; q < queries; ++q) {
        _mm512_store_ps(rowv, _mm512_i32gather_ps(column, &acc[0][q], 4));
        _mm512_store_ps(rowv + 16, _mm512_i32gather_ps(column, &acc[16][q], 4));
        store_rounded(rowv, dq + (i * 32 + q) * out_row + d);
      }
    }
  }
}
#endif


ffi::Error HeadLossesImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer targets,
                          ffi::Result<ffi::AnyBuffer> losses, int64_t n_vocab, bool tiles) {
  auto xd = x.dimensions(), wd = w.dimensions(), td = targets.dimensions();
  if (x.element_type() != ffi::DataType::BF16 ||
      (w.element_type() != ffi::DataType::BF16 && w.element_type() != ffi::DataType::U16) ||
      targets.element_type() != ffi::DataType::S32 || losses->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("head_losses: x bfloat16, w bfloat16 (or its bits), targets int32");
  if (xd.size() != 2 || wd.size() != 2 || td.size() != 1 || xd[1] != wd[1] || td[0] != xd[0] || xd[1] % 32 != 0 ||
      n_vocab < 1 || (n_vocab + 31) / 32 * 32 > wd[0])
    return ffi::Error::InvalidArgument(
        "head_losses: x [N, K], w [V_pad, K], targets [N], K a multiple of 32, n_vocab rounded up to 32 <= V_pad");
#if defined(__AVX512BF16__)
  const auto* xs = reinterpret_cast<const uint16_t*>(x.untyped_data());
  const auto* ws = reinterpret_cast<const uint16_t*>(w.untyped_data());
  const auto* ts = reinterpret_cast<const int32_t*>(targets.untyped_data());
  auto* ls = reinterpret_cast<float*>(losses->untyped_data());
  const int64_t N = xd[0], K = xd[1];
  parallel_chunks(pool, N, 32, 32, [=](int64_t i0, int64_t i1) {
    with_blocks(tiles, [&](auto& blocks) {
      for (int64_t t = i0; t < i1; t += kPassTokens)
        pass_losses(blocks, xs, ws, ts, ls, K, n_vocab, t, std::min(i1, t + kPassTokens));
    });
  });
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("head_losses: this build has no bfloat16 kernels (the CPU lacks AVX-512 BF16)");
#endif
}

// head_losses for training's forward: also each token's logsumexp lse [N] and the logits, kept
// [N / 32, vocabulary blocks of 32, 32 tokens, 32 rows] float32, for head_grads to start from
// rather than multiply again (124M at 4 x 256 tokens, Intel Xeon with AMX: ~210 MB written here and
// read there, against 79 GFLOP).
ffi::Error HeadLossesKeptImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer targets,
                              ffi::Result<ffi::AnyBuffer> losses, ffi::Result<ffi::AnyBuffer> lse,
                              ffi::Result<ffi::AnyBuffer> logits, int64_t n_vocab, bool tiles) {
  auto xd = x.dimensions(), wd = w.dimensions(), td = targets.dimensions();
  if (x.element_type() != ffi::DataType::BF16 ||
      (w.element_type() != ffi::DataType::BF16 && w.element_type() != ffi::DataType::U16) ||
      targets.element_type() != ffi::DataType::S32 || losses->element_type() != ffi::DataType::F32 ||
      lse->element_type() != ffi::DataType::F32 || logits->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("head_losses_kept: x bfloat16, w bfloat16 (or its bits), targets int32");
  if (xd.size() != 2 || wd.size() != 2 || td.size() != 1 || xd[1] != wd[1] || td[0] != xd[0] || xd[0] % 32 != 0 ||
      xd[1] % 32 != 0 || n_vocab < 1 || (n_vocab + 31) / 32 * 32 > wd[0] ||
      logits->element_count() != xd[0] * ((n_vocab + 31) / 32 * 32))
    return ffi::Error::InvalidArgument(
        "head_losses_kept: x [N, K], w [V_pad, K], targets [N], N and K multiples of 32, n_vocab rounded up to 32 <= V_pad, "
        "logits N x n_vocab rounded up to 32");
#if defined(__AVX512BF16__)
  const auto* xs = reinterpret_cast<const uint16_t*>(x.untyped_data());
  const auto* ws = reinterpret_cast<const uint16_t*>(w.untyped_data());
  const auto* ts = reinterpret_cast<const int32_t*>(targets.untyped_data());
  auto* ls = reinterpret_cast<float*>(losses->untyped_data());
  auto* lses = reinterpret_cast<float*>(lse->untyped_data());
  auto* kept = reinterpret_cast<float*>(logits->untyped_data());
  const int64_t N = xd[0], K = xd[1];
  parallel_chunks(pool, N, 32, 32, [=](int64_t i0, int64_t i1) {
    with_blocks(tiles, [&](auto& blocks) {
      for (int64_t t = i0; t < i1; t += kPassTokens)
        pass_losses(blocks, xs, ws, ts, ls, K, n_vocab, t, std::min(i1, t + kPassTokens), lses, kept);
    });
    _mm_sfence();  // the kept logits' streaming stores done before the chunk counts as finished
  });
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("head_losses_kept: this build has no bfloat16 kernels (the CPU lacks AVX-512 BF16)");
#endif
}

// lse: null, or each query's logsumexp [B, H, T] float32 (training's forward).
ffi::Error causal_attention(ffi::ThreadPool& pool, ffi::AnyBuffer& qkv, ffi::AnyBuffer& out, float* lses, bool tiles) {
  auto d = qkv.dimensions();
  if (qkv.element_type() != ffi::DataType::BF16 || out.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("causal_attention: qkv and the output bfloat16");
  if (d.size() != 5 || d[2] != 3 || d[4] % 32 != 0 || d[4] > 128)
    return ffi::Error::InvalidArgument("causal_attention: qkv [B, T, 3, H, Dh], Dh a multiple of 32 up to 128");
#if defined(__AVX512BF16__)
  const int64_t B = d[0], T = d[1], H = d[3], Dh = d[4], Tp = (T + 31) / 32 * 32;
  const auto* in = reinterpret_cast<const uint16_t*>(qkv.untyped_data());
  auto* os = reinterpret_cast<uint16_t*>(out.untyped_data());
  parallel_chunks(pool, B * H, 1, 1, [=](int64_t i0, int64_t i1) {
    with_blocks(tiles, [&](auto& blocks) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / H, h = i % H;
        const HeadOperands op(in + b * T * 3 * H * Dh + h * Dh, T, H, Dh, Tp);
        for (int64_t qb = 0; qb < Tp / 32; ++qb)
          attend_block(blocks, op, qb, T, Dh, Tp, os + b * T * H * Dh + h * Dh, H * Dh, lses ? lses + i * T : nullptr);
      }
    });
  });
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("causal_attention: this build has no bfloat16 kernels (the CPU lacks AVX-512 BF16)");
#endif
}

ffi::Error CausalAttentionImpl(ffi::ThreadPool pool, ffi::AnyBuffer qkv, ffi::Result<ffi::AnyBuffer> out, bool tiles) {
  return causal_attention(pool, qkv, *out, nullptr, tiles);
}

ffi::Error CausalAttentionLseImpl(ffi::ThreadPool pool, ffi::AnyBuffer qkv, ffi::Result<ffi::AnyBuffer> out,
                                  ffi::Result<ffi::AnyBuffer> lse, bool tiles) {
  auto d = qkv.dimensions();
  if (lse->element_type() != ffi::DataType::F32 || d.size() != 5 || lse->element_count() != d[0] * d[1] * d[3])
    return ffi::Error::InvalidArgument("causal_attention_lse: lse [B, H, T] float32 for qkv [B, T, 3, H, Dh]");
  return causal_attention(pool, qkv, *out, reinterpret_cast<float*>(lse->untyped_data()), tiles);
}

// causal_attention's gradient for training: qkv [B, T, 3, H, Dh], its output and the output's
// cotangent [B, T, H, Dh] (bfloat16), and the forward's logsumexp [B, H, T] -> dqkv in qkv's layout
// (bfloat16), one head per task. XLA:CPU ran the blocks' score, softmax and gradient passes over
// float32 arrays in memory and its batched bfloat16 products slowly.
ffi::Error CausalAttentionBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer qkv, ffi::AnyBuffer out, ffi::AnyBuffer dout,
                                       ffi::AnyBuffer lse, ffi::Result<ffi::AnyBuffer> dqkv, bool tiles) {
  auto d = qkv.dimensions();
  if (qkv.element_type() != ffi::DataType::BF16 || out.element_type() != ffi::DataType::BF16 ||
      dout.element_type() != ffi::DataType::BF16 || lse.element_type() != ffi::DataType::F32 ||
      dqkv->element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("causal_attention_backward: qkv, out, dout and dqkv bfloat16, lse float32");
  if (d.size() != 5 || d[2] != 3 || d[4] % 32 != 0 || d[4] > 128 || out.element_count() != d[0] * d[1] * d[3] * d[4] ||
      dout.element_count() != out.element_count() || lse.element_count() != d[0] * d[1] * d[3])
    return ffi::Error::InvalidArgument(
        "causal_attention_backward: qkv [B, T, 3, H, Dh] (Dh a multiple of 32 up to 128), out and dout [B, T, H, Dh], lse [B, H, T]");
#if defined(__AVX512BF16__)
  const int64_t B = d[0], T = d[1], H = d[3], Dh = d[4], Tp = (T + 31) / 32 * 32;
  const auto* in = reinterpret_cast<const uint16_t*>(qkv.untyped_data());
  const auto* os = reinterpret_cast<const uint16_t*>(out.untyped_data());
  const auto* dos = reinterpret_cast<const uint16_t*>(dout.untyped_data());
  const auto* ls = reinterpret_cast<const float*>(lse.untyped_data());
  auto* grads = reinterpret_cast<uint16_t*>(dqkv->untyped_data());
  parallel_chunks(pool, B * H, 1, 1, [=](int64_t i0, int64_t i1) {
    with_blocks(tiles, [&](auto& blocks) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / H, h = i % H, head = b * T * 3 * H * Dh + h * Dh, head_out = b * T * H * Dh + h * Dh;
        const HeadGradOperands op(in + head, os + head_out, dos + head_out, ls + i * T, T, H, Dh, Tp);
        uint16_t* dq = grads + head;
        head_backward(blocks, op, T, Dh, Tp, dq, dq + H * Dh, dq + 2 * H * Dh, 3 * H * Dh);
      }
    });
  });
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("causal_attention_backward: this build has no bfloat16 kernels (the CPU lacks AVX-512 BF16)");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HeadLosses, HeadLossesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("n_vocab")
                                  .Attr<bool>("tiles"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(HeadLossesKept, HeadLossesKeptImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("n_vocab")
                                  .Attr<bool>("tiles"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttention, CausalAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("tiles"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttentionLse, CausalAttentionLseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("tiles"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttentionBackward, CausalAttentionBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("tiles"));
