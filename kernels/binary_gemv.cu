// Small-M packed GEMV / skinny GEMM: C[M, N] = A[M, K] . B[N, K]^T for M <= MROWS (<= 16).
//
// Memory-bound regime: the packed weight matrix B is streamed once.  One warp owns one output
// column n (one row of B) at a time, grid-striding over n; its 32 lanes read consecutive VEC-word
// chunks of that row (VEC = 2: coalesced 16-byte loads, 512 contiguous bytes per warp per load).
// All M rows of A (every plane) are staged in shared memory once per block, zero-padded up to
// MROWS rows so the unrolled row loop needs no bounds checks.  Lanes reduce with
// __reduce_add_sync (sm_80+), lane 0 writes the dot products of column n.
//
// Launch: blockDim.x = 256, dynamic shared memory = PLANES * MROWS * W * 8 bytes.
#include "bitops.cuh"

template <int PLANES, int MROWS, int VEC>
__global__ void __launch_bounds__(256, 1) packed_gemv(const u64* __restrict__ a_s, const u64* __restrict__ a_m,
                                                   const u64* __restrict__ b_s, const u64* __restrict__ b_m,
                                                   int* __restrict__ c, int M, int N, int W, int K) {
  extern __shared__ __align__(16) u64 smem[];
  u64* sa_s = smem;
  u64* sa_m = smem + (PLANES == 2 ? MROWS * W : 0);
  for (int i = threadIdx.x; i < MROWS * W; i += blockDim.x) {
    const bool valid = i < M * W;
    sa_s[i] = valid ? a_s[i] : 0ull;
    if (PLANES == 2) sa_m[i] = valid ? a_m[i] : 0ull;
  }
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  for (int n = blockIdx.x * warps + (threadIdx.x >> 5); n < N; n += gridDim.x * warps) {
    int acc[MROWS];
#pragma unroll
    for (int r = 0; r < MROWS; ++r) acc[r] = 0;
    const u64* row_s = b_s + static_cast<size_t>(n) * W;
    const u64* row_m = (PLANES == 2 ? b_m : b_s) + static_cast<size_t>(n) * W;
#pragma unroll 1
    for (int w = lane * VEC; w < W; w += 32 * VEC) {
      u64 bs[VEC], bm[VEC];
      load_global_words<VEC>(row_s + w, bs);
      if constexpr (PLANES == 2) {
        load_global_words<VEC>(row_m + w, bm);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) bm[v] = bs[v];
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
#pragma unroll
        for (int r = 0; r < MROWS; ++r) {
          const u64 as = sa_s[r * W + w + v];
          const u64 am = PLANES == 2 ? sa_m[r * W + w + v] : as;
          acc[r] += WordDot<PLANES>::step(as, am, bs[v], bm[v]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < MROWS; ++r) {
      const int total = __reduce_add_sync(0xffffffffu, acc[r]);
      if (lane == 0 && r < M) c[static_cast<size_t>(r) * N + n] = WordDot<PLANES>::finish(total, K);
    }
  }
}
