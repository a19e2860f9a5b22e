//! The one error type of comet-core: each variant names what was wrong.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    #[error("invalid MoE config: {field} {problem}")]
    InvalidConfig {
        field: &'static str,
        problem: String,
    },
    #[error("unknown preset '{0}' (known: {1})")]
    UnknownPreset(String, String),
    #[error("routing does not match the config: {0}")]
    BadRouting(String),
    #[error("count matrix does not match the config: {0}")]
    BadCounts(String),
    #[error("tensor shape mismatch for {name}: expected {expected} elements, got {got}")]
    Shape {
        name: &'static str,
        expected: usize,
        got: usize,
    },
}
