// C interface of the native CPU kernels (see kernels/native.py for the Python side).
//
// Format: packed 64-bit words, bit j of word w = element 64w + j, bit 1 = -1, pad bits 0
// (kernels/packing.py).  Binary convolution is an implicit GEMM over packed NHWC activations;
// a matmul is the same computation with a 1x1 kernel over M "pixels".
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Output of bq_*_conv: what is written per (pixel, output channel).
enum BqOutputMode {
  BQ_OUT_INT32 = 0,   // int32 dot product
  BQ_OUT_FLOAT = 1,   // float32: (float)dot * mul_f[o], then + add_f[o] (two roundings, no FMA)
  BQ_OUT_SIGN = 2,    // one bit per channel: y = (double)dot * mul_d[o] + add_d[o] (two roundings), bit = y < 0
};

typedef struct {
  const uint64_t* x;          // packed activations [n][h][w][pixel_words]
  int64_t n, h, w;
  int64_t pixel_words;        // words per pixel = groups * group_words
  int64_t group_words;        // ceil(cin_per_group / 64)
  int64_t cin_per_group;      // true channels per group (elements per tap)
  const uint64_t* panels;     // weights [groups][ceil(out_per_group/8)][taps*group_words][8]
  const int32_t* tap_sums;    // [groups][taps][out_per_group]: sum_c w[o,c,t] (+-1); NULL = one-padding
  int64_t groups, out_per_group;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
  int32_t mode;               // BqOutputMode
  void* out;                  // int32|float [n*ho*wo][out_stride] or uint64 [n*ho*wo][out_stride words]
  int64_t out_stride;         // elements (int32/float) or words (sign) per output pixel
  const float* mul_f;         // [groups*out_per_group] (BQ_OUT_FLOAT)
  const float* add_f;
  const double* mul_d;        // (BQ_OUT_SIGN)
  const double* add_d;
  const float* residual;      // BQ_OUT_FLOAT: NULL, or [n*ho*wo][residual_stride] added after the transform
  int64_t residual_stride;
  int32_t clamp;              // BQ_OUT_FLOAT: nonzero = then clamp to [clamp_lo, clamp_hi] (Hardtanh)
  float clamp_lo, clamp_hi;
} BqConvArgs;

// A float convolution of a few input channels whose output a binary layer reads only through
// its sign (bq_float_conv_sign): mnist_cnn's first conv -> max-pool -> BatchNorm -> binary conv.
//   y[o] = sum over c, i, j in that order of x[c, iy, ix] * w[c, i, j, o], float32, no FMA; taps in
//          the zero padding are skipped (they would add 0); then + bias[o] (float32) if given;
//   bit  = (double)y * mul[o] + add[o] < 0 (two roundings, as BQ_OUT_SIGN), pad bits 0.
typedef struct {
  const float* x;           // [n][c][h][w] through the element strides below (NCHW or channels_last)
  int64_t n, c, h, w, stride_n, stride_c, stride_h, stride_w;
  const float* weight;      // [ceil(o/64)][c * kh * kw][64]: 64 output channels per block, zero past o
  const float* bias;        // [o] or NULL
  int64_t o, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
  const double* mul;        // [ceil(o/64) * 64] (zero past o)
  const double* add;
  uint64_t* out;            // [n][ho][wo][ceil(o/64)]
} BqFloatConvSignArgs;

// A max-pool of signs on packed NHWC words (bq_maxpool_bits): per channel the AND (bit 1 in
// and_mask[words]) or the OR of the window's bits; out-of-range taps are skipped.  The pooled
// entry points (bq_conv_pooled, bq_float_conv_sign_pooled) run a chain of them on a sign-output
// kernel's result in the same call: pool i reads pool i-1's [n][h][w][words] (pool 0 the kernel's),
// the last writes the args' `out`, the others scratch buffers.
typedef struct {
  int64_t n, h, w, words, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
  const uint64_t* and_mask;  // [words]
} BqMaxPoolArgs;

// A prepared ternary x int8 linear layer (bq_ternary_i8_layer): everything but the input, so that
// a call from Python converts four arguments, not eleven (microseconds at batch 1).
typedef struct {
  const uint8_t* codes;  // 2-bit weight codes [n][kp / 4] (bq_ternary_i8_prepack)
  int64_t n, k, kp;
  float weight_scale;    // y = (float)acc * (step[i] * weight_scale) (+ bias[j]), step[i] the row's absmax step
  float rms_eps;         // >= 0: parameter-free RMSNorm before the quantization; < 0: none
  const float* bias;     // [n] or NULL
} BqI8Layer;

#ifdef __cplusplus
}
#endif
