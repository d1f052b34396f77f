// The tensor-core GEMM kernel template (see gemm.cu); gemm_wgmma.cu reuses its loader, tile order and epilogue,
// and dev/cuda/gemm_variants.cu instantiates other tile shapes of it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>
#include "activation_math.cuh"
#include "kernels.h"

namespace cudacnn_gemm {

// Block tile BM x BN, K step BK, warps arranged WARPS_M x WARPS_N, STAGES-deep cp.async pipeline.
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, STAGES = STAGES_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // per-warp tile
  static constexpr int MT = WM / 16, NT = WN / 8;             // mma tiles per warp
  static constexpr int CHUNKS = BK / 8;                       // 16-byte chunks per shared row
  static constexpr int A_STAGE = BM * BK, B_STAGE = BN * BK;  // elements per stage
  static constexpr int SMEM_BYTES = STAGES * (A_STAGE + B_STAGE) * 2;
  // XOR the 16-byte chunk index with row bits so that ldmatrix's 8 rows at one logical chunk, and the
  // cp.async writes, land in 8 different 16-byte bank groups (rows of 64 B for BK 32, 128 B for BK 64).
  __device__ static __forceinline__ int swizzle(int row, int chunk) {
    if constexpr (CHUNKS == 4) return row * BK + ((chunk ^ ((row >> 1) & 3)) << 3);
    else return row * BK + ((chunk ^ (row & 7)) << 3);
  }
};
using DefaultTile = Tile<128, 256, 32, 2, 4, 4>;
constexpr int GROUP_M = 8;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  int bytes = pred ? 16 : 0;  // 0 source bytes: the 16 shared bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
  unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

template <typename T>
__device__ __forceinline__ void store_pair(T* p, float v0, float v1);
template <>
__device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* p, float v0, float v1) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
}
template <>
__device__ __forceinline__ void store_pair<__half>(__half* p, float v0, float v1) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v0, v1);
}

// Copy the (BM or BN) x BK tile starting at (row0, k0) of a K-contiguous matrix into shared memory.
template <typename Cfg, typename T, int ROWS>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int rows_total, int K, int64_t ld, int row0, int k0) {
  constexpr int CHUNKS = Cfg::CHUNKS, THREADS = Cfg::THREADS;
#pragma unroll
  for (int i = 0; i < ROWS * CHUNKS / THREADS; ++i) {
    int id = threadIdx.x + i * THREADS;
    int row = id / CHUNKS, chunk = id % CHUNKS;
    int grow = row0 + row, gk = k0 + chunk * 8;
    bool ok = grow < rows_total && gk < K;
    const T* src = ok ? g + (int64_t)grow * ld + gk : g;
    cp_async16(smem + Cfg::swizzle(row, chunk), src, ok);
  }
}

// Copy k-tile kt of A (rows m0..) and B (rows n0..) into pipeline stage `stage` of As and Bs.
template <typename Cfg, typename T>
__device__ __forceinline__ void load_stage(T* As, T* Bs, const T* A, const T* B, int M, int N, int K, int64_t lda,
                                           int64_t ldb, int m0, int n0, int stage, int kt) {
  load_tile<Cfg, T, Cfg::BM>(As + stage * Cfg::A_STAGE, A, M, K, lda, m0, kt * Cfg::BK);
  load_tile<Cfg, T, Cfg::BN>(Bs + stage * Cfg::B_STAGE, B, N, K, ldb, n0, kt * Cfg::BK);
}

// Grouped rasterization: the origin (m0, n0) of block pid's BM x BN output tile. Blocks walk C in groups of
// GROUP_M row-tiles so the A and B tiles they share stay in L2.
template <int BM, int BN>
__device__ __forceinline__ void tile_origin(int pid, int M, int N, int& m0, int& n0) {
  int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  int per_group = GROUP_M * tiles_n;
  int first_m = (pid / per_group) * GROUP_M;
  int group_m = min(tiles_m - first_m, GROUP_M);
  m0 = (first_m + (pid % per_group) % group_m) * BM;
  n0 = ((pid % per_group) / group_m) * BN;
}

// bias[col] and bias[col + 1] in float32; 0 past N or without a bias.
template <typename T>
__device__ __forceinline__ void load_bias_pair(const T* __restrict__ bias, int col, int N, float& b0, float& b1) {
  b0 = 0.0f;
  b1 = 0.0f;
  if (bias != nullptr) {
    if (col < N) b0 = to_float(bias[col]);
    if (col + 1 < N) b1 = to_float(bias[col + 1]);
  }
}

// Epilogue of one accumulator pair, outputs (row, col) and (row, col + 1): bias, activation, one store
// (a 32-bit pair store where C's rows allow it); rows and columns outside C are skipped.
template <typename T, int ACT>
__device__ __forceinline__ void store_outputs(T* __restrict__ C, int64_t ldc, int M, int N, int row, int col,
                                              float acc0, float acc1, float b0, float b1, bool pair_store) {
  if (row >= M) return;
  float v0 = act_forward<ACT, true>(acc0 + b0);
  float v1 = act_forward<ACT, true>(acc1 + b1);
  T* dst = C + (int64_t)row * ldc + col;
  if (pair_store && col + 1 < N) {
    store_pair<T>(dst, v0, v1);
  } else {
    if (col < N) dst[0] = from_float<T>(v0);
    if (col + 1 < N) dst[1] = from_float<T>(v1);
  }
}

template <typename Cfg, typename T, int ACT>
__global__ void __launch_bounds__(Cfg::THREADS)
    gemm_tn_kernel(const T* __restrict__ A, const T* __restrict__ B, const T* __restrict__ bias, T* __restrict__ C,
                   int M, int N, int K, int64_t lda, int64_t ldb, int64_t ldc, bool pair_store) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, STAGES = Cfg::STAGES;
  constexpr int WARPS_N = Cfg::WARPS_N, WM = Cfg::WM, WN = Cfg::WN, MT = Cfg::MT, NT = Cfg::NT;
  constexpr int A_STAGE = Cfg::A_STAGE, B_STAGE = Cfg::B_STAGE;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* As = reinterpret_cast<T*>(smem_raw);
  T* Bs = As + STAGES * A_STAGE;

  int m0, n0;
  tile_origin<BM, BN>(blockIdx.x, M, N, m0, n0);

  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int wm = warp / WARPS_N, wn = warp % WARPS_N;

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

  int k_tiles = (K + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_stage<Cfg, T>(As, Bs, A, B, M, N, K, lda, ldb, m0, n0, s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();  // tile kt has landed
    __syncthreads();              // ... for every thread, and everyone is done with tile kt - 1
    int next = kt + STAGES - 1;
    if (next < k_tiles) load_stage<Cfg, T>(As, Bs, A, B, M, N, K, lda, ldb, m0, n0, next % STAGES, next);
    cp_async_commit();

    const T* a_s = As + (kt % STAGES) * A_STAGE;
    const T* b_s = Bs + (kt % STAGES) * B_STAGE;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      unsigned af[MT][4], bf[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i)
        ldmatrix_x4(af[i], a_s + Cfg::swizzle(wm * WM + i * 16 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
      for (int j = 0; j < NT / 2; ++j) {
        unsigned r[4];
        ldmatrix_x4(r, b_s + Cfg::swizzle(wn * WN + j * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)));
        bf[2 * j][0] = r[0];
        bf[2 * j][1] = r[1];
        bf[2 * j + 1][0] = r[2];
        bf[2 * j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma16816<T>(acc[i][j], af[i], bf[j]);
    }
  }
  cp_async_wait<0>();

  // Epilogue straight from the accumulators: bias, activation, one store.
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    int col = n0 + wn * WN + j * 8 + (lane & 3) * 2;
    float b0, b1;
    load_bias_pair(bias, col, N, b0, b1);
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        int row = m0 + wm * WM + i * 16 + (lane >> 2) + half * 8;
        store_outputs<T, ACT>(C, ldc, M, N, row, col, acc[i][j][2 * half], acc[i][j][2 * half + 1], b0, b1,
                              pair_store);
      }
    }
  }
}

template <typename Cfg, typename T, int ACT>
int launch(const void* a, const void* b, const void* bias, void* c, int M, int N, int K, int64_t lda, int64_t ldb,
           int64_t ldc, cudaStream_t stream) {
  auto kernel = gemm_tn_kernel<Cfg, T, ACT>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM_BYTES);
  if (err != cudaSuccess) return (int)err;
  bool pair_store = (ldc % 2 == 0) && (reinterpret_cast<uintptr_t>(c) % 4 == 0);
  int blocks = ((M + Cfg::BM - 1) / Cfg::BM) * ((N + Cfg::BN - 1) / Cfg::BN);
  kernel<<<blocks, Cfg::THREADS, Cfg::SMEM_BYTES, stream>>>((const T*)a, (const T*)b, (const T*)bias, (T*)c, M, N,
                                                            K, lda, ldb, ldc, pair_store);
  return (int)cudaGetLastError();
}

}  // namespace cudacnn_gemm
