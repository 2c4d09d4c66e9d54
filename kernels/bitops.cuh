// Shared device helpers for the packed binary / ternary kernels.
//
// Packed format (see kernels/packing.py): 64-bit words along K, bit j of word w = element 64w+j,
// bit 1 = -1, pad bits 0.  Ternary operands carry two planes (s = sign, m = nonzero).
//
// WordDot<PLANES> is the one place where a pair of words becomes an accumulator increment, so the
// GEMV and GEMM kernels are written once for both binary and ternary operands:
//   binary  (PLANES = 1): acc += popc(a ^ b)                 dot = K - 2 * acc
//   ternary (PLANES = 2): acc += popc(ma & mb) - 2 * popc(ma & mb & (sa ^ sb))   dot = acc
#pragma once

typedef unsigned long long u64;

template <int PLANES>
struct WordDot;

template <>
struct WordDot<1> {
  static __device__ __forceinline__ int step(u64 a_s, u64 /*a_m*/, u64 b_s, u64 /*b_m*/) {
    return __popcll(a_s ^ b_s);
  }
  static __device__ __forceinline__ int finish(int acc, int k) { return k - 2 * acc; }
};

template <>
struct WordDot<2> {
  static __device__ __forceinline__ int step(u64 a_s, u64 a_m, u64 b_s, u64 b_m) {
    const u64 both = a_m & b_m;
    return __popcll(both) - 2 * __popcll(both & (a_s ^ b_s));
  }
  static __device__ __forceinline__ int finish(int acc, int /*k*/) { return acc; }
};

// VEC consecutive words from global memory through the read-only path (VEC = 2: one 16-byte load,
// valid when the address is 16-byte aligned, i.e. the row stride W is even).
template <int VEC>
static __device__ __forceinline__ void load_global_words(const u64* __restrict__ p, u64 (&out)[VEC]) {
  if constexpr (VEC == 2) {
    const ulonglong2 v = __ldg(reinterpret_cast<const ulonglong2*>(p));
    out[0] = v.x;
    out[1] = v.y;
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = __ldg(p + v);
  }
}
