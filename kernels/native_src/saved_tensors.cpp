// Training-time passes for what a step saves for backward (qat.act_compression, layers.bitpack):
// each is one pass over a float32 tensor where the NumPy / torch paths take two or three
// (absolute value, compare, pack; multiply, round, convert), and gives the same bits:
//
//   bq_pack_compare   words of op(x, t) or op(|x|, t), op in {<, <=, >=}: bit j of word w is
//                     element 64 w + j (little-endian), pad bits 0 (kernels.pack_bits' format);
//                     NaN compares false, as in NumPy and torch;
//   bq_scaled_to_i16  q = (int16) round_half_even(x * r_c), r_c = 1 / s_c computed by the caller
//                     (torch's reciprocal), one float32 product then the rounding: torch's
//                     t.mul(r).round_().to(int16) for |q| <= 32767;
//   bq_i16_to_scaled  y = (float) q * s_c: torch's q.to(float32).mul_(s);
//   bq_zero_where     g = +0.0f where the bit is set, in place: g.masked_fill_(flags, 0.0);
//   bq_quantize_groups   per group of `size` floats: lo, hi = min, max (NaN if the group has one),
//                     s = (hi - lo) / L, r = s > 0 ? 1 / s : 0, L = 2^bits - 1, and codes
//                     q = (uint8) clamp(((x - lo) * r + u_i / 256) + 1 / 512, 0, L) (NaN -> 0),
//                     packed 8 / bits per byte, first code in the low bits, u_i byte i % 8 of
//                     SplitMix64(seed + (i / 8 + 1) * golden) (i the flat index; computed here,
//                     never stored): qat.act_compression's quantize_groups and rounding_noise, the
//                     same float32 operations in the same order;
//   bq_dequantize_groups x~ = q * s + lo (two roundings, as its unpack).
//
// x is contiguous [outer, channels, inner] for the scaled forms (channel c's scale for every inner
// element). Built without -m flags, as dispatch.cpp (SSE2 on x86-64, the baseline): the passes are
// memory-bound, so wider vectors would not change their speed much.
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace {

enum Compare { kLess = 0, kLessEqual = 1, kGreaterEqual = 2 };

template <int Op>
inline bool compare(float v, float t) {
  return Op == kLess ? v < t : Op == kLessEqual ? v <= t : v >= t;
}

#if defined(__SSE2__)
template <int Op>
inline __m128 compare4(__m128 v, __m128 t) {  // ordered compares: false where v is NaN
  return Op == kLess ? _mm_cmplt_ps(v, t) : Op == kLessEqual ? _mm_cmple_ps(v, t) : _mm_cmpge_ps(v, t);
}
#endif

template <int Op, bool Absolute>
void pack_compare(const float* x, int64_t n, float threshold, uint64_t* words) {
  const int64_t full = n / 64;
#if defined(__SSE2__)
  const __m128 t = _mm_set1_ps(threshold);
  const __m128 magnitude = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
#endif
  for (int64_t w = 0; w < full; ++w) {
    const float* p = x + 64 * w;
    uint64_t bits = 0;
#if defined(__SSE2__)
    for (int j = 0; j < 64; j += 4) {
      __m128 v = _mm_loadu_ps(p + j);
      if (Absolute) v = _mm_and_ps(v, magnitude);
      bits |= static_cast<uint64_t>(_mm_movemask_ps(compare4<Op>(v, t))) << j;
    }
#else
    for (int j = 0; j < 64; ++j) {
      const float v = Absolute ? fabsf(p[j]) : p[j];
      bits |= static_cast<uint64_t>(compare<Op>(v, threshold)) << j;
    }
#endif
    words[w] = bits;
  }
  const int64_t rest = n - 64 * full;
  if (rest) {
    const float* p = x + 64 * full;
    uint64_t bits = 0;
    for (int64_t j = 0; j < rest; ++j) {
      const float v = Absolute ? fabsf(p[j]) : p[j];
      bits |= static_cast<uint64_t>(compare<Op>(v, threshold)) << j;
    }
    words[full] = bits;
  }
}

template <int Op>
void pack_compare_op(const float* x, int64_t n, float threshold, int absolute, uint64_t* words) {
  if (absolute) {
    pack_compare<Op, true>(x, n, threshold, words);
  } else {
    pack_compare<Op, false>(x, n, threshold, words);
  }
}

}  // namespace

// Returns 0, or -1 for an unknown op.
#define BQ_EXPORT extern "C" __attribute__((visibility("default")))

BQ_EXPORT int64_t bq_pack_compare(const float* x, int64_t n, int64_t op, float threshold, int64_t absolute,
                                    uint64_t* words) {
  switch (op) {
    case kLess: pack_compare_op<kLess>(x, n, threshold, static_cast<int>(absolute), words); return 0;
    case kLessEqual: pack_compare_op<kLessEqual>(x, n, threshold, static_cast<int>(absolute), words); return 0;
    case kGreaterEqual: pack_compare_op<kGreaterEqual>(x, n, threshold, static_cast<int>(absolute), words); return 0;
    default: return -1;
  }
}

namespace {

// block(base, c) for each run of `inner` elements of channel c of a contiguous [outer, channels, inner] tensor
template <typename Block>
void per_channel_runs(int64_t outer, int64_t channels, int64_t inner, Block block) {
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t c = 0; c < channels; ++c) block((o * channels + c) * inner, c);
  }
}

}  // namespace

BQ_EXPORT void bq_scaled_to_i16(const float* x, int64_t outer, int64_t channels, int64_t inner,
                                const float* inverse, int16_t* out) {
  per_channel_runs(outer, channels, inner, [&](int64_t base, int64_t c) {
    const float* p = x + base;
    int16_t* q = out + base;
    const float r = inverse[c];
    int64_t i = 0;
#if defined(__SSE2__)
    const __m128 rv = _mm_set1_ps(r);
    for (; i + 8 <= inner; i += 8) {  // cvtps2dq rounds half to even (the default MXCSR mode)
      const __m128i lo = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(p + i), rv));
      const __m128i hi = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(p + i + 4), rv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi32(lo, hi));
    }
#endif
    for (; i < inner; ++i) q[i] = static_cast<int16_t>(nearbyintf(p[i] * r));
  });
}

BQ_EXPORT void bq_i16_to_scaled(const int16_t* codes, int64_t outer, int64_t channels, int64_t inner,
                                const float* scale, float* out) {
  per_channel_runs(outer, channels, inner, [&](int64_t base, int64_t c) {
    const int16_t* q = codes + base;
    float* y = out + base;
    const float s = scale[c];
    int64_t i = 0;
#if defined(__SSE2__)
    const __m128 sv = _mm_set1_ps(s);
    for (; i + 8 <= inner; i += 8) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i));
      const __m128i lo = _mm_srai_epi32(_mm_unpacklo_epi16(v, v), 16);  // sign-extend int16 -> int32
      const __m128i hi = _mm_srai_epi32(_mm_unpackhi_epi16(v, v), 16);
      _mm_storeu_ps(y + i, _mm_mul_ps(_mm_cvtepi32_ps(lo), sv));
      _mm_storeu_ps(y + i + 4, _mm_mul_ps(_mm_cvtepi32_ps(hi), sv));
    }
#endif
    for (; i < inner; ++i) y[i] = static_cast<float>(q[i]) * s;
  });
}

namespace {

#if defined(__SSE2__)
// Masks of the 4 bits of `nibble` (all ones where set), lane j = bit j.
inline __m128i bit_lanes(uint32_t nibble) {
  const __m128i select = _mm_set_epi32(8, 4, 2, 1);
  const __m128i bits = _mm_and_si128(_mm_set1_epi32(static_cast<int>(nibble)), select);
  return _mm_cmpeq_epi32(bits, select);
}
#endif

}  // namespace

BQ_EXPORT void bq_zero_where(const uint64_t* words, int64_t n, float* g) {
  int64_t i = 0;
#if defined(__SSE2__)
  for (; i + 64 <= n; i += 64) {
    const uint64_t w = words[i / 64];
    if (!w) continue;
    for (int j = 0; j < 64; j += 4) {
      const __m128i lanes = bit_lanes(static_cast<uint32_t>(w >> j) & 15u);
      _mm_storeu_ps(g + i + j, _mm_andnot_ps(_mm_castsi128_ps(lanes), _mm_loadu_ps(g + i + j)));
    }
  }
#endif
  for (; i < n; ++i) {
    if ((words[i / 64] >> (i % 64)) & 1u) g[i] = 0.0f;
  }
}

namespace {

// float values of the codes in each byte: row b holds the 8 / bits codes of b, first in the low bits
struct CodeTable {
  float values[256][8];
  explicit CodeTable(int bits) {
    const int per_byte = 8 / bits;
    for (int b = 0; b < 256; ++b) {
      for (int k = 0; k < 8; ++k) values[b][k] = k < per_byte ? static_cast<float>((b >> (k * bits)) & ((1 << bits) - 1)) : 0.0f;
    }
  }
};

const CodeTable& code_table(int64_t bits) {
  static const CodeTable two(2), four(4), eight(8);
  return bits == 2 ? two : bits == 4 ? four : eight;
}

// lo, hi of one group; NaN for both if any element is NaN (torch's amin / amax propagate it)
void group_range(const float* p, int64_t size, float* lo_out, float* hi_out) {
  float lo = p[0], hi = p[0];
  int64_t i = 0;
  bool nan = false;
#if defined(__SSE2__)
  __m128 vlo = _mm_set1_ps(p[0]), vhi = vlo, unordered = _mm_setzero_ps();
  for (; i + 4 <= size; i += 4) {
    const __m128 v = _mm_loadu_ps(p + i);
    unordered = _mm_or_ps(unordered, _mm_cmpunord_ps(v, v));
    vlo = _mm_min_ps(vlo, v);
    vhi = _mm_max_ps(vhi, v);
  }
  float l[4], h[4];
  _mm_storeu_ps(l, vlo);
  _mm_storeu_ps(h, vhi);
  for (int k = 0; k < 4; ++k) {
    lo = l[k] < lo ? l[k] : lo;
    hi = h[k] > hi ? h[k] : hi;
  }
  nan = _mm_movemask_ps(unordered) != 0;
#endif
  for (; i < size; ++i) {
    const float v = p[i];
    nan |= v != v;
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  *lo_out = nan ? NAN : lo;
  *hi_out = nan ? NAN : hi;
}

}  // namespace

namespace {

// SplitMix64's output function (Steele, Lea, Flood 2014) of counter k: qat.act_compression.rounding_noise
inline uint64_t splitmix64(uint64_t seed, uint64_t k) {
  uint64_t z = seed + (k + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

#if defined(__SSE2__)
// 16 codes (four int32 vectors, lanes 0..255, in order) packed 8 / bits per byte, first in the low
// bits, written to out (16, 8 or 4 bytes). For 4 bits the 16-bit lane b0 + b1 << 8 becomes
// b0 | b1 << 4 in its low byte by lane | lane >> 4; for 2 bits the 32-bit lane
// b0 + b1 << 8 + b2 << 16 + b3 << 24 by t = lane | lane >> 6, then t | t >> 12 (every b_k < 4).
inline void store_codes(const __m128i codes[4], int64_t bits, uint8_t* out) {
  const __m128i bytes = _mm_packus_epi16(_mm_packs_epi32(codes[0], codes[1]), _mm_packs_epi32(codes[2], codes[3]));
  if (bits == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), bytes);
  } else if (bits == 4) {
    const __m128i pairs = _mm_and_si128(_mm_or_si128(bytes, _mm_srli_epi16(bytes, 4)), _mm_set1_epi16(0xFF));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(pairs, pairs));
  } else {
    __m128i quads = _mm_or_si128(bytes, _mm_srli_epi32(bytes, 6));
    quads = _mm_and_si128(_mm_or_si128(quads, _mm_srli_epi32(quads, 12)), _mm_set1_epi32(0xFF));
    const __m128i halves = _mm_packs_epi32(quads, quads);
    const int four = _mm_cvtsi128_si32(_mm_packus_epi16(halves, halves));
    memcpy(out, &four, 4);
  }
}
#endif

}  // namespace

BQ_EXPORT void bq_quantize_groups(const float* x, int64_t groups, int64_t size, uint64_t seed, int64_t bits,
                                  float* low, float* step, uint8_t* packed) {
  const float levels = static_cast<float>((1 << bits) - 1);
  const int per_byte = static_cast<int>(8 / bits);
  for (int64_t g = 0; g < groups; ++g) {
    const float* p = x + g * size;
    const uint64_t first_word = static_cast<uint64_t>(g * size / 8);  // size is a multiple of 8
    float lo, hi;
    group_range(p, size, &lo, &hi);
    const float s = (hi - lo) / levels;
    const float r = s > 0.0f ? 1.0f / s : 0.0f;
    low[g] = lo;
    step[g] = s;
    uint8_t* out = packed + g * size / per_byte;
    int64_t i = 0;
#if defined(__SSE2__)
    const __m128 vlo = _mm_set1_ps(lo), vr = _mm_set1_ps(r), top = _mm_set1_ps(levels), zero = _mm_setzero_ps();
    const __m128 unit = _mm_set1_ps(1.0f / 256.0f), half = _mm_set1_ps(1.0f / 512.0f);
    const __m128i none = _mm_setzero_si128();
    for (; i + 16 <= size; i += 16) {
      const uint64_t k = first_word + static_cast<uint64_t>(i / 8);
      const __m128i bytes = _mm_set_epi64x(static_cast<int64_t>(splitmix64(seed, k + 1)),
                                           static_cast<int64_t>(splitmix64(seed, k)));  // u_i, little-endian
      const __m128i shorts[2] = {_mm_unpacklo_epi8(bytes, none), _mm_unpackhi_epi8(bytes, none)};
      __m128i codes[4];
      for (int q = 0; q < 4; ++q) {
        const __m128i u = (q & 1) ? _mm_unpackhi_epi16(shorts[q / 2], none) : _mm_unpacklo_epi16(shorts[q / 2], none);
        __m128 v = _mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(p + i + 4 * q), vlo), vr);
        v = _mm_add_ps(v, _mm_mul_ps(_mm_cvtepi32_ps(u), unit));
        v = _mm_add_ps(v, half);
        v = _mm_min_ps(_mm_max_ps(v, zero), top);  // max(NaN, 0) is 0: maxps returns its second operand
        codes[q] = _mm_cvttps_epi32(v);
      }
      store_codes(codes, bits, out + i / per_byte);
    }
#endif
    for (; i < size; i += per_byte) {
      uint32_t byte = 0;
      for (int k = 0; k < per_byte; ++k) {
        const int64_t j = i + k;
        const uint64_t word = splitmix64(seed, first_word + static_cast<uint64_t>(j / 8));
        float v = (p[j] - lo) * r;
        v += static_cast<float>((word >> (8 * (j % 8))) & 0xFFu) * (1.0f / 256.0f);
        v += 1.0f / 512.0f;
        v = v > 0.0f ? v : 0.0f;  // NaN -> 0
        v = v < levels ? v : levels;
        byte |= static_cast<uint32_t>(v) << (k * bits);
      }
      out[i / per_byte] = static_cast<uint8_t>(byte);
    }
  }
}

BQ_EXPORT void bq_dequantize_groups(const uint8_t* packed, int64_t groups, int64_t size, int64_t bits,
                                    const float* low, const float* step, float* out) {
  const int per_byte = static_cast<int>(8 / bits);
  const CodeTable& table = code_table(bits);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* in = packed + g * size / per_byte;
    float* y = out + g * size;
    const float s = step[g], lo = low[g];
    int64_t i = 0;
#if defined(__SSE2__)
    const __m128 vs = _mm_set1_ps(s), vlo = _mm_set1_ps(lo);
    if (per_byte == 4) {
      for (; i + 4 <= size; i += 4) {
        const __m128 q = _mm_loadu_ps(table.values[in[i / 4]]);
        _mm_storeu_ps(y + i, _mm_add_ps(_mm_mul_ps(q, vs), vlo));
      }
    } else if (per_byte == 2) {
      for (; i + 4 <= size; i += 4) {
        const __m128 q = _mm_loadh_pi(_mm_loadl_pi(_mm_setzero_ps(), reinterpret_cast<const __m64*>(table.values[in[i / 2]])),
                                      reinterpret_cast<const __m64*>(table.values[in[i / 2 + 1]]));
        _mm_storeu_ps(y + i, _mm_add_ps(_mm_mul_ps(q, vs), vlo));
      }
    } else {
      for (; i + 4 <= size; i += 4) {
        uint32_t four;
        memcpy(&four, in + i, 4);
        const __m128i bytes = _mm_unpacklo_epi16(_mm_unpacklo_epi8(_mm_cvtsi32_si128(static_cast<int>(four)),
                                                                   _mm_setzero_si128()), _mm_setzero_si128());
        _mm_storeu_ps(y + i, _mm_add_ps(_mm_mul_ps(_mm_cvtepi32_ps(bytes), vs), vlo));
      }
    }
#endif
    for (; i < size; ++i) {
      float v = table.values[in[i / per_byte]][i % per_byte] * s;
      v += lo;
      y[i] = v;
    }
  }
}
