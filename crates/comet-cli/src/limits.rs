//! Size checks made before anything large is allocated, so that a run too
//! big for this machine ends with one line saying so instead of an
//! out-of-memory abort minutes later.

use anyhow::{bail, Result};

pub use comet_sched::host_memory::available as available_memory;
use comet_sched::host_memory::gib;

/// Fails when `need` bytes exceed what this machine has available
/// (`available`, normally [`available_memory`]; None skips the check).
/// `what` says what the memory is for, `hint` which flags make it smaller.
pub fn ensure_fits(need: u128, available: Option<u128>, what: &str, hint: &str) -> Result<()> {
    if let Some(avail) = available {
        if need > avail {
            bail!(
                "{what} needs about {} of memory but this machine has {} available; {hint}",
                gib(need),
                gib(avail)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        assert!(ensure_fits(2048 * 1024, Some(2048 * 1024), "x", "y").is_ok());
        let e = ensure_fits(3 << 30, Some(1 << 30), "the run", "lower --tokens")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "the run needs about 3.0 GiB of memory but this machine has 1.0 GiB available; lower --tokens"
        );
        assert!(ensure_fits(u128::MAX, None, "x", "y").is_ok());
    }
}
