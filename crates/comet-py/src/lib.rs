//! comet-py: the PyO3 module `comet` for PyTorch users.
//!
//! Not filled yet: no issue has asked for the Python face so far, and no
//! function here pretends to work. It will wrap comet-sched's executors
//! (tensors in and out, torch.distributed groups for bootstrap) once the
//! GPU executor of the whole layer exists.
