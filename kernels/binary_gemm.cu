// Tiled CUDA-core packed GEMM: C[M, N] = A[M, K] . B[N, K]^T (binary or ternary, int32 out).
//
// CTA tile 128 x 128 outputs, 256 threads as a 16 x 16 grid, each thread an 8 x 8 register tile
// (64 int32 accumulators).  K advances KW = 8 / PLANES words per stage (512 bits binary, 256 bits
// ternary), staged in shared memory K-major (sA[stage][plane][kw][row]) so a thread's operands are
// 16-byte vector loads (ternary holds B words for 4 columns at a time, re-reading A, to stay
// within registers).  Thread (ty, tx) owns rows ty*2 + 32*i + {0,1} and columns
// tx*2 + 32*j + {0,1}, i, j < 4: a half-warp reads 256 contiguous bytes of sB (conflict-free) and
// two addresses of sA (broadcast).  Double-buffered: the next stage's global words are fetched
// into registers before computing the current stage, then stored to the other buffer; one
// __syncthreads per stage.  Out-of-range rows and K words load as 0 (they add 0 to XOR/AND counts;
// out-of-range outputs are not written).
//
// One CTA per SM by design (__launch_bounds__(256, 1)): the 8 x 8 int32 tile plus operands needs
// more than 128 registers, and capping at 128 (two CTAs) spills.
//
// Launch: grid (ceil(M/128), ceil(N/128)), block 256, static shared memory 32 KiB.
// M is on gridDim.x (limit 2^31 - 1) because it is the large one (a conv's batch x Ho x Wo);
// N (output channels) on gridDim.y (limit 65535 tiles).  kernels/cuda_matmul.py: tile_grid.
#include "bitops.cuh"

namespace {
constexpr int kTile = 128;
constexpr int kThreads = 256;
}

template <int PLANES>
__global__ void __launch_bounds__(256, 1) packed_gemm(const u64* __restrict__ a_s, const u64* __restrict__ a_m,
                                                      const u64* __restrict__ b_s, const u64* __restrict__ b_m,
                                                      int* __restrict__ c, int M, int N, int W, int K) {
  constexpr int KW = 8 / PLANES;                 // words per stage per plane
  constexpr int LOADS = kTile * KW / kThreads;   // words per thread per operand plane
  constexpr int JB = 8 / PLANES;                 // columns whose B words sit in registers at once
  __shared__ __align__(16) u64 sA[2][PLANES][KW][kTile];
  __shared__ __align__(16) u64 sB[2][PLANES][KW][kTile];

  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const int m0 = blockIdx.x * kTile, n0 = blockIdx.y * kTile;
  const u64* a_planes[2] = {a_s, a_m};
  const u64* b_planes[2] = {b_s, b_m};

  u64 ra[PLANES][LOADS], rb[PLANES][LOADS];
  auto fetch = [&](int stage) {
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int idx = tid + kThreads * i;
      const int row = idx / KW, kw = stage * KW + idx % KW;
      const bool a_ok = m0 + row < M && kw < W, b_ok = n0 + row < N && kw < W;
#pragma unroll
      for (int p = 0; p < PLANES; ++p) {
        ra[p][i] = a_ok ? __ldg(a_planes[p] + static_cast<size_t>(m0 + row) * W + kw) : 0ull;
        rb[p][i] = b_ok ? __ldg(b_planes[p] + static_cast<size_t>(n0 + row) * W + kw) : 0ull;
      }
    }
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int idx = tid + kThreads * i;
#pragma unroll
      for (int p = 0; p < PLANES; ++p) {
        sA[buf][p][idx % KW][idx / KW] = ra[p][i];
        sB[buf][p][idx % KW][idx / KW] = rb[p][i];
      }
    }
  };

  int acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0;

  const int stages = (W + KW - 1) / KW;
  fetch(0);
  store(0);
  __syncthreads();
  for (int stage = 0; stage < stages; ++stage) {
    const int buf = stage & 1;
    if (stage + 1 < stages) fetch(stage + 1);
#pragma unroll 1
    for (int kw = 0; kw < KW; ++kw) {
#pragma unroll
      for (int j0 = 0; j0 < 8; j0 += JB) {
        u64 bv[PLANES][JB];
#pragma unroll
        for (int p = 0; p < PLANES; ++p)
#pragma unroll
          for (int jj = 0; jj < JB; jj += 2) {
            const int col = tx * 2 + 32 * ((j0 + jj) >> 1);
            const ulonglong2 v = *reinterpret_cast<const ulonglong2*>(&sB[buf][p][kw][col]);
            bv[p][jj] = v.x;
            bv[p][jj + 1] = v.y;
          }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          u64 av[PLANES][2];
#pragma unroll
          for (int p = 0; p < PLANES; ++p) {
            const ulonglong2 v = *reinterpret_cast<const ulonglong2*>(&sA[buf][p][kw][ty * 2 + 32 * i]);
            av[p][0] = v.x;
            av[p][1] = v.y;
          }
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int jj = 0; jj < JB; ++jj)
              acc[2 * i + h][j0 + jj] +=
                  WordDot<PLANES>::step(av[0][h], av[PLANES - 1][h], bv[0][jj], bv[PLANES - 1][jj]);
        }
      }
    }
    if (stage + 1 < stages) store(buf ^ 1);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int m = m0 + ty * 2 + 32 * (i >> 1) + (i & 1);
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int n = n0 + tx * 2 + 32 * (j >> 1) + (j & 1);
      if (n < N) c[static_cast<size_t>(m) * N + n] = WordDot<PLANES>::finish(acc[i][j], K);
    }
  }
}
