//! `comet launch -n W -- cmd args...`: W local ranks of a command with
//! torchrun's environment, through comet-transport's launcher.

use anyhow::{bail, Result};
use clap::Args;
use comet_transport::launch::{launch, LaunchConfig, LaunchError};
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Number of ranks (processes) to start.
    #[arg(short = 'n', long = "nproc", value_name = "W")]
    pub world: usize,
    /// Rank 0's bootstrap port (0: a free one).
    #[arg(long, default_value_t = 0)]
    pub master_port: u16,
    /// Address rank 0 listens on and the others connect to.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Kill every rank and fail after this many seconds (0: never).
    #[arg(long, default_value_t = 0.0)]
    pub timeout: f64,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

pub fn run(args: LaunchArgs) -> Result<()> {
    if args.world == 0 {
        bail!("-n must be at least 1");
    }
    if !args.timeout.is_finite() || args.timeout < 0.0 {
        bail!(
            "--timeout must be a non-negative number of seconds, not {}",
            args.timeout
        );
    }
    let Some((program, rest)) = args.cmd.split_first() else {
        bail!("no command given after --")
    };
    let mut cfg = LaunchConfig::new(args.world, program).args(rest);
    cfg.master_addr = args.master_addr;
    cfg.master_port = args.master_port;
    cfg.timeout = (args.timeout > 0.0).then(|| Duration::from_secs_f64(args.timeout));
    match launch(&cfg) {
        Ok(_) => Ok(()),
        Err(
            e @ (LaunchError::RankFailed { .. }
            | LaunchError::Failed { .. }
            | LaunchError::Timeout { .. }),
        ) => {
            if let Some(rep) = e.report() {
                for r in &rep.ranks {
                    eprintln!(
                        "comet launch: rank {}: {}{}",
                        r.rank,
                        r.describe(),
                        if r.killed_by_launcher {
                            " (stopped by the launcher)"
                        } else {
                            ""
                        }
                    );
                }
            }
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}
