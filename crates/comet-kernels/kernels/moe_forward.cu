// comet-rs: the MoE forward on the device (DESIGN.md 6b, docs/ARCHITECTURE.md).
// The phases around the two grouped GEMMs, named as in comet-sched's
// forward.rs:
//   comet_route     topk ids -> this rank's per-expert counts and each slot's
//                   index inside its (this rank -> expert) segment
//   comet_layout    count exchange with every rank, then from the W x E count
//                   matrix what comet-core's LayoutPlan computes on the host:
//                   receive segments, send offsets, destination rows, and the
//                   tile lists of both GEMMs (read by them from GPU memory)
//   comet_dispatch  x rows straight into their final rows on the destinations;
//                   dispatch(expert, src) there once a segment is complete
//   comet_wait_signals  (non-overlapped) a range of this rank's signals
//   comet_combine   FC2 rows, chunk by chunk as a chunk's tiles finish, back to
//                   their source ranks; combine(from, chunk) there
//   comet_reduce    y = weighted top-k sum (bf16), chunk by chunk as combines land
// and two kernels of a staged proxy's token-once wire (comet-sched's staged.rs):
//   comet_expand_rows  a landed piece's rows from its pair's slots (or zeros)
//   comet_sum_rows     a combine piece's rows summed per token slot
//
// Conventions. ids are int32 or int64 (as torch.topk gives them); a negative
// id is a dropped slot and adds nothing to y; an id >= experts is recorded in
// the error word (COMET_ERR_BAD_EXPERT, index = slot) and dropped, so the
// protocol stays whole. Every rank derives the same layout from the same
// count matrix, so a call whose rows exceed some rank's receive capacity is
// refused by all ranks alike (COMET_ERR_CAPACITY, index = that rank) and
// nothing moves. Signal indices are absolute in a rank's signal array:
// [0, W) count(src), then W + le*W + src dispatch(le, src), then
// W + epr*W + from*pieces + j combine(from, j), where layer1 piece
// j = g*chunks + c is column chunk c of expert group g's rows.
//
// Expert groups. A rank's local experts split into `groups` groups of
// consecutive experts (group g: [group_lo(g), group_lo(g + 1))). The tile
// lists hold group 0's tiles first, and an overlapped call runs FC1(g0),
// FC2(g0), FC1(g1), FC2(g1), ... (each launch from its group's first
// tile), so group 0's combine travels beside the later groups' GEMMs
// instead of after the last FC2 (docs/ARCHITECTURE.md, "What is
// overlapped"). One group is the plain per-layer overlap.
#include "moe_rows.cuh"

namespace comet {

__device__ __forceinline__ int group_of_expert(int le, int groups, int epr) {
  int g = 0;
  while (group_lo(g + 1, groups, epr) <= le) ++g;
  return g;
}
// Arrival groups of row tiles (step i, local expert le) are numbered
// expert-group-major, steps inside: group g's at lo*W + i*n + (le - lo),
// so each expert group's row tiles are consecutive (one group: i*epr + le).
__device__ __forceinline__ int arrival_index(int le, int i, int groups, int epr, int W) {
  const int g = group_of_expert(le, groups, epr);
  const int lo = group_lo(g, groups, epr), n = group_lo(g + 1, groups, epr) - lo;
  return lo * W + i * n + (le - lo);
}

// Thread 0's verdict for the whole block. `flag` is reused (once per
// chunk), so the second barrier keeps thread 0 from rewriting it before
// every thread has read it.
__device__ __forceinline__ bool block_verdict(int* flag, bool mine) {
  if (threadIdx.x == 0) *flag = mine ? 1 : 0;
  __syncthreads();
  const bool v = *flag != 0;
  __syncthreads();
  return v;
}

// A warp's place in the grid: warps take rows or tokens grid-stride.
struct WarpGrid {
  int lane;
  long long warp, warps;
};
__device__ __forceinline__ WarpGrid warp_grid() {
  WarpGrid g;
  g.lane = threadIdx.x & 31;
  g.warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  g.warps = ((long long)gridDim.x * blockDim.x) >> 5;
  return g;
}

// The side stream's copy kernels (comet_dispatch, comet_combine) are
// bounded to 64 registers so two of their blocks share an SM: W ranks
// sharing a GPU leave each other room for their route and layout blocks
// while these spin. At 127 registers (four vectors of every row in
// flight, 2026-12-06) staged ranks waited out their count timeout in two
// runs of three, and the copies were no faster beside the GEMMs.
#define COMET_SIDE_BOUNDS __launch_bounds__(512, 2)

struct RouteParams {
  const void* ids;   // [slots] int32 or int64
  unsigned* cnt;     // [experts], zeroed by the call
  int* local_idx;    // [slots]: index in the segment, -1 dropped
  u64* epoch;        // this rank's call counter, bumped here once per call
  u64* err;
  int slots;
  int experts;
  int ids_i64;
  int pad;
};

struct LayoutParams {
  const unsigned* cnt;      // [E] this call's counts of this rank
  const void* ids;
  const int* local_idx;
  const unsigned* counts;   // own symmetric counts [2][W][E]
  const u64* peer_counts;   // [W] every rank's counts buffer
  const u64* peer_signals;  // [W] every rank's signal array
  const u64* signals;       // own signal array
  const u64* epoch;
  u64* err;
  Scalars* sc;
  int* send_off;            // [E + 1] this rank's send order: global expert order
  int* dest_row;            // [E] first row of (e, this rank) on e's owner
  int* segs;                // [epr * W][4]: row, rows, src, src's send position
  int* rows_from;           // [groups][W] rows received from each source, per expert group
  int* send_slots;          // [slots] slot at each send position
  TileDesc* fc1;            // [max_row_tiles * ncol1]
  TileDesc* fc2;            // [max_row_tiles * nc2 * chunks]
  GroupTiles* group_tiles;  // [groups]
  u64 timeout_ns;
  int slots;
  int experts;
  int ranks;
  int me;
  int epr;
  int ids_i64;
  int recv_cap;             // rows every rank can receive
  int bm;                   // rows per GEMM tile
  int ncol1;                // FC1 column tiles
  int bn1;                  // FC1 output columns per tile
  int nc2;                  // FC2 column tiles per chunk
  int bn2;                  // FC2 output columns per tile
  int cols;                 // chunk width
  int chunks;
  int group1;               // FC1 column tiles per raster group
  int group2;               // FC2 column tiles per raster group
  int groups;               // expert groups, 1..=min(epr, MAX_GROUPS)
  int pad;
};

struct WaitParams {
  const u64* signals;
  const Scalars* sc;
  const u64* epoch;
  u64* err;
  u64 timeout_ns;
  int first;
  int count;
};

}  // namespace comet

using namespace comet;

// Counting by block-local histograms: one global atomic per (block, expert),
// then each slot's index = its block's base + its rank in the block. The
// order inside a segment is not fixed, and needs not be: a row's result does
// not depend on where in its expert's rows it sits.
extern "C" __global__ void __launch_bounds__(512) comet_route(const __grid_constant__ RouteParams p) {
  extern __shared__ unsigned hist[];
  for (int e = threadIdx.x; e < p.experts; e += blockDim.x) hist[e] = 0;
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.epoch += 1;
  __syncthreads();
  const long long per = ((long long)p.slots + gridDim.x - 1) / gridDim.x;
  const long long s0 = (long long)blockIdx.x * per;
  const long long s1 = s0 + per < p.slots ? s0 + per : p.slots;
  for (long long s = s0 + threadIdx.x; s < s1; s += blockDim.x) {
    const long long e = load_id(p.ids, p.ids_i64, s);
    int li = -1;
    if (e >= p.experts)
      signal_record_error(p.err, COMET_ERR_BAD_EXPERT, (unsigned)s);
    else if (e >= 0)
      li = (int)atomicAdd(&hist[e], 1u);
    p.local_idx[s] = li;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < p.experts; e += blockDim.x)
    if (hist[e] != 0u) hist[e] = atomicAdd(&p.cnt[e], hist[e]);
  __syncthreads();
  for (long long s = s0 + threadIdx.x; s < s1; s += blockDim.x) {
    const int li = p.local_idx[s];
    if (li >= 0) p.local_idx[s] = li + (int)hist[load_id(p.ids, p.ids_i64, s)];
  }
}

// Row tile q of the arrival-ordered list: its expert, first row and the
// arrival steps of its first and last segments.
struct RowTile {
  int le, row0, rows, i_first, i_last;
};

// The group of row tile q: the last of the E groups starting at or before it.
__device__ __forceinline__ int group_of(int q, const int* gstart, int E) {
  int lo = 0, hi = E - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (gstart[mid] <= q) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Tile g of a list that holds every row tile by `ncols` column tiles, its
// row tiles in the groups of `gstart` (a group's tiles become ready at one
// arrival step): inside a group, column tiles go in raster groups of
// `group`, each over all the group's row tiles, columns inside rows. So the
// CTAs resident at one time read a few column panels of B (a weight panel
// from HBM once per raster group) instead of all of them once per row tile,
// which made mixtral's FC1 stream the whole expert for every 128 rows.
__device__ __forceinline__ void raster(long long g, const int* gstart, int E, int ncols, int group,
                                       int* q, int* n) {
  const int q0 = (int)(g / ncols);
  const int lo = group_of(q0, gstart, E);
  const int first = gstart[lo], rows = gstart[lo + 1] - first;
  const long long l = g - (long long)first * ncols;
  const long long span = (long long)rows * group;
  const int cg = (int)(l / span);
  const int width = min(group, ncols - cg * group);
  const long long in = l - (long long)cg * span;
  *q = first + (int)(in / width);
  *n = cg * group + (int)(in - (in / width) * width);
}

__device__ __forceinline__ RowTile row_tile(int q, const int* gstart, const int* gfirst,
                                            const int* erow, const int* erows, const int* srows,
                                            int E, int epr, int W, int bm, int groups) {
  const int lo = group_of(q, gstart, E);
  int eg = 0;
  while (group_lo(eg + 1, groups, epr) * W <= lo) ++eg;
  const int first = group_lo(eg, groups, epr), n = group_lo(eg + 1, groups, epr) - first;
  RowTile t;
  t.i_last = (lo - first * W) / n;
  t.le = first + (lo - first * W) - t.i_last * n;
  const int r = gfirst[lo] + (q - gstart[lo]);
  const int rel = r * bm;
  t.row0 = erow[t.le] + rel;
  t.rows = min(bm, erows[t.le] - rel);
  int end = 0;
  t.i_first = 0;
  for (int i = 0; i < W; ++i) {
    end += srows[t.le * W + i];
    if (end > rel) { t.i_first = i; break; }
  }
  return t;
}

extern "C" __global__ void __launch_bounds__(512) comet_layout(const __grid_constant__ LayoutParams p) {
  extern __shared__ int sm[];
  const int W = p.ranks, E = p.experts, epr = p.epr, me = p.me;
  unsigned* mat = reinterpret_cast<unsigned*>(sm);  // [W][E] counts[src][e]
  int* erow = sm + W * E;                            // [epr] first row of each local expert
  int* erows = erow + epr;                           // [epr] its rows
  int* srows = erows + epr;                          // [epr][W] segment rows, arrival order
  int* gcnt = srows + E;                             // [E] row tiles whose last segment is i, by arrival_index
  int* gfirst = gcnt + E;                            // [E] the first of them
  int* gstart = gfirst + E;                          // [E + 1] prefix over arrival_index
  int* soff = gstart + E + 1;                        // [E + 1] this rank's send offsets
  __shared__ int ok_flag, bad_dst, recv_total;
  __shared__ int qstart[MAX_GROUPS + 1];  // first row tile of each expert group
  const int tid = threadIdx.x, nt = blockDim.x, G = p.groups;
  const u64 epoch = *p.epoch;
  const int par = (int)(epoch & 1ull);

  // 1. Count exchange: block 0 stores this rank's row into counts[par][me]
  // of every rank and raises count(me) there; every block waits for all W.
  if (blockIdx.x == 0) {
    for (int i = tid; i < W * E; i += nt) {
      const int r = i / E, e = i - r * E;
      reinterpret_cast<unsigned*>(p.peer_counts[r])[((size_t)par * W + me) * E + e] = p.cnt[e];
    }
    signal_fence();
    __syncthreads();
    if (tid < W) signal_store_release(peer_word(p.peer_signals, tid, me), epoch);
  }
  if (tid == 0) {
    int ok = 1;
    for (int r = 0; r < W && ok; ++r) ok = signal_wait(p.signals, (unsigned)r, epoch, p.timeout_ns, p.err);
    ok_flag = ok;
    bad_dst = -1;
  }
  __syncthreads();
  if (ok_flag) {
    const volatile unsigned* rows = p.counts + (size_t)par * W * E;
    for (int i = tid; i < W * E; i += nt) mat[i] = rows[i];
  }
  __syncthreads();

  // 2. Capacity: every rank checks every destination, so all agree.
  if (ok_flag) {
    for (int d = tid; d < W; d += nt) {
      long long tot = 0;
      for (int e = d * epr; e < (d + 1) * epr; ++e)
        for (int s = 0; s < W; ++s) tot += mat[s * E + e];
      if (tot > p.recv_cap) atomicExch(&bad_dst, d);
    }
  }
  __syncthreads();
  if (!ok_flag || bad_dst >= 0) {
    if (blockIdx.x == 0 && tid == 0) {
      if (bad_dst >= 0) signal_record_error(p.err, COMET_ERR_CAPACITY, (unsigned)bad_dst);
      Scalars z = {};
      *p.sc = z;
    }
    return;
  }

  // 3. This rank's receive layout: experts in order, inside one its sources
  // in arrival order (itself first, then me-1, me-2, ...).
  for (int le = tid; le < epr; le += nt) {
    int rows = 0;
    for (int i = 0; i < W; ++i) {
      const int src = (me - i + W) % W;
      const int r = (int)mat[src * E + me * epr + le];
      srows[le * W + i] = r;
      rows += r;
    }
    erows[le] = rows;
  }
  __syncthreads();
  if (tid == 0) {
    int row = 0;
    for (int le = 0; le < epr; ++le) {
      erow[le] = row;
      row += erows[le];
    }
    recv_total = row;
    int off = 0;
    for (int e = 0; e < E; ++e) {
      soff[e] = off;
      off += (int)mat[me * E + e];
    }
    soff[E] = off;
  }

  // 4. Row tiles of each expert, grouped by the arrival step of their last
  // segment: tiles of local rows first, then those completed by step 1,
  // ..., inside each expert group (arrival_index).
  for (int le = tid; le < epr; le += nt) {
    for (int i = 0; i < W; ++i) gcnt[arrival_index(le, i, G, epr, W)] = 0;
    const int R = erows[le];
    const int ntile = (R + p.bm - 1) / p.bm;
    int i = 0, end = srows[le * W];
    for (int r = 0; r < ntile; ++r) {
      const int last = min((r + 1) * p.bm, R) - 1;
      while (last >= end) end += srows[le * W + (++i)];
      const int a = arrival_index(le, i, G, epr, W);
      if (gcnt[a] == 0) gfirst[a] = r;
      gcnt[a] += 1;
    }
  }
  __syncthreads();
  if (tid == 0) {
    int acc = 0;
    for (int g = 0; g < E; ++g) {
      gstart[g] = acc;
      acc += gcnt[g];
    }
    gstart[E] = acc;
    for (int g = 0; g <= G; ++g) qstart[g] = gstart[group_lo(g, G, epr) * W];
  }
  __syncthreads();
  const int NR = gstart[E];
  const long long n1 = (long long)NR * p.ncol1;
  const long long per2 = (long long)NR * p.nc2;
  const long long n2 = per2 * p.chunks;

  // 5. Tables for the other phases (block 0).
  if (blockIdx.x == 0) {
    for (int e = tid; e <= E; e += nt) p.send_off[e] = soff[e];
    for (int e = tid; e < E; e += nt) {
      const int dst = e / epr, le = e - dst * epr;
      int row = 0;
      for (int l = 0; l < le; ++l)
        for (int s = 0; s < W; ++s) row += (int)mat[s * E + dst * epr + l];
      const int steps = (dst - me + W) % W;  // sources before this rank at dst
      for (int i = 0; i < steps; ++i) row += (int)mat[((dst - i + W) % W) * E + e];
      p.dest_row[e] = row;
    }
    for (int sg = tid; sg < E; sg += nt) {
      const int le = sg / W, i = sg - le * W;
      const int src = (me - i + W) % W;
      const int e = me * epr + le;
      int row = erow[le];
      for (int j = 0; j < i; ++j) row += srows[le * W + j];
      int pos = 0;
      for (int x = 0; x < e; ++x) pos += (int)mat[src * E + x];
      p.segs[4 * sg + 0] = row;
      p.segs[4 * sg + 1] = srows[sg];
      p.segs[4 * sg + 2] = src;
      p.segs[4 * sg + 3] = pos;
    }
    for (int x = tid; x < G * W; x += nt) {
      const int g = x / W, s = x - g * W;
      int rows = 0;
      for (int le = group_lo(g, G, epr); le < group_lo(g + 1, G, epr); ++le)
        rows += (int)mat[s * E + me * epr + le];
      p.rows_from[x] = rows;
    }
    for (int g = tid; g < G; g += nt) {
      const int rt = qstart[g + 1] - qstart[g];
      GroupTiles t = {};
      t.fc1_first = qstart[g] * p.ncol1;
      t.fc1_tiles = rt * p.ncol1;
      t.fc2_first = qstart[g] * p.nc2 * p.chunks;
      t.fc2_tiles = rt * p.nc2 * p.chunks;
      t.piece_tiles = rt * p.nc2;
      p.group_tiles[g] = t;
    }
    if (tid == 0) {
      Scalars s = {};
      s.ok = 1;
      s.recv_rows = recv_total;
      s.sent_rows = soff[E];
      s.row_tiles = NR;
      s.fc1_tiles = (int)n1;
      s.fc2_tiles = (int)n2;
      s.chunk_tiles = (u64)per2;
      *p.sc = s;
    }
  }

  // 6. Tile lists (all blocks), expert group by expert group. FC1: row
  // tiles in arrival order, rastered inside each arrival group (see
  // `raster`); each waits on the dispatch signals of the segments it
  // spans. FC2: chunk-major inside the expert group, rastered the same
  // inside a chunk, each tile adding 1 to its piece's counter.
  const long long gt = (long long)blockIdx.x * nt + tid, gs = (long long)gridDim.x * nt;
  for (long long g = gt; g < n1; g += gs) {
    int q, n;
    raster(g, gstart, E, p.ncol1, p.group1, &q, &n);
    const RowTile t = row_tile(q, gstart, gfirst, erow, erows, srows, E, epr, W, p.bm, G);
    TileDesc d;
    d.expert = t.le;
    d.row0 = t.row0;
    d.rows = t.rows;
    d.n0 = n * p.bn1;
    d.dep_off = t.le * W + t.i_first;
    d.dep_cnt = t.i_last - t.i_first + 1;
    d.sig = -1;
    d.sig_mode = 0;
    p.fc1[g] = d;
  }
  for (long long g = gt; g < n2; g += gs) {
    int eg = 0;  // the last expert group starting at or before g
    while (eg + 1 < G && (long long)qstart[eg + 1] * p.nc2 * p.chunks <= g) ++eg;
    const long long l = g - (long long)qstart[eg] * p.nc2 * p.chunks;
    const long long per = (long long)(qstart[eg + 1] - qstart[eg]) * p.nc2;
    const int c = (int)(l / per);
    int q, n;
    raster((long long)qstart[eg] * p.nc2 + (l - c * per), gstart, E, p.nc2, p.group2, &q, &n);
    const RowTile t = row_tile(q, gstart, gfirst, erow, erows, srows, E, epr, W, p.bm, G);
    TileDesc d;
    d.expert = t.le;
    d.row0 = t.row0;
    d.rows = t.rows;
    d.n0 = c * p.cols + n * p.bn2;
    d.dep_off = 0;
    d.dep_cnt = 0;
    d.sig = eg * p.chunks + c;
    d.sig_mode = 1;
    p.fc2[g] = d;
  }

  // 7. Send order: the slot at each send position.
  for (long long s = gt; s < p.slots; s += gs) {
    const int li = p.local_idx[s];
    if (li >= 0) p.send_slots[soff[load_id(p.ids, p.ids_i64, s)] + li] = (int)s;
  }
}

// Warps take send positions from this rank's own rows on (own segments land
// first, then the next ranks in ring order), ROWS at a time: one lane
// resolves each row's source and destination, then all lanes copy the rows
// with their loads in flight together; the lane whose row completes a
// segment raises dispatch(le, me) on its destination.
extern "C" __global__ void COMET_SIDE_BOUNDS comet_dispatch(const __grid_constant__ DispatchParams p) {
  if (!p.sc->ok) return;
  const u64 epoch = *p.epoch;
  if (blockIdx.x == 0) raise_empty_segments(p, epoch, threadIdx.x, blockDim.x);
  const int total = p.sc->sent_rows;
  const int start = p.send_off[p.me * p.epr];
  const WarpGrid wg = warp_grid();
  for (long long w0 = wg.warp * ROWS; w0 < total; w0 += wg.warps * ROWS)
    dispatch_rows<ROWS>(p, w0, ROWS, total, start, wg.lane, epoch);
}

// The sequential dispatch: a warp per token reads its x row once and stores
// it into every one of its k destination rows (x is read once, not k
// times); segments complete as in comet_dispatch. With gather_rows (one
// rank, whose FC1 reads x in place) only each row's token is stored.
extern "C" __global__ void __launch_bounds__(512) comet_dispatch_tokens(const __grid_constant__ DispatchParams p) {
  if (!p.sc->ok) return;
  const u64 epoch = *p.epoch;
  if (blockIdx.x == 0) raise_empty_segments(p, epoch, threadIdx.x, blockDim.x);
  const WarpGrid wg = warp_grid();
  const int lane = wg.lane, vecs = p.hidden / 8;
  for (long long t = wg.warp; t < p.tokens; t += wg.warps) {
    unsigned long long mine = 0ull;
    int e = -1;
    if (lane < p.k) {
      const long long slot = t * p.k + lane;
      const int li = p.local_idx[slot];
      if (li >= 0) {
        e = (int)load_id(p.ids, p.ids_i64, slot);
        const long long row = (long long)p.dest_row[e] + li;
        mine = reinterpret_cast<unsigned long long>(
            reinterpret_cast<bf16_t*>(p.peer_recv[e / p.epr]) + row * p.hidden);
      }
    }
    if (p.gather_rows) {
      if (e >= 0) p.gather_rows[p.dest_row[e] + p.local_idx[t * p.k + lane]] = (int)t;
      signal_fence();
      __syncwarp();
      count_dispatched(p, e, epoch);
      continue;
    }
    uint4* dst[MAX_TOPK];
#pragma unroll
    for (int j = 0; j < MAX_TOPK; ++j)
      dst[j] = j < p.k ? reinterpret_cast<uint4*>(__shfl_sync(0xffffffffu, mine, j)) : nullptr;
    const uint4* src = reinterpret_cast<const uint4*>(p.x + t * p.hidden);
    // Two vectors a lane: two loads in flight before the k stores of each.
    for (int v = lane; v < vecs; v += 64) {
      const bool two = v + 32 < vecs;
      const uint4 a = src[v];
      const uint4 b = two ? src[v + 32] : a;
#pragma unroll
      for (int j = 0; j < MAX_TOPK; ++j)
        if (dst[j]) {
          dst[j][v] = a;
          if (two) dst[j][v + 32] = b;
        }
    }
    signal_fence();
    __syncwarp();
    count_dispatched(p, e, epoch);
  }
}

// The call's status word into pinned host memory by a store from the
// call's stream, not a device-to-host copy: such a copy waiting there for
// the call's kernels was seen to hold back another stream's
// device-to-host copy (a staged proxy's count download) until the call
// ended, which needed that download (docs/PERF.md, 2026-12-06).
struct StatusParams {
  const u64* err;
  u64* status;  // mapped pinned host memory
};

extern "C" __global__ void __launch_bounds__(32) comet_store_status(const __grid_constant__ StatusParams p) {
  if (threadIdx.x != 0) return;
  *(volatile u64*)p.status = *(volatile const u64*)p.err;
  __threadfence_system();
}

extern "C" __global__ void __launch_bounds__(256) comet_wait_signals(const __grid_constant__ WaitParams p) {
  if (!p.sc->ok) return;
  const u64 epoch = *p.epoch;
  for (int i = threadIdx.x; i < p.count; i += blockDim.x)
    if (!signal_wait(p.signals, (unsigned)(p.first + i), epoch, p.timeout_ns, p.err)) return;
}

// Rows of other sources only: the reduce reads this rank's own rows in
// place. Piece j = g*chunks + c is column chunk c of expert group g's rows
// (consecutive: the receive layout is expert-major), sent once FC2 has
// finished its tiles. The segment table sits in shared memory (each row
// looks up its segment); rows move ROWS per warp as in the dispatch.
extern "C" __global__ void COMET_SIDE_BOUNDS comet_combine(const __grid_constant__ CombineParams p) {
  extern __shared__ int segs[];
  __shared__ int verdict;
  if (!p.sc->ok) return;
  const u64 epoch = *p.epoch;
  const int W = p.ranks;
  for (int i = threadIdx.x; i < 4 * p.epr * W; i += blockDim.x) segs[i] = p.segs[i];
  __syncthreads();
  const WarpGrid wg = warp_grid();
  for (int j = p.piece_begin; j < p.piece_end; ++j) {
    const int g = j / p.chunks;
    const int* rows_from = p.rows_from + g * W;
    if (blockIdx.x == 0) raise_empty_pieces(p, rows_from, j, j + 1, epoch, threadIdx.x, blockDim.x);
    if (p.wait_chunks && !block_verdict(&verdict, threadIdx.x != 0 || piece_done(p, j, 64))) return;
    const GroupRows gr = group_rows(p, segs, g);
    for (long long w0 = gr.r0 + wg.warp * ROWS; w0 < gr.r1; w0 += wg.warps * ROWS)
      combine_rows<ROWS>(p, segs, rows_from, j, w0, ROWS, gr.r1, wg.lane, epoch);
  }
}

// A warp per token: lanes 0..k-1 resolve the token's k rows (its own FC2
// output for this rank's experts, the combine buffer for the others) and
// weights once; every lane then sums its 16-byte column vectors over them.
// With wait_chunks (one rank, overlapped: beside FC2 on the side stream)
// a chunk's sum waits for its FC2 tiles too.
extern "C" __global__ void __launch_bounds__(512) comet_reduce(const __grid_constant__ ReduceParams p) {
  __shared__ int verdict;
  if (!p.sc->ok) return;
  const u64 epoch = *p.epoch;
  const int vecs = p.cols / 8;
  const WarpGrid wg = warp_grid();
  const int lane = wg.lane;
  for (int c = p.chunk_begin; c < p.chunk_end; ++c) {
    if (!block_verdict(&verdict, threadIdx.x != 0 || chunk_landed(p, c, epoch))) return;
    for (long long t = wg.warp; t < p.tokens; t += wg.warps) {
      float wmine;
      const unsigned long long mine = reinterpret_cast<unsigned long long>(token_row(p, t, c, lane, &wmine));
      const uint4* rows[MAX_TOPK];
      float wts[MAX_TOPK];
#pragma unroll
      for (int j = 0; j < MAX_TOPK; ++j) {
        rows[j] = j < p.k ? reinterpret_cast<const uint4*>(__shfl_sync(0xffffffffu, mine, j)) : nullptr;
        wts[j] = j < p.k ? __shfl_sync(0xffffffffu, wmine, j) : 0.f;
      }
      bf16_t* yrow = p.y + t * p.hidden + (long long)c * p.cols;
      for (int v = lane; v < vecs; v += 32) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        // A group's loads all issue before its first use: the rows are
        // scattered, so the reduce runs at the memory's speed only with
        // several in flight per thread (accumulated one at a time, the
        // compiler kept two; 2.1 of about 4 TB/s on an H200). ld.global.cg:
        // peers' combines land while this kernel runs, so no L1 copy.
#pragma unroll
        for (int g = 0; g < MAX_TOPK; g += REDUCE_GROUP) {
          if (g >= p.k) break;
          uint4 q[REDUCE_GROUP];
#pragma unroll
          for (int j = 0; j < REDUCE_GROUP; ++j)
            if (rows[g + j] != nullptr) q[j] = __ldcg(rows[g + j] + v);
#pragma unroll
          for (int j = 0; j < REDUCE_GROUP; ++j)
            if (rows[g + j] != nullptr) add_weighted(acc, wts[g + j], q[j]);
        }
        reinterpret_cast<uint4*>(yrow)[v] = pack_bf16x8(acc);
      }
    }
  }
}

namespace comet {
struct FillParams {
  bf16_t* dst;
  long long n;
  u64 seed;
  float scale;
  int pad;
};

// Mirrored by comet_kernels::forward::ExpandParams.
struct ExpandParams {
  const uint4* tokens;     // a pair's token rows (or slot sums)
  const unsigned* index;   // a slot per row of the piece; ~0u: a zero row
  uint4* dst;              // the piece's first row
  long long rows;
  int vecs;                // 16-byte vectors per row
  int pitch;               // 16-byte vectors from one dst row to the next
};

// Mirrored by comet_kernels::forward::SumParams.
struct SumParams {
  const uint4* src;        // the piece's first row
  const unsigned* starts;  // [slots + 1] each slot's first entry of rows
  const unsigned* rows;    // the piece's rows of each slot, slot-major
  const float* ratio;      // [rows] each row's scale
  uint4* dst;              // [slots][vecs] the sums
  long long slots;
  int vecs;                // 16-byte vectors per row
  int pitch;               // 16-byte vectors from one src row to the next
};

// Mirrored by comet_kernels::forward::CopyParams.
struct CopyParams {
  const unsigned char* src;
  unsigned char* dst;
  long long src_pitch;     // bytes from one src row to the next
  long long dst_pitch;
  long long rows;
  long long width;         // bytes a row
  int vec;                 // bytes a move: 16, 4 or 1, dividing every address, pitch and width
  int pad;
};
}  // namespace comet

// Uniform bf16 values in [-scale, scale) from a hash of (seed, index)
// (splitmix64's mixer): weights for tests and benchmarks without staging
// gigabytes through the host.
extern "C" __global__ void __launch_bounds__(512) comet_fill_random(const __grid_constant__ FillParams p) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    u64 z = p.seed + (u64)i * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = (float)(z >> 40) * (1.0f / 16777216.0f);
    p.dst[i] = (bf16_t)(pack_bf16x2((2.f * u - 1.f) * p.scale, 0.f) & 0xFFFFu);
  }
}

// A staged proxy's token-once landing: row r of the piece becomes slot
// index[r] of its pair (a token row on dispatch, a token's sum on combine),
// or zeros. Tokens and index may be host memory the GPU maps (the proxy's
// registered inbox, its pinned staging), read once per row over the bus.
extern "C" __global__ void __launch_bounds__(512) comet_expand_rows(const __grid_constant__ ExpandParams p) {
  const long long n = p.rows * p.vecs;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const long long r = i / p.vecs;
    const long long v = i - r * p.vecs;
    const unsigned s = p.index[r];
    uint4 q;
    if (s == ~0u) {
      q.x = q.y = q.z = q.w = 0u;
    } else {
      q = p.tokens[(long long)s * p.vecs + v];
    }
    p.dst[r * p.pitch + v] = q;
  }
}

// A staged proxy's token-once combine, before it leaves the expert side:
// per token slot of the pair, the sum of the piece's rows of that token,
// each scaled by its ratio, in f32, rounded once to bf16. A thread per
// (slot, 16-byte column vector); dst may be pinned host memory. Products
// and sums are rounded apart (no fused multiply-add), in row order, so the
// sums equal the proxy's host version (staged.rs: sum_rows) bit for bit
// (NaNs aside: each side has its own NaN pattern).
extern "C" __global__ void __launch_bounds__(512) comet_sum_rows(const __grid_constant__ SumParams p) {
  const long long n = p.slots * p.vecs;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const long long s = i / p.vecs;
    const long long v = i - s * p.vecs;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (unsigned e = p.starts[s]; e < p.starts[s + 1]; ++e) {
      const unsigned r = p.rows[e];
      const float a = p.ratio[r];
      const uint4 q = p.src[(long long)r * p.pitch + v];
      const unsigned u[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        acc[2 * h] = __fadd_rn(acc[2 * h], __fmul_rn(a, bf16_to_f32((unsigned short)(u[h] & 0xFFFFu))));
        acc[2 * h + 1] = __fadd_rn(acc[2 * h + 1], __fmul_rn(a, bf16_to_f32((unsigned short)(u[h] >> 16))));
      }
    }
    uint4 o;
    o.x = pack_bf16x2(acc[0], acc[1]);
    o.y = pack_bf16x2(acc[2], acc[3]);
    o.z = pack_bf16x2(acc[4], acc[5]);
    o.w = pack_bf16x2(acc[6], acc[7]);
    p.dst[i] = o;
  }
}

// A staged proxy's copies between device memory and the host memory the
// GPU maps (its pinned staging, its registered inboxes): rows of `width`
// bytes from src to dst, each side at its own pitch. Done by the SMs the
// proxy reserves, not by a copy engine, where a copy waiting behind a call
// on another stream can hold it back (docs/ARCHITECTURE.md).
extern "C" __global__ void __launch_bounds__(512) comet_copy_runs(const __grid_constant__ CopyParams p) {
  const long long per_row = p.width / p.vec;
  const long long n = p.rows * per_row;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const long long r = i / per_row;
    const long long c = (i - r * per_row) * p.vec;
    const unsigned char* s = p.src + r * p.src_pitch + c;
    unsigned char* d = p.dst + r * p.dst_pitch + c;
    if (p.vec == 16) {
      *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(s);
    } else if (p.vec == 4) {
      *reinterpret_cast<unsigned*>(d) = *reinterpret_cast<const unsigned*>(s);
    } else {
      *d = *s;
    }
  }
}
