// Binary GEMM on the b1 tensor cores: mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc.
//
// Hopper's b1 MMA offers AND-popc only.  With a, b the bit rows (bit 1 = -1) and pa, pb their
// popcounts, popc(a ^ b) = pa + pb - 2 popc(a & b), so the +-1 dot product is
//     dot = K - 2 (pa + pb) + 4 popc(a & b).
// row_popcount computes pa / pb (one warp per row); packed_gemm_tc accumulates popc(a & b).
//
// CTA tile 128 x 128, 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 = 4 x 4 mma tiles (64 s32
// accumulators per thread).  A stage holds 512 bits (8 words) of K for 128 rows of A and of B in
// shared memory, row stride 20 u32 (16 data + 4 pad) so the fragment loads of the 8 rows x 4
// threads-in-group of a warp hit 32 distinct banks.  Fragments (PTX ISA, m16n8k256 .b1): with
// g = lane / 4, t = lane % 4, a0/a2 are row g, a1/a3 row g + 8; a0/a1 cover k bits 32t..32t+31 and
// a2/a3 bits 128 + 32t..; b0 covers k bits 32t.. and b1 128 + 32t.. of column g; c0,c1 are row g,
// columns 2t, 2t+1 and c2,c3 row g + 8.  Because the AND-popc sums over all 256 bits, only the
// pairing a0<->b0, a2<->b1 of the same k chunk matters, which the shared layout guarantees.
// Double-buffered through registers like packed_gemm; out-of-range rows / words load as 0.
//
// Launch: grid (ceil(M/128), ceil(N/128)), block 256, static shared memory 40 KiB.
// M is on gridDim.x (limit 2^31 - 1) because it is the large one (a conv's batch x Ho x Wo);
// N (output channels) on gridDim.y (limit 65535 tiles).  kernels/cuda_matmul.py: tile_grid.
#include "bitops.cuh"

namespace {
constexpr int kTcTile = 128;
constexpr int kStageWords = 8;           // 512 bits of K per stage
constexpr int kRowU32 = 2 * kStageWords + 4;
}

extern "C" __global__ void __launch_bounds__(256) row_popcount(const u64* __restrict__ bits, int* __restrict__ out,
                                                               int rows, int W) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  int count = 0;
  for (int w = lane; w < W; w += 32) count += __popcll(__ldg(bits + static_cast<size_t>(row) * W + w));
  count = __reduce_add_sync(0xffffffffu, count);
  if (lane == 0) out[row] = count;
}

static __device__ __forceinline__ void mma_b1_and(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

extern "C" __global__ void __launch_bounds__(256) packed_gemm_tc(const u64* __restrict__ a, const u64* __restrict__ b,
                                                                 const int* __restrict__ pa, const int* __restrict__ pb,
                                                                 int* __restrict__ c, int M, int N, int W, int K) {
  __shared__ __align__(16) unsigned sA[2][kTcTile * kRowU32];
  __shared__ __align__(16) unsigned sB[2][kTcTile * kRowU32];
  constexpr int LOADS = kTcTile * kStageWords / 256;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int warp_m = (warp >> 2) * 64, warp_n = (warp & 3) * 32;
  const int m0 = blockIdx.x * kTcTile, n0 = blockIdx.y * kTcTile;

  u64 ra[LOADS], rb[LOADS];
  auto fetch = [&](int stage) {
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int idx = tid + 256 * i;
      const int row = idx / kStageWords, kw = stage * kStageWords + idx % kStageWords;
      ra[i] = (m0 + row < M && kw < W) ? __ldg(a + static_cast<size_t>(m0 + row) * W + kw) : 0ull;
      rb[i] = (n0 + row < N && kw < W) ? __ldg(b + static_cast<size_t>(n0 + row) * W + kw) : 0ull;
    }
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int idx = tid + 256 * i;
      const int off = (idx / kStageWords) * kRowU32 + 2 * (idx % kStageWords);
      *reinterpret_cast<u64*>(&sA[buf][off]) = ra[i];
      *reinterpret_cast<u64*>(&sB[buf][off]) = rb[i];
    }
  };

  int acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  const int stages = (W + kStageWords - 1) / kStageWords;
  fetch(0);
  store(0);
  __syncthreads();
  for (int stage = 0; stage < stages; ++stage) {
    const int buf = stage & 1;
    if (stage + 1 < stages) fetch(stage + 1);
#pragma unroll
    for (int kb = 0; kb < 2; ++kb) {   // two 256-bit MMA steps per stage
      const int col = kb * 8 + t;
      unsigned bf[4][2];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const unsigned* rowp = &sB[buf][(warp_n + 8 * j + g) * kRowU32];
        bf[j][0] = rowp[col];
        bf[j][1] = rowp[col + 4];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const unsigned* r0 = &sA[buf][(warp_m + 16 * i + g) * kRowU32];
        const unsigned* r8 = r0 + 8 * kRowU32;
        const unsigned af[4] = {r0[col], r8[col], r0[col + 4], r8[col + 4]};
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_b1_and(acc[i][j], af, bf[j]);
      }
    }
    if (stage + 1 < stages) store(buf ^ 1);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + warp_m + 16 * i + g + 8 * h;
      if (m >= M) continue;
      const int pm = __ldg(pa + m);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int n = n0 + warp_n + 8 * j + 2 * t + e;
          if (n < N) c[static_cast<size_t>(m) * N + n] = K - 2 * (pm + __ldg(pb + n)) + 4 * acc[i][j][2 * h + e];
        }
    }
}
