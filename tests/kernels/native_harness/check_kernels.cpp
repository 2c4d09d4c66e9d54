// Exactness harness of the native CPU engine (kernels/native_src), no torch, no Python.
//
// Linked with dispatch.cpp and every isa_kernels.cpp object built for this architecture (exactly as
// kernels/native.py builds the library; tests/native_harness/run.sh does it, natively or for
// AArch64 under qemu), it runs every instruction set the CPU (or emulator) supports against a
// plain scalar reference written here from the definitions, not from the kernels' formulas:
//   conv      dot = sum over taps and channels of the +-1 products (zero padding adds 0; without
//             tap_sums a padded tap reads +1), in the three output modes of bitkernels.h, over
//             1 and 2 threads; the whole output buffer (stride gaps and a guard after the end) is
//             compared bit for bit;
//   matmul    the same entry point as a 1x1 convolution over M pixels;
//   ternary   sum of products of values in {-1, 0, +1} (sign bits under a zero mask are random);
//   packing   bq_pack_rows / bq_pack_planes (bit = x < 0, -0.0 and NaN -> 0, NaN counted),
//             bq_prepack_panels;
//   maxpool   bq_maxpool_bits against a per-bit AND / OR of the window.
// Random inputs from a fixed seed; prints `native harness: <isas>: N checks, M mismatches` and
// exits 1 on any mismatch.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#include "bitkernels.h"

extern "C" {
void bq_set_num_threads(int threads);
int bq_isa_count();
const char* bq_isa_name(int i);
int bq_isa_supported(int i);
int bq_select_isa(const char* name);
const char* bq_selected_isa();
void bq_conv(const BqConvArgs* args);
void bq_ternary_gemm(const uint64_t* sa, const uint64_t* ma, int64_t m, const uint64_t* sb_panels,
                     const uint64_t* mb_panels, int64_t n, int64_t words, int32_t* out);
int64_t bq_pack_rows(const float* x, int64_t rows, int64_t k, int64_t ld, uint64_t* out, int64_t out_ld);
int64_t bq_pack_planes(const float* x, int64_t n, int64_t c, int64_t hw, int64_t groups, uint64_t* out);
void bq_prepack_panels(const uint64_t* rows, int64_t n, int64_t words, uint64_t* panels);
void bq_maxpool_bits(const uint64_t* x, const BqMaxPoolArgs* p, uint64_t* out);
double bq_peak_bitmacs_per_s(int64_t reps);
}

namespace {

typedef std::vector<uint64_t> Words;
constexpr int64_t GUARD = 16;  // words after every output buffer that no kernel may touch
constexpr int NR = 8;

// ---------------------------------------------------------------------------------------------
// Random numbers (splitmix64: the same sequence on every platform and compiler)
// ---------------------------------------------------------------------------------------------
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  int64_t below(int64_t n) { return (int64_t)(next() % (uint64_t)n); }
  bool bit() { return next() >> 63; }
  double uniform() { return (double)(next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
};

Rng g_rng{20261203};

// Floats with the awkward values in them: 0.0, -0.0, +-inf, denormals, NaN of both signs.
float odd_float(Rng& r, bool allow_nan) {
  switch (r.below(16)) {
    case 0: return 0.0f;
    case 1: return -0.0f;
    case 2: return INFINITY;
    case 3: return -INFINITY;
    case 4: return 1e-45f;
    case 5: return -1e-45f;
    case 6: return -1.17549435e-38f;
    case 7:
      if (allow_nan) return r.bit() ? NAN : -NAN;
      return 1.0f;
    default: return (float)(r.uniform() * 4.0 - 2.0);
  }
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping
// ---------------------------------------------------------------------------------------------
long g_checks = 0, g_mismatches = 0;
std::string g_context;  // isa / threads, prefixed to every failure

void fail(const std::string& what) {
  ++g_mismatches;
  if (g_mismatches <= 20) fprintf(stderr, "MISMATCH [%s] %s\n", g_context.c_str(), what.c_str());
}

// One check: got == want word for word (the whole buffer, including stride gaps and the guard).
void expect_words(const std::string& what, const uint64_t* got, const uint64_t* want, size_t words) {
  ++g_checks;
  for (size_t i = 0; i < words; ++i) {
    if (got[i] != want[i]) {
      char buf[160];
      snprintf(buf, sizeof buf, " (first at word %zu of %zu: got %016llx want %016llx)", i, words,
               (unsigned long long)got[i], (unsigned long long)want[i]);
      fail(what + buf);
      return;
    }
  }
}

void expect_eq(const std::string& what, int64_t got, int64_t want) {
  ++g_checks;
  if (got != want) fail(what + " (got " + std::to_string(got) + ", want " + std::to_string(want) + ")");
}

Words random_words(Rng& r, size_t n) {
  Words v(n);
  for (auto& x : v) x = r.next();
  return v;
}

// ---------------------------------------------------------------------------------------------
// Binary convolution
// ---------------------------------------------------------------------------------------------
struct ConvShape {
  std::string name;
  int64_t n, c, h, w, o, groups, kh, kw, sh, sw, ph, pw, dh, dw;
};

int64_t words_for(int64_t k) { return (k + 63) / 64; }

struct ConvCase {
  ConvShape s;
  int64_t cg, og, gw, taps, ho, wo, pixels;
  std::vector<uint8_t> xs;     // [n][h][w][c] 1 = -1
  std::vector<uint8_t> ws;     // [o][cg][kh][kw] 1 = -1
  Words x;                     // packed NHWC [n][h][w][groups*gw]
  Words panels;                // [groups][ceil(og/8)][taps*gw][8]
  std::vector<int32_t> tap_sums;  // [groups][taps][og]
  std::vector<int32_t> dot_zero, dot_one;  // [pixels][o]: zero- and one-padded reference
  std::vector<float> mul_f, add_f;
  std::vector<double> mul_d, add_d;
};

// Weights of one group as rows [og][taps*gw] (tap-major, channels padded per tap), as
// kernels.conv.pack_conv_weight lays them out.
Words weight_rows(const ConvCase& c, int64_t g) {
  Words rows((size_t)(c.og * c.taps * c.gw), 0);
  for (int64_t o = 0; o < c.og; ++o)
    for (int64_t ch = 0; ch < c.cg; ++ch)
      for (int64_t t = 0; t < c.taps; ++t)
        if (c.ws[(((g * c.og + o) * c.cg + ch) * c.taps) + t])
          rows[(size_t)(o * c.taps * c.gw + t * c.gw + ch / 64)] |= (uint64_t)1 << (ch % 64);
  return rows;
}

// Panels of 8 rows, word-interleaved, rows past the end zero (the layout bitkernels.h states).
Words reference_panels(const Words& rows, int64_t n, int64_t words) {
  const int64_t count = (n + NR - 1) / NR;
  Words p((size_t)(count * words * NR), 0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t k = 0; k < words; ++k) p[(size_t)(((r / NR) * words + k) * NR + r % NR)] = rows[(size_t)(r * words + k)];
  return p;
}

ConvCase make_conv(const ConvShape& s, Rng& r) {
  ConvCase c;
  c.s = s;
  c.cg = s.c / s.groups;
  c.og = s.o / s.groups;
  c.gw = words_for(c.cg);
  c.taps = s.kh * s.kw;
  c.ho = (s.h + 2 * s.ph - s.dh * (s.kh - 1) - 1) / s.sh + 1;
  c.wo = (s.w + 2 * s.pw - s.dw * (s.kw - 1) - 1) / s.sw + 1;
  c.pixels = s.n * c.ho * c.wo;
  const int64_t pw = s.groups * c.gw;

  // Some pixels all +1 or all -1: against the all-equal weight rows below every word pair differs
  // in all 64 bits, the worst case of the kernels' byte counters (FLUSH).
  c.xs.resize((size_t)(s.n * s.h * s.w * s.c));
  for (int64_t p = 0; p < s.n * s.h * s.w; ++p) {
    const int64_t kind = r.below(6);
    for (int64_t ch = 0; ch < s.c; ++ch) c.xs[(size_t)(p * s.c + ch)] = kind == 0 ? 0 : kind == 1 ? 1 : r.bit();
  }
  c.ws.resize((size_t)(s.o * c.cg * c.taps));
  // A few all-equal weight rows, so tap sums reach +-C.
  for (int64_t o = 0; o < s.o; ++o) {
    const int64_t kind = r.below(8);
    for (int64_t i = 0; i < c.cg * c.taps; ++i)
      c.ws[(size_t)(o * c.cg * c.taps + i)] = kind == 0 ? 0 : kind == 1 ? 1 : r.bit();
  }

  c.x.assign((size_t)(s.n * s.h * s.w * pw), 0);
  for (int64_t p = 0; p < s.n * s.h * s.w; ++p)
    for (int64_t ch = 0; ch < s.c; ++ch)
      if (c.xs[(size_t)(p * s.c + ch)])
        c.x[(size_t)(p * pw + (ch / c.cg) * c.gw + (ch % c.cg) / 64)] |= (uint64_t)1 << ((ch % c.cg) % 64);

  for (int64_t g = 0; g < s.groups; ++g) {
    Words p = reference_panels(weight_rows(c, g), c.og, c.taps * c.gw);
    c.panels.insert(c.panels.end(), p.begin(), p.end());
  }
  c.tap_sums.assign((size_t)(s.groups * c.taps * c.og), 0);
  for (int64_t g = 0; g < s.groups; ++g)
    for (int64_t t = 0; t < c.taps; ++t)
      for (int64_t o = 0; o < c.og; ++o) {
        int32_t sum = 0;
        for (int64_t ch = 0; ch < c.cg; ++ch) sum += c.ws[(size_t)(((g * c.og + o) * c.cg + ch) * c.taps + t)] ? -1 : 1;
        c.tap_sums[(size_t)((g * c.taps + t) * c.og + o)] = sum;
      }

  // The reference: +-1 products summed; a tap outside the input is 0 (zero) or +1 (one-padding).
  c.dot_zero.assign((size_t)(c.pixels * s.o), 0);
  c.dot_one.assign((size_t)(c.pixels * s.o), 0);
  for (int64_t b = 0; b < s.n; ++b)
    for (int64_t oy = 0; oy < c.ho; ++oy)
      for (int64_t ox = 0; ox < c.wo; ++ox) {
        const int64_t p = (b * c.ho + oy) * c.wo + ox;
        for (int64_t o = 0; o < s.o; ++o) {
          const int64_t g = o / c.og;
          int32_t zero = 0, one = 0;
          for (int64_t i = 0; i < s.kh; ++i)
            for (int64_t j = 0; j < s.kw; ++j) {
              const int64_t iy = oy * s.sh - s.ph + i * s.dh, ix = ox * s.sw - s.pw + j * s.dw;
              const bool inside = iy >= 0 && iy < s.h && ix >= 0 && ix < s.w;
              const uint8_t* wrow = &c.ws[(size_t)(o * c.cg * c.taps + i * s.kw + j)];
              const uint8_t* xrow = inside ? &c.xs[(size_t)(((b * s.h + iy) * s.w + ix) * s.c + g * c.cg)] : nullptr;
              for (int64_t ch = 0; ch < c.cg; ++ch) {
                const int wv = wrow[ch * c.taps] ? -1 : 1;
                const int xv = inside ? (xrow[ch] ? -1 : 1) : 0;
                zero += xv * wv;
                one += (inside ? xv : 1) * wv;
              }
            }
          c.dot_zero[(size_t)(p * s.o + o)] = zero;
          c.dot_one[(size_t)(p * s.o + o)] = one;
        }
      }

  // Output transforms: random, with exact zeros, negative scales and integer offsets (ties y == 0).
  c.mul_f.resize((size_t)s.o);
  c.add_f.resize((size_t)s.o);
  c.mul_d.resize((size_t)s.o);
  c.add_d.resize((size_t)s.o);
  for (int64_t o = 0; o < s.o; ++o) {
    c.mul_f[(size_t)o] = r.below(8) == 0 ? 0.0f : (float)(r.uniform() * 4.0 - 2.0);
    c.add_f[(size_t)o] = r.below(8) == 0 ? -0.0f : (float)(r.uniform() * 100.0 - 50.0);
    switch (r.below(6)) {
      case 0: c.mul_d[(size_t)o] = 0.0; c.add_d[(size_t)o] = r.bit() ? 0.0 : -0.0; break;
      case 1: c.mul_d[(size_t)o] = 1.0; c.add_d[(size_t)o] = (double)(r.below(9) - 4); break;
      case 2: c.mul_d[(size_t)o] = -0.5; c.add_d[(size_t)o] = (double)(r.below(5) - 2); break;
      default:
        c.mul_d[(size_t)o] = r.uniform() * 2.0 - 1.0;
        c.add_d[(size_t)o] = r.uniform() * 20.0 - 10.0;
    }
  }
  return c;
}

// The expected output buffer for `mode` on top of `fill` (what the buffer held before the call).
Words expected_conv(const ConvCase& c, int mode, const std::vector<int32_t>& dot, int64_t stride, const Words& fill) {
  Words want = fill;
  const int64_t outs = c.s.o;
  for (int64_t p = 0; p < c.pixels; ++p) {
    if (mode == BQ_OUT_SIGN)
      for (int64_t k = 0; k < words_for(outs); ++k) want[(size_t)(p * stride + k)] = 0;
    for (int64_t o = 0; o < outs; ++o) {
      const int32_t d = dot[(size_t)(p * outs + o)];
      if (mode == BQ_OUT_INT32) {
        ((int32_t*)want.data())[p * stride + o] = d;
      } else if (mode == BQ_OUT_FLOAT) {
        volatile float product = (float)d * c.mul_f[(size_t)o];  // two roundings, whatever the flags
        ((float*)want.data())[p * stride + o] = product + c.add_f[(size_t)o];
      } else {
        volatile double product = (double)d * c.mul_d[(size_t)o];
        const double y = product + c.add_d[(size_t)o];
        if (y < 0) want[(size_t)(p * stride + o / 64)] |= (uint64_t)1 << (o % 64);
      }
    }
  }
  return want;
}

const char* mode_name(int mode) { return mode == BQ_OUT_INT32 ? "int32" : mode == BQ_OUT_FLOAT ? "float" : "sign"; }

void run_conv_case(const ConvCase& c, int threads) {
  const ConvShape& s = c.s;
  for (int with_sums = 0; with_sums < 2; ++with_sums) {
    const std::vector<int32_t>& dot = with_sums ? c.dot_zero : c.dot_one;
    for (int mode = 0; mode < 3; ++mode) {
      // Stride: exact, or with a gap (written elements / words must stay inside their slots).  The
      // sign output of several groups runs 10 times on 2 threads: tasks of different groups write
      // bits of the same words (a race that lost bits showed in about 1 of 6 runs on 2 cores).
      const int repeats = mode == BQ_OUT_SIGN && s.groups > 1 && threads > 1 ? 10 : 1;
      for (int run = 0; run < 2 * repeats; ++run) {
        const int gap = run % 2;
        int64_t stride;
        size_t words;
        if (mode == BQ_OUT_SIGN) {
          stride = words_for(s.o) + gap;
          words = (size_t)(c.pixels * stride) + GUARD;
        } else {
          stride = s.o + 3 * gap;
          words = (size_t)((c.pixels * stride + 1) / 2) + GUARD;
        }
        const Words fill = random_words(g_rng, words);
        Words out = fill;
        BqConvArgs a;
        memset(&a, 0, sizeof a);
        a.x = c.x.data();
        a.n = s.n; a.h = s.h; a.w = s.w;
        a.pixel_words = s.groups * c.gw;
        a.group_words = c.gw;
        a.cin_per_group = c.cg;
        a.panels = c.panels.data();
        a.tap_sums = with_sums ? c.tap_sums.data() : nullptr;
        a.groups = s.groups; a.out_per_group = c.og;
        a.kh = s.kh; a.kw = s.kw; a.sh = s.sh; a.sw = s.sw; a.ph = s.ph; a.pw = s.pw; a.dh = s.dh; a.dw = s.dw;
        a.ho = c.ho; a.wo = c.wo;
        a.mode = mode;
        a.out = out.data();
        a.out_stride = stride;
        a.mul_f = mode == BQ_OUT_FLOAT ? c.mul_f.data() : nullptr;
        a.add_f = mode == BQ_OUT_FLOAT ? c.add_f.data() : nullptr;
        a.mul_d = mode == BQ_OUT_SIGN ? c.mul_d.data() : nullptr;
        a.add_d = mode == BQ_OUT_SIGN ? c.add_d.data() : nullptr;
        bq_conv(&a);
        const Words want = expected_conv(c, mode, dot, stride, fill);
        char what[200];
        snprintf(what, sizeof what, "conv %s: %s, %s padding, stride gap %d", s.name.c_str(), mode_name(mode),
                 with_sums ? "zero (tap_sums)" : "one (no tap_sums)", gap);
        expect_words(what, out.data(), want.data(), words);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Ternary matmul
// ---------------------------------------------------------------------------------------------
struct TernaryCase {
  int64_t m, n, k, words;
  Words sa, ma, sb_panels, mb_panels;
  std::vector<int32_t> want;
};

TernaryCase make_ternary(int64_t m, int64_t n, int64_t k, Rng& r) {
  TernaryCase t;
  t.m = m; t.n = n; t.k = k; t.words = words_for(k);
  // Values in {-1, 0, +1} (zeros a third); the sign bit under a zero mask is random (it must not count).
  // Some rows all +1 or all -1 (every word pair counts 64 in both popcounts: the counters' worst case).
  std::vector<int8_t> a((size_t)(m * k)), b((size_t)(n * k));
  auto fill_rows = [&](std::vector<int8_t>& v, int64_t rows) {
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t kind = r.below(5);
      for (int64_t e = 0; e < k; ++e)
        v[(size_t)(i * k + e)] = (int8_t)(kind == 0 ? 1 : kind == 1 ? -1 : r.below(3) - 1);
    }
  };
  fill_rows(a, m);
  fill_rows(b, n);
  auto planes = [&](const std::vector<int8_t>& v, int64_t rows, Words& s, Words& msk) {
    s.assign((size_t)(rows * t.words), 0);
    msk.assign((size_t)(rows * t.words), 0);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t e = 0; e < t.words * 64; ++e) {
        const int8_t x = e < k ? v[(size_t)(i * k + e)] : 0;
        const uint64_t bit = (uint64_t)1 << (e % 64);
        if (x != 0) msk[(size_t)(i * t.words + e / 64)] |= bit;
        if (x < 0 || (x == 0 && r.bit())) s[(size_t)(i * t.words + e / 64)] |= bit;
      }
  };
  Words sb, mb;
  planes(a, m, t.sa, t.ma);
  planes(b, n, sb, mb);
  t.sb_panels = reference_panels(sb, n, t.words);
  t.mb_panels = reference_panels(mb, n, t.words);
  t.want.assign((size_t)(m * n), 0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      int32_t sum = 0;
      for (int64_t e = 0; e < k; ++e) sum += a[(size_t)(i * k + e)] * b[(size_t)(j * k + e)];
      t.want[(size_t)(i * n + j)] = sum;
    }
  return t;
}

void run_ternary(const TernaryCase& t) {
  const size_t words = (size_t)((t.m * t.n + 1) / 2) + GUARD;
  const Words fill = random_words(g_rng, words);
  Words out = fill, want = fill;
  memcpy(want.data(), t.want.data(), sizeof(int32_t) * t.want.size());
  bq_ternary_gemm(t.sa.data(), t.ma.data(), t.m, t.sb_panels.data(), t.mb_panels.data(), t.n, t.words,
                  (int32_t*)out.data());
  char what[120];
  snprintf(what, sizeof what, "ternary M=%lld N=%lld K=%lld", (long long)t.m, (long long)t.n, (long long)t.k);
  expect_words(what, out.data(), want.data(), words);
}

// ---------------------------------------------------------------------------------------------
// Packing
// ---------------------------------------------------------------------------------------------
void check_pack_rows(Rng& r, int64_t rows, int64_t k, int64_t ld_extra, int64_t out_extra) {
  const int64_t ld = k + ld_extra, words = words_for(k), out_ld = words + out_extra;
  std::vector<float> x((size_t)(rows * ld));
  for (auto& v : x) v = odd_float(r, true);
  const size_t size = (size_t)(rows * out_ld) + GUARD;
  const Words fill = random_words(g_rng, size);
  Words out = fill, want = fill;
  int64_t nans = 0;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t w = 0; w < words; ++w) {
      uint64_t word = 0;
      for (int64_t e = 0; e < 64 && w * 64 + e < k; ++e) {
        const float v = x[(size_t)(i * ld + w * 64 + e)];
        if (isnan(v)) ++nans;
        else if (v < 0) word |= (uint64_t)1 << e;
      }
      want[(size_t)(i * out_ld + w)] = word;
    }
  const int64_t got = bq_pack_rows(x.data(), rows, k, ld, out.data(), out_ld);
  char what[120];
  snprintf(what, sizeof what, "pack_rows rows=%lld k=%lld ld=%lld out_ld=%lld", (long long)rows, (long long)k,
           (long long)ld, (long long)out_ld);
  expect_words(what, out.data(), want.data(), size);
  expect_eq(std::string(what) + " NaN count", got, nans);
}

void check_pack_planes(Rng& r, int64_t n, int64_t c, int64_t hw, int64_t groups) {
  const int64_t cg = c / groups, gw = words_for(cg), pw = groups * gw;
  std::vector<float> x((size_t)(n * c * hw));
  for (auto& v : x) v = odd_float(r, true);
  const size_t size = (size_t)(n * hw * pw) + GUARD;
  const Words fill = random_words(g_rng, size);
  Words out = fill, want = fill;
  for (size_t i = 0; i < (size_t)(n * hw * pw); ++i) want[i] = 0;
  int64_t nans = 0;
  for (int64_t b = 0; b < n; ++b)
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t p = 0; p < hw; ++p) {
        const float v = x[(size_t)((b * c + ch) * hw + p)];
        if (isnan(v)) ++nans;
        else if (v < 0)
          want[(size_t)((b * hw + p) * pw + (ch / cg) * gw + (ch % cg) / 64)] |= (uint64_t)1 << ((ch % cg) % 64);
      }
  const int64_t got = bq_pack_planes(x.data(), n, c, hw, groups, out.data());
  char what[120];
  snprintf(what, sizeof what, "pack_planes n=%lld c=%lld hw=%lld groups=%lld", (long long)n, (long long)c,
           (long long)hw, (long long)groups);
  expect_words(what, out.data(), want.data(), size);
  expect_eq(std::string(what) + " NaN count", got, nans);
}

void check_prepack_panels(Rng& r, int64_t n, int64_t words) {
  const Words rows = random_words(r, (size_t)(n * words));
  Words want = reference_panels(rows, n, words);
  const size_t size = want.size() + GUARD;
  const Words fill = random_words(g_rng, size);
  Words out = fill;
  for (size_t i = want.size(); i < size; ++i) want.push_back(fill[i]);
  bq_prepack_panels(rows.data(), n, words, out.data());
  expect_words("prepack_panels n=" + std::to_string(n) + " words=" + std::to_string(words), out.data(), want.data(),
               size);
}

// ---------------------------------------------------------------------------------------------
// Max-pool of signs
// ---------------------------------------------------------------------------------------------
void check_maxpool(Rng& r, int64_t n, int64_t h, int64_t w, int64_t words, int64_t kh, int64_t kw, int64_t sh,
                   int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  const int64_t ho = (h + 2 * ph - dh * (kh - 1) - 1) / sh + 1, wo = (w + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  // Sparse and dense bits, so that both AND and OR see 0 and 1 results.
  Words x((size_t)(n * h * w * words));
  for (auto& v : x) v = r.below(3) == 0 ? r.next() & r.next() & r.next() : r.below(2) ? r.next() | r.next() : r.next();
  const Words mask = random_words(r, (size_t)words);
  const size_t size = (size_t)(n * ho * wo * words) + GUARD;
  const Words fill = random_words(g_rng, size);
  Words out = fill, want = fill;
  for (int64_t b = 0; b < n; ++b)
    for (int64_t oy = 0; oy < ho; ++oy)
      for (int64_t ox = 0; ox < wo; ++ox)
        for (int64_t ch = 0; ch < words * 64; ++ch) {
          bool all = true, any = false;  // over the taps inside the input (none: AND 1, OR 0)
          for (int64_t i = 0; i < kh; ++i)
            for (int64_t j = 0; j < kw; ++j) {
              const int64_t iy = oy * sh - ph + i * dh, ix = ox * sw - pw + j * dw;
              if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
              const bool bit = (x[(size_t)(((b * h + iy) * w + ix) * words + ch / 64)] >> (ch % 64)) & 1;
              all = all && bit;
              any = any || bit;
            }
          const bool use_and = (mask[(size_t)(ch / 64)] >> (ch % 64)) & 1;
          uint64_t& dst = want[(size_t)(((b * ho + oy) * wo + ox) * words + ch / 64)];
          if (ch % 64 == 0) dst = 0;
          if (use_and ? all : any) dst |= (uint64_t)1 << (ch % 64);
        }
  const BqMaxPoolArgs args = {n, h, w, words, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, mask.data()};
  bq_maxpool_bits(x.data(), &args, out.data());
  char what[160];
  snprintf(what, sizeof what, "maxpool %lldx%lldx%lld words=%lld k=%lldx%lld s=%lld,%lld p=%lld,%lld d=%lld,%lld",
           (long long)n, (long long)h, (long long)w, (long long)words, (long long)kh, (long long)kw, (long long)sh,
           (long long)sw, (long long)ph, (long long)pw, (long long)dh, (long long)dw);
  expect_words(what, out.data(), want.data(), size);
}

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------
const ConvShape kConvShapes[] = {
    // name                      n     c   h   w    o  groups kh kw sh sw ph pw dh dw
    {"K=1 3x3 p1",               1,    1,  5,  6,   3,  1,    3, 3, 1, 1, 1, 1, 1, 1},
    {"K=63 3x3 p1 n2",           2,   63,  6,  5,  10,  1,    3, 3, 1, 1, 1, 1, 1, 1},
    {"K=64 3x3 s2 p1",           1,   64,  7,  7,  16,  1,    3, 3, 2, 2, 1, 1, 1, 1},
    {"K=65 3x3 p2 d2",           1,   65,  6,  7,   9,  1,    3, 3, 1, 1, 2, 2, 2, 2},
    {"K=1000 3x3 p1",            1, 1000,  4,  5,  11,  1,    3, 3, 1, 1, 1, 1, 1, 1},
    {"K=1000 5x5 p2 s2",         1, 1000,  5,  4,   9,  1,    5, 5, 2, 2, 2, 2, 1, 1},
    {"K=70 5x5 p2",              1,   70,  9,  8,  20,  1,    5, 5, 1, 1, 2, 2, 1, 1},
    {"K=33 5x5 s2 p2 n2",        2,   33, 11,  9,   8,  1,    5, 5, 2, 2, 2, 2, 1, 1},
    {"K=5 5x5 p0",               1,    5,  7,  6,   7,  1,    5, 5, 1, 1, 0, 0, 1, 1},
    {"K=20 3x3 p2",              1,   20,  4,  4,   5,  1,    3, 3, 1, 1, 2, 2, 1, 1},
    {"K=40 1x3 p0,1 s1,2 d1,2",  1,   40,  6,  7,  12,  1,    1, 3, 1, 2, 0, 1, 1, 2},
    {"K=130 1x1 n2",             2,  130,  5,  4,  24,  1,    1, 1, 1, 1, 0, 0, 1, 1},
    {"K=64 1x1 s2 p1",           1,   64,  5,  5,  13,  1,    1, 1, 2, 2, 1, 1, 1, 1},
    {"grouped 4 K=96 3x3 p1",    1,   96,  6,  6,  40,  4,    3, 3, 1, 1, 1, 1, 1, 1},
    {"grouped 2 K=260 3x3 p1",   1,  260,  5,  5,  18,  2,    3, 3, 1, 1, 1, 1, 1, 1},
    {"grouped 2 K=128 1x1",      1,  128,  4,  3,  32,  2,    1, 1, 1, 1, 0, 0, 1, 1},
    {"depthwise 32 3x3 p1 n2",   2,   32,  7,  6,  32, 32,    3, 3, 1, 1, 1, 1, 1, 1},
    {"depthwise x2 16 3x3 s2",   1,   16,  6,  6,  32, 16,    3, 3, 2, 2, 1, 1, 1, 1},
    {"depthwise 8 5x5 p2 d2",    1,    8,  9,  9,   8,  8,    5, 5, 1, 1, 2, 2, 2, 2},
    // Enough work for the worker threads (run_tasks goes parallel from 2^17 word pairs).
    {"threaded K=128 3x3 p1",    1,  128, 14, 14,  72,  1,    3, 3, 1, 1, 1, 1, 1, 1},
    {"threaded K=64 O=130 3x3",  1,   64, 12, 12, 130,  1,    3, 3, 1, 1, 1, 1, 1, 1},
    {"threaded grouped 2 K=128", 1,  128, 12, 12,  64,  2,    3, 3, 1, 1, 1, 1, 1, 1},
    // Sign output of several groups sharing output words across threads (bits of one byte from
    // different tasks).
    {"threaded depthwise 64",    1,   64, 14, 14,  64, 64,    3, 3, 1, 1, 1, 1, 1, 1},
    {"threaded grouped 3 O=3*13",1,   96, 16, 16,  39,  3,    3, 3, 1, 1, 1, 1, 1, 1},
    // A 1x1 kernel with more than 4096 words per pixel: gathered (no shared zero segment).
    {"K=262145 1x1 p1",          1, 262145, 1, 1,   9,  1,    1, 1, 1, 1, 1, 1, 1, 1},
};

const int64_t kMatmulM[] = {1, 3, 17, 33};
const int64_t kMatmulK[] = {1, 63, 64, 65, 1000, 4097};
const int64_t kMatmulN[] = {5, 70};

}  // namespace

int main() {
  Rng data{20261203};

  // Inputs and references once; every instruction set and thread count runs against them.
  std::vector<ConvCase> convs;
  for (const ConvShape& s : kConvShapes) convs.push_back(make_conv(s, data));
  for (int64_t m : kMatmulM)
    for (int64_t k : kMatmulK)
      for (int64_t n : kMatmulN) {
        const std::string name = "matmul M=" + std::to_string(m) + " K=" + std::to_string(k) + " N=" + std::to_string(n);
        ConvShape s = {name, 1, k, 1, m, n, 1, 1, 1, 1, 1, 0, 0, 1, 1};
        convs.push_back(make_conv(s, data));
      }
  std::vector<TernaryCase> ternaries;
  for (int64_t m : kMatmulM)
    for (int64_t k : kMatmulK)
      for (int64_t n : kMatmulN) ternaries.push_back(make_ternary(m, n, k, data));

  std::string isas;
  const int count = bq_isa_count();
  for (int i = 0; i < count; ++i) {
    const char* name = bq_isa_name(i);
    if (!bq_isa_supported(i)) {
      expect_eq(std::string("bq_select_isa(") + name + ") on a CPU without it", bq_select_isa(name), -2);
      continue;
    }
    expect_eq(std::string("bq_select_isa(") + name + ")", bq_select_isa(name), 0);
    ++g_checks;
    if (strcmp(bq_selected_isa(), name) != 0) fail(std::string("bq_selected_isa() after selecting ") + name);
    isas += (isas.empty() ? "" : ",") + std::string(name);
    for (int threads = 1; threads <= 2; ++threads) {
      bq_set_num_threads(threads);
      g_context = std::string(name) + ", " + std::to_string(threads) + " thread" + (threads > 1 ? "s" : "");
      for (const ConvCase& c : convs) run_conv_case(c, threads);
      for (const TernaryCase& t : ternaries) run_ternary(t);
      if (threads == 1) {
        for (int64_t k : {1, 7, 8, 9, 17, 63, 64, 65, 1000})
          check_pack_rows(data, 5, k, k % 3, k % 2);
        check_pack_rows(data, 1, 4097, 0, 0);
        for (int64_t c : {1, 3, 64, 65, 130}) check_pack_planes(data, 2, c, 7, 1);
        check_pack_planes(data, 1, 96, 5, 4);
        check_pack_planes(data, 2, 260, 3, 2);
        check_pack_planes(data, 1, 16, 9, 16);
        check_pack_planes(data, 1, 1, 1, 1);
        ++g_checks;
        if (!(bq_peak_bitmacs_per_s(50) > 0)) fail("bq_peak_bitmacs_per_s(50) <= 0");
      }
    }
  }
  g_context = "dispatch";
  bq_set_num_threads(1);
  expect_eq("bq_select_isa(no-such-isa)", bq_select_isa("no-such-isa"), -1);
  expect_eq("bq_select_isa(NULL)", bq_select_isa(nullptr), 0);
  for (int64_t n : {1, 7, 8, 9, 70})
    for (int64_t words : {1, 3, 65}) check_prepack_panels(data, n, words);
  check_maxpool(data, 1, 6, 6, 1, 2, 2, 2, 2, 0, 0, 1, 1);
  check_maxpool(data, 2, 7, 5, 2, 3, 3, 2, 2, 1, 1, 1, 1);
  check_maxpool(data, 1, 9, 8, 3, 3, 3, 1, 1, 1, 1, 1, 1);
  check_maxpool(data, 1, 9, 9, 1, 3, 3, 1, 2, 2, 2, 2, 2);
  check_maxpool(data, 1, 5, 7, 17, 2, 3, 1, 2, 1, 1, 1, 2);
  check_maxpool(data, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1);  // border outputs see no input: AND 1, OR 0

  if (isas.empty()) fail("no instruction set runs on this CPU");
  printf("native harness: %s: %ld checks, %ld mismatches\n", isas.c_str(), g_checks, g_mismatches);
  return g_mismatches == 0 ? 0 : 1;
}
