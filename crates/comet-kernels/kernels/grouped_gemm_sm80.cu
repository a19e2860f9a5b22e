// comet-rs: portable grouped GEMM for compute capability >= 8.0.
// mma.sync m16n8k16 (bf16 in, f32 accumulate), cp.async into a 3-stage
// shared-memory ring with an XOR swizzle (conflict-free ldmatrix), 4 warps
// of 64x64 each over a 128x128 tile, persistent grid over the tile list.
// Hooks are template parameters: a variant without them compiles them out.
#include "gemm_common.cuh"

namespace comet {
namespace sm80 {

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 3, THREADS = 128;
constexpr int WM = 64, WN = 64;                 // warp tile
constexpr int MF = WM / 16, NF = WN / 8;        // mma fragments per warp
constexpr int TILE_BYTES = (BM + BN) * BK * 2;  // one stage

// 16-byte chunk c of row r lives at chunk c ^ (r & 7): rows are 128 bytes,
// so ldmatrix's 8 rows hit 8 distinct bank groups.
__device__ __forceinline__ int swz(int r, int c) { return r * BK + ((c ^ (r & 7)) << 3); }

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;  // src-size 0 zero-fills the chunk
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2,
                                        unsigned& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

__device__ __forceinline__ void mma16816(float* d, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Row r of the B tile in shared memory -> row of B[expert] in global memory.
// SwiGLU: each warp's 64 columns are 32 gate then 32 up columns of the same
// outputs, so one thread holds gate and up of an output in fragments f, f+4.
template <int EPI>
__device__ __forceinline__ int b_row(int r, int n0, int half_n) {
  if (EPI == EPI_SWIGLU) {
    const int h = r / WN, w = r % WN;
    return w < WN / 2 ? n0 + h * (WN / 2) + w : half_n + n0 + h * (WN / 2) + (w - WN / 2);
  }
  return n0 + r;
}

template <int EPI>
__device__ __forceinline__ void load_stage(const GemmParams& p, const TileDesc& t, int kb,
                                           unsigned sA, unsigned sB) {
  const int tid = threadIdx.x;
  const int half_n = p.N / 2;
  const bf16_t* Bb = p.B + (size_t)t.expert * p.N * p.K + kb * BK;
#pragma unroll
  for (int i = 0; i < BM * BK / 8 / THREADS; ++i) {
    const int idx = tid + i * THREADS, r = idx >> 3, c = idx & 7;
    const bool ok = r < t.rows;
    const int row = t.row0 + (ok ? r : 0);
    const size_t a_row = p.a_rows ? (size_t)p.a_rows[row] : (size_t)row;
    cp_async16(sA + swz(r, c) * 2, p.A + a_row * p.K + kb * BK + c * 8, ok);
  }
#pragma unroll
  for (int i = 0; i < BN * BK / 8 / THREADS; ++i) {
    const int idx = tid + i * THREADS, r = idx >> 3, c = idx & 7;
    const int br = b_row<EPI>(r, t.n0, half_n);
    const bool ok = br < p.N;
    const bf16_t* src = Bb + (size_t)(ok ? br : 0) * p.K + c * 8;
    cp_async16(sB + swz(r, c) * 2, src, ok);
  }
}

template <int EPI, bool WAIT, bool RAISE>
__device__ __forceinline__ void gemm(const GemmParams& p) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int wait_ok;
  const unsigned sbase = smem_u32(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 2, wn = warp % 2;
  const int kblocks = p.K / BK;

  for (int ti = blockIdx.x; ti < tile_count(p); ti += gridDim.x) {
    const TileDesc t = tile_list(p)[ti];
    if (WAIT) {
      if (!signal_wait_block(p.signals, p.deps + t.dep_off, (unsigned)t.dep_cnt, hook_wait_target(p),
                             p.timeout_ns, p.err, &wait_ok))
        return;
    }
    float acc[MF][NF][4];
#pragma unroll
    for (int i = 0; i < MF; ++i)
#pragma unroll
      for (int j = 0; j < NF; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < kblocks) {
        const unsigned st = sbase + s * TILE_BYTES;
        load_stage<EPI>(p, t, s, st, st + BM * BK * 2);
      }
      cp_commit();
    }
    for (int kb = 0; kb < kblocks; ++kb) {
      cp_wait<STAGES - 2>();
      __syncthreads();
      {  // prefetch kb + STAGES - 1 into the slot freed at kb - 1
        const int nk = kb + STAGES - 1;
        if (nk < kblocks) {
          const unsigned st = sbase + (nk % STAGES) * TILE_BYTES;
          load_stage<EPI>(p, t, nk, st, st + BM * BK * 2);
        }
        cp_commit();
      }
      const unsigned sA = sbase + (kb % STAGES) * TILE_BYTES;
      const unsigned sB = sA + BM * BK * 2;
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        unsigned af[MF][4], bf[NF][2];
#pragma unroll
        for (int i = 0; i < MF; ++i) {
          const int r = wm * WM + i * 16 + (lane & 15);
          const int c = kk * 2 + (lane >> 4);
          ldsm_x4(sA + swz(r, c) * 2, af[i][0], af[i][1], af[i][2], af[i][3]);
        }
#pragma unroll
        for (int j = 0; j < NF; j += 2) {
          const int r = wn * WN + j * 8 + (lane & 7) + ((lane >> 4) << 3);
          const int c = kk * 2 + ((lane >> 3) & 1);
          ldsm_x4(sB + swz(r, c) * 2, bf[j][0], bf[j][1], bf[j + 1][0], bf[j + 1][1]);
        }
#pragma unroll
        for (int i = 0; i < MF; ++i)
#pragma unroll
          for (int j = 0; j < NF; ++j) mma16816(acc[i][j], af[i], bf[j]);
      }
    }
    cp_wait<0>();
    __syncthreads();  // the next tile's prologue reuses the ring

    // Epilogue straight from registers.
#pragma unroll
    for (int i = 0; i < MF; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wm * WM + i * 16 + (lane >> 2) + h * 8;
        if (r >= t.rows) continue;
        const int grow = t.row0 + r;
        if (EPI == EPI_SWIGLU) {
          const int fcols = p.N / 2;
#pragma unroll
          for (int j = 0; j < NF / 2; ++j) {
            const int col = t.n0 + wn * (WN / 2) + j * 8 + (lane & 3) * 2;
            if (col >= fcols) continue;
            const float g0 = acc[i][j][h * 2], g1 = acc[i][j][h * 2 + 1];
            const float u0 = acc[i][j + NF / 2][h * 2], u1 = acc[i][j + NF / 2][h * 2 + 1];
            store_bf16x2(p.C + (size_t)grow * p.ldc + col, silu_f(g0) * u0, silu_f(g1) * u1);
          }
        } else {
          size_t orow = (size_t)grow;
          float w = 1.f;
          if (EPI == EPI_SCATTER) {
            const int d = p.scatter_idx[grow];
            if (d < 0) continue;
            orow = (size_t)d;
            w = p.scatter_w[grow];
          }
#pragma unroll
          for (int j = 0; j < NF; ++j) {
            const int col = t.n0 + wn * WN + j * 8 + (lane & 3) * 2;
            if (col >= p.N) continue;
            store_bf16x2(p.C + orow * p.ldc + col, w * acc[i][j][h * 2], w * acc[i][j][h * 2 + 1]);
          }
        }
      }
    }
    if (RAISE) {
      if (t.sig >= 0) {
        signal_fence();
        __syncthreads();
        if (threadIdx.x == 0) {
          if (t.sig_mode == 1)
            signal_raise_add(p.signals, (unsigned)t.sig, 1ull);
          else
            signal_raise(p.signals, (unsigned)t.sig, hook_raise_value(p));
        }
      }
    }
  }
}

}  // namespace sm80
}  // namespace comet
