// Hopper (sm_90a) GEMM on warpgroup MMA: C = act(A @ B^T + bias), bf16/fp16 in, fp32 accumulation.
//
// Same operand layout, loader, shared-memory swizzle and epilogue as gemm.cu, but the math is wgmma:
// each of the 2 warpgroups (4 warps each) computes a 64x256 slice of the 128x256 block tile with
// wgmma.mma_async m64n256k16, both operands read by the tensor cores straight from shared memory through
// matrix descriptors. The [rows][64] bf16 tiles, 16-byte chunk c of row r stored at c ^ (r % 8), are
// exactly the hardware's 128-byte swizzle, so the descriptors say "128B swizzle", 8-row stride 1024 B.
// K advances 64 at a time through a 4-stage cp.async pipeline (48 KB a stage), one wgmma group in flight.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>
#include "gemm_kernel.cuh"
#include "kernels.h"

using namespace cudacnn_gemm;

namespace {

using WgTile = Tile<128, 256, 64, 2, 4, 4>;  // 256 threads: the loader's thread count; 2 warpgroups

__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  uint64_t addr = static_cast<uint64_t>(__cvta_generic_to_shared(p));
  uint64_t desc = (addr & 0x3FFFF) >> 4;   // start address
  desc |= (uint64_t)(16 >> 4) << 16;       // leading byte offset (unused with 128B swizzle, K-major)
  desc |= (uint64_t)(1024 >> 4) << 32;     // stride byte offset: 8 rows x 128 B
  desc |= 1ull << 62;                      // 128-byte swizzle
  return desc;
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void fence_async_shared() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// One wgmma.mma_async.m64n256k16 into the 128 fp32 accumulators d, A and B read through shared-memory
// descriptors; TYPE is the PTX input type ("bf16" or "f16"). scale-d = 1: accumulate into d.
#define CUDACNN_WGMMA_M64N256K16(TYPE)                                                    \
  asm volatile(                                                                          \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                       \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " "                    \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, " \
      "%128, %129, p, 1, 1, 0, 0;\n}\n"                                                  \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127]) \
      : "l"(desc_a), "l"(desc_b), "r"(1))

template <typename T>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    CUDACNN_WGMMA_M64N256K16("bf16");
  } else {
    CUDACNN_WGMMA_M64N256K16("f16");
  }
#endif
}
#undef CUDACNN_WGMMA_M64N256K16

template <typename T, int ACT>
__global__ void __launch_bounds__(WgTile::THREADS, 1)
    gemm_wgmma_kernel(const T* __restrict__ A, const T* __restrict__ B, const T* __restrict__ bias,
                      T* __restrict__ C, int M, int N, int K, int64_t lda, int64_t ldb, int64_t ldc, bool pair_store) {
  using Cfg = WgTile;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, STAGES = Cfg::STAGES;
  constexpr int A_STAGE = Cfg::A_STAGE, B_STAGE = Cfg::B_STAGE;
  // The 128-byte swizzle repeats every 1024 B: align the tiles to that (the launch adds 1 KB of slack).
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned pad = (1024u - (static_cast<unsigned>(__cvta_generic_to_shared(smem_raw)) & 1023u)) & 1023u;
  T* As = reinterpret_cast<T*>(smem_raw + pad);
  T* Bs = As + STAGES * A_STAGE;

  int m0, n0;
  tile_origin<BM, BN>(blockIdx.x, M, N, m0, n0);
  int wg = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;

  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.0f;

  // Prefetch distance STAGES - 2: the stage refilled at step kt was last read by the wgmma of step kt - 2,
  // which every warpgroup has retired (wait_group 1 at the end of step kt - 1, then the barrier), so one
  // wgmma group stays in flight while the next tile's loads are issued.
  int k_tiles = (K + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 2; ++s) {
    if (s < k_tiles) load_stage<Cfg, T>(As, Bs, A, B, M, N, K, lda, ldb, m0, n0, s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 3>();  // tile kt has landed (for this thread's copies)
    fence_async_shared();         // make them visible to the tensor cores' (async-proxy) reads
    __syncthreads();              // ... for every thread's copies
    int next = kt + STAGES - 2;
    if (next < k_tiles) load_stage<Cfg, T>(As, Bs, A, B, M, N, K, lda, ldb, m0, n0, next % STAGES, next);
    cp_async_commit();

    const T* a_s = As + (kt % STAGES) * A_STAGE + wg * 64 * BK;
    const T* b_s = Bs + (kt % STAGES) * B_STAGE;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) wgmma_m64n256k16<T>(acc, smem_desc(a_s + kk * 16), smem_desc(b_s + kk * 16));
    wgmma_commit();
    wgmma_wait<1>();  // the previous step's group has retired; this one keeps the tensor cores busy
  }
  wgmma_wait<0>();
  cp_async_wait<0>();

  // Accumulator fragment: register 4j + {0,1} is row 16 * warp + lane / 4, columns 8j + 2 (lane % 4) + {0,1};
  // 4j + {2,3} the same eight rows further down.
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    int col = n0 + j * 8 + (lane & 3) * 2;
    float b0, b1;
    load_bias_pair(bias, col, N, b0, b1);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      int row = m0 + wg * 64 + warp * 16 + (lane >> 2) + half * 8;
      store_outputs<T, ACT>(C, ldc, M, N, row, col, acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1], b0, b1,
                            pair_store);
    }
  }
}

template <typename T, int ACT>
int launch_wgmma(const void* a, const void* b, const void* bias, void* c, int M, int N, int K, int64_t lda,
                 int64_t ldb, int64_t ldc, cudaStream_t stream) {
  auto kernel = gemm_wgmma_kernel<T, ACT>;
  constexpr int smem_bytes = WgTile::SMEM_BYTES + 1024;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return (int)err;
  bool pair_store = (ldc % 2 == 0) && (reinterpret_cast<uintptr_t>(c) % 4 == 0);
  int blocks = ((M + WgTile::BM - 1) / WgTile::BM) * ((N + WgTile::BN - 1) / WgTile::BN);
  kernel<<<blocks, WgTile::THREADS, smem_bytes, stream>>>((const T*)a, (const T*)b, (const T*)bias, (T*)c,
                                                                  M, N, K, lda, ldb, ldc, pair_store);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_wgmma_act(int act, const void* a, const void* b, const void* bias, void* c, int M, int N, int K,
                     int64_t lda, int64_t ldb, int64_t ldc, cudaStream_t stream) {
  switch (act) {
    case kNone: return launch_wgmma<T, kNone>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    case kRelu: return launch_wgmma<T, kRelu>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    case kGelu: return launch_wgmma<T, kGelu>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    case kGeluTanh: return launch_wgmma<T, kGeluTanh>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    case kSilu: return launch_wgmma<T, kSilu>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace

// True when this build carries the sm_90a wgmma code (an sm_90a target); else the launcher refuses.
bool wgmma_built() {
#if defined(CUDACNN_HAVE_SM90A)
  return true;
#else
  return false;
#endif
}

int launch_gemm_wgmma(int dtype, const void* a, const void* b, const void* bias, void* c, int M, int N, int K,
                      int64_t lda, int64_t ldb, int64_t ldc, int activation, cudaStream_t stream) {
  if (!wgmma_built()) return (int)cudaErrorInvalidDeviceFunction;
  if (dtype == kBFloat16)
    return launch_wgmma_act<__nv_bfloat16>(activation, a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
  if (dtype == kFloat16) return launch_wgmma_act<__half>(activation, a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
  return (int)cudaErrorInvalidValue;
}
