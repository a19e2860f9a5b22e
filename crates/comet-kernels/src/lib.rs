//! comet-kernels: CUDA C++ sources embedded as text and compiled at run
//! time by NVRTC for the GPU present, with the device half of the signal ABI.
