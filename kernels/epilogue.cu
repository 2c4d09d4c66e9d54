// Fused output transform of an int32 accumulator C[M, N] (N = output channels, innermost).
//
// epilogue_affine:    y[m, n] = float(acc) * mul[n] + add[n] in float32, rounded as two separate
//                     IEEE operations (no FMA contraction, subnormals kept) to match the CPU path.
//                     mul_f32 / add_f32 emit mul.rn.f32 / add.rn.f32 as inline PTX: __fmul_rn and
//                     __fadd_rn would become mul.rn.ftz.f32 / add.rn.ftz.f32 under -ftz=true, which
//                     CuPy appends to every compile (after ours, and NVRTC honours the last one).
// epilogue_sign_pack: y computed in float64 the same way, then bit = (y < 0) (tie y == 0 -> +1),
//                     packed along N into 64-bit words (bit j of word w = channel 64w + j, pad 0).
//                     One warp per output word: lanes read 32 + 32 consecutive accumulators
//                     (coalesced) and two __ballot_sync calls form the low / high halves.
#include "bitops.cuh"

static __device__ __forceinline__ float mul_f32(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return __fmul_rn(a, b);  // host-side builds (e.g. a CPU emulation of these kernels)
#endif
}

static __device__ __forceinline__ float add_f32(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return __fadd_rn(a, b);
#endif
}

extern "C" __global__ void __launch_bounds__(256) epilogue_affine(const int* __restrict__ acc, const float* __restrict__ mul,
                                                                  const float* __restrict__ add, float* __restrict__ y,
                                                                  long long total, int N) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int n = static_cast<int>(i % N);
    y[i] = add_f32(mul_f32(static_cast<float>(acc[i]), __ldg(mul + n)), __ldg(add + n));
  }
}

extern "C" __global__ void __launch_bounds__(256) epilogue_sign_pack(const int* __restrict__ acc, const double* __restrict__ mul,
                                                                     const double* __restrict__ add, u64* __restrict__ bits,
                                                                     int M, int N, int WN) {
  const int lane = threadIdx.x & 31;
  const long long word = blockIdx.x * static_cast<long long>(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (word >= static_cast<long long>(M) * WN) return;  // whole warp exits together
  const int m = static_cast<int>(word / WN), w = static_cast<int>(word % WN);
  unsigned half[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int n = w * 64 + 32 * h + lane;
    bool negative = false;
    if (n < N) {
      const double v = __dadd_rn(__dmul_rn(static_cast<double>(acc[static_cast<size_t>(m) * N + n]), mul[n]), add[n]);
      negative = v < 0.0;
    }
    half[h] = __ballot_sync(0xffffffffu, negative);
  }
  if (lane == 0) bits[word] = (static_cast<u64>(half[1]) << 32) | half[0];
}
