//! What the CPU and GPU executors share beyond the schedules: the count
//! exchange that opens every call, the checks of a world call's inputs, and
//! running one call on every rank thread while reporting the root cause.

use crate::cpu::RankInput;
use crate::error::SchedError;
use comet_core::layout::{ring_dest, LayoutPlan};
use comet_core::{MoeConfig, Routing, WireSignal};
use comet_transport::{BufferId, SignalOp, Transport, TransportError};
use std::time::Duration;

pub(crate) fn rank_err(rank: usize, message: impl Into<String>) -> SchedError {
    SchedError::Input {
        rank,
        message: message.into(),
    }
}

pub(crate) fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Every rank puts its row of the W x E count matrix to all ranks (into
/// the slot of the epoch's parity, so a fast rank's next call never
/// overwrites counts a slow rank has yet to read), raises `counts[src]`
/// (signals `0..W`), waits for all rows and builds the plan. Since nobody
/// gets all rows of call n+1 before every rank has finished call n, it
/// also fences call n+1's writes away from buffers call n still reads.
/// Fails if this rank would receive more rows than `recv_cap_rows`.
pub(crate) fn exchange_counts<T: Transport + ?Sized>(
    t: &T,
    cfg: &MoeConfig,
    counts_buf: BufferId,
    recv_cap_rows: usize,
    routing: &Routing,
    epoch: u64,
    timeout: Duration,
) -> Result<LayoutPlan, SchedError> {
    let (w, e, rank) = (cfg.ranks, cfg.experts, t.rank());
    let slot = (epoch % 2) as usize;
    let row: Vec<u8> = routing
        .counts_per_expert(e)
        .iter()
        .flat_map(|&c| (c as u64).to_le_bytes())
        .collect();
    for i in 0..w {
        let dst = ring_dest(rank, i, w);
        t.put(dst, counts_buf, (slot * w + rank) * e * 8, &row)?;
        t.signal(
            dst,
            WireSignal::exchange(rank).index(),
            SignalOp::Set(epoch),
        )?;
    }
    // One deadline for all W rows: the timeout bounds the exchange, not
    // each wait in turn.
    let deadline = std::time::Instant::now() + timeout;
    for src in 0..w {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        t.wait(WireSignal::exchange(src).index(), epoch, left)?;
    }
    let mut raw = vec![0u8; w * e * 8];
    t.read(counts_buf, slot * w * e * 8, &mut raw)?;
    let counts = raw
        .chunks_exact(e * 8)
        .map(|r| {
            r.chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
                .collect()
        })
        .collect();
    let plan = LayoutPlan::new(cfg, counts)?;
    let recv_rows = plan.recv[rank].total_rows;
    if recv_rows > recv_cap_rows {
        return Err(SchedError::Capacity {
            rank,
            what: "received rows",
            needed: recv_rows,
            capacity: recv_cap_rows,
        });
    }
    Ok(plan)
}

/// Checks every rank's input before any rank starts: a rank that failed
/// alone would leave the others waiting out their timeout.
pub(crate) fn check_inputs(
    cfg: &MoeConfig,
    inputs: &[RankInput],
    max_tokens: &[usize],
) -> Result<(), SchedError> {
    if inputs.len() != cfg.ranks {
        return Err(rank_err(
            0,
            format!("{} inputs for {} ranks", inputs.len(), cfg.ranks),
        ));
    }
    for ((r, inp), &cap) in inputs.iter().enumerate().zip(max_tokens) {
        check_input(cfg, r, &inp.x, &inp.routing, cap)?;
    }
    Ok(())
}

/// One rank's input: routing against the config, `x` of `tokens x hidden`,
/// tokens within what the rank's buffers were sized for.
pub(crate) fn check_input(
    cfg: &MoeConfig,
    rank: usize,
    x: &[f32],
    routing: &Routing,
    max_tokens: usize,
) -> Result<(), SchedError> {
    routing
        .validate(cfg)
        .map_err(|e| rank_err(rank, e.to_string()))?;
    if x.len() != routing.tokens * cfg.hidden {
        return Err(rank_err(
            rank,
            format!(
                "x has {} values, expected tokens {} x hidden {}",
                x.len(),
                routing.tokens,
                cfg.hidden
            ),
        ));
    }
    if routing.tokens > max_tokens {
        return Err(SchedError::Capacity {
            rank,
            what: "tokens",
            needed: routing.tokens,
            capacity: max_tokens,
        });
    }
    Ok(())
}

/// Builds every rank on its own thread (construction is collective: the
/// ranks allocate and meet at a barrier together); a panic becomes an error.
pub(crate) fn build_ranks<I, R, F>(items: Vec<I>, build: F) -> Result<Vec<R>, SchedError>
where
    I: Send,
    R: Send,
    F: Fn(usize, I) -> Result<R, SchedError> + Sync,
{
    let build = &build;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .into_iter()
            .enumerate()
            .map(|(r, item)| s.spawn(move || build(r, item)))
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join().map_err(|p| SchedError::Panicked {
                    rank: r,
                    message: panic_text(p),
                })?
            })
            .collect()
    })
}

/// Runs `call` for every rank on its own thread and joins them. On failure
/// the root cause is reported: a rank's own error before the timeouts and
/// lost peers it caused on the others.
pub(crate) fn run_ranks<R, O, F>(
    ranks: &mut [R],
    inputs: &[RankInput],
    call: F,
) -> Result<Vec<O>, SchedError>
where
    R: Send,
    O: Send,
    F: Fn(&mut R, &RankInput) -> Result<O, SchedError> + Sync,
{
    let call = &call;
    let results: Vec<Result<O, SchedError>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter_mut()
            .zip(inputs)
            .map(|(rank, inp)| s.spawn(move || call(rank, inp)))
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join().unwrap_or_else(|p| {
                    Err(SchedError::Panicked {
                        rank: r,
                        message: panic_text(p),
                    })
                })
            })
            .collect()
    });
    let mut first: Option<(SchedError, bool)> = None;
    let mut outs = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(o) => outs.push(o),
            Err(e) => {
                let secondary = matches!(
                    e,
                    SchedError::Transport(
                        TransportError::WaitTimeout { .. } | TransportError::PeerGone { .. }
                    )
                );
                match (&first, secondary) {
                    (None, _) => first = Some((e, secondary)),
                    (Some((_, true)), false) => first = Some((e, false)),
                    _ => {}
                }
            }
        }
    }
    match first {
        Some((e, _)) => Err(e),
        None => Ok(outs),
    }
}
