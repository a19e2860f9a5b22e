// comet-rs: small kernels around the two grouped GEMMs of one MoE layer.
//
// comet_layer_reduce: the source side of the combine. Each column chunk c of
// the layer's output arrives from the expert ranks into the combine buffer
// `comb` laid out [chunk][rows_sent][cols] (bf16, row = position in this
// rank's send order). A block waits (bounded, thread 0 only) for the chunk's
// combine signals, then the grid writes
//     y[t, c*cols + j] = sum_i w[t*k + i] * comb[c][pos[t*k + i]][j]
// in f32. Chunks are taken in order, so a chunk that has landed is reduced
// while later ones are still in flight. The grid is kept small by the host:
// blocks that wait must not crowd out the peers' GEMMs on a shared GPU.
#include "signal.cuh"

namespace comet {

struct ReduceParams {
  const unsigned short* comb;  // bf16 bits
  const int* pos;              // [tokens * k]
  const float* w;              // [tokens * k]
  float* y;                    // [tokens, hidden]
  const u64* signals;          // signal array, already offset to the map
  const unsigned* waits;       // [chunks][nwait] signal indices
  u64* err;
  u64 target;
  u64 timeout_ns;
  int tokens;
  int k;
  int hidden;
  int cols;
  int chunks;
  int rows_sent;
  int nwait;
  int pad_;
};

__device__ __forceinline__ float bf16_bits_to_f32(unsigned short b) {
  return __uint_as_float(((unsigned)b) << 16);
}

}  // namespace comet

extern "C" __global__ void __launch_bounds__(512)
comet_layer_reduce(const __grid_constant__ comet::ReduceParams p) {
  __shared__ int ok_flag;
  const long long per_chunk = (long long)p.tokens * p.cols;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (int c = 0; c < p.chunks; ++c) {
    if (!comet::signal_wait_block(p.signals, p.waits + (long long)c * p.nwait, (unsigned)p.nwait,
                                  p.target, p.timeout_ns, p.err, &ok_flag))
      return;
    const unsigned short* region = p.comb + (long long)c * p.rows_sent * p.cols;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < per_chunk;
         idx += stride) {
      const int t = (int)(idx / p.cols);
      const int j = (int)(idx - (long long)t * p.cols);
      float acc = 0.f;
      for (int i = 0; i < p.k; ++i) {
        const int slot = t * p.k + i;
        acc += p.w[slot] * comet::bf16_bits_to_f32(region[(long long)p.pos[slot] * p.cols + j]);
      }
      p.y[(long long)t * p.hidden + (long long)c * p.cols + j] = acc;
    }
  }
}
