// Binary / ternary popcount kernels, written once and compiled once per instruction set.
//
// kernels/native.py compiles this file several times with different -m flags and -DBQ_ISA_<NAME>
// (scalar, popcnt, avx2, avx512 on x86-64; scalar, neon on AArch64) and links the objects with
// dispatch.cpp, which picks one at run time from the CPU's features.  Everything here has internal
// linkage except the few bq_<isa>_* entry points, so no inline function compiled for one
// instruction set can be shared with (and crash) another.
//
// The computation (kernels/conv.py states the formulas):
//   binary   dot[p, o] = T*C - 2 * sum_t popc(x[p, t] ^ w[o, t])  - sum_{t padded at p} S[o, t]
//   ternary  dot[i, j] = popc(ma & mb) - 2 * popc(ma & mb & (sa ^ sb))        (summed over words)
// where T taps of C channels each are packed per tap, a padded tap reads an all-zero segment
// (bit 0 = +1), and S[o, t] = sum_c w[o, c, t] removes exactly what that +1 segment added, so the
// result is the zero-padded convolution.
//
// Register blocking: weights are pre-arranged in panels of 8 output channels, word-interleaved
// ([panel][k word][8]), so one vector load brings word k of 8 channels; each activation word is
// broadcast against it.  A microkernel keeps MR pixels x 8 channels of counters in registers over
// all taps and words.  The same layout serves any channel count, including one word per tap.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bitkernels.h"

#if defined(BQ_ISA_AVX2) || defined(BQ_ISA_AVX512)
#include <immintrin.h>
#endif
#if defined(BQ_ISA_NEON)
#include <arm_neon.h>
#endif

#define BQ_CAT2(a, b, c) a##b##c
#define BQ_CAT(a, b, c) BQ_CAT2(a, b, c)
#define BQ_EXPORT(name) BQ_CAT(bq_, BQ_ISA_NAME, _##name)

extern "C" void bq_parallel_for(int64_t tasks, void (*fn)(void*, int64_t), void* ctx);

namespace {

// Below this many word pairs (about 10-20 microseconds on one core) waking another thread costs
// more than it saves, and on two cores it would compete with torch's own threads: run inline.
constexpr int64_t INLINE_WORK = 1 << 17;

void run_tasks(int64_t tasks, int64_t work, void (*fn)(void*, int64_t), void* ctx) {
  if (work < INLINE_WORK) {
    for (int64_t t = 0; t < tasks; ++t) fn(ctx, t);
  } else {
    bq_parallel_for(tasks, fn, ctx);
  }
}

constexpr int NR = 8;  // output channels per panel

// ---------------------------------------------------------------------------------------------
// Per-ISA primitives over V = word k of 8 channels; Acc = popcount counters of 8 channels.
// acc_popc adds popc of each of V's 8 words; after FLUSH calls the counters must be flushed
// into 32-bit totals (byte counters hold at most 255).
// ---------------------------------------------------------------------------------------------
#if defined(BQ_ISA_AVX2)
struct Prim {
  static constexpr int MR = 4;
  static constexpr int FLUSH = 31;  // 31 * 8 = 248 < 256 per byte counter
  struct V { __m256i lo, hi; };
  struct Acc { __m256i lo, hi; };
  static inline V load(const uint64_t* p) {
    return {_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)(p + 4))};
  }
  static inline V bcast(uint64_t a) { __m256i v = _mm256_set1_epi64x((long long)a); return {v, v}; }
  static inline V vxor(V a, V b) { return {_mm256_xor_si256(a.lo, b.lo), _mm256_xor_si256(a.hi, b.hi)}; }
  static inline V vand(V a, V b) { return {_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi)}; }
  static inline __m256i byte_popc(__m256i v) {  // nibble lookup (Mula's vpshufb method)
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low));
    __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
    return _mm256_add_epi8(lo, hi);
  }
  static inline void zero(Acc& a) { a.lo = a.hi = _mm256_setzero_si256(); }
  static inline void acc_popc(Acc& a, V v) {
    a.lo = _mm256_add_epi8(a.lo, byte_popc(v.lo));
    a.hi = _mm256_add_epi8(a.hi, byte_popc(v.hi));
  }
  static inline void flush(Acc& a, uint32_t* tot) {
    const __m256i z = _mm256_setzero_si256();
    // sad: one u64 sum per 64-bit word (< 2^16); keep the low 32 bits of each, channels 0-7 in order.
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    __m256i lo = _mm256_permutevar8x32_epi32(_mm256_sad_epu8(a.lo, z), even);
    __m256i hi = _mm256_permutevar8x32_epi32(_mm256_sad_epu8(a.hi, z), even);
    __m256i sums = _mm256_blend_epi32(lo, hi, 0xF0);
    _mm256_storeu_si256((__m256i*)tot, _mm256_add_epi32(_mm256_loadu_si256((const __m256i*)tot), sums));
    zero(a);
  }};
#elif defined(BQ_ISA_AVX512)
struct Prim {
  static constexpr int MR = 8;
  static constexpr int FLUSH = 1 << 30;  // 64-bit counters
  typedef __m512i V;
  typedef __m512i Acc;
  static inline V load(const uint64_t* p) { return _mm512_loadu_si512((const void*)p); }
  static inline V bcast(uint64_t a) { return _mm512_set1_epi64((long long)a); }
  static inline V vxor(V a, V b) { return _mm512_xor_si512(a, b); }
  static inline V vand(V a, V b) { return _mm512_and_si512(a, b); }
  static inline void zero(Acc& a) { a = _mm512_setzero_si512(); }
  static inline void acc_popc(Acc& a, V v) { a = _mm512_add_epi64(a, _mm512_popcnt_epi64(v)); }
  static inline void flush(Acc& a, uint32_t* tot) {
    alignas(64) uint64_t s[8];
    _mm512_store_si512((void*)s, a);
    for (int j = 0; j < 8; ++j) tot[j] += (uint32_t)s[j];
    zero(a);
  }
};
#elif defined(BQ_ISA_NEON)
struct Prim {
  static constexpr int MR = 4;
  static constexpr int FLUSH = 31;
  struct V { uint64x2_t q[4]; };
  struct Acc { uint8x16_t c[4]; };
  static inline V load(const uint64_t* p) { return {{vld1q_u64(p), vld1q_u64(p + 2), vld1q_u64(p + 4), vld1q_u64(p + 6)}}; }
  static inline V bcast(uint64_t a) { uint64x2_t v = vdupq_n_u64(a); return {{v, v, v, v}}; }
  static inline V vxor(V a, V b) { V r; for (int k = 0; k < 4; ++k) r.q[k] = veorq_u64(a.q[k], b.q[k]); return r; }
  static inline V vand(V a, V b) { V r; for (int k = 0; k < 4; ++k) r.q[k] = vandq_u64(a.q[k], b.q[k]); return r; }
  static inline void zero(Acc& a) { for (int k = 0; k < 4; ++k) a.c[k] = vdupq_n_u8(0); }
  static inline void acc_popc(Acc& a, V v) {
    for (int k = 0; k < 4; ++k) a.c[k] = vaddq_u8(a.c[k], vcntq_u8(vreinterpretq_u8_u64(v.q[k])));
  }
  static inline void flush(Acc& a, uint32_t* tot) {
    for (int k = 0; k < 4; ++k) {
      uint64x2_t s = vpaddlq_u32(vpaddlq_u16(vpaddlq_u8(a.c[k])));
      tot[2 * k] += (uint32_t)vgetq_lane_u64(s, 0);
      tot[2 * k + 1] += (uint32_t)vgetq_lane_u64(s, 1);
    }
    zero(a);
  }
};
#else  // scalar (BQ_ISA_SCALAR: portable; BQ_ISA_POPCNT: the same code with the POPCNT instruction)
struct Prim {
  static constexpr int MR = 1;
  static constexpr int FLUSH = 1 << 30;
  struct V { uint64_t w[8]; };
  struct Acc { uint32_t c[8]; };
  static inline V load(const uint64_t* p) { V r; for (int j = 0; j < 8; ++j) r.w[j] = p[j]; return r; }
  static inline V bcast(uint64_t a) { V r; for (int j = 0; j < 8; ++j) r.w[j] = a; return r; }
  static inline V vxor(V a, V b) { V r; for (int j = 0; j < 8; ++j) r.w[j] = a.w[j] ^ b.w[j]; return r; }
  static inline V vand(V a, V b) { V r; for (int j = 0; j < 8; ++j) r.w[j] = a.w[j] & b.w[j]; return r; }
  static inline void zero(Acc& a) { for (int j = 0; j < 8; ++j) a.c[j] = 0; }
  static inline void acc_popc(Acc& a, V v) {
    for (int j = 0; j < 8; ++j) a.c[j] += (uint32_t)__builtin_popcountll(v.w[j]);
  }
  static inline void flush(Acc& a, uint32_t* tot) { for (int j = 0; j < 8; ++j) tot[j] += a.c[j]; zero(a); }
};
#endif

// ---------------------------------------------------------------------------------------------
// Microkernels
// ---------------------------------------------------------------------------------------------

// counts[i][j] = sum_w popc(rows[i][w] ^ panel[w][j]) for i < R, w < words: a branch-free inner
// loop over FLUSH words at a time, then the counters are flushed.
template <int R>
inline void binary_micro(const uint64_t* const* rows, int64_t words, const uint64_t* panel,
                         uint32_t (*counts)[NR]) {
  typename Prim::Acc acc[R];
  const uint64_t* row[R];
  for (int i = 0; i < R; ++i) {
    Prim::zero(acc[i]);
    row[i] = rows[i];
    for (int j = 0; j < NR; ++j) counts[i][j] = 0;
  }
  for (int64_t w0 = 0; w0 < words; w0 += Prim::FLUSH) {
    const int64_t w1 = words - w0 > Prim::FLUSH ? w0 + Prim::FLUSH : words;
    for (int64_t w = w0; w < w1; ++w) {
      typename Prim::V b = Prim::load(panel + w * NR);
      for (int i = 0; i < R; ++i) Prim::acc_popc(acc[i], Prim::vxor(Prim::bcast(row[i][w]), b));
    }
    for (int i = 0; i < R; ++i) Prim::flush(acc[i], counts[i]);
  }
}

// Ternary: both[i][j] = sum popc(ma & mb), neg[i][j] = sum popc(ma & mb & (sa ^ sb)).
template <int R>
inline void ternary_micro(const uint64_t* const* sa, const uint64_t* const* ma, int64_t words,
                          const uint64_t* sb, const uint64_t* mb, uint32_t (*both)[NR], uint32_t (*neg)[NR]) {
  typename Prim::Acc acc_both[R], acc_neg[R];
  for (int i = 0; i < R; ++i) {
    Prim::zero(acc_both[i]); Prim::zero(acc_neg[i]);
    for (int j = 0; j < NR; ++j) both[i][j] = neg[i][j] = 0;
  }
  int pending = 0;
  for (int64_t w = 0; w < words; ++w) {
    typename Prim::V s = Prim::load(sb + w * NR), m = Prim::load(mb + w * NR);
    for (int i = 0; i < R; ++i) {
      typename Prim::V nz = Prim::vand(Prim::bcast(ma[i][w]), m);
      Prim::acc_popc(acc_both[i], nz);
      Prim::acc_popc(acc_neg[i], Prim::vand(nz, Prim::vxor(Prim::bcast(sa[i][w]), s)));
    }
    if (++pending == Prim::FLUSH) {
      for (int i = 0; i < R; ++i) { Prim::flush(acc_both[i], both[i]); Prim::flush(acc_neg[i], neg[i]); }
      pending = 0;
    }
  }
  for (int i = 0; i < R; ++i) { Prim::flush(acc_both[i], both[i]); Prim::flush(acc_neg[i], neg[i]); }
}

// Calls micro<R> for R = Prim::MR, or a smaller R for the last rows of a block.
template <template <int> class Call, class... Args>
inline void with_rows(int r, Args&&... args) {
  switch (r) {
    case 8: Call<(Prim::MR >= 8 ? 8 : 1)>::run(args...); break;
    case 7: Call<(Prim::MR >= 7 ? 7 : 1)>::run(args...); break;
    case 6: Call<(Prim::MR >= 6 ? 6 : 1)>::run(args...); break;
    case 5: Call<(Prim::MR >= 5 ? 5 : 1)>::run(args...); break;
    case 4: Call<(Prim::MR >= 4 ? 4 : 1)>::run(args...); break;
    case 3: Call<(Prim::MR >= 3 ? 3 : 1)>::run(args...); break;
    case 2: Call<(Prim::MR >= 2 ? 2 : 1)>::run(args...); break;
    default: Call<1>::run(args...); break;
  }
}

template <int R>
struct BinaryMicro {
  static void run(const uint64_t* const* rows, int64_t words, const uint64_t* panel, uint32_t (*counts)[NR]) {
    binary_micro<R>(rows, words, panel, counts);
  }
};

template <int R>
struct TernaryMicro {
  static void run(const uint64_t* const* sa, const uint64_t* const* ma, int64_t words, const uint64_t* sb,
                  const uint64_t* mb, uint32_t (*both)[NR], uint32_t (*neg)[NR]) {
    ternary_micro<R>(sa, ma, words, sb, mb, both, neg);
  }
};

// ---------------------------------------------------------------------------------------------
// Binary convolution (and matmul) driver
// ---------------------------------------------------------------------------------------------
constexpr int64_t PIXEL_BLOCK = 32;     // pixels whose tap pointers are resolved together
constexpr int64_t ZERO_WORDS = 1 << 12;  // an all-zero (+1) segment for padded taps
alignas(64) const uint64_t kZeros[ZERO_WORDS] = {0};

struct ConvPlan {
  const BqConvArgs* a;
  int64_t taps, pixels, pixel_blocks, panels_per_group, panel_chunk, chunks_per_group;
};

// dot[i][j] = T C - 2 counts[i][j] - (the tap sums of pixel i's padded taps), then the output
// transform of the mode.  Only border pixels (any_pad) pay for the padding correction.
template <int Mode>
void write_rows(const ConvPlan& plan, int64_t g, int64_t panel, int64_t p_first, int rows,
                const uint32_t (*counts)[NR], const unsigned char* padded, const unsigned char* any_pad) {
  const BqConvArgs& a = *plan.a;
  const int64_t taps = plan.taps, og = a.out_per_group;
  const int64_t o0 = panel * NR, width = og - o0 < NR ? og - o0 : NR;
  const int64_t full = taps * a.cin_per_group;
  for (int i = 0; i < rows; ++i) {
    const int64_t p = p_first + i;
    int64_t correction[NR] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (a.tap_sums && any_pad[i]) {
      const unsigned char* pad = padded + (int64_t)i * taps;
      const int32_t* sums = a.tap_sums + g * taps * og + o0;
      for (int64_t t = 0; t < taps; ++t)
        if (pad[t])
          for (int64_t j = 0; j < width; ++j) correction[j] += sums[t * og + j];
    }
    const int64_t oc0 = g * og + o0;
    int32_t dot[NR];
    for (int j = 0; j < NR; ++j)  // a fixed trip count: vectorized
      dot[j] = (int32_t)full - 2 * (int32_t)counts[i][j] - (int32_t)correction[j];
    if (Mode == BQ_OUT_SIGN && width == NR && (oc0 & 7) == 0) {  // one whole byte of the packed output
      double y[NR];
      for (int j = 0; j < NR; ++j) y[j] = (double)dot[j] * a.mul_d[oc0 + j] + a.add_d[oc0 + j];
      unsigned bits = 0;
      for (int j = 0; j < NR; ++j) bits |= (unsigned)(y[j] < 0) << j;
      ((unsigned char*)((uint64_t*)a.out + p * a.out_stride))[oc0 >> 3] = (unsigned char)bits;  // little-endian
      continue;
    }
    if (Mode == BQ_OUT_FLOAT && width == NR) {
      float* dst = (float*)a.out + p * a.out_stride + oc0;
      const float* mul = a.mul_f + oc0;
      const float* add = a.add_f + oc0;
      // Two roundings, as torch's acc.float() * mul + add: built with -ffp-contract=off (no FMA);
      // then, as the float model does next, + residual (one more rounding) and the clamp.
      float v[NR];
      for (int j = 0; j < NR; ++j) v[j] = (float)dot[j] * mul[j] + add[j];
      if (a.residual) {
        const float* r = a.residual + p * a.residual_stride + oc0;
        for (int j = 0; j < NR; ++j) v[j] = v[j] + r[j];
      }
      if (a.clamp)
        for (int j = 0; j < NR; ++j) v[j] = v[j] < a.clamp_lo ? a.clamp_lo : (v[j] > a.clamp_hi ? a.clamp_hi : v[j]);
      for (int j = 0; j < NR; ++j) dst[j] = v[j];
      continue;
    }
    for (int64_t j = 0; j < width; ++j) {
      const int64_t oc = oc0 + j;
      if (Mode == BQ_OUT_INT32) {
        ((int32_t*)a.out)[p * a.out_stride + oc] = dot[j];
      } else if (Mode == BQ_OUT_FLOAT) {
        float v = (float)dot[j] * a.mul_f[oc] + a.add_f[oc];
        if (a.residual) v = v + a.residual[p * a.residual_stride + oc];
        if (a.clamp) v = v < a.clamp_lo ? a.clamp_lo : (v > a.clamp_hi ? a.clamp_hi : v);
        ((float*)a.out)[p * a.out_stride + oc] = v;
      } else {
        const double y = (double)dot[j] * a.mul_d[oc] + a.add_d[oc];
        // An atomic OR of the bit's byte: with groups > 1 a byte can hold channels of panels of
        // several groups, written by different threads (a plain |= of the word lost bits).
        if (y < 0)
          __atomic_fetch_or((unsigned char*)((uint64_t*)a.out + p * a.out_stride) + (oc >> 3),
                            (unsigned char)(1u << (oc & 7)), __ATOMIC_RELAXED);  // little-endian
      }
    }
  }
}

void write_outputs(const ConvPlan& plan, int64_t g, int64_t panel, int64_t p_first, int rows,
                   const uint32_t (*counts)[NR], const unsigned char* padded, const unsigned char* any_pad) {
  switch (plan.a->mode) {
    case BQ_OUT_INT32: write_rows<BQ_OUT_INT32>(plan, g, panel, p_first, rows, counts, padded, any_pad); break;
    case BQ_OUT_FLOAT: write_rows<BQ_OUT_FLOAT>(plan, g, panel, p_first, rows, counts, padded, any_pad); break;
    default: write_rows<BQ_OUT_SIGN>(plan, g, panel, p_first, rows, counts, padded, any_pad); break;
  }
}

// Per-thread scratch, grown on demand: one pixel block's gathered rows.
uint64_t* scratch_words(size_t count) {
  static thread_local uint64_t* buffer = nullptr;
  static thread_local size_t capacity = 0;
  if (count > capacity) {
    free(buffer);
    buffer = (uint64_t*)malloc(count * sizeof(uint64_t));
    capacity = count;
  }
  return buffer;
}

// One task: a block of PIXEL_BLOCK output pixels x a chunk of panels of one group.  The pixels'
// taps are first gathered into contiguous rows of taps * group_words words (a padded tap becomes
// zero words, i.e. +1), so the microkernel runs one tight loop over the whole row; a 1x1 kernel
// reads its rows in place.
void conv_task(void* ctx, int64_t task) {
  const ConvPlan& plan = *(const ConvPlan*)ctx;
  const BqConvArgs& a = *plan.a;
  const int64_t taps = plan.taps, gw = a.group_words, kwords = taps * gw;
  const int64_t per_block = plan.chunks_per_group * a.groups;
  const int64_t block = task / per_block;
  const int64_t rest = task % per_block;
  const int64_t g = rest / plan.chunks_per_group;
  const int64_t panel0 = (rest % plan.chunks_per_group) * plan.panel_chunk;
  const int64_t panel1 = panel0 + plan.panel_chunk < plan.panels_per_group ? panel0 + plan.panel_chunk
                                                                            : plan.panels_per_group;
  const int64_t p0 = block * PIXEL_BLOCK;
  const int64_t p1 = p0 + PIXEL_BLOCK < plan.pixels ? p0 + PIXEL_BLOCK : plan.pixels;
  const int64_t hw = a.ho * a.wo;

  const uint64_t* rows[PIXEL_BLOCK];
  unsigned char any_pad[PIXEL_BLOCK];
  const bool gather = taps > 1 || gw > ZERO_WORDS;
  uint64_t* cols = gather ? scratch_words((size_t)(PIXEL_BLOCK * kwords + PIXEL_BLOCK * taps)) : nullptr;
  unsigned char* padded = gather ? (unsigned char*)(cols + PIXEL_BLOCK * kwords) : nullptr;
  unsigned char one_tap[PIXEL_BLOCK];
  if (!gather) padded = one_tap;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n = p / hw, oy = (p % hw) / a.wo, ox = p % a.wo, i_row = p - p0;
    any_pad[i_row] = 0;
    uint64_t* dst = gather ? cols + i_row * kwords : nullptr;
    const int64_t iy0 = oy * a.sh - a.ph, ix0 = ox * a.sw - a.pw;
    if (gather && iy0 >= 0 && ix0 >= 0 && iy0 + (a.kh - 1) * a.dh < a.h && ix0 + (a.kw - 1) * a.dw < a.w) {
      const uint64_t* base = a.x + ((n * a.h + iy0) * a.w + ix0) * a.pixel_words + g * gw;  // interior pixel
      for (int64_t i = 0; i < a.kh; ++i)
        for (int64_t j = 0; j < a.kw; ++j) {
          const uint64_t* src = base + (i * a.dh * a.w + j * a.dw) * a.pixel_words;
          for (int64_t w = 0; w < gw; ++w) *dst++ = src[w];
        }
      for (int64_t t = 0; t < taps; ++t) padded[i_row * taps + t] = 0;
      rows[i_row] = cols + i_row * kwords;
      continue;
    }
    for (int64_t i = 0; i < a.kh; ++i) {
      for (int64_t j = 0; j < a.kw; ++j) {
        const int64_t t = i * a.kw + j, iy = oy * a.sh - a.ph + i * a.dh, ix = ox * a.sw - a.pw + j * a.dw;
        const bool inside = iy >= 0 && iy < a.h && ix >= 0 && ix < a.w;
        const uint64_t* src = inside ? a.x + ((n * a.h + iy) * a.w + ix) * a.pixel_words + g * gw : kZeros;
        if (gather) {
          for (int64_t w = 0; w < gw; ++w) dst[t * gw + w] = inside ? src[w] : 0;
        } else {
          rows[i_row] = src;
        }
        padded[i_row * taps + t] = !inside;
        any_pad[i_row] |= !inside;
      }
    }
    if (gather) rows[i_row] = dst;
  }
  const uint64_t* group_panels = a.panels + g * plan.panels_per_group * kwords * NR;
  uint32_t counts[Prim::MR][NR];
  for (int64_t panel = panel0; panel < panel1; ++panel) {
    const uint64_t* pn = group_panels + panel * kwords * NR;
    for (int64_t p = p0; p < p1; p += Prim::MR) {
      const int r = (int)(p1 - p < Prim::MR ? p1 - p : Prim::MR);
      with_rows<BinaryMicro>(r, (const uint64_t* const*)(rows + (p - p0)), kwords, pn, counts);
      write_outputs(plan, g, panel, p, r, counts, padded + (p - p0) * taps, any_pad + (p - p0));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Ternary matmul driver
// ---------------------------------------------------------------------------------------------
struct TernaryPlan {
  const uint64_t *sa, *ma, *sb, *mb;
  int64_t m, n, words, panels, panel_chunk, chunks;
  int32_t* out;
};

void ternary_task(void* ctx, int64_t task) {
  const TernaryPlan& t = *(const TernaryPlan*)ctx;
  const int64_t block = task / t.chunks, chunk = task % t.chunks;
  const int64_t r0 = block * PIXEL_BLOCK, r1 = r0 + PIXEL_BLOCK < t.m ? r0 + PIXEL_BLOCK : t.m;
  const int64_t q0 = chunk * t.panel_chunk, q1 = q0 + t.panel_chunk < t.panels ? q0 + t.panel_chunk : t.panels;
  uint32_t both[Prim::MR][NR], neg[Prim::MR][NR];
  const uint64_t* sa[Prim::MR];
  const uint64_t* ma[Prim::MR];
  for (int64_t q = q0; q < q1; ++q) {
    const uint64_t* sb = t.sb + q * t.words * NR;
    const uint64_t* mb = t.mb + q * t.words * NR;
    for (int64_t r = r0; r < r1; r += Prim::MR) {
      const int rows = (int)(r1 - r < Prim::MR ? r1 - r : Prim::MR);
      for (int i = 0; i < rows; ++i) { sa[i] = t.sa + (r + i) * t.words; ma[i] = t.ma + (r + i) * t.words; }
      with_rows<TernaryMicro>(rows, (const uint64_t* const*)sa, (const uint64_t* const*)ma, t.words, sb, mb,
                              both, neg);
      for (int i = 0; i < rows; ++i)
        for (int j = 0; j < NR && q * NR + j < t.n; ++j)
          t.out[(r + i) * t.n + q * NR + j] = (int32_t)both[i][j] - 2 * (int32_t)neg[i][j];
    }
  }
}

// Splits the panels of each row block into chunks so that there are enough tasks for the
// threads; with a bit-packed output a chunk covers whole 64-channel words (8 panels).
int64_t panel_chunk_for(int64_t row_blocks, int64_t panels, int64_t groups, bool whole_words) {
  const int64_t wanted_tasks = 16;
  int64_t chunks = (wanted_tasks + row_blocks * groups - 1) / (row_blocks * groups);
  if (chunks < 1) chunks = 1;
  if (chunks > panels) chunks = panels;
  int64_t chunk = (panels + chunks - 1) / chunks;
  if (whole_words) chunk = (chunk + 7) / 8 * 8;
  return chunk < 1 ? 1 : chunk;
}

}  // namespace

extern "C" {

void BQ_EXPORT(conv)(const BqConvArgs* a) {
  ConvPlan plan;
  plan.a = a;
  plan.taps = a->kh * a->kw;
  plan.pixels = a->n * a->ho * a->wo;
  plan.pixel_blocks = (plan.pixels + PIXEL_BLOCK - 1) / PIXEL_BLOCK;
  plan.panels_per_group = (a->out_per_group + NR - 1) / NR;
  plan.panel_chunk = panel_chunk_for(plan.pixel_blocks, plan.panels_per_group, a->groups, a->mode == BQ_OUT_SIGN);
  plan.chunks_per_group = (plan.panels_per_group + plan.panel_chunk - 1) / plan.panel_chunk;
  if (a->mode == BQ_OUT_SIGN)  // bits are OR-ed in: start from +1 everywhere
    for (int64_t p = 0; p < plan.pixels; ++p)
      memset((uint64_t*)a->out + p * a->out_stride, 0, sizeof(uint64_t) * ((a->groups * a->out_per_group + 63) / 64));
  const int64_t work = plan.pixels * a->groups * plan.panels_per_group * NR * plan.taps * a->group_words;
  run_tasks(plan.pixel_blocks * a->groups * plan.chunks_per_group, work, conv_task, &plan);
}

void BQ_EXPORT(ternary_gemm)(const uint64_t* sa, const uint64_t* ma, int64_t m, const uint64_t* sb_panels,
                             const uint64_t* mb_panels, int64_t n, int64_t words, int32_t* out) {
  TernaryPlan t{sa, ma, sb_panels, mb_panels, m, n, words, (n + NR - 1) / NR, 0, 0, out};
  const int64_t blocks = (m + PIXEL_BLOCK - 1) / PIXEL_BLOCK;
  t.panel_chunk = panel_chunk_for(blocks, t.panels, 1, false);
  t.chunks = (t.panels + t.panel_chunk - 1) / t.panel_chunk;
  run_tasks(blocks * t.chunks, 2 * m * t.panels * NR * words, ternary_task, &t);
}

// Packs rows of k floats: bit = x < 0 (so 0 and -0.0 are +1), pad bits 0.  Returns how many NaNs
// were seen (the caller refuses them: NaN has no sign).
int64_t BQ_EXPORT(pack_rows)(const float* x, int64_t rows, int64_t k, int64_t ld, uint64_t* out, int64_t out_ld) {
  int64_t nans = 0;
  const int64_t words = (k + 63) / 64;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * ld;
    uint64_t* dst = out + r * out_ld;
    for (int64_t w = 0; w < words; ++w) {
      const int64_t base = w * 64, n = k - base < 64 ? k - base : 64;
      uint64_t word = 0;
      int64_t e = 0;
#if defined(BQ_ISA_AVX2) || defined(BQ_ISA_AVX512)
      const __m256 zero = _mm256_setzero_ps();
      for (; e + 8 <= n; e += 8) {
        __m256 v = _mm256_loadu_ps(row + base + e);
        word |= (uint64_t)(unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ)) << e;
        nans += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      }
#endif
      for (; e < n; ++e) {
        const float v = row[base + e];
        word |= (uint64_t)(v < 0.0f) << e;
        nans += v != v;
      }
      dst[w] = word;
    }
  }
  return nans;
}

// NCHW floats -> packed [n*hw][groups*group_words] (channel c of group g at word g*gw + c/64).
int64_t BQ_EXPORT(pack_planes)(const float* x, int64_t n, int64_t c, int64_t hw, int64_t groups, uint64_t* out) {
  const int64_t cg = c / groups, gw = (cg + 63) / 64, pw = groups * gw;
  int64_t nans = 0;
  memset(out, 0, sizeof(uint64_t) * (size_t)(n * hw * pw));
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const float* plane = x + (b * c + ch) * hw;
      const int64_t word = (ch / cg) * gw + (ch % cg) / 64;
      const int bit = (int)((ch % cg) % 64);
      uint64_t* dst = out + b * hw * pw + word;
      for (int64_t p = 0; p < hw; ++p) {
        const float v = plane[p];
        dst[p * pw] |= (uint64_t)(v < 0.0f) << bit;
        nans += v != v;
      }
    }
  }
  return nans;
}

// Popcount peak of this instruction set: popc(a ^ b) over L1-resident words with the microkernel's
// own primitives and register blocking, no memory traffic.  Returns bit-MACs done (64 per pair).
int64_t BQ_EXPORT(peak_bitmacs)(int64_t reps) {
  alignas(64) uint64_t panel[64 * NR];
  alignas(64) uint64_t rows_data[Prim::MR][64];
  for (int i = 0; i < 64 * NR; ++i) panel[i] = 0x9E3779B97F4A7C15ull * (uint64_t)(i + 1);
  for (int i = 0; i < Prim::MR; ++i)
    for (int w = 0; w < 64; ++w) rows_data[i][w] = 0xD1B54A32D192ED03ull * (uint64_t)(i * 64 + w + 7);
  const uint64_t* rows[Prim::MR];
  for (int i = 0; i < Prim::MR; ++i) rows[i] = rows_data[i];
  uint32_t counts[Prim::MR][NR];
  volatile uint32_t sink = 0;
  for (int64_t r = 0; r < reps; ++r) {
    __asm__ volatile("" ::: "memory");  // the inputs may have changed: no hoisting out of the loop
    binary_micro<Prim::MR>(rows, 64, panel, counts);
    uint32_t sum = 0;
    for (int i = 0; i < Prim::MR; ++i)
      for (int j = 0; j < NR; ++j) sum += counts[i][j];
    sink = sink + sum;
  }
  return reps * Prim::MR * NR * 64 * 64;
}

}  // extern "C"
