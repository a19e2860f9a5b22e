//! What every transport shares: the bookkeeping of a rank's signal array
//! (how many words, where word `sig` lives, the range check that names the
//! signal), the checks of a buffer argument (the buffer exists, the bytes
//! fit in it), and the one bounded poll loop, with its one back-off, that
//! every wait goes through.

use crate::error::TransportError;
use crate::transport::{BufferId, SignalId};
use std::fmt::Display;
use std::time::{Duration, Instant};

/// Bytes of one signal word.
pub const SIGNAL_BYTES: usize = 8;

/// A rank's signal array: `count` 64-bit words, word `sig` at byte
/// `8 * sig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalSlots {
    count: usize,
}

impl SignalSlots {
    pub fn new(count: usize) -> Self {
        Self { count }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes of the array; an error on `rank` when they overflow.
    pub fn bytes(&self, rank: usize) -> Result<usize, TransportError> {
        self.count
            .checked_mul(SIGNAL_BYTES)
            .ok_or_else(|| TransportError::Backend {
                backend: "signals",
                rank,
                message: format!("{} signals overflow", self.count),
            })
    }

    /// The index of `sig` in this array, checked: the error (raised on
    /// `rank`) names the signal, the rank whose array it is (`on`, when not
    /// `rank` itself) and how many words that array has.
    pub fn index(&self, rank: usize, sig: SignalId, on: Owner) -> Result<usize, TransportError> {
        let i = sig as usize;
        if i < self.count {
            return Ok(i);
        }
        Err(TransportError::NotAllocated {
            rank,
            what: format!("{} (it has {})", on.name(sig), self.count),
        })
    }

    /// The byte offset of `sig` in this array, checked as [`Self::index`].
    pub fn offset(&self, rank: usize, sig: SignalId, on: Owner) -> Result<usize, TransportError> {
        self.index(rank, sig, on).map(|i| i * SIGNAL_BYTES)
    }
}

/// Whose signal array a check is about, for its error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The calling rank's own array (waits, reads).
    Local,
    /// Peer `rank`'s array (raises).
    Peer(usize),
}

impl Owner {
    fn name(self, sig: SignalId) -> String {
        match self {
            Owner::Local => format!("signal {sig}"),
            Owner::Peer(r) => format!("signal {sig} on rank {r}"),
        }
    }
}

/// The error of a rank that has no signal array yet.
fn no_array(rank: usize, sig: SignalId, on: Owner) -> TransportError {
    TransportError::NotAllocated {
        rank,
        what: format!("{} (no signal array)", on.name(sig)),
    }
}

/// The checked byte offset of `sig` in `slots`, or the error of a rank
/// that has no signal array yet.
pub fn signal_offset(
    rank: usize,
    slots: Option<SignalSlots>,
    sig: SignalId,
    on: Owner,
) -> Result<usize, TransportError> {
    match slots {
        Some(s) => s.offset(rank, sig, on),
        None => Err(no_array(rank, sig, on)),
    }
}

/// A transport's signal array (`array`, whose [`SignalSlots`] `slots`
/// says) and the checked byte offset of `sig` in it.
pub fn locate<A>(
    rank: usize,
    array: Option<&A>,
    slots: impl FnOnce(&A) -> SignalSlots,
    sig: SignalId,
    on: Owner,
) -> Result<(&A, usize), TransportError> {
    match array {
        Some(a) => Ok((a, slots(a).offset(rank, sig, on)?)),
        None => Err(no_array(rank, sig, on)),
    }
}

/// Buffer `buf` of a transport's list `buffers` (indexed by id), or the
/// error, raised on `rank`, that names it.
pub fn buffer<T>(rank: usize, buffers: &[T], buf: BufferId) -> Result<&T, TransportError> {
    buffers
        .get(buf.0 as usize)
        .ok_or_else(|| TransportError::NotAllocated {
            rank,
            what: format!("buffer {}", buf.0),
        })
}

/// Checks that `len` bytes at `offset` fit in `size` bytes (an offset
/// whose end overflows does not); the error, raised on `rank`, names the
/// access as `what` (built only on failure).
pub fn check_range(
    rank: usize,
    what: impl Display,
    offset: usize,
    len: usize,
    size: usize,
) -> Result<(), TransportError> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(TransportError::OutOfBounds {
            rank,
            what: what.to_string(),
            offset,
            len,
            size,
        });
    }
    Ok(())
}

/// The one back-off of every bounded poll: the first [`Backoff::SPIN`]
/// rounds only yield the core (a signal that is about to land is seen at
/// once), later rounds idle for one microsecond per 16 rounds, at most
/// [`Backoff::MAX_IDLE`] (spares the CPU on long waits; CI machines have
/// two cores shared by every rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff;

impl Backoff {
    pub const SPIN: u32 = 64;
    pub const MAX_IDLE: Duration = Duration::from_micros(50);

    /// How long to idle after round `round` (`None`: only yield).
    pub fn idle(round: u32) -> Option<Duration> {
        (round >= Self::SPIN)
            .then(|| Duration::from_micros(u64::from(round / 16)).min(Self::MAX_IDLE))
    }
}

/// One look of a poll loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    n: u32,
    last: bool,
}

impl Round {
    /// Rounds counted from 0.
    pub fn number(&self) -> u32 {
        self.n
    }

    /// Every [`Backoff::SPIN`]-th round and the last one before a timeout:
    /// the time for checks too costly for every look (peer liveness,
    /// releasing completed requests).
    pub fn checkpoint(&self) -> bool {
        self.last || (self.n > 0 && self.n.is_multiple_of(Backoff::SPIN))
    }
}

/// How a bounded poll ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled<T> {
    Ready(T),
    /// Nothing came within the bound; this long was waited.
    TimedOut(Duration),
}

/// The one bounded poll loop: calls `look` until it returns a value or an
/// error, or `timeout` passes (then once more, as a checkpoint, so a value
/// or a failure found at the last moment wins over the timeout). Between
/// looks it idles as [`Backoff`] says, through `idle`, which may return
/// early when what is polled may have changed (a condition variable).
pub fn poll_bounded<T>(
    timeout: Duration,
    mut look: impl FnMut(Round) -> Result<Option<T>, TransportError>,
    mut idle: impl FnMut(Duration),
) -> Result<Polled<T>, TransportError> {
    let start = Instant::now();
    let mut n = 0u32;
    loop {
        if let Some(v) = look(Round { n, last: false })? {
            return Ok(Polled::Ready(v));
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Ok(match look(Round { n, last: true })? {
                Some(v) => Polled::Ready(v),
                None => Polled::TimedOut(waited),
            });
        }
        n = n.saturating_add(1);
        match Backoff::idle(n) {
            Some(d) => idle(d.min(timeout - waited)),
            None => std::thread::yield_now(),
        }
    }
}

/// Waits until signal `sig` of `rank`, read by `read`, is at least
/// `target`, within `timeout`: [`poll_bounded`] with the signal's timeout
/// error. Returns the value seen.
pub fn wait_signal(
    rank: usize,
    sig: SignalId,
    target: u64,
    timeout: Duration,
    mut read: impl FnMut(Round) -> Result<u64, TransportError>,
    idle: impl FnMut(Duration),
) -> Result<u64, TransportError> {
    let mut observed = 0;
    let polled = poll_bounded(
        timeout,
        |r| {
            observed = read(r)?;
            Ok((observed >= target).then_some(observed))
        },
        idle,
    )?;
    match polled {
        Polled::Ready(v) => Ok(v),
        Polled::TimedOut(waited) => Err(TransportError::WaitTimeout {
            rank,
            signal: sig,
            expected: target,
            observed,
            waited,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_check_names_signal_rank_and_count() {
        let s = SignalSlots::new(4);
        assert_eq!(s.offset(0, 3, Owner::Local).unwrap(), 24);
        match s.index(0, 4, Owner::Peer(1)) {
            Err(TransportError::NotAllocated { rank: 0, what }) => {
                assert_eq!(what, "signal 4 on rank 1 (it has 4)")
            }
            other => panic!("{other:?}"),
        }
        assert!(s.index(2, u32::MAX, Owner::Local).is_err());
        match signal_offset(3, None, 0, Owner::Local) {
            Err(TransportError::NotAllocated { rank: 3, what }) => {
                assert_eq!(what, "signal 0 (no signal array)")
            }
            other => panic!("{other:?}"),
        }
        assert!(SignalSlots::new(usize::MAX).bytes(0).is_err());
        assert_eq!(SignalSlots::new(5).bytes(0).unwrap(), 40);
    }

    #[test]
    fn buffer_checks_name_the_buffer_and_the_access() {
        let list = [10u8, 20];
        assert_eq!(buffer(0, &list, BufferId(1)).unwrap(), &20);
        match buffer(3, &list, BufferId(2)) {
            Err(TransportError::NotAllocated { rank: 3, what }) => assert_eq!(what, "buffer 2"),
            other => panic!("{other:?}"),
        }
        assert!(check_range(0, "x", 4, 4, 8).is_ok());
        assert!(check_range(0, "x", 8, 0, 8).is_ok());
        match check_range(1, format_args!("put to buffer {}", 5), 6, 4, 8) {
            Err(TransportError::OutOfBounds {
                rank: 1,
                what,
                offset: 6,
                len: 4,
                size: 8,
            }) => assert_eq!(what, "put to buffer 5"),
            other => panic!("{other:?}"),
        }
        assert!(check_range(0, "x", usize::MAX, 1, usize::MAX).is_err());
    }

    #[test]
    fn backoff_spins_then_idles_boundedly() {
        assert_eq!(Backoff::idle(0), None);
        assert_eq!(Backoff::idle(Backoff::SPIN - 1), None);
        let first = Backoff::idle(Backoff::SPIN).unwrap();
        assert!(first > Duration::ZERO && first <= Backoff::MAX_IDLE);
        assert_eq!(Backoff::idle(u32::MAX), Some(Backoff::MAX_IDLE));
        let mut prev = Duration::ZERO;
        for r in Backoff::SPIN..10_000 {
            let d = Backoff::idle(r).unwrap();
            assert!(d >= prev, "the idle never shrinks");
            prev = d;
        }
    }

    #[test]
    fn wait_returns_the_value_or_times_out_naming_the_signal() {
        let mut v = 0u64;
        let got = wait_signal(
            1,
            7,
            3,
            Duration::from_secs(5),
            |_| {
                v += 1;
                Ok(v)
            },
            std::thread::sleep,
        );
        assert_eq!(got.unwrap(), 3);
        let start = Instant::now();
        let e = wait_signal(
            1,
            7,
            3,
            Duration::from_millis(20),
            |_| Ok(2),
            std::thread::sleep,
        )
        .unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert!(
            matches!(
                e,
                TransportError::WaitTimeout {
                    rank: 1,
                    signal: 7,
                    expected: 3,
                    observed: 2,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn checkpoints_come_every_spin_rounds_and_last() {
        let mut checkpoints = Vec::new();
        let mut last_was_checkpoint = false;
        let r = poll_bounded::<()>(
            Duration::from_millis(10),
            |r| {
                if r.checkpoint() {
                    checkpoints.push(r.number());
                }
                last_was_checkpoint = r.checkpoint();
                Ok(None)
            },
            std::thread::sleep,
        )
        .unwrap();
        assert!(matches!(r, Polled::TimedOut(_)));
        assert!(
            last_was_checkpoint,
            "the look after the timeout is a checkpoint"
        );
        assert!(checkpoints.contains(&Backoff::SPIN));
        assert!(!checkpoints.contains(&0));
    }

    #[test]
    fn an_error_ends_the_poll_at_once() {
        let e = poll_bounded::<()>(
            Duration::from_secs(30),
            |r| {
                if r.checkpoint() {
                    Err(TransportError::PeerGone {
                        rank: 0,
                        peer: 1,
                        reason: "test".into(),
                    })
                } else {
                    Ok(None)
                }
            },
            std::thread::sleep,
        )
        .unwrap_err();
        assert!(matches!(e, TransportError::PeerGone { peer: 1, .. }));
    }
}
