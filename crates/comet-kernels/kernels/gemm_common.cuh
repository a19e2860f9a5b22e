// comet-rs: shared definitions of the grouped GEMM kernels (sm80 and sm90a).
//
// Data layout (row-major everywhere, bf16):
//   A  [total_rows, K]   rows of each expert contiguous (layout plan)
//   B  [E, N, K]         per expert, K contiguous (like torch Linear.weight,
//                        i.e. the transpose of comet_core's fc1/fc2 [K, N])
//   C  plain:   [total_rows, ldc] (ldc >= N)
//      swiglu:  [total_rows, ldc] (ldc >= N/2); out = silu(gate) * up with
//               gate = GEMM cols [0, N/2), up = cols [N/2, N)
//      scatter: [dst rows, ldc]; row r goes to scatter_idx[r] (skipped when
//               negative), scaled by scatter_w[r] (combine's top-k weight)
// A tile list in GPU memory drives a persistent grid; each tile says which
// expert, which rows and which output columns it computes, and which signals
// it waits on (prologue hook) or raises (epilogue hook).
#pragma once
#include "signal.cuh"

namespace comet {

// bf16 as raw bits: no CUDA headers are needed, so NVRTC compiles these
// sources on a machine that has only libnvrtc.
typedef unsigned short bf16_t;

// Two floats -> packed bf16x2 (round to nearest even), lo in the low half.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ void store_bf16x2(bf16_t* dst, float lo, float hi) {
  *reinterpret_cast<unsigned*>(dst) = pack_bf16x2(lo, hi);
}

enum EpilogueKind { EPI_STORE = 0, EPI_SWIGLU = 1, EPI_SCATTER = 2 };

// 32 bytes; mirrored by comet_kernels::tiles::TileDesc.
struct TileDesc {
  int expert;    // index into B's leading dimension
  int row0;      // first row in A (global row index)
  int rows;      // rows of this tile, 1..=BM
  int n0;        // first OUTPUT column (swiglu: in [0, N/2))
  int dep_off;   // first dependency in GemmParams::deps
  int dep_cnt;   // number of dependencies (0: none)
  int sig;       // signal raised when the tile is stored (-1: none)
  int sig_mode;  // 0: store raise_value, 1: add 1
};

struct GemmParams {
  const bf16_t* A;
  const bf16_t* B;
  bf16_t* C;
  const TileDesc* tiles;
  const int* scatter_idx;
  const float* scatter_w;
  u64* signals;
  const unsigned* deps;
  u64* err;
  u64 wait_target;
  u64 raise_value;
  u64 timeout_ns;
  int num_tiles;
  int K;
  int N;      // GEMM columns (swiglu: 2 * output columns)
  int ldc;
  int total_rows;
  int experts;
  // Split tail (sm90, no clusters): tiles [sk_begin, num_tiles) are cut
  // along K into runs of sk_len k-blocks over CTAs 0..sk_ctas; see
  // comet_kernels::tiles::TailSplit. sk_begin == num_tiles: no split.
  float* sk_partials;  // [CTA][consumer][acc element][thread] f32
  u64* sk_flags;       // [CTA][consumer]: sk_epoch once that partial is stored
  u64 sk_epoch;
  int sk_begin;
  int sk_len;
  int sk_ctas;
  // Work that lives in GPU memory (the device forward, DESIGN.md 6b): when
  // set, the kernel reads the tile count and the call's epoch (hooks' wait
  // target and raise value) at run time, so one launch, captured once in a
  // CUDA graph, serves every call; no tail is split then.
  const int* num_tiles_dev;
  const u64* epoch_dev;
  // Gather (one rank's FC1, DESIGN.md 6b): row r of the tile list's row
  // space is row a_rows[r] of A (x itself), so the rows are never copied
  // into expert order; null: A's rows are the tile rows.
  const int* a_rows;
  // When set (the device forward's expert groups), this launch's tiles
  // start at entry *first_tile_dev of the list: one list holds every
  // group's tiles back to back, and a launch runs one group of them.
  const int* first_tile_dev;
};

// Tiles of this launch: the device count when there is one.
__device__ __forceinline__ int tile_count(const GemmParams& p) {
  return p.num_tiles_dev ? *p.num_tiles_dev : p.num_tiles;
}
// This launch's tile list.
__device__ __forceinline__ const TileDesc* tile_list(const GemmParams& p) {
  return p.first_tile_dev ? p.tiles + *p.first_tile_dev : p.tiles;
}
// First tile of the split tail (== tile_count: nothing is split).
__device__ __forceinline__ int split_begin(const GemmParams& p) {
  return p.num_tiles_dev ? *p.num_tiles_dev : p.sk_begin;
}
__device__ __forceinline__ u64 hook_wait_target(const GemmParams& p) {
  return p.epoch_dev ? *p.epoch_dev : p.wait_target;
}
__device__ __forceinline__ u64 hook_raise_value(const GemmParams& p) {
  return p.epoch_dev ? *p.epoch_dev : p.raise_value;
}

// silu(x) = x * sigmoid(x) = h + h * tanh(h) with h = x / 2: one MUFU op
// (tanh.approx, absolute error about 2^-11) and two FP ops. The IEEE
// division of x / (1 + exp(-x)) took a second MUFU op and about ten more,
// which made the SwiGLU epilogue math cost 5-8% of FC1 on an H100
// (docs/PERF.md, 2026-12-06); the outputs are bf16 (8 bits of mantissa).
__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float silu_f(float x) {
  const float h = 0.5f * x;
  return fmaf(h, tanh_approx(h), h);
}

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

}  // namespace comet
