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
    #[error("a kernel left its work after another thread's error (index {index})")]
    Aborted { index: u32 },
    #[error("expert id out of range at slot {slot} (token = slot / top_k); the slot was dropped")]
    BadExpert { slot: u32 },
    #[error(
        "rank {rank} would receive more rows than its receive capacity; the call moved nothing"
    )]
    Capacity { rank: u32 },
    #[error("device error word {code}:{index}")]
    DeviceError { code: u32, index: u32 },
}

/// The device error codes (`COMET_ERR_*` in kernels/signal.cuh): one table,
/// pinned to the header by a test.
pub mod code {
    pub const SIGNAL_TIMEOUT: u32 = 1;
    pub const ABORTED: u32 = 2;
    pub const SPLIT_TIMEOUT: u32 = 3;
    pub const BAD_EXPERT: u32 = 4;
    pub const CAPACITY: u32 = 5;
    /// Every code with its name in signal.cuh.
    pub const ALL: [(u32, &str); 5] = [
        (SIGNAL_TIMEOUT, "COMET_ERR_SIGNAL_TIMEOUT"),
        (ABORTED, "COMET_ERR_ABORTED"),
        (SPLIT_TIMEOUT, "COMET_ERR_SPLIT_TIMEOUT"),
        (BAD_EXPERT, "COMET_ERR_BAD_EXPERT"),
        (CAPACITY, "COMET_ERR_CAPACITY"),
    ];
}

impl KernelError {
    /// Decodes the kernels' error word (code << 32 | index).
    pub fn from_error_word(word: u64) -> Option<KernelError> {
        let (c, index) = ((word >> 32) as u32, word as u32);
        Some(match c {
            0 => return None,
            code::SIGNAL_TIMEOUT => KernelError::SignalTimeout {
                signal: index,
                code: c,
            },
            code::ABORTED => KernelError::Aborted { index },
            code::SPLIT_TIMEOUT => KernelError::SplitTimeout { tile: index },
            code::BAD_EXPERT => KernelError::BadExpert { slot: index },
            code::CAPACITY => KernelError::Capacity { rank: index },
            _ => KernelError::DeviceError { code: c, index },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `NAME = value` pairs of the COMET_ERR_ enum in signal.cuh.
    fn header_codes() -> Vec<(String, u32)> {
        crate::SIGNAL_CUH
            .lines()
            .filter_map(|l| {
                let l = l.trim();
                let (name, rest) = l.split_once('=')?;
                let name = name.trim();
                if !name.starts_with("COMET_ERR_") {
                    return None;
                }
                let v = rest.trim().trim_end_matches(',').trim().parse().ok()?;
                Some((name.to_string(), v))
            })
            .collect()
    }

    #[test]
    fn rust_and_cuda_error_codes_agree() {
        let header = header_codes();
        assert!(header.iter().any(|(n, v)| n == "COMET_ERR_NONE" && *v == 0));
        let named: Vec<_> = header
            .iter()
            .filter(|(n, _)| n != "COMET_ERR_NONE")
            .collect();
        assert_eq!(named.len(), code::ALL.len(), "{header:?}");
        for (v, name) in code::ALL {
            assert!(
                header.iter().any(|(n, hv)| n == name && *hv == v),
                "{name} = {v} is not in signal.cuh: {header:?}"
            );
        }
    }

    #[test]
    fn every_code_decodes_by_name() {
        for (v, name) in code::ALL {
            let e = KernelError::from_error_word((u64::from(v) << 32) | 7).unwrap();
            assert!(
                !matches!(e, KernelError::DeviceError { .. }),
                "{name} decodes as a bare number"
            );
        }
        assert!(KernelError::from_error_word(0).is_none());
        assert!(matches!(
            KernelError::from_error_word(99 << 32),
            Some(KernelError::DeviceError { code: 99, .. })
        ));
    }
}
