// comet-rs: the rows the MoE forward moves (DESIGN.md 6b). The parameter
// blocks of the dispatch, the combine and the reduce, and the warp-level
// movers they run, shared by moe_forward.cu's kernels and by the side
// warps of the Hopper GEMM (grouped_gemm_sm90.cu), which move a rank's
// rows beside its tiles: the dispatch inside FC1, the combine (a rank
// alone: the reduce) of finished chunks inside FC2 (docs/ARCHITECTURE.md,
// "Rows moved inside the GEMMs").
#pragma once
#include "gemm_common.cuh"

namespace comet {

// Written by comet_layout, read by the other phases; mirrored by
// comet_kernels::forward::Scalars.
struct Scalars {
  int ok;          // 1: every rank's rows fit its receive capacity
  int recv_rows;   // rows this rank receives
  int sent_rows;   // rows this rank sends (non-dropped slots)
  int row_tiles;   // row tiles of this rank's experts
  int fc1_tiles;   // entries of the FC1 tile list
  int fc2_tiles;   // entries of the FC2 tile list
  int pad0, pad1;
  u64 chunk_tiles; // FC2 tiles of one column chunk, all groups
};

// Per expert group, written by comet_layout into the call's zeroed
// counters (a refused call leaves them 0, so its GEMMs run no tile);
// mirrored by comet_kernels::forward::GroupTiles.
struct GroupTiles {
  int fc1_first, fc1_tiles;  // the group's run of the FC1 list
  int fc2_first, fc2_tiles;  // and of the FC2 list
  int piece_tiles;           // FC2 tiles of one of its column chunks
  int pad[3];
};

// The most expert groups a layer runs.
constexpr int MAX_GROUPS = 16;

__device__ __forceinline__ int group_lo(int g, int groups, int epr) {
  return (int)((long long)g * epr / groups);
}

__device__ __forceinline__ long long load_id(const void* ids, int i64, long long s) {
  return i64 ? reinterpret_cast<const long long*>(ids)[s]
             : (long long)reinterpret_cast<const int*>(ids)[s];
}

__device__ __forceinline__ float bf16_to_f32(unsigned short b) {
  return __uint_as_float(((unsigned)b) << 16);
}

__device__ __forceinline__ u64* peer_word(const u64* table, int rank, long long index) {
  return reinterpret_cast<u64*>(table[rank]) + index;
}

// Rows a warp moves at once, and the most top-k slots of a token.
constexpr int ROWS = 4;
constexpr int MAX_TOPK = 16;
// Top-k rows the reduce loads at once (a divisor of MAX_TOPK).
constexpr int REDUCE_GROUP = 8;

// One lane's row of a warp's batch: 16-byte vectors from src to dst (none
// when dst is null).
struct RowCopy {
  const uint4* src = nullptr;
  uint4* dst = nullptr;
};

// Lanes first .. first + N - 1 hold rows of the batch; all lanes copy
// those N rows, the loads of every one in flight before the stores.
template <int N = ROWS>
__device__ __forceinline__ void copy_rows(const RowCopy& mine, int vecs, int lane, int first = 0) {
  const uint4* src[N];
  uint4* dst[N];
#pragma unroll
  for (int r = 0; r < N; ++r) {
    src[r] = reinterpret_cast<const uint4*>(
        __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(mine.src), first + r));
    dst[r] = reinterpret_cast<uint4*>(
        __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(mine.dst), first + r));
  }
  for (int v = lane; v < vecs; v += 32) {
    uint4 a[N];
#pragma unroll
    for (int r = 0; r < N; ++r)
      if (dst[r]) a[r] = src[r][v];
#pragma unroll
    for (int r = 0; r < N; ++r)
      if (dst[r]) dst[r][v] = a[r];
  }
}

struct DispatchParams {
  const bf16_t* x;          // [tokens, hidden]
  const void* ids;
  const int* local_idx;
  const int* send_slots;
  const int* send_off;
  const int* dest_row;
  const unsigned* cnt;
  unsigned* seg_done;       // [E] rows stored of each segment, zeroed by the call
  const u64* peer_recv;     // [W] every rank's receive buffer
  const u64* peer_signals;
  const Scalars* sc;
  const u64* epoch;
  int* gather_rows;         // [recv rows] or null: see comet_dispatch_tokens
  int hidden;
  int k;
  int experts;
  int epr;
  int ranks;
  int me;
  int ids_i64;
  int tokens;
};

struct ReduceParams {
  const bf16_t* out;        // own FC2 output: rows this rank computed for itself
  const bf16_t* comb;       // combine buffer [send positions, hidden]
  const void* ids;
  const void* w;            // [slots] f32 or bf16
  const int* local_idx;
  const int* send_off;
  const int* segs;
  bf16_t* y;                // [tokens, hidden]
  const u64* signals;
  const Scalars* sc;
  const u64* epoch;
  u64* err;
  const u64* chunk_done;    // [pieces] finished FC2 tiles per piece
  const GroupTiles* group_tiles;
  u64 timeout_ns;
  int tokens;
  int k;
  int hidden;
  int cols;
  int chunks;               // column chunks (pieces = groups * chunks)
  int groups;
  int epr;
  int ranks;
  int me;
  int ids_i64;
  int w_bf16;
  int wait_chunks;          // 0: FC2 has finished (it ran before on this stream)
  int chunk_sig0;           // index naming chunk_done(0) in timeouts
  int chunk_begin;          // the chunks [chunk_begin, chunk_end) this launch sums
  int chunk_end;
  int pad;
};

struct CombineParams {
  const bf16_t* out;        // FC2 output [recv rows, hidden]
  const int* segs;
  const int* rows_from;     // [groups][W]
  const GroupTiles* group_tiles;
  const u64* chunk_done;    // [pieces] finished FC2 tiles per piece
  unsigned* comb_done;      // [pieces][W] rows sent, zeroed by the call
  const u64* peer_comb;     // [W] every rank's combine buffer
  const u64* peer_signals;
  const Scalars* sc;
  const u64* epoch;
  u64* err;
  u64 timeout_ns;
  int hidden;
  int cols;
  int chunks;               // column chunks (pieces = groups * chunks)
  int groups;
  int epr;
  int ranks;
  int me;
  int wait_chunks;          // 0: FC2 has finished (non-overlapped)
  int chunk_sig0;           // index naming chunk_done(0) in timeouts
  int piece_begin;          // the pieces [piece_begin, piece_end) this launch sends
  int piece_end;
  int pad;
};

__device__ __forceinline__ unsigned dispatch_sig(int W, int le, int src) {
  return (unsigned)(W + le * W + src);
}
__device__ __forceinline__ unsigned combine_sig(int W, int epr, int pieces, int from, int j) {
  return (unsigned)(W + epr * W + from * pieces + j);
}

// Segments with no rows are complete from the start: threads `first`,
// `first + step`, ... of one block raise them.
__device__ __forceinline__ void raise_empty_segments(const DispatchParams& p, u64 epoch, int first,
                                                     int step) {
  for (int e = first; e < p.experts; e += step)
    if (p.cnt[e] == 0u) {
      const int dst = e / p.epr;
      signal_store_release(peer_word(p.peer_signals, dst, dispatch_sig(p.ranks, e - dst * p.epr, p.me)),
                           epoch);
    }
}

// The segment of global expert e from this rank has one more row stored;
// the lane that stores its last raises dispatch(le, me) on its owner.
__device__ __forceinline__ void count_dispatched(const DispatchParams& p, int e, u64 epoch) {
  if (e >= 0 && atomicAdd(&p.seg_done[e], 1u) + 1u == p.cnt[e]) {
    const int dst = e / p.epr;
    signal_raise(peer_word(p.peer_signals, dst, 0), dispatch_sig(p.ranks, e - dst * p.epr, p.me), epoch);
  }
}

// Pieces [j0, j1) (of one expert group) that a source sent no rows of
// are complete from the start: threads `first`, `first + step`, ... of one
// block raise them on their sources.
__device__ __forceinline__ void raise_empty_pieces(const CombineParams& p, const int* rows_from, int j0,
                                                   int j1, u64 epoch, int first, int step) {
  const int W = p.ranks, pieces = p.groups * p.chunks;
  for (int i = first; i < (j1 - j0) * W; i += step) {
    const int j = j0 + i / W, s = i % W;
    if (s != p.me && rows_from[s] == 0)
      signal_store_release(peer_word(p.peer_signals, s, combine_sig(W, p.epr, pieces, p.me, j)), epoch);
  }
}

// Piece j's FC2 tiles are all counted: one thread waits, polling every
// `sleep_ns`; false once the wait ran out (in the error word).
__device__ __forceinline__ bool piece_done(const CombineParams& p, int j, unsigned sleep_ns) {
  return wait_at_least(p.chunk_done + j, (u64)p.group_tiles[j / p.chunks].piece_tiles, p.timeout_ns, p.err,
                       COMET_ERR_SIGNAL_TIMEOUT, (unsigned)(p.chunk_sig0 + j), sleep_ns);
}

// Expert group g's receive rows [r0, r1).
struct GroupRows {
  int r0, r1;
};
__device__ __forceinline__ GroupRows group_rows(const CombineParams& p, const int* segs, int g) {
  const int W = p.ranks, epr = p.epr;
  const int lo = group_lo(g, p.groups, epr), hi = group_lo(g + 1, p.groups, epr);
  return {segs[4 * lo * W], hi < epr ? segs[4 * hi * W] : p.sc->recv_rows};
}

// One warp's receive rows [w0, w0 + n) (n <= 32, below r1) of piece j
// back to their sources' combine buffers, N rows at a time: lane r < n
// finds row r's segment (segs: 4 ints each, ordered by first row), and
// the lane whose row completes (j, source) raises combine(me, j) there.
template <int N>
__device__ __forceinline__ void combine_rows(const CombineParams& p, const int* segs, const int* rows_from, int j,
                                             long long w0, int n, int r1, int lane, u64 epoch) {
  const int W = p.ranks, c = j % p.chunks;
  RowCopy rc;
  int src = -1;
  if (lane < n && w0 + lane < r1) {
    const int r = (int)(w0 + lane);
    int lo = 0, hi = p.epr * W - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (segs[4 * mid] <= r) lo = mid; else hi = mid - 1;
    }
    const int* sg = segs + 4 * lo;
    if (sg[2] != p.me) {
      src = sg[2];
      const long long pos = (long long)sg[3] + (r - sg[0]);
      rc.src = reinterpret_cast<const uint4*>(p.out + (size_t)r * p.hidden + (size_t)c * p.cols);
      rc.dst = reinterpret_cast<uint4*>(reinterpret_cast<bf16_t*>(p.peer_comb[src]) + pos * p.hidden +
                                        (long long)c * p.cols);
    }
  }
  for (int r = 0; r < n; r += N) copy_rows<N>(rc, p.cols / 8, lane, r);
  signal_fence();
  __syncwarp();
  if (src >= 0 && atomicAdd(&p.comb_done[j * W + src], 1u) + 1u == (unsigned)rows_from[src])
    signal_raise(peer_word(p.peer_signals, src, 0), combine_sig(W, p.epr, p.groups * p.chunks, p.me, j), epoch);
}

// One warp's send positions [w0, w0 + n) (n <= 32, from `start` around the
// ring of `total`), N rows at a time: lane r < n resolves row r's source
// and destination, all lanes copy, and the lane whose row completes a
// segment raises dispatch(le, me) on its destination.
template <int N>
__device__ __forceinline__ void dispatch_rows(const DispatchParams& p, long long w0, int n, int total,
                                              int start, int lane, u64 epoch) {
  RowCopy rc;
  int e = -1;
  if (lane < n && w0 + lane < total) {
    long long pos = start + w0 + lane;
    if (pos >= total) pos -= total;
    const int slot = p.send_slots[pos];
    e = (int)load_id(p.ids, p.ids_i64, slot);
    const int dst = e / p.epr;
    const long long row = (long long)p.dest_row[e] + p.local_idx[slot];
    rc.src = reinterpret_cast<const uint4*>(p.x + (size_t)(slot / p.k) * p.hidden);
    rc.dst = reinterpret_cast<uint4*>(reinterpret_cast<bf16_t*>(p.peer_recv[dst]) + row * p.hidden);
  }
  for (int r = 0; r < n; r += N) copy_rows<N>(rc, p.hidden / 8, lane, r);
  signal_fence();
  __syncwarp();
  count_dispatched(p, e, epoch);
}

// Lane j < k: token t's j-th row (its own FC2 output for this rank's
// experts, the combine buffer for the others) at column chunk c, and its
// weight; null and 0 for a dropped slot or a lane past k.
__device__ __forceinline__ const uint4* token_row(const ReduceParams& p, long long t, int c, int lane,
                                                  float* w) {
  *w = 0.f;
  if (lane >= p.k) return nullptr;
  const long long slot = t * p.k + lane;
  const int li = p.local_idx[slot];
  if (li < 0) return nullptr;
  const int e = (int)load_id(p.ids, p.ids_i64, slot);
  const int dst = e / p.epr;
  *w = p.w_bf16 ? bf16_to_f32(reinterpret_cast<const unsigned short*>(p.w)[slot])
                : reinterpret_cast<const float*>(p.w)[slot];
  const bf16_t* row = dst == p.me ? p.out + (long long)(p.segs[4 * ((e - dst * p.epr) * p.ranks)] + li) * p.hidden
                                  : p.comb + (long long)(p.send_off[e] + li) * p.hidden;
  return reinterpret_cast<const uint4*>(row + (long long)c * p.cols);
}

__device__ __forceinline__ void add_weighted(float acc[8], float w, const uint4& q) {
  const unsigned u[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int h = 0; h < 4; ++h) {
    acc[2 * h] += w * bf16_to_f32((unsigned short)(u[h] & 0xFFFFu));
    acc[2 * h + 1] += w * bf16_to_f32((unsigned short)(u[h] >> 16));
  }
}

__device__ __forceinline__ uint4 pack_bf16x8(const float acc[8]) {
  uint4 o;
  o.x = pack_bf16x2(acc[0], acc[1]);
  o.y = pack_bf16x2(acc[2], acc[3]);
  o.z = pack_bf16x2(acc[4], acc[5]);
  o.w = pack_bf16x2(acc[6], acc[7]);
  return o;
}

// Column chunk c is whole here: every expert group's FC2 piece of it
// counted (when FC2 may still run) and every other rank's combine of it
// landed. One thread waits, polling FC2's counters every `sleep_ns`; false
// once a wait ran out (in the error word).
__device__ __forceinline__ bool chunk_landed(const ReduceParams& p, int c, u64 epoch, unsigned sleep_ns = 64) {
  const int pieces = p.groups * p.chunks;
  bool landed = true;
  for (int g = 0; g < p.groups && landed; ++g) {
    const int j = g * p.chunks + c;
    if (p.wait_chunks)
      landed = wait_at_least(p.chunk_done + j, (u64)p.group_tiles[g].piece_tiles, p.timeout_ns, p.err,
                             COMET_ERR_SIGNAL_TIMEOUT, (unsigned)(p.chunk_sig0 + j), sleep_ns);
    for (int s = 0; s < p.ranks && landed; ++s)
      if (s != p.me)
        landed = signal_wait(p.signals, combine_sig(p.ranks, p.epr, pieces, s, j), epoch, p.timeout_ns, p.err);
  }
  return landed;
}

// One warp's weighted top-k sum of token t at column chunk c into y, with
// G of its rows' loads in flight and each row's address fetched from its
// lane as it is needed: few registers (the GEMM's side warps have 40), at
// the cost of a shuffle per row and vector. comet_reduce keeps all k
// addresses and 8 loads per thread instead. The shuffles take every lane,
// so a chunk is whole 32-vector rounds: a multiple of 256 columns (the
// host refuses others, comet_kernels::gemm::validate_args).
template <int G>
__device__ __forceinline__ void sum_token_lean(const ReduceParams& p, long long t, int c, int lane) {
  float wmine;
  const unsigned long long mine = reinterpret_cast<unsigned long long>(token_row(p, t, c, lane, &wmine));
  bf16_t* yrow = p.y + t * p.hidden + (long long)c * p.cols;
  for (int v = lane; v < p.cols / 8; v += 32) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j0 = 0; j0 < p.k; j0 += G) {
      uint4 q[G];
      float w[G];
#pragma unroll
      for (int j = 0; j < G; ++j) {
        // Lanes past k hold no row: their loads and weights are zeros.
        const uint4* row = reinterpret_cast<const uint4*>(__shfl_sync(0xffffffffu, mine, (j0 + j) & 31));
        w[j] = __shfl_sync(0xffffffffu, wmine, (j0 + j) & 31);
        q[j] = j0 + j < p.k && row != nullptr ? __ldcg(row + v) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int j = 0; j < G; ++j) add_weighted(acc, w[j], q[j]);
    }
    reinterpret_cast<uint4*>(yrow)[v] = pack_bf16x8(acc);
  }
}

// What the side warps of one GEMM launch do (none: kind 0). `next` is the
// call's zeroed work counter: warps take work from it, not by their place
// in the grid, so whichever CTAs are resident make the progress.
enum SideKind { SIDE_NONE = 0, SIDE_DISPATCH = 1, SIDE_REDUCE = 2, SIDE_COMBINE = 3 };
struct SideWork {
  int kind;
  int pad;
  unsigned* next;
  DispatchParams d;
  ReduceParams r;
  CombineParams c;
};

// The next item a side warp takes from its launch's work counter, on
// every lane.
__device__ __forceinline__ long long take_item(unsigned* next, int lane) {
  long long i = 0;
  if (lane == 0) i = atomicAdd(next, 1u);
  return __shfl_sync(0xffffffffu, i, 0);
}

// Lane 0's verdict on its wait, on every lane; lane 0's acquire orders
// the other lanes' loads too.
__device__ __forceinline__ bool warp_verdict(bool lane0) {
  const bool ok = __shfl_sync(0xffffffffu, lane0, 0);
  __syncwarp();
  return ok;
}

// Send positions a side warp takes at once, copied 2 rows at a time.
constexpr int SIDE_ROWS = 8;
// Tokens a side warp sums at once.
constexpr int SIDE_TOKENS = 8;

// The dispatch by a GEMM's side warps (one of which, `leader`, raises the
// empty segments): the send positions in order, so the segments FC1's
// first tiles wait on complete first.
__device__ __forceinline__ void side_dispatch(const SideWork& s, int lane, bool leader) {
  const DispatchParams& p = s.d;
  if (!p.sc->ok) return;
  const u64 epoch = *p.epoch;
  if (leader) raise_empty_segments(p, epoch, lane, 32);
  const int total = p.sc->sent_rows, start = p.send_off[p.me * p.epr];
  for (;;) {
    const long long w0 = take_item(s.next, lane) * SIDE_ROWS;
    if (w0 >= total) return;
    dispatch_rows<2>(p, w0, SIDE_ROWS, total, start, lane, epoch);
  }
}

// The reduce of chunks [chunk_begin, chunk_end) by FC2's side warps, each
// chunk's tokens once its tiles are counted (the last chunk is left to a
// whole-grid launch after FC2: here it would be a tail on these warps).
__device__ __forceinline__ void side_reduce(const SideWork& s, int lane) {
  const ReduceParams& p = s.r;
  if (!p.sc->ok || p.tokens == 0) return;
  const u64 epoch = *p.epoch;
  const long long blocks = (p.tokens + SIDE_TOKENS - 1) / SIDE_TOKENS;
  int whole = -1;  // the last chunk this warp saw whole
  for (;;) {
    const long long i = take_item(s.next, lane);
    const int c = p.chunk_begin + (int)(i / blocks);
    if (c >= p.chunk_end) return;
    if (c != whole) {
      // A chunk of FC2 takes hundreds of microseconds: every side warp
      // of the grid polls its counter, each once a microsecond or so.
      if (!warp_verdict(lane == 0 ? chunk_landed(p, c, epoch, 1024) : true)) return;
      whole = c;
    }
    const long long t0 = (i % blocks) * SIDE_TOKENS;
    for (long long t = t0; t < t0 + SIDE_TOKENS && t < p.tokens; ++t) sum_token_lean<4>(p, t, c, lane);
  }
}

// The combine by FC2's side warps: pieces [piece_begin, piece_end) of one
// expert group, each piece's rows once its tiles are counted (one warp,
// `leader`, raises the pieces a source sent nothing of). Taken SIDE_ROWS
// rows at a time in piece order, so the first chunk leaves first.
__device__ __forceinline__ void side_combine(const SideWork& s, int lane, bool leader) {
  const CombineParams& p = s.c;
  if (!p.sc->ok) return;
  const u64 epoch = *p.epoch;
  const int g = p.piece_begin / p.chunks;
  const int* rows_from = p.rows_from + g * p.ranks;
  if (leader) raise_empty_pieces(p, rows_from, p.piece_begin, p.piece_end, epoch, lane, 32);
  const GroupRows gr = group_rows(p, p.segs, g);
  const long long blocks = (gr.r1 - gr.r0 + SIDE_ROWS - 1) / SIDE_ROWS;
  if (blocks <= 0) return;
  int whole = -1;  // the last piece this warp saw counted
  for (;;) {
    const long long i = take_item(s.next, lane);
    const int j = p.piece_begin + (int)(i / blocks);
    if (j >= p.piece_end) return;
    if (j != whole) {
      if (!warp_verdict(lane == 0 ? piece_done(p, j, 1024) : true)) return;
      whole = j;
    }
    combine_rows<2>(p, p.segs, rows_from, j, gr.r0 + (i % blocks) * SIDE_ROWS, SIDE_ROWS, gr.r1, lane, epoch);
  }
}

}  // namespace comet
