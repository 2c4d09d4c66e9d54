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
extern "C" int bq_thread_count();

namespace {

// Below this many word pairs (a few microseconds on one core) waking another thread costs more
// than it saves: run inline.  Measured on a Zen 4 (2 cores, torch's OpenMP team, AVX2 and AVX-512
// builds), 3x3 sign-output convs at batch 1 inline against on both threads: even at 9-14 K word
// pairs, threads ahead from 37 K (16.5 against 14.5 us with AVX2; 70 K: 28 against 17 us).  It was
// 1 << 17 when the kernels ran on their own pool, whose wake-up cost more.
constexpr int64_t INLINE_WORK = 1 << 14;

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
  static inline void flush(Acc& a, uint32_t* tot) {  // the low 32 bits of each count (vpmovqd), added in one vector
    const __m256i sums = _mm512_cvtepi64_epi32(a);
    _mm256_storeu_si256((__m256i*)tot, _mm256_add_epi32(_mm256_loadu_si256((const __m256i*)tot), sums));
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

// Hardtanh's clamp, NaN kept: two selects, each exactly the max / min instruction's pattern, so a
// loop of them compiles branch-free.  (The nested `v < lo ? lo : (v > hi ? hi : v)` compiled to
// branches, which mispredict on real activations: three times the conv's own time on ResNet-18's
// first stage at batch 64.)
inline float clamp_keep_nan(float v, float lo, float hi) {
  v = lo > v ? lo : v;
  return hi < v ? hi : v;
}

// The packed output byte of 8 channels: bit j = (dot[j] * mul[j] + add[j] < 0) in float64 (little-endian).
inline unsigned char sign_byte(const int32_t* dot, const double* mul, const double* add) {
  double y[NR];
  for (int j = 0; j < NR; ++j) y[j] = (double)dot[j] * mul[j] + add[j];
  unsigned bits = 0;
  for (int j = 0; j < NR; ++j) bits |= (unsigned)(y[j] < 0) << j;
  return (unsigned char)bits;
}

// dot[i][j] = T C - 2 counts[i][j] - (the tap sums of pixel i's padded taps), then the output
// transform of the mode.  Only border pixels (any_pad) pay for the padding correction.
template <int Mode>
void write_rows(const ConvPlan& plan, int64_t g, int64_t panel, int64_t p_first, int rows,
                const uint32_t (*counts)[NR], const unsigned char* padded, const unsigned char* any_pad) {
  const BqConvArgs& a = *plan.a;
  const int64_t taps = plan.taps, og = a.out_per_group;
  const int64_t o0 = panel * NR, width = og - o0 < NR ? og - o0 : NR;
  const int64_t full = taps * a.cin_per_group;
  // Read once: the byte stores of the sign output may alias anything, which would make the
  // compiler reload these through `a` for every pixel.
  const double* const mul_d = Mode == BQ_OUT_SIGN ? a.mul_d + g * og + o0 : nullptr;
  const double* const add_d = Mode == BQ_OUT_SIGN ? a.add_d + g * og + o0 : nullptr;
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
      ((unsigned char*)((uint64_t*)a.out + p * a.out_stride))[oc0 >> 3] = sign_byte(dot, mul_d, add_d);
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
      if (a.clamp) {
        const float lo = a.clamp_lo, hi = a.clamp_hi;
        for (int j = 0; j < NR; ++j) v[j] = clamp_keep_nan(v[j], lo, hi);
      }
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
        if (a.clamp) v = clamp_keep_nan(v, a.clamp_lo, a.clamp_hi);
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

// ---------------------------------------------------------------------------------------------
// Ternary weights x int8 activations (BitNet b1.58 linears): acc[i, j] = sum_k x[i, k] t[j, k]
// ---------------------------------------------------------------------------------------------
// Weights: 2-bit codes q = t + 1 in {0, 1, 2}, row-major [n][kp / 4] bytes, kp = K rounded up to
// 128 (pad codes 1, i.e. t = 0).  In block b (128 weights, 32 bytes) byte j holds, in bits 2i..2i+1,
// the weight at k = 128 b + 32 i + j, so (block >> 2i) & 3 on a 32-byte vector yields 32
// consecutive codes (llama.cpp's TQ2_0 arrangement).  Activations: int8 codes [m][kp], pads 0.
//   acc = sum_k q_k x_k - sum_k x_k
// The unsigned code times the signed activation is exactly what maddubs multiplies (u8 x s8); a
// pair sum is at most 2 * 2 * 128 = 512 in magnitude, so it never saturates (x = -128 is exact,
// unlike the abs/sign form), and 16 blocks (64 maddubs) of int16 partial sums stay within
// [-32768, 32512] before they are widened to int32.
constexpr int64_t I8_BLOCK = 128;
// Below this many weight blocks x rows (about 20 microseconds on one core here) the kernel runs on
// the calling thread: waking the pool costs more than it saves at batch 1 of a small layer.
constexpr int64_t I8_INLINE_WORK = 1 << 13;

#if defined(BQ_ISA_AVX2) || defined(BQ_ISA_AVX512)
// R activation rows x C weight rows; counts[r][c] = sum_k q[c][k] x[r][k] over `blocks` blocks.
template <int R, int C>
inline void i8_micro(const int8_t* const* x, const uint8_t* const* w, int64_t blocks, int32_t (*counts)[4]) {
  const __m256i three = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  __m256i total[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) total[r][c] = _mm256_setzero_si256();
  for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
    const int64_t b1 = blocks - b0 > 16 ? b0 + 16 : blocks;
    __m256i part[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) part[r][c] = _mm256_setzero_si256();
    for (int64_t b = b0; b < b1; ++b) {
      __m256i v[C];
      for (int c = 0; c < C; ++c) v[c] = _mm256_loadu_si256((const __m256i*)(w[c] + b * 32));
      for (int i = 0; i < 4; ++i) {
        __m256i xv[R];
        for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_si256((const __m256i*)(x[r] + b * I8_BLOCK + 32 * i));
        for (int c = 0; c < C; ++c) {
          const __m256i q = _mm256_and_si256(i ? _mm256_srli_epi16(v[c], 2 * i) : v[c], three);
          for (int r = 0; r < R; ++r) part[r][c] = _mm256_add_epi16(part[r][c], _mm256_maddubs_epi16(q, xv[r]));
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) total[r][c] = _mm256_add_epi32(total[r][c], _mm256_madd_epi16(part[r][c], ones));
  }
  // Horizontal sums, four accumulators at a time (at K = 256 a row is only two blocks: one sum per
  // register would cost as much as the products).
  const __m256i* flat = &total[0][0];
  int32_t sums[R * C + 3];
  int e = 0;
  for (; e + 4 <= R * C; e += 4) {
    const __m256i t = _mm256_hadd_epi32(_mm256_hadd_epi32(flat[e], flat[e + 1]), _mm256_hadd_epi32(flat[e + 2], flat[e + 3]));
    _mm_storeu_si128((__m128i*)(sums + e), _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1)));
  }
  for (; e < R * C; ++e) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(flat[e]), _mm256_extracti128_si256(flat[e], 1));
    s = _mm_hadd_epi32(s, s);
    s = _mm_hadd_epi32(s, s);
    sums[e] = _mm_cvtsi128_si32(s);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) counts[r][c] = sums[r * C + c];
}
constexpr int I8_MR = 4;  // activation rows per microkernel call
#else
template <int R, int C>
inline void i8_micro(const int8_t* const* x, const uint8_t* const* w, int64_t blocks, int32_t (*counts)[4]) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      int32_t sum = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* wb = w[c] + b * 32;
        const int8_t* xb = x[r] + b * I8_BLOCK;
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 32; ++j) sum += (int32_t)((wb[j] >> (2 * i)) & 3) * (int32_t)xb[32 * i + j];
      }
      counts[r][c] = sum;
    }
}
constexpr int I8_MR = 1;
#endif

template <int R>
struct I8Rows {
  // C weight rows at once: 4 for one activation row (GEMV: the activation vector is reused 4 times),
  // 2 for several (the decoded codes are reused R times; 4 x 2 partial sums fit the 16 registers).
  static constexpr int C = R == 1 ? 4 : 2;
  static void run(const int8_t* const* x, const uint8_t* const* w, int64_t blocks, int cols, int32_t (*counts)[4]) {
    if (cols == C) {
      i8_micro<R, C>(x, w, blocks, counts);
    } else {
      for (int c = 0; c < cols; ++c) {
        int32_t one[R][4];
        i8_micro<R, 1>(x, w + c, blocks, one);
        for (int r = 0; r < R; ++r) counts[r][c] = one[r][0];
      }
    }
  }
};

struct I8Plan {
  const int8_t* x;      // [m][kp] codes, pads 0
  const int32_t* xsum;  // [m] sum of each row's codes
  const uint8_t* w;     // [n][kp / 4] weight codes
  int64_t m, n, kp, rows_per_task, row_tasks, m_block;
  int32_t* out_i;       // int32 [m][n], or
  float* out_f;         // float32 [m][n]: (float)acc * mul[i] (+ bias[j]), two roundings, no FMA
  const float* mul;
  const float* bias;
};

void i8_task(void* ctx, int64_t task) {
  const I8Plan& p = *(const I8Plan*)ctx;
  const int64_t mb = task / p.row_tasks, nt = task % p.row_tasks;
  const int64_t i0 = mb * p.m_block, i1 = i0 + p.m_block < p.m ? i0 + p.m_block : p.m;
  const int64_t j0 = nt * p.rows_per_task, j1 = j0 + p.rows_per_task < p.n ? j0 + p.rows_per_task : p.n;
  const int64_t blocks = p.kp / I8_BLOCK, wbytes = p.kp / 4;
  for (int64_t i = i0; i < i1; i += I8_MR) {
    const int rows = (int)(i1 - i < I8_MR ? i1 - i : I8_MR);
    const int8_t* xr[I8_MR];
    for (int r = 0; r < rows; ++r) xr[r] = p.x + (i + r) * p.kp;
    const int step = rows == 1 ? 4 : 2;
    for (int64_t j = j0; j < j1; j += step) {
      const int cols = (int)(j1 - j < step ? j1 - j : step);
      const uint8_t* wr[4];
      for (int c = 0; c < cols; ++c) wr[c] = p.w + (j + c) * wbytes;
      int32_t counts[I8_MR][4];
      switch (rows) {
        case 4: I8Rows<(I8_MR >= 4 ? 4 : 1)>::run(xr, wr, blocks, cols, counts); break;
        case 3: I8Rows<(I8_MR >= 3 ? 3 : 1)>::run(xr, wr, blocks, cols, counts); break;
        case 2: I8Rows<(I8_MR >= 2 ? 2 : 1)>::run(xr, wr, blocks, cols, counts); break;
        default: I8Rows<1>::run(xr, wr, blocks, cols, counts); break;
      }
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
          const int32_t acc = counts[r][c] - p.xsum[i + r];
          const int64_t at = (i + r) * p.n + j + c;
          if (p.out_i) {
            p.out_i[at] = acc;
          } else {
            float y = (float)acc * p.mul[i + r];
            if (p.bias) y = y + p.bias[j + c];
            p.out_f[at] = y;
          }
        }
    }
  }
}

void i8_run(I8Plan& p) {
  const int64_t blocks = p.kp / I8_BLOCK;
  p.m_block = 32;
  const int64_t m_blocks = (p.m + p.m_block - 1) / p.m_block;
  // About 16 tasks in all, each a multiple of 4 weight rows.
  int64_t chunks = (16 + m_blocks - 1) / m_blocks;
  int64_t per = (p.n + chunks - 1) / chunks;
  per = (per + 3) / 4 * 4;
  p.rows_per_task = per < 4 ? 4 : per;
  p.row_tasks = (p.n + p.rows_per_task - 1) / p.rows_per_task;
  const int64_t work = p.m * p.n * blocks / (p.m > 1 ? 2 : 1);  // several rows share the weight decode
  if (work < I8_INLINE_WORK) {
    for (int64_t t = 0; t < m_blocks * p.row_tasks; ++t) i8_task(&p, t);
  } else {
    bq_parallel_for(m_blocks * p.row_tasks, i8_task, &p);
  }
}

// Per-thread scratch of bytes, grown on demand (the caller's thread only).
unsigned char* scratch_bytes(size_t count) {
  static thread_local unsigned char* buffer = nullptr;
  static thread_local size_t capacity = 0;
  if (count > capacity) {
    free(buffer);
    buffer = (unsigned char*)malloc(count);
    capacity = count;
  }
  return buffer;
}

// Per-token absmax quantization of one row (BitNet b1.58's activation_quant), every rounding as
// layers/bitnet.py's rms_norm and absmax_codes do it (their docstrings say why), so the codes and
// the step are the training layer's bit for bit:
//   (optional, rms_eps >= 0)  ms = (float)(sum_e (double)(float)(x_e * x_e) / k)   [float squares, double sum]
//                             r = (float)sqrt((double)(ms + eps))   [float add; correctly rounded root]
//                             n = x / r                              [float division]
//   step = max(max|n|, 1e-5) / 127;   q = clamp(round_half_even(n / step), -128, 127)
// Writes kp codes (pads 0) and returns the row's code sum; *step_out = step (n ~ q * step).  Counts
// NaN/inf.  The float64 sum is in another order than torch's; both round to the same float except
// within ~1e-16 (relative) of a float rounding boundary.
int32_t quantize_row(const float* x, int64_t k, int64_t kp, float rms_eps, int8_t* q, float* step_out,
                     int64_t* bad, float* normed) {
  const float* src = x;
  if (rms_eps >= 0.0f) {
    double squares = 0.0;
    int64_t e = 0;
#if defined(BQ_ISA_AVX2) || defined(BQ_ISA_AVX512)
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    for (; e + 8 <= k; e += 8) {
      const __m256 v = _mm256_loadu_ps(x + e);
      const __m256 sq = _mm256_mul_ps(v, v);  // the float square, then widened exactly
      s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(sq)));
      s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(sq, 1)));
    }
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, _mm256_add_pd(s0, s1));
    squares = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
    for (; e < k; ++e) {
      const float sq = x[e] * x[e];
      squares += (double)sq;
    }
    const float ms = (float)(squares / (double)k);
    const float denominator = ms + rms_eps;
    const float root = (float)__builtin_sqrt((double)denominator);
    e = 0;
#if defined(BQ_ISA_AVX2) || defined(BQ_ISA_AVX512)
    const __m256 vr = _mm256_set1_ps(root);
    for (; e + 8 <= k; e += 8) _mm256_storeu_ps(normed + e, _mm256_div_ps(_mm256_loadu_ps(x + e), vr));
#endif
    for (; e < k; ++e) normed[e] = x[e] / root;
    src = normed;
  }
  float amax = 0.0f;
  int64_t nonfinite = 0;
  int64_t e = 0;
#if defined(BQ_ISA_AVX2) || defined(BQ_ISA_AVX512)
  const __m256 sign = _mm256_set1_ps(-0.0f), inf = _mm256_set1_ps(__builtin_inff());
  __m256 vmax = _mm256_setzero_ps();
  for (; e + 8 <= k; e += 8) {
    const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(src + e));
    nonfinite += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(a, inf, _CMP_NLT_UQ)));
    vmax = _mm256_max_ps(vmax, a);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  for (int l = 0; l < 8; ++l) amax = lanes[l] > amax ? lanes[l] : amax;
#endif
  for (; e < k; ++e) {
    const float a = __builtin_fabsf(src[e]);
    nonfinite += !(a < __builtin_inff());
    amax = a > amax ? a : amax;
  }
  *bad += nonfinite;
  const float step = (amax > 1e-5f ? amax : 1e-5f) / 127.0f;
  *step_out = step;
  int32_t sum = 0;
  e = 0;
#if defined(BQ_ISA_AVX2) || defined(BQ_ISA_AVX512)
  const __m256 vs = _mm256_set1_ps(step), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  __m256i vsum = _mm256_setzero_si256();
  for (; e + 8 <= k; e += 8) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(src + e), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    const __m256i iv = _mm256_cvtps_epi32(v);
    vsum = _mm256_add_epi32(vsum, iv);
    alignas(32) int32_t tmp[8];
    _mm256_store_si256((__m256i*)tmp, iv);
    for (int l = 0; l < 8; ++l) q[e + l] = (int8_t)tmp[l];
  }
  alignas(32) int32_t parts[8];
  _mm256_store_si256((__m256i*)parts, vsum);
  for (int l = 0; l < 8; ++l) sum += parts[l];
#endif
  for (; e < k; ++e) {
    // Round half to even by the 1.5 * 2^23 trick (|v| <= 127.00002 here, far below 2^22; no libm).
    float v = src[e] / step;
    v = (v + 12582912.0f) - 12582912.0f;
    v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
    q[e] = (int8_t)(int32_t)v;
    sum += (int32_t)q[e];
  }
  for (; e < kp; ++e) q[e] = 0;
  return sum;
}

// bq_float_conv_sign: one task per output row (image b, row oy); NaN outputs are counted.  The
// accumulators of one pixel's 64-channel block live in NV native-width vectors (GCC vector
// extensions, VB bytes: the instruction set's register).
#if defined(BQ_ISA_AVX512)
constexpr int VB = 64;
#elif defined(BQ_ISA_AVX2)
constexpr int VB = 32;
#else
constexpr int VB = 16;
#endif
constexpr int FL = VB / 4, DL = VB / 8;  // floats, doubles per vector
constexpr int ACC_REGS = VB == 64 ? 24 : 8;  // accumulator vectors that fit in the register file (32 / 16)
// Unaligned, and allowed to alias the floats / doubles they are loaded from (loads through a
// pointer cast, not memcpy: GCC splits a memcpy into halves, stalling store forwarding).
typedef float FV __attribute__((vector_size(VB), aligned(4), may_alias));
typedef float FH __attribute__((vector_size(VB / 2), aligned(4), may_alias));
typedef double DV __attribute__((vector_size(VB), aligned(8), may_alias));

struct FloatConvSignPlan {
  const BqFloatConvSignArgs* a;
  int64_t blocks, taps_c;  // 64-channel blocks, c * kh * kw
  int64_t nans;            // summed with an atomic add
};

// Bit i of the result = (z[i] < 0) for the DL doubles of z.
inline unsigned negative_bits(DV z) {
#if defined(BQ_ISA_AVX512)
  return (unsigned)_mm512_cmp_pd_mask((__m512d)z, _mm512_setzero_pd(), _CMP_LT_OQ);
#elif defined(BQ_ISA_AVX2)
  return (unsigned)_mm256_movemask_pd(_mm256_cmp_pd((__m256d)z, _mm256_setzero_pd(), _CMP_LT_OQ));
#else
  unsigned bits = 0;
  for (int i = 0; i < DL; ++i) bits |= (unsigned)(z[i] < 0.0) << i;
  return bits;
#endif
}

// The accumulators of P pixels in a row (P independent add chains, so the adds' latency overlaps).
// Inside the image each tap reads x through `offsets` (relative to a window's corner `base`, tap
// order (c, i, j); the next pixel's corner is `step` floats on); a pixel at the border (P = 1,
// offsets = NULL) checks every tap.
template <int NV, int P>
void accumulate(const BqFloatConvSignArgs& a, const float* wb, const float* base, int64_t step,
                const int64_t* offsets, int64_t b, int64_t oy, int64_t ox, FV (*acc)[NV]) {
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) acc[p][v] = FV{};
  if (offsets) {
    const int64_t taps = a.c * a.kh * a.kw;
    for (int64_t t = 0; t < taps; ++t) {
      const float* xt = base + offsets[t];
      for (int v = 0; v < NV; ++v) {
        const FV w = *(const FV*)(wb + t * 64 + FL * v);
        for (int p = 0; p < P; ++p) acc[p][v] += xt[p * step] * w;
      }
    }
    return;
  }
  for (int64_t ch = 0; ch < a.c; ++ch)
    for (int64_t i = 0; i < a.kh; ++i) {
      const int64_t iy = oy * a.sh - a.ph + i * a.dh;
      if (iy < 0 || iy >= a.h) continue;
      const float* row = a.x + b * a.stride_n + ch * a.stride_c + iy * a.stride_h;
      const float* wt = wb + (ch * a.kh + i) * a.kw * 64;
      for (int64_t j = 0; j < a.kw; ++j, wt += 64) {
        const int64_t ix = ox * a.sw - a.pw + j * a.dw;
        if (ix < 0 || ix >= a.w) continue;
        const float x = row[ix * a.stride_w];
        for (int v = 0; v < NV; ++v) acc[0][v] += x * *(const FV*)(wt + FL * v);
      }
    }
}

// P pixels' words of output channels [first, first + count): accumulate, + bias, then the signs
// of y * mul + add in float64, DL channels at a time.  dst[p * dst_step] gets pixel p's word.
template <int NV, int P>
int64_t float_conv_sign_block(const BqFloatConvSignArgs& a, const float* wb, const float* base, int64_t step,
                              const int64_t* offsets, int64_t b, int64_t oy, int64_t ox, int64_t first,
                              int64_t count, uint64_t* dst, int64_t dst_step) {
  FV acc[P][NV];
  accumulate<NV, P>(a, wb, base, step, offsets, b, oy, ox, acc);
  int64_t nans = 0;
  for (int p = 0; p < P; ++p) {
    float y[FL * NV];
    for (int v = 0; v < NV; ++v) *(FV*)(y + FL * v) = acc[p][v];
    if (a.bias)
      for (int64_t k = 0; k < count; ++k) y[k] += a.bias[first + k];
    for (int64_t k = 0; k < count; ++k) nans += y[k] != y[k];
    uint64_t word = 0;
    for (int q = 0; q < 2 * NV; ++q) {
      DV z = __builtin_convertvector(*(const FH*)(y + DL * q), DV) * *(const DV*)(a.mul + first + DL * q);
      z = z + *(const DV*)(a.add + first + DL * q);
      word |= (uint64_t)negative_bits(z) << (DL * q);
    }
    dst[p * dst_step] = count < 64 ? word & ((uint64_t(1) << count) - 1) : word;
  }
  return nans;
}

// float_conv_sign_block<NV, P> for the fewest vectors that hold count channels (the weights, mul
// and add are zero past o, so whole vectors compute nothing wrong).
template <int NV, int P>
int64_t float_conv_sign_any(const BqFloatConvSignArgs& a, const float* wb, const float* base, int64_t step,
                            const int64_t* offsets, int64_t b, int64_t oy, int64_t ox, int64_t first, int64_t count,
                            uint64_t* dst, int64_t dst_step) {
  if constexpr (NV < 64 / FL) {
    if (count > NV * FL)
      return float_conv_sign_any<NV + 1, P>(a, wb, base, step, offsets, b, oy, ox, first, count, dst, dst_step);
  }
  // at most ACC_REGS accumulators, so they stay in registers: fewer pixels per pass when NV is large
  constexpr int PASS = NV * P <= ACC_REGS ? P : (ACC_REGS / NV > 0 ? ACC_REGS / NV : 1);
  static_assert(P % PASS == 0 || PASS == 1, "pixels per pass must divide P");
  int64_t nans = 0;
  for (int p = 0; p < P; p += PASS)
    nans += float_conv_sign_block<NV, PASS>(a, wb, base + p * step, step, offsets, b, oy, ox + p, first, count,
                                            dst + p * dst_step, dst_step);
  return nans;
}

void float_conv_sign_task(void* ctx, int64_t task) {
  FloatConvSignPlan* plan = (FloatConvSignPlan*)ctx;
  const BqFloatConvSignArgs& a = *plan->a;
  const int64_t b = task / a.ho, oy = task % a.ho;
  constexpr int64_t MAX_TAPS = 256;
  int64_t offsets[MAX_TAPS];
  const int64_t y0 = oy * a.sh - a.ph;
  const bool rows_inside = y0 >= 0 && y0 + (a.kh - 1) * a.dh < a.h && plan->taps_c <= MAX_TAPS;
  if (rows_inside)
    for (int64_t ch = 0, t = 0; ch < a.c; ++ch)
      for (int64_t i = 0; i < a.kh; ++i)
        for (int64_t j = 0; j < a.kw; ++j, ++t)
          offsets[t] = ch * a.stride_c + i * a.dh * a.stride_h + j * a.dw * a.stride_w;
  constexpr int P = 4;  // pixels per call inside the image
  const int64_t step = a.sw * a.stride_w;
  int64_t nans = 0;
  for (int64_t ox = 0; ox < a.wo;) {
    const int64_t x0 = ox * a.sw - a.pw;
    const bool inside = rows_inside && x0 >= 0 && (ox + P - 1) * a.sw - a.pw + (a.kw - 1) * a.dw < a.w;
    const float* base = a.x + b * a.stride_n + y0 * a.stride_h + x0 * a.stride_w;
    uint64_t* dst = a.out + ((b * a.ho + oy) * a.wo + ox) * plan->blocks;
    for (int64_t blk = 0; blk < plan->blocks; ++blk) {
      const int64_t first = blk * 64, count = a.o - first < 64 ? a.o - first : 64;
      const float* wb = a.weight + blk * plan->taps_c * 64;
      if (inside && ox + P <= a.wo)
        nans += float_conv_sign_any<1, P>(a, wb, base, step, offsets, b, oy, ox, first, count, dst + blk,
                                          plan->blocks);
      else
        nans += float_conv_sign_any<1, 1>(a, wb, base, step, nullptr, b, oy, ox, first, count, dst + blk, 0);
    }
    ox += inside && ox + P <= a.wo ? P : 1;
  }
  if (nans) __atomic_fetch_add(&plan->nans, nans, __ATOMIC_RELAXED);
}

// ---------------------------------------------------------------------------------------------
// Ternary weights x int8 activations by table lookup (T-MAC / bitnet.cpp TL2 style), exact.
// ---------------------------------------------------------------------------------------------
// Weights in groups of three: index c = q0 + 3 q1 + 9 q2 (q = t + 1, so c in 0..26, 5 bits); three
// groups (9 weights) of one output row share a 16-bit word c0 | c1 << 5 | c2 << 10 (1.78 bits a
// weight), in panels of 32 rows: [ceil(n / 32)][ceil(k / 9)][32] words, one 64-byte line per panel
// and 9 weights (bq_ternary_i8_lut_prepack; pad rows and pad weights are t = 0, c = 13).  For each
// activation row and group j the caller builds a table of the 27 sums
//   T_j[c] = t0(c) x[3j] + t1(c) x[3j+1] + t2(c) x[3j+2]        (|T| <= 384, int16)
// and the product is acc[i, r] = sum_j T_j[c[r, j]]: one lookup replaces three multiply-adds.
//   avx512: the table is 32 int16 words (27 used) in one register, and vpermw (AVX512BW) looks up
//           32 rows at once; it reads only bits 0-4 of each index word, so a line w gives group 0's
//           indices as is and groups 1 and 2's as w >> 5, w >> 10 (done as mulhi by 2^11, 2^6, on
//           the multiply pipes: the shuffle pipe is the bound).  Per 32 rows x 9 weights: one load,
//           two mulhi, three vpermw, three int16 adds.
//   avx2:   vpshufb looks up 16 bytes: the int16 table is split into low and high bytes, each in
//           two 16-entry halves (entries 0-15, 16-26) chosen by bit 4 of the index; the indices are
//           masked out of the words and packed to bytes, the looked-up bytes interleaved back into
//           int16 (packus then unpacklo/hi: the two lane permutations cancel).
//   other:  a plain lookup loop.
// The int16 sums hold LUT_FLUSH lines (28 * 9 * 128 = 32256 < 32768) before they are widened.
// A table is 64 bytes per (activation row, group): int16[32] (avx512, scalar), or the avx2 byte
// tables [low 0-15][low 16-31][high 0-15][high 16-31]; groups past k (to a whole line) are zero.
constexpr int LUT_ROWS = 32;      // weight rows per panel (one 16-bit word each per line)
constexpr int64_t LUT_FLUSH = 28;  // lines (3 groups each) per int16 partial sum
constexpr int LUT_TABLE = 64;     // bytes per table

// t0, t1, t2 of index c (0 past 26): the digits of c in base 3, minus 1.
struct LutDigits {
  alignas(64) int16_t d[3][32];
  LutDigits() {
    for (int c = 0; c < 32; ++c)
      for (int i = 0, v = c; i < 3; ++i, v /= 3) d[i][c] = c < 27 ? (int16_t)(v % 3 - 1) : 0;
  }
};
const LutDigits kLutDigits;

// The tables of one activation row: groups [0, groups), x past k read as 0.
void lut_build_row(const int8_t* x, int64_t k, int64_t groups, unsigned char* dst) {
  for (int64_t j = 0; j < groups; ++j, dst += LUT_TABLE) {
    int16_t v[3];
    for (int i = 0; i < 3; ++i) v[i] = 3 * j + i < k ? x[3 * j + i] : 0;
#if defined(BQ_ISA_AVX512)
    const __m512i* d = (const __m512i*)kLutDigits.d;
    __m512i t = _mm512_mullo_epi16(_mm512_load_si512(d), _mm512_set1_epi16(v[0]));
    t = _mm512_add_epi16(t, _mm512_mullo_epi16(_mm512_load_si512(d + 1), _mm512_set1_epi16(v[1])));
    t = _mm512_add_epi16(t, _mm512_mullo_epi16(_mm512_load_si512(d + 2), _mm512_set1_epi16(v[2])));
    _mm512_storeu_si512((void*)dst, t);
#elif defined(BQ_ISA_AVX2)
    __m256i t[2];
    for (int h = 0; h < 2; ++h) {
      const int16_t* d = &kLutDigits.d[0][16 * h];
      t[h] = _mm256_mullo_epi16(_mm256_load_si256((const __m256i*)d), _mm256_set1_epi16(v[0]));
      t[h] = _mm256_add_epi16(t[h], _mm256_mullo_epi16(_mm256_load_si256((const __m256i*)(d + 32)),
                                                       _mm256_set1_epi16(v[1])));
      t[h] = _mm256_add_epi16(t[h], _mm256_mullo_epi16(_mm256_load_si256((const __m256i*)(d + 64)),
                                                       _mm256_set1_epi16(v[2])));
    }
    const __m256i low = _mm256_set1_epi16(0xff);
    // packus per 128-bit lane: [a 0-7, b 0-7 | a 8-15, b 8-15]; the permute puts a's 16 bytes first
    const __m256i lo = _mm256_permute4x64_epi64(
        _mm256_packus_epi16(_mm256_and_si256(t[0], low), _mm256_and_si256(t[1], low)), 0xD8);
    const __m256i hi = _mm256_permute4x64_epi64(
        _mm256_packus_epi16(_mm256_srli_epi16(t[0], 8), _mm256_srli_epi16(t[1], 8)), 0xD8);
    _mm256_storeu_si256((__m256i*)dst, lo);
    _mm256_storeu_si256((__m256i*)(dst + 32), hi);
#else
    int16_t* t = (int16_t*)dst;
    for (int c = 0; c < 32; ++c)
      t[c] = (int16_t)(kLutDigits.d[0][c] * v[0] + kLutDigits.d[1][c] * v[1] + kLutDigits.d[2][c] * v[2]);
#endif
  }
}

// acc[r][p * 32 + row] = sum over all lines and their 3 groups of tables[r][group][index] for R
// activation rows and P panels (panel p's lines at w + p * pstride words).
#if defined(BQ_ISA_AVX512)
constexpr int LUT_MAX_R = 4, LUT_MAX_P = 8, LUT_MULTI_P = 2;  // 1 x 8 or 4 x 2 int16 sums in registers
template <int R, int P>
void lut_micro(const unsigned char* const* tab, const uint16_t* w, int64_t pstride, int64_t lines, int32_t* acc) {
  alignas(64) int32_t wide[R][P][2][16];  // int32 sums, rows 0-15 and 16-31 (touched once per LUT_FLUSH lines)
  memset(wide, 0, sizeof(wide));
  const __m512i by5 = _mm512_set1_epi16(1 << 11), by10 = _mm512_set1_epi16(1 << 6);  // mulhi: >> 5, >> 10
  for (int64_t l0 = 0; l0 < lines; l0 += LUT_FLUSH) {
    const int64_t l1 = lines - l0 > LUT_FLUSH ? l0 + LUT_FLUSH : lines;
    __m512i sum[R][P];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) sum[r][p] = _mm512_setzero_si512();
    for (int64_t l = l0; l < l1; ++l) {
      __m512i t[R][3];
      for (int r = 0; r < R; ++r)
        for (int g = 0; g < 3; ++g) t[r][g] = _mm512_load_si512((const void*)(tab[r] + (3 * l + g) * LUT_TABLE));
      for (int p = 0; p < P; ++p) {
        const __m512i i0 = _mm512_loadu_si512((const void*)(w + p * pstride + l * LUT_ROWS));
        const __m512i i1 = _mm512_mulhi_epu16(i0, by5), i2 = _mm512_mulhi_epu16(i0, by10);
        for (int r = 0; r < R; ++r) {
          const __m512i a = _mm512_add_epi16(_mm512_permutexvar_epi16(i0, t[r][0]), _mm512_permutexvar_epi16(i1, t[r][1]));
          sum[r][p] = _mm512_add_epi16(sum[r][p], _mm512_add_epi16(a, _mm512_permutexvar_epi16(i2, t[r][2])));
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) {
        const __m512i lo = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(sum[r][p]));
        const __m512i hi = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(sum[r][p], 1));
        _mm512_store_si512((void*)wide[r][p][0], _mm512_add_epi32(_mm512_load_si512((const void*)wide[r][p][0]), lo));
        _mm512_store_si512((void*)wide[r][p][1], _mm512_add_epi32(_mm512_load_si512((const void*)wide[r][p][1]), hi));
      }
  }
  memcpy(acc, wide, sizeof(wide));  // [r][p][32] in row order
}
#elif defined(BQ_ISA_AVX2)
constexpr int LUT_MAX_R = 2, LUT_MAX_P = 2, LUT_MULTI_P = 1;
template <int R, int P>
void lut_micro(const unsigned char* const* tab, const uint16_t* w, int64_t pstride, int64_t lines, int32_t* acc) {
  alignas(32) int32_t wide[R][P][32];
  memset(wide, 0, sizeof(wide));
  const __m256i mask5 = _mm256_set1_epi16(31);
  for (int64_t l0 = 0; l0 < lines; l0 += LUT_FLUSH) {
    const int64_t l1 = lines - l0 > LUT_FLUSH ? l0 + LUT_FLUSH : lines;
    __m256i u[R][P][2];  // int16 sums of rows 0-15, 16-31
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) u[r][p][0] = u[r][p][1] = _mm256_setzero_si256();
    for (int64_t l = l0; l < l1; ++l)
      for (int p = 0; p < P; ++p) {
        const uint16_t* line = w + p * pstride + l * LUT_ROWS;
        const __m256i w0 = _mm256_loadu_si256((const __m256i*)line), w1 = _mm256_loadu_si256((const __m256i*)(line + 16));
        for (int g = 0; g < 3; ++g) {
          // bytes: lane 0 rows 0-7, 16-23; lane 1 rows 8-15, 24-31 (packus per lane); w >> 10 < 32
          const __m256i a = g == 0 ? _mm256_and_si256(w0, mask5)
                            : g == 1 ? _mm256_and_si256(_mm256_srli_epi16(w0, 5), mask5) : _mm256_srli_epi16(w0, 10);
          const __m256i b = g == 0 ? _mm256_and_si256(w1, mask5)
                            : g == 1 ? _mm256_and_si256(_mm256_srli_epi16(w1, 5), mask5) : _mm256_srli_epi16(w1, 10);
          const __m256i idx = _mm256_packus_epi16(a, b);
          const __m256i upper = _mm256_slli_epi16(idx, 3);  // bit 4 of each index -> bit 7 (blend select)
          for (int r = 0; r < R; ++r) {
            const __m128i* t = (const __m128i*)(tab[r] + (3 * l + g) * LUT_TABLE);
            const __m256i lo = _mm256_blendv_epi8(
                _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(t)), idx),
                _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(t + 1)), idx), upper);
            const __m256i hi = _mm256_blendv_epi8(
                _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(t + 2)), idx),
                _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(t + 3)), idx), upper);
            // unpacklo: lane 0 rows 0-7, lane 1 rows 8-15; unpackhi: rows 16-23, 24-31
            u[r][p][0] = _mm256_add_epi16(u[r][p][0], _mm256_unpacklo_epi8(lo, hi));
            u[r][p][1] = _mm256_add_epi16(u[r][p][1], _mm256_unpackhi_epi8(lo, hi));
          }
        }
      }
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p)
        for (int h = 0; h < 2; ++h)
          for (int s = 0; s < 2; ++s) {
            __m256i* d = (__m256i*)(wide[r][p] + 16 * h + 8 * s);
            const __m128i part = s ? _mm256_extracti128_si256(u[r][p][h], 1) : _mm256_castsi256_si128(u[r][p][h]);
            _mm256_store_si256(d, _mm256_add_epi32(_mm256_load_si256(d), _mm256_cvtepi16_epi32(part)));
          }
  }
  memcpy(acc, wide, sizeof(wide));
}
#else
constexpr int LUT_MAX_R = 1, LUT_MAX_P = 1, LUT_MULTI_P = 1;
template <int R, int P>
void lut_micro(const unsigned char* const* tab, const uint16_t* w, int64_t pstride, int64_t lines, int32_t* acc) {
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) {
      int32_t* dst = acc + (r * P + p) * LUT_ROWS;
      for (int row = 0; row < LUT_ROWS; ++row) dst[row] = 0;
      for (int64_t l = 0; l < lines; ++l) {
        const int16_t* t = (const int16_t*)(tab[r] + 3 * l * LUT_TABLE);
        const uint16_t* line = w + p * pstride + l * LUT_ROWS;
        for (int row = 0; row < LUT_ROWS; ++row)  // & 31: as vpermw, never out of a table
          dst[row] += t[line[row] & 31] + t[32 + ((line[row] >> 5) & 31)] + t[64 + ((line[row] >> 10) & 31)];
      }
    }
}
#endif

struct LutPlan {
  unsigned char* tables;  // [m][3 * lines][64]
  const uint16_t* w;      // [panels][lines][32]
  int64_t m, n, lines, panels, panels_per_task, panel_tasks, m_block;
  int32_t* out;
  const int8_t* x;        // non-null: each task builds its rows' tables first (it alone reads them)
  int64_t ldx, k;
};

// Builds activation row i's tables (every group of its 3 * lines) in their place in p.tables.
void lut_build_tables(const LutPlan& p, int64_t i) {
  lut_build_row(p.x + i * p.ldx, p.k, 3 * p.lines, p.tables + i * 3 * p.lines * LUT_TABLE);
}

template <int R, int P>
void lut_block(const LutPlan& p, int64_t i, int64_t panel) {
  const unsigned char* tab[R];
  for (int r = 0; r < R; ++r) tab[r] = p.tables + (i + r) * 3 * p.lines * LUT_TABLE;
  const int64_t pstride = p.lines * LUT_ROWS;
  alignas(64) int32_t acc[R * P * LUT_ROWS];
  lut_micro<R, P>(tab, p.w + panel * pstride, pstride, p.lines, acc);
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < P; ++q) {
      const int64_t j0 = (panel + q) * LUT_ROWS, cols = p.n - j0 < LUT_ROWS ? p.n - j0 : LUT_ROWS;
      memcpy(p.out + (i + r) * p.n + j0, acc + (r * P + q) * LUT_ROWS, sizeof(int32_t) * (size_t)cols);
    }
}

// Panels [q0, q1) of rows i..i+R-1, P at a time, then fewer.
template <int R, int P>
void lut_panels(const LutPlan& p, int64_t i, int64_t q0, int64_t q1) {
  int64_t q = q0;
  for (; q + P <= q1; q += P) lut_block<R, P>(p, i, q);
  if constexpr (P > 1) lut_panels<R, P / 2>(p, i, q, q1);
}

void lut_task(void* ctx, int64_t task) {
  const LutPlan& p = *(const LutPlan*)ctx;
  const int64_t mb = task / p.panel_tasks, pt = task % p.panel_tasks;
  const int64_t i0 = mb * p.m_block, i1 = i0 + p.m_block < p.m ? i0 + p.m_block : p.m;
  const int64_t q0 = pt * p.panels_per_task, q1 = q0 + p.panels_per_task < p.panels ? q0 + p.panels_per_task : p.panels;
  for (int64_t i = i0; i < i1;) {
    // one activation row: P panels share each table load; several: R rows share each index line
    const int r = (int)(i1 - i < LUT_MAX_R ? i1 - i : LUT_MAX_R);
    if (p.x)  // built just before they are read (in cache)
      for (int64_t e = i; e < i + r; ++e) lut_build_tables(p, e);
    switch (r) {
      case 4: lut_panels<(LUT_MAX_R >= 4 ? 4 : 1), LUT_MULTI_P>(p, i, q0, q1); break;
      case 3: lut_panels<(LUT_MAX_R >= 3 ? 3 : 1), LUT_MULTI_P>(p, i, q0, q1); break;
      case 2: lut_panels<(LUT_MAX_R >= 2 ? 2 : 1), LUT_MULTI_P>(p, i, q0, q1); break;
      default: lut_panels<1, LUT_MAX_P>(p, i, q0, q1); break;
    }
    i += r;
  }
}

void lut_table_task(void* ctx, int64_t i) { lut_build_tables(*(const LutPlan*)ctx, i); }

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

int64_t BQ_EXPORT(float_conv_sign)(const BqFloatConvSignArgs* a) {
  FloatConvSignPlan plan{a, (a->o + 63) / 64, a->c * a->kh * a->kw, 0};
  // work in the units run_tasks counts (word pairs): about one per 16 float multiply-adds
  const int64_t work = a->n * a->ho * a->wo * plan.blocks * 64 * plan.taps_c / 16;
  run_tasks(a->n * a->ho, work, float_conv_sign_task, &plan);
  return plan.nans;
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


// acc[m][n] = x[m][K] @ t[n][K]^T for int8 codes x (row stride ldx) and weight codes w [n][kp/4].
void BQ_EXPORT(ternary_i8_gemm)(const int8_t* x, int64_t m, int64_t k, int64_t ldx, const uint8_t* w, int64_t n,
                                int64_t kp, int32_t* out) {
  const bool direct = k == kp && ldx == kp;
  unsigned char* buffer = scratch_bytes((size_t)(m * (direct ? 0 : kp) + m * (int64_t)sizeof(int32_t)) + 64);
  int32_t* xsum = (int32_t*)buffer;
  int8_t* padded = (int8_t*)(buffer + m * sizeof(int32_t));
  for (int64_t i = 0; i < m; ++i) {
    const int8_t* row = x + i * ldx;
    int32_t sum = 0;
    for (int64_t e = 0; e < k; ++e) sum += row[e];
    xsum[i] = sum;
    if (!direct) {
      memcpy(padded + i * kp, row, (size_t)k);
      memset(padded + i * kp + k, 0, (size_t)(kp - k));
    }
  }
  I8Plan p{direct ? x : padded, xsum, w, m, n, kp, 0, 0, 0, out, nullptr, nullptr, nullptr};
  i8_run(p);
}

// Per-token absmax quantization of float rows (optionally after the parameter-free RMSNorm when
// rms_eps >= 0): codes [m][k] (row stride ldq) and steps [m].  Returns the count of NaN/inf seen.
int64_t BQ_EXPORT(quantize_i8)(const float* x, int64_t m, int64_t k, int64_t ldx, float rms_eps, int8_t* codes,
                               int64_t ldq, float* steps) {
  const int64_t kp = (k + I8_BLOCK - 1) / I8_BLOCK * I8_BLOCK;
  unsigned char* buffer = scratch_bytes((size_t)(kp + k * (int64_t)sizeof(float)) + 64);
  int8_t* row = (int8_t*)buffer;
  float* normed = (float*)(buffer + (kp + 31) / 32 * 32);
  int64_t bad = 0;
  for (int64_t i = 0; i < m; ++i) {
    quantize_row(x + i * ldx, k, kp, rms_eps, row, steps + i, &bad, normed);
    memcpy(codes + i * ldq, row, (size_t)k);
  }
  return bad;
}

// The whole BitLinear at inference: quantize each float row (as bq_quantize_i8), acc = codes @ t^T,
// y[i][j] = (float)acc * (step[i] * weight_scale) (+ bias[j]): layers.quantized's
// op(codes, code) * (step * s) + b, each product and the add rounded separately (no FMA:
// -ffp-contract=off).  Returns the count of NaN/inf.
int64_t BQ_EXPORT(ternary_i8_linear)(const float* x, int64_t m, int64_t k, int64_t ldx, float rms_eps,
                                     const uint8_t* w, int64_t n, int64_t kp, float weight_scale, const float* bias,
                                     float* out) {
  unsigned char* buffer = scratch_bytes((size_t)(m * kp + m * 3 * (int64_t)sizeof(int32_t) + k * (int64_t)sizeof(float)) + 128);
  int32_t* xsum = (int32_t*)buffer;
  float* mul = (float*)(xsum + m);
  float* steps = mul + m;
  float* normed = steps + m;
  int8_t* codes = (int8_t*)(normed + k);
  int64_t bad = 0;
  for (int64_t i = 0; i < m; ++i) {
    xsum[i] = quantize_row(x + i * ldx, k, kp, rms_eps, codes + i * kp, steps + i, &bad, normed);
    mul[i] = steps[i] * weight_scale;
  }
  I8Plan p{codes, xsum, w, m, n, kp, 0, 0, 0, nullptr, out, mul, bias};
  i8_run(p);
  return bad;
}

// acc[m][n] = x[m][k] @ t[n][k]^T by table lookup (see "by table lookup" above): int8 codes x (row
// stride ldx), weights [ceil(n / 32)][ceil(k / 9)][32] 16-bit words from bq_ternary_i8_lut_prepack.
void BQ_EXPORT(ternary_i8_lut_gemm)(const int8_t* x, int64_t m, int64_t k, int64_t ldx, const uint16_t* w, int64_t n,
                                    int32_t* out) {
  const int64_t lines = (k + 8) / 9, groups = 3 * lines, panels = (n + LUT_ROWS - 1) / LUT_ROWS;
  unsigned char* base = scratch_bytes((size_t)(m * groups * LUT_TABLE) + 64);
  unsigned char* tables = base + (64 - (uintptr_t)base % 64) % 64;  // whole cache lines per table
  LutPlan p{tables, w, m, n, lines, panels, panels, 1, 32, out, x, ldx, k};
  const int64_t work = m * n * (k / I8_BLOCK + 1) / (m > 1 ? 2 : 1);
  if (work < I8_INLINE_WORK) {  // on this thread: all panels in one pass per row block
    for (int64_t t = 0; t < (m + p.m_block - 1) / p.m_block; ++t) lut_task(&p, t);
    return;
  }
  const int threads = bq_thread_count();
  const int64_t row_blocks = (m + LUT_MAX_R - 1) / LUT_MAX_R;
  if (m > 1 && row_blocks >= threads) {
    // Split by rows: a task builds the tables of its rows and reads them over all panels.  (Tables
    // built on one core and read on another cost a transfer of every line between the cores: at
    // 2 threads that took as long as the product.)
    p.m_block = (row_blocks + threads - 1) / threads * LUT_MAX_R;
    bq_parallel_for((m + p.m_block - 1) / p.m_block, lut_task, &p);
    return;
  }
  // Split by panels: the tables first (shared by every task), then about 16 tasks, each an even
  // number of panels where there are several (P panels share a table load).
  if (m > 1 && m * groups >= 4096) {
    bq_parallel_for(m, lut_table_task, &p);
  } else {
    for (int64_t i = 0; i < m; ++i) lut_build_tables(p, i);
  }
  p.x = nullptr;  // the tasks below read the tables built here
  const int64_t m_blocks = (m + p.m_block - 1) / p.m_block;
  const int64_t chunks = (16 + m_blocks - 1) / m_blocks;
  int64_t per = (panels + chunks - 1) / chunks;
  if (per > 1 || m > 1) per = (per + 1) / 2 * 2;  // (4 rows x 1 panel would wait on the table loads)
  p.panels_per_task = per;
  p.panel_tasks = (panels + per - 1) / per;
  bq_parallel_for(m_blocks * p.panel_tasks, lut_task, &p);
}

}  // extern "C"
