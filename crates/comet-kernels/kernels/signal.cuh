// comet-rs: the device half of the signal ABI (DESIGN.md section 4).
//
// A signal is a 64-bit word in GPU memory (possibly a peer's, mapped through
// P2P/IPC, or host-mapped memory written by a proxy). Epochs grow by one per
// layer call, so a waiter waits for `word >= target` and words are never
// reset between calls.
//
// Contract:
//  * wait: acquire at system scope, bounded by a time budget in nanoseconds
//    read from %globaltimer. On timeout the first failing waiter records
//    (code << 32 | signal index) into the error word and every waiter returns
//    false; kernels must then leave their tile without touching its data.
//    Waiters also give up early once any other thread has recorded an error,
//    so one missing signal stops the whole grid quickly.
//  * raise: the producer's data stores must be visible first. Each thread
//    that stored data calls comet_signal_fence() before the block barrier;
//    one thread then raises with a release store (set) or a release atomic
//    add (counters such as "finished tiles of a layer1 chunk").
//
// Only PTX is used (no CCCL), so it compiles with the NVRTC headers alone.
#pragma once

#ifndef COMET_SIGNAL_CUH
#define COMET_SIGNAL_CUH

namespace comet {

typedef unsigned long long u64;

// Error word layout: high 32 bits the code, low 32 bits the signal index.
enum : unsigned {
  COMET_ERR_NONE = 0,
  COMET_ERR_SIGNAL_TIMEOUT = 1,
  COMET_ERR_ABORTED = 2,
  // A split tile's finisher never saw a partial (index: the tile).
  COMET_ERR_SPLIT_TIMEOUT = 3,
  // An expert id >= the number of experts (index: the slot).
  COMET_ERR_BAD_EXPERT = 4,
  // A call's rows exceed a rank's receive capacity (index: that rank).
  COMET_ERR_CAPACITY = 5,
};

__device__ __forceinline__ u64 signal_load_acquire(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ u64 signal_load_relaxed(const u64* p) {
  u64 v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void signal_store_release(u64* p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void signal_add_release(u64* p, u64 v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ u64 global_timer_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Every thread that wrote data a signal announces calls this before the
// barrier that precedes the raise.
__device__ __forceinline__ void signal_fence() {
  asm volatile("fence.acq_rel.sys;" ::: "memory");
}

// A bad expert id is reported but breaks nothing (its slot is dropped and
// the protocol goes on); every other code means some wait will not be met.
__device__ __forceinline__ bool signal_error_fatal(u64 word) {
  return word != 0ull && (unsigned)(word >> 32) != COMET_ERR_BAD_EXPERT;
}

// Records the first error only, so later ones keep the original cause;
// except that a fatal error replaces a bad-id report, which is not one.
__device__ __forceinline__ void signal_record_error(u64* err, unsigned code, unsigned index) {
  const u64 word = ((u64)code << 32) | (u64)index;
  const u64 old = atomicCAS(err, 0ull, word);
  if (old != 0ull && !signal_error_fatal(old) && signal_error_fatal(word)) atomicCAS(err, old, word);
}

// Whether a waiter should give up: another thread recorded a fatal error.
__device__ __forceinline__ bool signal_error_set(const u64* err) {
  return signal_error_fatal(signal_load_relaxed(err));
}

// Bounded wait for *word >= target, called by ONE thread. Returns true once
// satisfied, false after recording (code, index) on timeout (or on seeing
// another thread's error). `sleep_ns` between polls: waits of hundreds of
// microseconds by many warps poll less often, so one L2 line is not
// hammered beside a GEMM.
__device__ __forceinline__ bool wait_at_least(const u64* word, u64 target, u64 timeout_ns, u64* err,
                                              unsigned code, unsigned index, unsigned sleep_ns = 64) {
  if (signal_load_acquire(word) >= target) return true;
  const u64 start = global_timer_ns();
  unsigned spins = 0;
  while (true) {
    if (signal_load_acquire(word) >= target) return true;
    if ((++spins & 63u) == 0u) {
      if (signal_error_set(err)) return false;
      if (global_timer_ns() - start > timeout_ns) {
        signal_record_error(err, code, index);
        return false;
      }
    }
    __nanosleep(sleep_ns);
  }
}

// Bounded wait for signals[index] >= target (see wait_at_least).
__device__ __forceinline__ bool signal_wait(const u64* signals, unsigned index, u64 target,
                                            u64 timeout_ns, u64* err) {
  return wait_at_least(signals + index, target, timeout_ns, err, COMET_ERR_SIGNAL_TIMEOUT, index);
}

// Raise a signal to `value` (epochs); call after the block barrier that
// follows every writer's signal_fence().
__device__ __forceinline__ void signal_raise(u64* signals, unsigned index, u64 value) {
  signal_fence();
  signal_store_release(signals + index, value);
}

// Add to a counter signal (a layer1 chunk leaves at base + tiles).
__device__ __forceinline__ void signal_raise_add(u64* signals, unsigned index, u64 delta) {
  signal_fence();
  signal_add_release(signals + index, delta);
}

// Block-wide wait: thread 0 waits for every listed dependency, then the
// verdict is broadcast. Returns false (for every thread) on timeout/error.
// Uses one __shared__ int; call from all threads of the block.
__device__ __forceinline__ bool signal_wait_block(const u64* signals, const unsigned* deps,
                                                  unsigned ndeps, u64 target, u64 timeout_ns,
                                                  u64* err, int* smem_flag) {
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
    int ok = 1;
    for (unsigned i = 0; i < ndeps && ok; ++i)
      ok = signal_wait(signals, deps[i], target, timeout_ns, err) ? 1 : 0;
    *smem_flag = ok;
  }
  __syncthreads();
  const bool ok = *smem_flag != 0;
  __syncthreads();
  return ok;
}

}  // namespace comet

#endif  // COMET_SIGNAL_CUH
