//! Size checks made before anything large is allocated, so that a run too
//! big for this machine ends with one line saying so instead of an
//! out-of-memory abort minutes later.

use anyhow::{bail, Result};

/// `MemAvailable` of /proc/meminfo in bytes; None where it cannot be read.
pub fn available_memory() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u128> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut parts = line.split_whitespace().skip(1);
    let n: u128 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(n * 1024),
        Some(_) => None,
    }
}

/// `bytes` as GiB with one decimal.
pub fn gib(bytes: u128) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

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
    fn meminfo_parses_and_sizes_are_checked() {
        let text = "MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(text), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
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
