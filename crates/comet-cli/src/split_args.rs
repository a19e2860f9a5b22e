//! How the device forward splits a GPU and sizes its buffers: the flags
//! `comet plan` and `comet bench --gpu` share. A plan shows a bench's split
//! when given what the bench's world implies too: `--ranks-per-gpu` (the
//! bench spreads ranks over the visible GPUs, all on one where there is
//! one), `--device h200-socket` and the proxy's
//! `--reserved-sms` for a staged transport.

use anyhow::{bail, Result};
use clap::Args;

/// Device-forward flags, flattened into each command's arguments.
#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitArgs {
    /// Communication blocks beside the overlapped GEMMs (the dispatch and
    /// combine kernels, and a staged proxy's token kernels) instead of the
    /// rows moving in the Hopper GEMMs' idle warps, or of the cost model's
    /// blocks for other GEMMs; blocks given always overlap, a rank alone
    /// too (its dispatch beside FC1, its reduce beside FC2).
    #[arg(long)]
    pub comm_sms: Option<usize>,
    /// Expert groups of an overlapped call instead of the cost model's:
    /// FC1 and FC2 run group by group, each group's combine beside the
    /// later groups' GEMMs (1: the per-layer overlap). More than one needs
    /// ranks whose combine overlaps, and the rows wire behind a proxy.
    #[arg(long)]
    pub groups: Option<usize>,
    /// Layer1 column chunks instead of the plan's (whole FC2 tiles
    /// dividing the hidden size): where a call overlaps, or a rank alone
    /// sums every chunk but the last inside FC2.
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Bound on the rows one rank receives in a call (default: the worst
    /// case, every rank sending all its rows to one, which grows with the
    /// world).
    #[arg(long)]
    pub recv_rows: Option<usize>,
    /// SMs of the GPU no GEMM takes, left to the transport's own kernels (a
    /// staged proxy's kernels, NCCL's). `comet bench`'s default: the
    /// transport's choice (4 a rank behind a proxy; NCCL's lanes get at
    /// least what they need whatever is given); `comet plan`'s: none.
    #[arg(long, default_value_t = 0)]
    pub reserved_sms: usize,
}

impl SplitArgs {
    /// Refuses values no layer can take.
    pub fn check(&self) -> Result<()> {
        if self.recv_rows == Some(0) {
            bail!("--recv-rows must be at least 1");
        }
        if self.groups == Some(0) {
            bail!("--groups must be at least 1");
        }
        if self.chunks == Some(0) {
            bail!("--chunks must be at least 1");
        }
        Ok(())
    }

    /// The flags given, by name (they set how a GPU forward runs).
    pub fn given(&self) -> Vec<&'static str> {
        [
            (self.comm_sms.is_some(), "--comm-sms"),
            (self.groups.is_some(), "--groups"),
            (self.chunks.is_some(), "--chunks"),
            (self.recv_rows.is_some(), "--recv-rows"),
            (self.reserved_sms > 0, "--reserved-sms"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect()
    }
}
