// comet-rs: Hopper (sm_90a) grouped GEMM.
// One producer warp (warpgroup 0) streams A and B tiles with TMA into a
// STAGES-deep shared-memory ring whose slots complete on mbarriers; two
// consumer warpgroups each own 64 rows of the 128 x BN tile and issue wgmma
// (m64n128k16, both operands from 128B-swizzled shared memory). The grid is
// persistent over the tile list; the producer runs ahead into the next tile
// while the consumers store the previous one, and a SwiGLU tile's staging
// and stores wait for the next tile's first wgmma groups to be in flight
// (its accumulators are free once packed), so the tensor cores do not wait
// on them. Hooks are template parameters.
// With CM = 2 the CTAs run as clusters of two along M: the tile list holds
// pairs (entries 2i, 2i+1: same expert and columns, the second possibly
// empty), each CTA loads its own A and one half of the shared B tile, which
// TMA multicasts into both CTAs' rings, so each SM pulls a third less from
// L2 per k-block (the bound of 128 x 256 tiles on H100, per NVIDIA's CUTLASS
// docs on multicast; measured in docs/PERF.md).
#include "moe_rows.cuh"

namespace comet {
namespace sm90 {

constexpr int BM = 128, BK = 64;

// Opaque CUtensorMap (64-byte aligned, 128 bytes), filled on the host by
// cuTensorMapEncodeTiled.
struct alignas(64) TmaDesc {
  unsigned long long v[16];
};

struct HopperParams {
  TmaDesc tma_a;  // A: dims {K, total_rows}, box {64, 128} (unused by a gather)
  TmaDesc tma_b;  // B: dims {K, N, E}, box {64, BN/2}
  TmaDesc tma_c;  // C: dims {output cols, total_rows}, box {64, 64} (TMA-store variants)
  GemmParams p;
  int tma_store;  // 0: tma_c is not valid here, every tile uses plain stores
  // Rows the producer warpgroup's idle warps move beside the tiles: the
  // dispatch in a launch that waits on it, the reduce or the combine of
  // finished chunks in one that counts them (moe_rows.cuh).
  SideWork side;
};
static_assert(sizeof(SideWork) == 480 && sizeof(HopperParams) == 1088,
              "mirrored by comet_kernels::gemm::HopperParamsC");

__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  asm volatile(
      "{\n"
      ".reg .pred P1;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@!P1 bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void tma_load_2d(unsigned dst, const TmaDesc* map, unsigned bar, int c0,
                                            int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, "
      "{%3, %4}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<unsigned long long>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void tma_load_3d(unsigned dst, const TmaDesc* map, unsigned bar, int c0,
                                            int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, "
      "{%3, %4, %5}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<unsigned long long>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// As tma_load_3d, written to the same shared offset of every CTA in `mask`
// and completing on each one's mbarrier at `bar`.
__device__ __forceinline__ void tma_load_3d_mc(unsigned dst, const TmaDesc* map, unsigned bar,
                                               int c0, int c1, int c2, unsigned short mask) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::"
      "cluster [%0], [%1, {%3, %4, %5}], [%2], %6;\n" ::"r"(dst),
      "l"(reinterpret_cast<unsigned long long>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2),
      "h"(mask)
      : "memory");
}

__device__ __forceinline__ unsigned cluster_rank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// The address of local shared address `addr` in cluster CTA `rank`.
__device__ __forceinline__ unsigned mapa(unsigned addr, unsigned rank) {
  unsigned r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
// Arrive on an mbarrier of any CTA of the cluster (address from mapa). The
// ring's releases order nothing but retired wgmma reads, so CTA scope does;
// the verdict exchange publishes a value and takes cluster scope.
__device__ __forceinline__ void mbar_arrive_remote(unsigned cluster_addr) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_addr) : "memory");
}
__device__ __forceinline__ void mbar_arrive_remote_release(unsigned cluster_addr) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(
                   cluster_addr)
               : "memory");
}
// mbar_wait that also acquires what the arriving peer CTA released.
__device__ __forceinline__ void mbar_wait_cluster(unsigned bar, unsigned parity) {
  asm volatile(
      "{\n"
      ".reg .pred P1;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 P1, [%0], %1;\n"
      "@!P1 bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void st_shared_cluster_u32(unsigned cluster_addr, unsigned v) {
  asm volatile("st.shared::cluster.u32 [%0], %1;\n" ::"r"(cluster_addr), "r"(v) : "memory");
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;\n" ::
          : "memory");
}

// Bulk tensor store of one 64 x 64 box from 128B-swizzled shared memory;
// the copy reads shared memory asynchronously (bulk async-group of the
// issuing thread), so the consumers go on to the next tile meanwhile.
__device__ __forceinline__ void tma_store_2d(const TmaDesc* map, unsigned src, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(
          reinterpret_cast<unsigned long long>(map)),
      "r"(src), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// This thread's bulk stores have finished reading shared memory.
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
// This thread's bulk stores are complete.
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// ... all but the N groups it committed last.
template <int N>
__device__ __forceinline__ void bulk_wait_all_but() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
// Generic-proxy shared-memory writes become visible to the async proxy (TMA, wgmma).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Global memory, between the generic and the async proxy (both ways).
__device__ __forceinline__ void fence_proxy_async_global() {
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
}

// K-major operand in shared memory, 128-byte swizzle: rows of 64 bf16, 8-row
// core groups 1024 bytes apart.
__device__ __forceinline__ unsigned long long smem_desc(unsigned addr) {
  unsigned long long d = 0;
  d |= (unsigned long long)((addr & 0x3FFFF) >> 4);
  d |= (unsigned long long)1 << 16;             // leading byte offset (unused when swizzled)
  d |= (unsigned long long)(1024 >> 4) << 32;   // stride byte offset
  d |= (unsigned long long)1 << 62;             // 128B swizzle
  return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins the accumulators after a wait so no read is hoisted above it.
__device__ __forceinline__ void fence_acc(float& r) { asm volatile("" : "+f"(r)::"memory"); }

__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// named_barrier that also returns whether any of the threads passed true.
__device__ __forceinline__ bool named_barrier_or(int id, int threads, bool v) {
  unsigned r;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n"
      " barrier.red.or.pred q, %2, %3, p;\n selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(r)
      : "r"((unsigned)v), "r"(id), "r"(threads)
      : "memory");
  return r != 0;
}

#define COMET_R8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
  "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])

// d[64] += A(64x16) * B(16x128)^T, both K-major in shared memory.
__device__ __forceinline__ void wgmma_n128(float* d, unsigned long long da, unsigned long long db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : COMET_R8(0), COMET_R8(8), COMET_R8(16), COMET_R8(24), COMET_R8(32), COMET_R8(40),
        COMET_R8(48), COMET_R8(56)
      : "l"(da), "l"(db), "r"(1));
}

// d[128] += A(64x16) * B(16x256)^T: one instruction for the whole tile
// width, so A is read from shared memory once per k16 step.
__device__ __forceinline__ void wgmma_n256(float* d, unsigned long long da, unsigned long long db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, 0, 0;\n"
      "}\n"
      : COMET_R8(0), COMET_R8(8), COMET_R8(16), COMET_R8(24), COMET_R8(32), COMET_R8(40), COMET_R8(48), COMET_R8(56), COMET_R8(64), COMET_R8(72), COMET_R8(80), COMET_R8(88), COMET_R8(96), COMET_R8(104), COMET_R8(112), COMET_R8(120)
      : "l"(da), "l"(db), "r"(1));
}

template <int BN, int STAGES>
struct Smem {
  static constexpr int A_BYTES = BM * BK * 2;
  static constexpr int B_BYTES = BN * BK * 2;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
  // Epilogue staging: per consumer, 64 rows x 128 bf16 (one n128 block).
  static constexpr int STAGING_BYTES = 2 * 64 * 128 * 2;
  // ring, staging, barriers (2 per stage, 2 for the cluster's verdict
  // exchange), the verdict words and the abort flag, plus 1 KiB to align the
  // ring to 1024 bytes (128B-swizzled TMA destinations).
  static constexpr int BYTES = STAGES * STAGE_BYTES + STAGING_BYTES + 128 + 1024;
};

// Where Smem's parts lie in a launch's dynamic shared memory: the ring
// (aligned to 1024), the staging, then the barriers - full[STAGES],
// empty[STAGES], pair[2] (8 bytes each) - then the pair verdicts [2], the
// abort flag and the split verdicts [2] (4 bytes each).
template <int BN, int STAGES>
struct Places {
  unsigned ring, staging, bars;
  volatile int* abort_flag;
  __device__ __forceinline__ explicit Places(unsigned char* base) {
    using S = Smem<BN, STAGES>;
    const unsigned raw = smem_u32(base);
    ring = (raw + 1023u) & ~1023u;
    staging = ring + STAGES * S::STAGE_BYTES;
    bars = staging + S::STAGING_BYTES;
    abort_flag = reinterpret_cast<volatile int*>(base + (bars - raw) + (2 * STAGES + 2) * 8 + 8);
  }
};

// Staging tile [64 rows][128 cols] bf16 as two [64][64] halves of 8 KiB, each
// in TMA's 128-byte swizzle (16-byte chunk c of row r at chunk c ^ (r & 7)),
// so a half is one bulk-store box; the fragment writes (8 rows per
// instruction) and the row-wise 16-byte reads are both free of bank conflicts.
__device__ __forceinline__ unsigned stg_off(int r, int col) {
  return (unsigned)((col >> 6) * 8192 + r * 128 + ((((col >> 3) ^ r) & 7) << 4) + (col & 7) * 2);
}

__device__ __forceinline__ void st_shared_u32(unsigned addr, unsigned v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ unsigned ld_shared_u32(unsigned addr) {
  unsigned v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void st_global_v4(float* p, float a, float b, float c, float d) {
  asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
}
// Through L2 only: the line was written by another SM during this launch.
__device__ __forceinline__ float4 ld_global_cg_v4(const float* p) {
  float4 v;
  asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "l"(p)
               : "memory");
  return v;
}
__device__ __forceinline__ uint4 ld_shared_v4(unsigned addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

// Scatter: the top-k weights of this thread's two accumulator rows (rows
// past the tile get 0); 1 for the other epilogues.
template <int EPI>
__device__ __forceinline__ void row_weights(const GemmParams& p, const TileDesc& t, int cw, int warp,
                                            int lane, float (&wrow)[2]) {
  wrow[0] = wrow[1] = 1.f;
  if (EPI == EPI_SCATTER) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = cw * 64 + warp * 16 + (lane >> 2) + h * 8;
      wrow[h] = r < t.rows ? p.scatter_w[t.row0 + r] : 0.f;
    }
  }
}

// SwiGLU outputs of one consumer's accumulators, packed as bf16 pairs in
// the order `stage_packed` writes them: silu(gate) * up in f32 (gate =
// tile columns [0, BN/2), up = [BN/2, BN)), rounded once.
template <int BN>
__device__ __forceinline__ void swiglu_pack(const float (&acc)[BN / 128][64],
                                            unsigned (&out)[BN / 8]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) {
      const int gc = j * 8, uc = BN / 2 + j * 8;
      const int gb = gc / 128, gi = (gc % 128) / 8 * 4 + h * 2;
      const int ub = uc / 128, ui = (uc % 128) / 8 * 4 + h * 2;
      out[h * (BN / 16) + j] = pack_bf16x2(silu_f(acc[gb][gi]) * acc[ub][ui],
                                           silu_f(acc[gb][gi + 1]) * acc[ub][ui + 1]);
    }
  }
}

// The packed SwiGLU outputs of `swiglu_pack` into the swizzled staging
// buffer at `dst` (BN/2 columns).
template <int BN>
__device__ __forceinline__ void stage_packed(const unsigned (&v)[BN / 8], unsigned dst, int warp,
                                             int lane) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int sr = warp * 16 + (lane >> 2) + h * 8;
#pragma unroll
    for (int j = 0; j < BN / 16; ++j)
      st_shared_u32(dst + stg_off(sr, j * 8 + (lane & 3) * 2), v[h * (BN / 16) + j]);
  }
}

// Epilogue pass `pass` of one store or scatter consumer: n128 block `pass`
// of its accumulators, scaled by the row weights, as bf16 into the swizzled
// 64 x 128 staging buffer at `dst`. Accumulator i of n128 block b holds row
// warp*16 + lane/4 + 8*((i/2)&1), column b*128 + (i/4)*8 + (lane%4)*2 + (i&1).
template <int BN>
__device__ __forceinline__ void stage_pass(const float (&acc)[BN / 128][64], int pass,
                                           const float (&wrow)[2], unsigned dst, int warp,
                                           int lane) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int sr = warp * 16 + (lane >> 2) + h * 8;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float o0 = wrow[h] * acc[pass][j * 4 + h * 2];
      const float o1 = wrow[h] * acc[pass][j * 4 + h * 2 + 1];
      st_shared_u32(dst + stg_off(sr, j * 8 + (lane & 3) * 2), pack_bf16x2(o0, o1));
    }
  }
}

// One consumer's rows of staged pass `pass` of tile t to C with 16-byte
// row stores (`cols` columns a pass; scatter: rows to their scatter_idx).
template <int EPI>
__device__ __forceinline__ void store_pass(const GemmParams& p, const TileDesc& t, int pass, int cols,
                                           int out_cols, unsigned stg, int cw, int lt) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int idx = lt + i * 128;
    const int sr = idx >> 4, ch = idx & 15;
    const int r = cw * 64 + sr;
    const int col = t.n0 + pass * 128 + ch * 8;
    if (ch * 8 < cols && r < t.rows && col < out_cols) {
      size_t orow = (size_t)(t.row0 + r);
      if (EPI == EPI_SCATTER) {
        const int d = p.scatter_idx[orow];
        if (d < 0) continue;
        orow = (size_t)d;
      }
      const uint4 v = ld_shared_v4(stg + stg_off(sr, ch * 8));
      *reinterpret_cast<uint4*>(p.C + orow * p.ldc + col) = v;
    }
  }
}

// A SwiGLU tile's outputs (packed by swiglu_pack) through one consumer's
// staging to C. Runs inside the next tile's k-loop, while its first
// wgmma groups are in flight, so the tensor cores do not wait on it.
template <int BN>
__device__ __forceinline__ void store_swiglu(const GemmParams& p, const TileDesc& t,
                                             const unsigned (&v)[BN / 8], unsigned stg, int cw,
                                             int warp, int lane, int lt) {
  named_barrier(2 + cw, 128);  // earlier readers of the staging are done
  stage_packed<BN>(v, stg, warp, lane);
  named_barrier(2 + cw, 128);
  store_pass<EPI_SWIGLU>(p, t, 0, BN / 2, p.N / 2, stg, cw, lt);
}

// One unit of a CTA's work: k-blocks [kb0, kb1) of tile `tile`. A whole
// tile is stored by its epilogue; a part of a split tail tile leaves its f32
// accumulators in the CTA's workspace slot; the last part (the one holding
// the tile's last k-block) adds the parts of CTAs from..blockIdx.x-1 to its
// own and runs the epilogue. Mirrored by comet_kernels::tiles::TailSplit.
enum PieceRole { PIECE_WHOLE = 0, PIECE_PART = 1, PIECE_LAST = 2 };
struct Piece {
  int tile, kb0, kb1, role, from;
};

// Piece `which` (0 or 1) of this CTA's run of the split tail. A run of
// sk_len k-blocks spans at most two tiles; the piece that starts a tile goes
// first because it never waits, so a last part only ever waits on CTAs that
// run their part before anything else of the tail.
__device__ __forceinline__ bool tail_piece(const GemmParams& p, int kblocks, int which, Piece& pc) {
  const int tail = tile_count(p) - split_begin(p);
  if (tail <= 0 || (int)blockIdx.x >= p.sk_ctas) return false;
  const long long len = p.sk_len, work = (long long)tail * kblocks;
  const long long r0 = (long long)blockIdx.x * len;
  const long long r1 = r0 + len < work ? r0 + len : work;
  if (r0 >= r1) return false;
  const long long first_end = (r0 / kblocks + 1) * kblocks;
  const long long cut = first_end < r1 ? first_end : r1;
  const bool two = cut < r1;
  if (which > 1 || (which == 1 && !two)) return false;
  const long long a = (two && which == 0) ? cut : r0;
  const long long b = (two && which == 0) ? r1 : cut;
  const long long tl = a / kblocks;
  pc.tile = p.sk_begin + (int)tl;
  pc.kb0 = (int)(a - tl * kblocks);
  pc.kb1 = (int)(b - tl * kblocks);
  pc.role = pc.kb1 < kblocks ? PIECE_PART : (pc.kb0 == 0 ? PIECE_WHOLE : PIECE_LAST);
  pc.from = (int)(tl * kblocks / len);
  return true;
}

// This CTA's work item `step`: its grid-stride tiles (pairs with CM = 2),
// then its pieces of the split tail. False past the last one.
template <int CM>
__device__ __forceinline__ bool work_item(const GemmParams& p, int kblocks, unsigned crank, int step,
                                          Piece& pc) {
  if (CM > 1) {
    const int ti = (int)blockIdx.x / CM + step * ((int)gridDim.x / CM);
    if (ti >= tile_count(p) / CM) return false;
    pc = Piece{ti * CM + (int)crank, 0, kblocks, PIECE_WHOLE, 0};
    return true;
  }
  const int b = (int)blockIdx.x, g = (int)gridDim.x;
  const int sb = split_begin(p);
  const int whole = b < sb ? (sb - 1 - b) / g + 1 : 0;
  if (step < whole) {
    pc = Piece{b + step * g, 0, kblocks, PIECE_WHOLE, 0};
    return true;
  }
  return tail_piece(p, kblocks, step - whole, pc);
}

// Whether a launch gathers A (p.a_rows): never with dependency waits or
// clusters (the host refuses both), so those variants compile without it.
template <bool WAIT, int CM>
__device__ __forceinline__ bool gathers(const GemmParams& p) {
  return !WAIT && CM == 1 && p.a_rows != nullptr;
}
constexpr int GATHER_THREADS = 128;

__device__ __forceinline__ void cp_async_cg16(unsigned dst, const void* src, unsigned bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}
// The barrier at `bar` receives one arrival once every cp.async this thread
// issued so far has completed (noinc: the arrival is one of the barrier's
// expected count), without the thread waiting for them.
__device__ __forceinline__ void cp_async_mbar_arrive(unsigned bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// The producer: thread 0, and with a gather the whole producer warpgroup.
// For every tile of this CTA it waits on the tile's dependency signals
// (prologue hook), then streams its k-blocks into the ring: thread 0 sets
// each slot's expected bytes and loads B, and A as one 128-row TMA box. On
// a failed wait it sets the abort flag and completes the slot without data
// so the consumers wake and leave. With CM = 2 both CTAs of a cluster agree
// on the verdict first (each one's B half lands in the other's ring), and
// each producer ends by waiting until both CTAs' consumers released every
// slot, so no CTA leaves while its peer may still arrive on its barriers.
//
// A gather (tile row r reads row a_rows[row0 + r] of x) loads A with
// cp.async instead, 16 bytes a thread and instruction, 8 threads a row so
// each instruction reads 4 whole 128-byte rows, written in TMA's 128-byte
// swizzle (chunk c of row r at c ^ (r & 7)). One TMA box per row was
// measured first: 128 boxes a k-block made FC1 1.65x slower (docs/PERF.md,
// 2026-12-06). The slot's barrier counts 128 arrivals besides thread 0's
// expected bytes for B: each thread's arrival comes from the hardware once
// its copies of the k-block have landed (cp.async.mbarrier.arrive), so
// copies stay in flight for every free slot of the ring, as TMA's do. (The
// form before waited on its own copies two k-blocks behind and arrived
// itself: FC1 ran 10% slower than over copied rows, 2026-12-06.) The
// consumers fence their view for the async proxy (wgmma reads through it)
// after the wait, since the copies were generic-proxy writes.
template <int EPI, bool WAIT, int BN, int STAGES, int CM>
__device__ __forceinline__ void produce(const HopperParams& hp, unsigned ring, unsigned bars,
                                        volatile int* abort_flag, int tid) {
  using S = Smem<BN, STAGES>;
  const GemmParams& p = hp.p;
  const int kblocks = p.K / BK;
  const bool lead = tid == 0;
  const bool gather = gathers<WAIT, CM>(p);
  const unsigned crank = CM > 1 ? cluster_rank() : 0u;
  const unsigned pair_bar = bars + 2 * STAGES * 8;  // [2]: the peer's verdict arrived
  const unsigned pair_ok = pair_bar + 2 * 8;        // [2]: the peer's verdict
  // Slot of k-block i free: released by every consumer warp of the cluster.
  auto wait_empty = [&](int i) {
    mbar_wait(bars + (STAGES + i % STAGES) * 8, ((unsigned)(i / STAGES) & 1u) ^ 1u);
  };
  int it = 0;  // k-block counter across tiles: ring slot and phase
  for (int q = 0;; ++q) {  // q: work items (pairs) taken
    Piece pc;
    if (!work_item<CM>(p, kblocks, crank, q, pc)) break;
    const TileDesc t = tile_list(p)[pc.tile];
    bool ok = true;
    if (WAIT) {
      for (int i = 0; i < t.dep_cnt && ok; ++i)
        ok = signal_wait(p.signals, p.deps[t.dep_off + i], hook_wait_target(p), p.timeout_ns, p.err);
      // A and B are read by the async proxy after the acquire.
      fence_proxy_async_global();
      if (CM > 1) {
        // Two slots, so the peer can be one pair ahead but never two.
        const unsigned slot = (unsigned)q & 1u, peer = crank ^ 1u;
        st_shared_cluster_u32(mapa(pair_ok + slot * 4, peer), ok ? 1u : 0u);
        mbar_arrive_remote_release(mapa(pair_bar + slot * 8, peer));
        mbar_wait_cluster(pair_bar + slot * 8, (unsigned)(q >> 1) & 1u);
        ok = ok && ld_shared_u32(pair_ok + slot * 4) != 0u;
      }
    }
    if (!ok) {
      // The slot free (with CM > 1 every slot: both CTAs' consumers are done
      // with earlier tiles, so no peer arrives here after this CTA leaves).
      for (int j = 0; j < (CM > 1 ? STAGES : 1); ++j) wait_empty(it + j);
      *abort_flag = 1;
      mbar_arrive(bars + (it % STAGES) * 8);  // wakes the consumers without data
      return;
    }
    const int bn0 = t.n0;
    const int bn1 = (EPI == EPI_SWIGLU) ? (p.N / 2 + t.n0) : (t.n0 + BN / 2);
    // The second CTA of a pair may have no rows: it still takes B for both.
    const bool has_a = CM == 1 || t.rows > 0;
    const unsigned bytes = has_a ? S::STAGE_BYTES : S::B_BYTES;
    // Gather: this thread's 16-byte chunk c of rows r0 + 16 i; rows past
    // the tile are zero-filled (read from the tile's first row, 0 bytes).
    const int c = tid & 7, r0 = tid >> 3;
    int src[BM / 16];
    if (gather) {
#pragma unroll
      for (int i = 0; i < BM / 16; ++i) {
        const int r = r0 + 16 * i;
        src[i] = r < t.rows ? p.a_rows[t.row0 + r] : -1;
      }
    }
    for (int kb = pc.kb0; kb < pc.kb1; ++kb, ++it) {
      const int s = it % STAGES;
      wait_empty(it);
      const unsigned full = bars + s * 8;
      const unsigned sa = ring + s * S::STAGE_BYTES;
      const unsigned sb = sa + S::A_BYTES;
      if (gather) {
        if (lead) mbar_expect_tx(full, S::B_BYTES);
        // Row r's swizzle term r & 7 is r0 & 7 for every row of this thread.
        const unsigned dst = sa + (unsigned)r0 * (BK * 2) + (unsigned)((c ^ (r0 & 7)) << 4);
#pragma unroll
        for (int i = 0; i < BM / 16; ++i) {
          const bf16_t* row = p.A + (size_t)(src[i] < 0 ? 0 : src[i]) * p.K + kb * BK + c * 8;
          cp_async_cg16(dst + (unsigned)(16 * i) * (BK * 2), row, src[i] < 0 ? 0u : 16u);
        }
        cp_async_mbar_arrive(full);
      } else {
        mbar_expect_tx(full, bytes);
        if (has_a) tma_load_2d(sa, &hp.tma_a, full, kb * BK, t.row0);
      }
      if (!lead) continue;
      if (CM == 1) {
        tma_load_3d(sb, &hp.tma_b, full, kb * BK, bn0, t.expert);
        tma_load_3d(sb + S::B_BYTES / 2, &hp.tma_b, full, kb * BK, bn1, t.expert);
      } else {
        tma_load_3d_mc(sb + crank * (S::B_BYTES / 2), &hp.tma_b, full, kb * BK,
                       crank ? bn1 : bn0, t.expert, (unsigned short)0x3);
      }
    }
  }
  if (gather) cp_async_wait_all();
  if (CM > 1)
    for (int j = 0; j < STAGES; ++j) wait_empty(it + j);
}

// Warps 1-3 of the producer warpgroup (thread 0 alone streams the tiles;
// a gather, which takes the whole warpgroup, never has side work). FC1's
// never wait, and its producer waits on them only through the segment
// signals, bounded; FC2's wait (bounded) on the chunk counters its
// consumers raise, which never wait on them.
template <bool WAIT, bool RAISE, int CM>
__device__ __forceinline__ void side_work(const SideWork& s, int lane, bool leader) {
  if (WAIT && CM == 1 && s.kind == SIDE_DISPATCH) side_dispatch(s, lane, leader);
  if (RAISE && CM == 1 && s.kind == SIDE_REDUCE) side_reduce(s, lane);
  if (RAISE && CM == 1 && s.kind == SIDE_COMBINE) side_combine(s, lane, leader);
}

// A consumer warp's release of ring slot `s`: to every CTA of the cluster
// whose producer may refill it (each one multicasts into both).
template <int STAGES, int CM>
__device__ __forceinline__ void release_slot(unsigned bars, int s) {
  const unsigned empty = bars + (STAGES + s) * 8;
  if (CM == 1) {
    mbar_arrive(empty);
  } else {
#pragma unroll
    for (int c = 0; c < CM; ++c) mbar_arrive_remote(mapa(empty, (unsigned)c));
  }
}

// A tile's raise, held until its bulk stores are complete (TileDesc's
// sig and sig_mode; sig < 0: nothing held).
struct HeldRaise {
  int sig = -1, mode = 0;
};

// Both consumers' stores of the held tile are visible (each consumer's
// thread 0 saw its bulk stores complete and fenced them into the generic
// proxy; plain stores were fenced by their threads): consumer 0 raises.
__device__ __forceinline__ void raise_held(const GemmParams& p, const HeldRaise& h, int cw, int lt) {
  if (h.sig < 0) return;
  signal_fence();
  named_barrier(1, 256);
  if (cw == 0 && lt == 0) {
    if (h.mode == 1)
      signal_raise_add(p.signals, (unsigned)h.sig, 1ull);
    else
      signal_raise(p.signals, (unsigned)h.sig, hook_raise_value(p));
  }
}

// TMA_ST: full tiles of the store epilogue leave through bulk tensor stores
// (one thread per consumer issues them and only waits for the reads of its
// staging before the next pass refills it), so the global writes overlap
// the next pass and the next tile's math. With the raise hook a tile's
// signal waits for its stores to complete, so it is raised one tile
// later, once the next tile's stores are issued: raised at once, the wait
// for the writes cost FC2 about 10% (plain stores did too: docs/PERF.md,
// 2026-12-06). Partial tiles (rows of the next expert follow in C) and
// scatter keep plain stores; so does SwiGLU (one pass per tile: bulk stores
// measured no faster there, 2026-11-23).
template <int EPI, bool WAIT, bool RAISE, int BN, int STAGES, bool TMA_ST = false, int CM = 1>
__device__ __forceinline__ void gemm(const HopperParams& hp) {
  static_assert(CM == 1 || CM == 2, "clusters of one or two CTAs along M");
  constexpr int NB = BN / 128;  // wgmma n128 blocks per consumer
  constexpr bool TS = TMA_ST && EPI == EPI_STORE;
  using S = Smem<BN, STAGES>;
  extern __shared__ unsigned char smem_raw[];
  const Places<BN, STAGES> at(smem_raw);
  const unsigned ring = at.ring, staging = at.staging, bars = at.bars;
  volatile int* abort_flag = at.abort_flag;
  volatile int* sk_ok = abort_flag + 1;  // [2]: a last part's partials all arrived
  const GemmParams& p = hp.p;
  const int wg = threadIdx.x / 128;
  const int kblocks = p.K / BK;

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      // thread 0's expect_tx arrival (and each gathering thread's)
      mbar_init(bars + s * 8, gathers<WAIT, CM>(p) ? 1 + GATHER_THREADS : 1);
      mbar_init(bars + (STAGES + s) * 8, 8 * CM);  // each consumer warp of the cluster
    }
    mbar_init(bars + 2 * STAGES * 8, 1);
    mbar_init(bars + 2 * STAGES * 8 + 8, 1);
    *abort_flag = 0;
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  // The peer's producer multicasts into this CTA's ring and its consumers
  // arrive on this CTA's barriers: both CTAs' barriers must be initialised.
  if (CM > 1)
    cluster_sync();
  else
    __syncthreads();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0 || (gathers<WAIT, CM>(p) && threadIdx.x < GATHER_THREADS))
      produce<EPI, WAIT, BN, STAGES, CM>(hp, ring, bars, abort_flag, threadIdx.x);
    else if (threadIdx.x >= 32)
      side_work<WAIT, RAISE, CM>(hp.side, threadIdx.x & 31, blockIdx.x == 0 && threadIdx.x < 64);
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int cw = wg - 1;  // consumer index: tile rows cw*64 .. +64
    const int lt = threadIdx.x % 128;
    const int warp = lt / 32, lane = lt % 32;
    const unsigned stg = staging + cw * (64 * 128 * 2);
    const unsigned crank = CM > 1 ? cluster_rank() : 0u;
    // A SwiGLU tile's epilogue math runs once its accumulators are final;
    // its staging and stores wait for the next tile's k-loop (DEFER), so
    // they overlap that tile's first wgmma groups. With the raise hook a
    // tile's signal must follow its stores, so those variants store at once.
    constexpr bool DEFER = EPI == EPI_SWIGLU && !RAISE;
    unsigned pend_v[BN / 8];
    TileDesc pend_t = {};
    bool pend = false;
    HeldRaise held;
    int it = 0;
    for (int step = 0;; ++step) {
      Piece pc;
      if (!work_item<CM>(p, kblocks, crank, step, pc)) break;
      const TileDesc t = tile_list(p)[pc.tile];
      // A pair of a cluster aborts before its first k-block, in both CTAs
      // alike; the consumers leave without touching the ring.
      if (WAIT && CM > 1) {
        mbar_wait(bars + (it % STAGES) * 8, (unsigned)(it / STAGES) & 1u);
        if (*abort_flag) break;
      }
      if (CM > 1 && t.rows == 0) {
        // The empty second tile of a pair only takes its share of B: its
        // consumers pass each slot on (a loop of its own, so the wgmma loop
        // below keeps its single in-flight group).
        for (int kb = pc.kb0; kb < pc.kb1; ++kb, ++it) {
          if (!(WAIT && kb == pc.kb0)) mbar_wait(bars + (it % STAGES) * 8, (unsigned)(it / STAGES) & 1u);
          if (lane == 0) release_slot<STAGES, CM>(bars, it % STAGES);
        }
        continue;
      }
      float acc[NB][64];
#pragma unroll
      for (int b = 0; b < NB; ++b)
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[b][i] = 0.f;
      // One wgmma group stays in flight: slot kb-1 is released once group
      // kb is issued and kb-1 has retired.
      int prev_s = -1;
      // Only a failed dependency wait sets the abort flag. Leaving the
      // k-loop early made ptxas retire every wgmma group before each
      // k-block's check, so an aborted tile runs to its end on stale
      // operands without waiting (the producer has left) and the
      // consumers leave after it.
      bool aborted = false;
      for (int kb = pc.kb0; kb < pc.kb1; ++kb, ++it) {
        const int s = it % STAGES;
        const unsigned ph = (unsigned)(it / STAGES) & 1u;
        if (!aborted && !(WAIT && CM > 1 && kb == pc.kb0)) {
          mbar_wait(bars + s * 8, ph);
          aborted = WAIT && CM == 1 && *abort_flag;
        }
        if (gathers<WAIT, CM>(p)) fence_proxy_async_smem();
        const unsigned sa = ring + s * S::STAGE_BYTES + cw * 64 * BK * 2;
        const unsigned sb = ring + s * S::STAGE_BYTES + S::A_BYTES;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          const unsigned long long da = smem_desc(sa + kk * 32);
          if (NB == 2) {
            wgmma_n256(&acc[0][0], da, smem_desc(sb + kk * 32));
          } else {
#pragma unroll
            for (int b = 0; b < NB; ++b)
              wgmma_n128(acc[b], da, smem_desc(sb + b * 128 * BK * 2 + kk * 32));
          }
        }
        wgmma_commit();
        if (DEFER && pend && kb == min(pc.kb0 + 1, pc.kb1 - 1)) {
          store_swiglu<BN>(p, pend_t, pend_v, stg, cw, warp, lane, lt);
          pend = false;
        }
        wgmma_wait<1>();
        if (prev_s >= 0 && lane == 0) release_slot<STAGES, CM>(bars, prev_s);
        prev_s = s;
      }
      wgmma_wait<0>();
#pragma unroll
      for (int b = 0; b < NB; ++b)
#pragma unroll
        for (int i = 0; i < 64; ++i) fence_acc(acc[b][i]);
      if (prev_s >= 0 && lane == 0) release_slot<STAGES, CM>(bars, prev_s);
      // Each warp reads the abort flag after its own slot waits, so warps
      // of one consumer can disagree about the tile the producer aborted
      // behind; one verdict for all of them, or some would leave while the
      // rest block at the epilogue's barriers.
      if (WAIT && CM == 1) aborted = named_barrier_or(2 + cw, 128, aborted);
      if (WAIT && aborted) {
        if (TS && lt == 0) bulk_wait_all();
        return;
      }
      if (CM == 1 && pc.role != PIECE_WHOLE) {
        // Thread lt's accumulators as float4 columns of its consumer's slot,
        // so each store and load of the 128 threads is one contiguous 2 KiB.
        constexpr int Q = NB * 16;
        const size_t slot_floats = (size_t)Q * 128 * 4;
        if (pc.role == PIECE_PART) {
          float* dst = p.sk_partials + ((size_t)blockIdx.x * 2 + cw) * slot_floats;
#pragma unroll
          for (int q = 0; q < Q; ++q) {
            const float* a = &acc[q / 16][(q % 16) * 4];
            st_global_v4(dst + ((size_t)q * 128 + lt) * 4, a[0], a[1], a[2], a[3]);
          }
          signal_fence();
          named_barrier(2 + cw, 128);
          if (lt == 0) signal_raise(p.sk_flags, blockIdx.x * 2 + cw, p.sk_epoch);
          continue;
        }
        if (lt == 0) {
          bool ok = true;
          for (int j = pc.from; j < (int)blockIdx.x && ok; ++j)
            ok = wait_at_least(p.sk_flags + j * 2 + cw, p.sk_epoch, p.timeout_ns, p.err,
                               COMET_ERR_SPLIT_TIMEOUT, (unsigned)pc.tile);
          sk_ok[cw] = ok ? 1 : 0;
        }
        named_barrier(2 + cw, 128);
        // A missing part is in the error word; the tile stays unwritten.
        if (!sk_ok[cw]) continue;
        for (int j = pc.from; j < (int)blockIdx.x; ++j) {
          const float* src = p.sk_partials + ((size_t)j * 2 + cw) * slot_floats;
#pragma unroll
          for (int q = 0; q < Q; ++q) {
            float* a = &acc[q / 16][(q % 16) * 4];
            const float4 v = ld_global_cg_v4(src + ((size_t)q * 128 + lt) * 4);
            a[0] += v.x;
            a[1] += v.y;
            a[2] += v.z;
            a[3] += v.w;
          }
        }
      }

      if (DEFER) {
        // (A k-loop of no k-blocks would have left the last one pending.)
        if (pend) store_swiglu<BN>(p, pend_t, pend_v, stg, cw, warp, lane, lt);
        swiglu_pack<BN>(acc, pend_v);
        pend_t = t;
        pend = true;
        continue;
      }
      if (EPI == EPI_SWIGLU) {
        // With the raise hook: stored now, before the signal.
        unsigned v[BN / 8];
        swiglu_pack<BN>(acc, v);
        store_swiglu<BN>(p, t, v, stg, cw, warp, lane, lt);
      }
      // Store and scatter: fragments -> swizzled staging (bf16) -> 16-byte
      // coalesced row stores (or bulk stores), one 64 x 128 pass at a time.
      constexpr int PASSES = (EPI == EPI_SWIGLU) ? 0 : NB;
      const int out_cols = p.N;
      const bool bulk = TS && hp.tma_store != 0 && t.rows == BM;
      float wrow[2];
      row_weights<EPI>(p, t, cw, warp, lane, wrow);
#pragma unroll
      for (int pass = 0; pass < PASSES; ++pass) {
        if (TS && lt == 0) bulk_wait_read();
        named_barrier(2 + cw, 128);  // earlier readers of the staging are done
        stage_pass<BN>(acc, pass, wrow, stg, warp, lane);
        if (TS && bulk) fence_proxy_async_smem();
        named_barrier(2 + cw, 128);
        if (TS && bulk) {
          if (lt == 0) {
            const int col0 = t.n0 + pass * 128;
            const int row = t.row0 + cw * 64;
            if (col0 < out_cols) tma_store_2d(&hp.tma_c, stg, col0, row);
            if (col0 + 64 < out_cols) tma_store_2d(&hp.tma_c, stg + 8192, col0 + 64, row);
            bulk_commit();
          }
          continue;
        }
        store_pass<EPI>(p, t, pass, 128, out_cols, stg, cw, lt);
      }
      if (RAISE && TS) {
        // The tile before is complete once no more than this tile's own
        // groups are in flight (none when this one stored plainly).
        if (lt == 0) {
          if (bulk)
            bulk_wait_all_but<PASSES>();
          else
            bulk_wait_all();
          fence_proxy_async_global();
        }
        raise_held(p, held, cw, lt);
        held = HeldRaise{t.sig, t.sig_mode};
      } else if (RAISE) {
        raise_held(p, HeldRaise{t.sig, t.sig_mode}, cw, lt);
      }
    }
    if (RAISE && TS) {
      if (lt == 0) {
        bulk_wait_all();
        fence_proxy_async_global();
      }
      raise_held(p, held, cw, lt);
    }
    if (DEFER && pend) store_swiglu<BN>(p, pend_t, pend_v, stg, cw, warp, lane, lt);
    // Shared memory must outlive the last bulk stores' reads.
    if (TS && lt == 0) bulk_wait_all();
  }
}

}  // namespace sm90
}  // namespace comet
