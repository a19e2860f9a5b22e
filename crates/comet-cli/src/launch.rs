//! `comet launch -n W -- cmd args...`: W local ranks of a command with
//! torchrun's environment, through comet-transport's launcher. When a rank
//! fails, `comet launch` exits with that rank's exit code (the first rank
//! to fail), as torchrun does; 128 + N for a rank killed by signal N.

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

/// The exit code `comet launch` ends with for `e`: the first failing
/// rank's own code, or 128 + signal for a rank that was killed. None for
/// any other error (the command's usual 1).
pub fn exit_code(e: &anyhow::Error) -> Option<i32> {
    let e = e.downcast_ref::<LaunchError>()?;
    let rank = match e {
        LaunchError::RankFailed { rank, report, .. } => report.ranks.get(*rank)?,
        LaunchError::Failed { failed, report } => report.ranks.get(*failed.first()?)?,
        _ => return None,
    };
    match (rank.code, rank.signal) {
        (Some(c), _) if c != 0 => Some(c),
        (None, Some(s)) => Some(128 + s),
        _ => None,
    }
}

/// `comet` names this very binary, whether or not it is on the PATH (the
/// README lets users call it by its path); any other program is looked up
/// as given.
fn own_program(program: &str) -> String {
    match std::env::current_exe() {
        Ok(me) if program == "comet" => me.to_string_lossy().into_owned(),
        _ => program.to_string(),
    }
}

pub fn run(args: LaunchArgs) -> Result<()> {
    if args.world == 0 {
        bail!("-n must be at least 1");
    }
    if args.world > comet_transport::launch::MAX_WORLD {
        bail!(
            "-n {} is above the launcher's limit of {} local ranks",
            args.world,
            comet_transport::launch::MAX_WORLD
        );
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
    let program = own_program(program);
    let mut cfg = LaunchConfig::new(args.world, &program).args(rest);
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

#[cfg(test)]
mod tests {
    use super::own_program;

    #[test]
    fn comet_is_this_binary_and_other_programs_are_as_given() {
        let me = std::env::current_exe().unwrap();
        assert_eq!(own_program("comet"), me.to_string_lossy());
        assert_eq!(own_program("python3"), "python3");
        assert_eq!(own_program("./comet"), "./comet");
    }
}
