//! Errors of the kernel pipeline: NVRTC, the driver, shapes, device signals.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("NVRTC library not found: {0}")]
    NvrtcNotFound(String),
    #[error("NVRTC failed to compile {kernel} for {arch}: {status}\n--- NVRTC log ---\n{log}")]
    Compile {
        kernel: String,
        arch: String,
        status: String,
        log: String,
    },
    #[error("NVRTC call {call} failed: {status}")]
    Nvrtc { call: &'static str, status: String },
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("invalid GEMM problem: {0}")]
    InvalidShape(String),
    #[error("unsupported GPU: {0}")]
    Unsupported(String),
    #[error("signal {signal} timed out on the device (error code {code})")]
    SignalTimeout { signal: u32, code: u32 },
    #[error("tile {tile} of a split tail never got its other parts (a CTA failed or never ran)")]
    SplitTimeout { tile: u32 },
    #[error("device error word {code}:{index}")]
    DeviceError { code: u32, index: u32 },
}

impl KernelError {
    /// Decodes the kernels' error word (code << 32 | signal index).
    pub fn from_error_word(word: u64) -> Option<KernelError> {
        let (code, index) = ((word >> 32) as u32, word as u32);
        match code {
            0 => None,
            1 => Some(KernelError::SignalTimeout {
                signal: index,
                code,
            }),
            3 => Some(KernelError::SplitTimeout { tile: index }),
            _ => Some(KernelError::DeviceError { code, index }),
        }
    }
}
