//! Bootstrap: TCP rendezvous of W ranks and small collectives over it.
//!
//! Transports need to swap a few byte blobs before any data moves (CUDA IPC
//! handles, NCCL unique ids, UCX worker addresses and remote keys). This
//! module does that with nothing but `std::net`: rank 0 listens on
//! `MASTER_ADDR:MASTER_PORT`, every other rank connects to it (a star), and
//! [`Bootstrap::all_gather`] / [`Bootstrap::barrier`] run through rank 0.
//! The environment is torchrun's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), so `torchrun`, the
//! `comet launch` launcher and Slurm wrappers that export it all work.
//!
//! The connections also carry liveness: a reader thread per connection sees
//! a peer's socket close, and rank 0 relays "rank r is gone" to the others,
//! so a rank that crashes turns every other rank's next wait into
//! [`BootstrapError::PeerGone`] instead of a hang. An orderly shutdown
//! (drop) says goodbye first, which is not a failure.
//!
//! Frames are length-prefixed with a magic word and a protocol version, so a
//! stray process on the port, or a rank of another build, is refused with a
//! clear error rather than misread. Every blocking step has a deadline.

use std::collections::BTreeMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;

/// "CMTB" in ASCII: the first word of every frame.
const MAGIC: u32 = 0x434d_5442;
/// Bumped whenever the frame layout or the handshake changes.
const VERSION: u16 = 1;
const HEADER: usize = 12;
/// Largest payload accepted; anything bigger is garbage or an attack.
const MAX_PAYLOAD: usize = 1 << 30;
/// How often waits look at liveness and call their idle hook.
const POLL: Duration = Duration::from_millis(2);

const K_HELLO: u16 = 1;
const K_WELCOME: u16 = 2;
const K_REJECT: u16 = 3;
const K_GATHER: u16 = 4;
const K_GATHERED: u16 = 5;
const K_BYE: u16 = 6;
const K_PEER_GONE: u16 = 7;

/// How long rank 0 waits for a new connection's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Default deadline of the rendezvous and of each collective.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BootstrapError {
    #[error("bootstrap environment: {var} {problem}")]
    Env { var: &'static str, problem: String },
    #[error("bootstrap: rank {rank} is not in a world of {world}")]
    RankOutOfRange { rank: usize, world: usize },
    #[error("bootstrap: rank {peer} says the world has {theirs} ranks, rank 0 says {ours}")]
    WorldMismatch {
        peer: usize,
        theirs: usize,
        ours: usize,
    },
    #[error("bootstrap: two processes claim rank {rank}")]
    DuplicateRank { rank: usize },
    #[error("bootstrap: cannot listen on {addr} (port taken?): {detail}")]
    PortTaken { addr: String, detail: String },
    #[error("bootstrap: rank {rank} could not reach rank 0 at {addr} within {waited:?}: {detail}")]
    Unreachable {
        rank: usize,
        addr: String,
        waited: Duration,
        detail: String,
    },
    #[error("bootstrap: ranks {missing:?} never joined rank 0 within {waited:?}")]
    MissingRanks {
        missing: Vec<usize>,
        waited: Duration,
    },
    #[error("bootstrap: rank 0 refused rank {rank}: {reason}")]
    Rejected { rank: usize, reason: String },
    #[error("bootstrap: peer {peer} spoke no comet bootstrap protocol: {detail}")]
    Protocol { peer: String, detail: String },
    #[error("bootstrap: rank {rank}: peer {peer} is gone ({reason})")]
    PeerGone {
        rank: usize,
        peer: usize,
        reason: String,
    },
    #[error("bootstrap: rank {rank}: {what} timed out after {waited:?}, still waiting for ranks {missing:?}")]
    Timeout {
        rank: usize,
        what: String,
        waited: Duration,
        missing: Vec<usize>,
    },
    #[error("bootstrap: rank {rank}: {context}: {detail}")]
    Io {
        rank: usize,
        context: String,
        detail: String,
    },
}

impl From<BootstrapError> for crate::TransportError {
    fn from(e: BootstrapError) -> Self {
        match e {
            BootstrapError::PeerGone { rank, peer, reason } => {
                crate::TransportError::PeerGone { rank, peer, reason }
            }
            other => crate::TransportError::Bootstrap(other.to_string()),
        }
    }
}

/// Where this rank sits and how to reach rank 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapConfig {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub local_world: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Deadline of the rendezvous (collectives take their own), and the
    /// longest a write to a peer may stand still (a peer alive but no
    /// longer reading ends the writer's wait with an error).
    pub timeout: Duration,
}

impl BootstrapConfig {
    /// A config for rank `rank` of `world` ranks on this host.
    pub fn local(rank: usize, world: usize, master_port: u16) -> Self {
        BootstrapConfig {
            rank,
            world,
            local_rank: rank,
            local_world: world,
            master_addr: "127.0.0.1".into(),
            master_port,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Reads the torchrun environment of this process.
    pub fn from_env() -> Result<Self, BootstrapError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads a torchrun-style environment through `get` (tests pass a map).
    /// `LOCAL_RANK`/`LOCAL_WORLD_SIZE` default to the global values,
    /// `MASTER_ADDR` to 127.0.0.1 and `MASTER_PORT` to torch's 29500;
    /// `COMET_BOOTSTRAP_TIMEOUT_S` sets the rendezvous deadline.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, BootstrapError> {
        fn num(
            get: &dyn Fn(&str) -> Option<String>,
            var: &'static str,
            default: Option<usize>,
        ) -> Result<usize, BootstrapError> {
            match get(var) {
                None if default.is_some() => Ok(default.unwrap_or_default()),
                None => Err(BootstrapError::Env {
                    var,
                    problem: "is not set".into(),
                }),
                Some(s) => s.trim().parse::<usize>().map_err(|_| BootstrapError::Env {
                    var,
                    problem: format!("is {s:?}, not a non-negative integer"),
                }),
            }
        }
        let get: &dyn Fn(&str) -> Option<String> = &get;
        let rank = num(get, "RANK", None)?;
        let world = num(get, "WORLD_SIZE", None)?;
        if world == 0 {
            return Err(BootstrapError::Env {
                var: "WORLD_SIZE",
                problem: "is 0".into(),
            });
        }
        if rank >= world {
            return Err(BootstrapError::RankOutOfRange { rank, world });
        }
        let local_rank = num(get, "LOCAL_RANK", Some(rank))?;
        let local_world = num(get, "LOCAL_WORLD_SIZE", Some(world))?;
        let port = num(get, "MASTER_PORT", Some(29500))?;
        let master_port = u16::try_from(port).map_err(|_| BootstrapError::Env {
            var: "MASTER_PORT",
            problem: format!("is {port}, above 65535"),
        })?;
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let timeout = match get("COMET_BOOTSTRAP_TIMEOUT_S") {
            None => DEFAULT_TIMEOUT,
            Some(s) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| BootstrapError::Env {
                    var: "COMET_BOOTSTRAP_TIMEOUT_S",
                    problem: format!("is {s:?}, not a positive number"),
                })?,
        };
        Ok(BootstrapConfig {
            rank,
            world,
            local_rank,
            local_world,
            master_addr,
            master_port,
            timeout,
        })
    }

    fn addr(&self) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }
}

/// What a rank knows about another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerState {
    Alive,
    /// Said goodbye: finished normally.
    Departed,
    /// Connection lost without a goodbye.
    Gone(String),
}

struct Frame {
    kind: u16,
    payload: Vec<u8>,
}

fn write_frame(s: &mut TcpStream, kind: u16, payload: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(HEADER + payload.len());
    buf.extend_from_slice(&MAGIC.to_le_bytes());
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&kind.to_le_bytes());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    s.write_all(&buf)?;
    s.flush()
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a header.
fn read_frame(s: &mut TcpStream) -> io::Result<Option<Frame>> {
    let mut h = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match s.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed inside a frame header",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let version = u16::from_le_bytes([h[4], h[5]]);
    let kind = u16::from_le_bytes([h[6], h[7]]);
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    if magic != MAGIC {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("bad magic word {magic:#010x}"),
        ));
    }
    if version != VERSION {
        // A comet rank of another build: `Unsupported` tells it from strangers.
        return Err(io::Error::new(
            ErrorKind::Unsupported,
            format!("protocol version {version}, this build speaks {VERSION}"),
        ));
    }
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {MAX_PAYLOAD}"),
        ));
    }
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok(Some(Frame { kind, payload }))
}

fn u32_at(p: &[u8], at: usize) -> Option<u32> {
    p.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(p: &[u8], at: usize) -> Option<u64> {
    p.get(at..at + 8).map(|b| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a)
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Events from reader threads: (sending rank, frame).
type Inbox = Receiver<(usize, Frame)>;

struct Link {
    peer: usize,
    writer: Mutex<TcpStream>,
}

struct Shared {
    rank: usize,
    peers: Mutex<Vec<PeerState>>,
    /// Rank 0 only: links to every other rank, to relay deaths.
    links: Vec<Arc<Link>>,
}

impl Shared {
    fn mark(&self, peer: usize, state: PeerState) -> bool {
        let mut p = lock(&self.peers);
        // Departed is final: the end of stream after a goodbye is no death.
        if p[peer] == PeerState::Alive {
            p[peer] = state;
            return true;
        }
        false
    }

    fn relay_gone(&self, peer: usize, reason: &str) {
        let mut payload = (peer as u32).to_le_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        for l in &self.links {
            if l.peer != peer {
                // A failed relay means that rank is gone too; its own reader reports it.
                let _ = write_frame(&mut lock(&l.writer), K_PEER_GONE, &payload);
            }
        }
    }
}

fn reader_loop(
    shared: Arc<Shared>,
    peer: usize,
    mut stream: TcpStream,
    tx: Sender<(usize, Frame)>,
) {
    loop {
        match read_frame(&mut stream) {
            Ok(Some(f)) if f.kind == K_BYE => {
                shared.mark(peer, PeerState::Departed);
                tracing::debug!(rank = shared.rank, peer, "peer said goodbye");
            }
            Ok(Some(f)) if f.kind == K_PEER_GONE => {
                let gone = u32_at(&f.payload, 0)
                    .map(|r| r as usize)
                    .filter(|&r| r < lock(&shared.peers).len());
                if let Some(g) = gone {
                    let why = String::from_utf8_lossy(&f.payload[4..]).into_owned();
                    shared.mark(g, PeerState::Gone(format!("reported by rank 0: {why}")));
                }
            }
            Ok(Some(f)) => {
                if tx.send((peer, f)).is_err() {
                    return;
                }
            }
            Ok(None) | Err(_) if lock(&shared.peers)[peer] == PeerState::Departed => return,
            Ok(None) => {
                let why = "connection closed without goodbye".to_string();
                if shared.mark(peer, PeerState::Gone(why.clone())) {
                    tracing::warn!(rank = shared.rank, peer, "peer vanished");
                    shared.relay_gone(peer, &why);
                }
                return;
            }
            Err(e) => {
                let why = format!("connection lost: {e}");
                if shared.mark(peer, PeerState::Gone(why.clone())) {
                    tracing::warn!(rank = shared.rank, peer, error = %e, "peer vanished");
                    shared.relay_gone(peer, &why);
                }
                return;
            }
        }
    }
}

/// One rank's membership in a bootstrapped world.
pub struct Bootstrap {
    cfg: BootstrapConfig,
    shared: Arc<Shared>,
    /// Rank 0: one link per other rank (index = rank - 1). Others: the link to rank 0.
    links: Vec<Arc<Link>>,
    inbox: Mutex<Inbox>,
    seq: Mutex<u64>,
    readers: Vec<JoinHandle<()>>,
    closed: bool,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap")
            .field("rank", &self.cfg.rank)
            .field("world", &self.cfg.world)
            .finish()
    }
}

/// Binds rank 0's listening socket, mapping "in use" to [`BootstrapError::PortTaken`].
/// Port 0 picks a free port (read it back with `local_addr`).
pub fn listen(addr: &str, port: u16) -> Result<TcpListener, BootstrapError> {
    let cfg = BootstrapConfig {
        master_addr: addr.into(),
        master_port: port,
        ..BootstrapConfig::local(0, 1, port)
    };
    TcpListener::bind(cfg.addr()).map_err(|e| BootstrapError::PortTaken {
        addr: cfg.addr(),
        detail: e.to_string(),
    })
}

impl Bootstrap {
    /// Joins the world described by the torchrun environment.
    pub fn from_env() -> Result<Self, BootstrapError> {
        Self::connect(BootstrapConfig::from_env()?)
    }

    /// Rank 0 listens on the master address; the others connect to it.
    pub fn connect(cfg: BootstrapConfig) -> Result<Self, BootstrapError> {
        if cfg.rank >= cfg.world {
            return Err(BootstrapError::RankOutOfRange {
                rank: cfg.rank,
                world: cfg.world,
            });
        }
        if cfg.rank == 0 {
            let l = listen(&cfg.master_addr, cfg.master_port)?;
            Self::root(cfg, l)
        } else {
            Self::child(cfg)
        }
    }

    /// Rank 0 on a socket bound beforehand (tests bind port 0 first).
    pub fn with_listener(
        cfg: BootstrapConfig,
        listener: TcpListener,
    ) -> Result<Self, BootstrapError> {
        if cfg.rank != 0 {
            return Err(BootstrapError::Env {
                var: "RANK",
                problem: format!("is {}, but only rank 0 listens", cfg.rank),
            });
        }
        Self::root(cfg, listener)
    }

    pub fn rank(&self) -> usize {
        self.cfg.rank
    }

    pub fn world(&self) -> usize {
        self.cfg.world
    }

    pub fn config(&self) -> &BootstrapConfig {
        &self.cfg
    }

    /// What this rank knows about `peer` (rank 0 knows everyone; others
    /// learn of deaths through rank 0).
    pub fn peer_state(&self, peer: usize) -> PeerState {
        lock(&self.shared.peers)
            .get(peer)
            .cloned()
            .unwrap_or(PeerState::Gone("not a rank".into()))
    }

    /// `Err(PeerGone)` for the first rank that vanished without a goodbye.
    pub fn check_peers(&self) -> Result<(), BootstrapError> {
        let p = lock(&self.shared.peers);
        for (r, s) in p.iter().enumerate() {
            if let PeerState::Gone(why) = s {
                return Err(BootstrapError::PeerGone {
                    rank: self.cfg.rank,
                    peer: r,
                    reason: why.clone(),
                });
            }
        }
        Ok(())
    }

    fn io_err(&self, context: impl Into<String>, e: impl std::fmt::Display) -> BootstrapError {
        BootstrapError::Io {
            rank: self.cfg.rank,
            context: context.into(),
            detail: e.to_string(),
        }
    }

    fn root(cfg: BootstrapConfig, listener: TcpListener) -> Result<Self, BootstrapError> {
        let joined = Self::accept_ranks(&cfg, &listener)?;
        let io = |context: &str, e: io::Error| BootstrapError::Io {
            rank: 0,
            context: context.into(),
            detail: e.to_string(),
        };
        let shared = Arc::new(Shared {
            rank: 0,
            peers: Mutex::new(vec![PeerState::Alive; cfg.world]),
            links: joined
                .iter()
                .map(|(&peer, s)| {
                    s.try_clone().map(|w| {
                        Arc::new(Link {
                            peer,
                            writer: Mutex::new(w),
                        })
                    })
                })
                .collect::<io::Result<Vec<_>>>()
                .map_err(|e| io("socket", e))?,
        });
        let links = shared.links.clone();
        for l in &links {
            write_frame(&mut lock(&l.writer), K_WELCOME, &[])
                .map_err(|e| io(&format!("welcome to rank {}", l.peer), e))?;
        }
        let (tx, rx) = mpsc::channel();
        let mut readers = Vec::new();
        for (peer, s) in joined {
            s.set_read_timeout(None).map_err(|e| io("socket", e))?;
            let (sh, tx) = (Arc::clone(&shared), tx.clone());
            readers.push(
                std::thread::Builder::new()
                    .name(format!("comet-boot-r{peer}"))
                    .spawn(move || reader_loop(sh, peer, s, tx))
                    .map_err(|e| io("spawn reader", e))?,
            );
        }
        tracing::debug!(world = cfg.world, "bootstrap: all ranks joined");
        Ok(Bootstrap {
            cfg,
            shared,
            links,
            inbox: Mutex::new(rx),
            seq: Mutex::new(0),
            readers,
            closed: false,
        })
    }

    /// Rank 0's side of joining: a connection from every other rank whose
    /// hello fits this world, within the timeout. Connections that are no
    /// comet rank are dropped; a rank that cannot join (another world
    /// size, out of range, a second rank with its number) is refused and
    /// fails the world.
    fn accept_ranks(
        cfg: &BootstrapConfig,
        listener: &TcpListener,
    ) -> Result<BTreeMap<usize, TcpStream>, BootstrapError> {
        let start = Instant::now();
        let io = |context: &str, e: io::Error| BootstrapError::Io {
            rank: 0,
            context: context.into(),
            detail: e.to_string(),
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| io("listener", e))?;
        let mut joined: BTreeMap<usize, TcpStream> = BTreeMap::new();
        while joined.len() + 1 < cfg.world {
            let waited = start.elapsed();
            if waited >= cfg.timeout {
                let missing = (1..cfg.world).filter(|r| !joined.contains_key(r)).collect();
                return Err(BootstrapError::MissingRanks { missing, waited });
            }
            let (mut s, from) = match listener.accept() {
                Ok(x) => x,
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted =>
                {
                    std::thread::sleep(POLL);
                    continue;
                }
                Err(e) => return Err(io("accept", e)),
            };
            s.set_nonblocking(false).map_err(|e| io("socket", e))?;
            let _ = s.set_nodelay(true);
            // A peer alive but not reading must not hold a writer for good.
            s.set_write_timeout(Some(cfg.timeout.max(Duration::from_millis(100))))
                .map_err(|e| io("socket", e))?;
            // A silent connection may not hold up the others for long.
            let left = cfg
                .timeout
                .saturating_sub(start.elapsed())
                .clamp(Duration::from_millis(100), HELLO_TIMEOUT);
            s.set_read_timeout(Some(left))
                .map_err(|e| io("socket", e))?;
            if let Some(rank) = Self::admit(cfg, &mut s, &from.to_string(), &joined)? {
                tracing::debug!(rank, %from, "rank joined");
                joined.insert(rank, s);
            }
        }
        Ok(joined)
    }

    /// The rank a new connection's hello names, if it may join `joined`;
    /// None for a connection that is no comet rank (dropped).
    fn admit(
        cfg: &BootstrapConfig,
        s: &mut TcpStream,
        from: &str,
        joined: &BTreeMap<usize, TcpStream>,
    ) -> Result<Option<usize>, BootstrapError> {
        let refuse = |s: &mut TcpStream, err: BootstrapError| {
            let _ = write_frame(s, K_REJECT, err.to_string().as_bytes());
            err
        };
        let hello = match read_frame(s) {
            Ok(Some(f)) if f.kind == K_HELLO && f.payload.len() >= 8 => f,
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                let err = BootstrapError::Protocol {
                    peer: from.to_string(),
                    detail: e.to_string(),
                };
                return Err(refuse(s, err));
            }
            other => {
                // Port scanners and health checks are no reason to fail
                // the world: drop them and keep waiting for ranks.
                let why = match other {
                    Err(e) => e.to_string(),
                    _ => "first frame was not a hello".into(),
                };
                tracing::warn!(%from, why, "bootstrap: ignoring a connection that is no comet rank");
                return Ok(None);
            }
        };
        let rank = u32_at(&hello.payload, 0).unwrap_or(u32::MAX) as usize;
        let world = u32_at(&hello.payload, 4).unwrap_or(0) as usize;
        if world != cfg.world {
            return Err(refuse(
                s,
                BootstrapError::WorldMismatch {
                    peer: rank,
                    theirs: world,
                    ours: cfg.world,
                },
            ));
        }
        if rank >= cfg.world {
            return Err(refuse(
                s,
                BootstrapError::RankOutOfRange {
                    rank,
                    world: cfg.world,
                },
            ));
        }
        if rank == 0 || joined.contains_key(&rank) {
            return Err(refuse(s, BootstrapError::DuplicateRank { rank }));
        }
        Ok(Some(rank))
    }

    fn child(cfg: BootstrapConfig) -> Result<Self, BootstrapError> {
        let start = Instant::now();
        let rank = cfg.rank;
        let io = |context: &str, e: io::Error| BootstrapError::Io {
            rank,
            context: context.into(),
            detail: e.to_string(),
        };
        let mut s = Self::connect_to_root(&cfg, start)?;
        let _ = s.set_nodelay(true);
        // As on rank 0's side: writes to a peer that stops reading end.
        s.set_write_timeout(Some(cfg.timeout.max(Duration::from_millis(100))))
            .map_err(|e| io("socket", e))?;
        let mut hello = (rank as u32).to_le_bytes().to_vec();
        hello.extend_from_slice(&(cfg.world as u32).to_le_bytes());
        write_frame(&mut s, K_HELLO, &hello).map_err(|e| io("hello to rank 0", e))?;
        let left = cfg
            .timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(100));
        s.set_read_timeout(Some(left))
            .map_err(|e| io("socket", e))?;
        Self::await_welcome(&cfg, &mut s, start)?;
        s.set_read_timeout(None).map_err(|e| io("socket", e))?;
        let link = Arc::new(Link {
            peer: 0,
            writer: Mutex::new(s.try_clone().map_err(|e| io("socket", e))?),
        });
        let shared = Arc::new(Shared {
            rank,
            peers: Mutex::new(vec![PeerState::Alive; cfg.world]),
            links: Vec::new(),
        });
        let (tx, rx) = mpsc::channel();
        let sh = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name(format!("comet-boot-{rank}"))
            .spawn(move || reader_loop(sh, 0, s, tx))
            .map_err(|e| io("spawn reader", e))?;
        Ok(Bootstrap {
            cfg,
            shared,
            links: vec![link],
            inbox: Mutex::new(rx),
            seq: Mutex::new(0),
            readers: vec![reader],
            closed: false,
        })
    }

    /// A connection to rank 0, retried until the timeout (rank 0 may start
    /// after this rank).
    fn connect_to_root(cfg: &BootstrapConfig, start: Instant) -> Result<TcpStream, BootstrapError> {
        let addr = cfg.addr();
        loop {
            let last = match addr.to_socket_addrs() {
                Ok(addrs) => {
                    let mut last = format!("{addr} resolves to no address");
                    for a in addrs {
                        match TcpStream::connect_timeout(&a, Duration::from_millis(500)) {
                            Ok(s) => return Ok(s),
                            Err(e) => last = e.to_string(),
                        }
                    }
                    last
                }
                Err(e) => format!("cannot resolve {addr}: {e}"),
            };
            let waited = start.elapsed();
            if waited >= cfg.timeout {
                return Err(BootstrapError::Unreachable {
                    rank: cfg.rank,
                    addr,
                    waited,
                    detail: last,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rank 0's answer to this rank's hello: welcome once every rank has
    /// joined, or why not.
    fn await_welcome(
        cfg: &BootstrapConfig,
        s: &mut TcpStream,
        start: Instant,
    ) -> Result<(), BootstrapError> {
        let (rank, addr) = (cfg.rank, cfg.addr());
        match read_frame(s) {
            Ok(Some(f)) if f.kind == K_WELCOME => Ok(()),
            Ok(Some(f)) if f.kind == K_REJECT => Err(BootstrapError::Rejected {
                rank,
                reason: String::from_utf8_lossy(&f.payload).into_owned(),
            }),
            Ok(Some(f)) => Err(BootstrapError::Protocol {
                peer: addr,
                detail: format!("unexpected frame kind {} instead of welcome", f.kind),
            }),
            Ok(None) => Err(BootstrapError::PeerGone {
                rank,
                peer: 0,
                reason: "rank 0 closed the connection during the rendezvous".into(),
            }),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                Err(BootstrapError::Timeout {
                    rank,
                    what: "waiting for rank 0 to admit every rank".into(),
                    waited: start.elapsed(),
                    missing: vec![0],
                })
            }
            Err(e) => Err(BootstrapError::Protocol {
                peer: addr,
                detail: e.to_string(),
            }),
        }
    }

    /// Every rank contributes `blob`; every rank gets all blobs in rank order.
    pub fn all_gather(
        &self,
        blob: &[u8],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, BootstrapError> {
        self.all_gather_with(blob, timeout, &mut || {})
    }

    /// As [`Self::all_gather`], calling `idle` every few milliseconds while
    /// waiting (a UCX transport progresses its worker there, so peers whose
    /// puts need this rank's progress to complete can reach the collective).
    pub fn all_gather_with(
        &self,
        blob: &[u8],
        timeout: Duration,
        idle: &mut dyn FnMut(),
    ) -> Result<Vec<Vec<u8>>, BootstrapError> {
        let mut seq_guard = lock(&self.seq);
        let seq = *seq_guard;
        *seq_guard += 1;
        let what = format!("all_gather #{seq}");
        if self.cfg.world == 1 {
            return Ok(vec![blob.to_vec()]);
        }
        let start = Instant::now();
        let inbox = lock(&self.inbox);
        if self.cfg.rank == 0 {
            let mut blobs: Vec<Option<Vec<u8>>> = vec![None; self.cfg.world];
            blobs[0] = Some(blob.to_vec());
            while blobs.iter().any(Option::is_none) {
                let missing: Vec<usize> = (0..self.cfg.world)
                    .filter(|&r| blobs[r].is_none())
                    .collect();
                let (from, f) = self.next_frame(&inbox, &what, start, timeout, &missing, idle)?;
                let got = u64_at(&f.payload, 0);
                if f.kind != K_GATHER || got != Some(seq) {
                    return Err(BootstrapError::Protocol {
                        peer: format!("rank {from}"),
                        detail: format!("expected {what}, got frame kind {} seq {got:?}", f.kind),
                    });
                }
                blobs[from] = Some(f.payload[8..].to_vec());
            }
            let blobs: Vec<Vec<u8>> = blobs.into_iter().map(Option::unwrap_or_default).collect();
            let mut out = seq.to_le_bytes().to_vec();
            for b in &blobs {
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
            for l in &self.links {
                write_frame(&mut lock(&l.writer), K_GATHERED, &out)
                    .map_err(|e| self.io_err(format!("{what} to rank {}", l.peer), e))?;
            }
            Ok(blobs)
        } else {
            let mut out = seq.to_le_bytes().to_vec();
            out.extend_from_slice(blob);
            write_frame(&mut lock(&self.links[0].writer), K_GATHER, &out).map_err(|e| {
                self.check_peers()
                    .err()
                    .unwrap_or_else(|| self.io_err(format!("{what} to rank 0"), e))
            })?;
            let (_, f) = self.next_frame(&inbox, &what, start, timeout, &[0], idle)?;
            let bad = |detail: String| BootstrapError::Protocol {
                peer: "rank 0".into(),
                detail,
            };
            if f.kind != K_GATHERED || u64_at(&f.payload, 0) != Some(seq) {
                return Err(bad(format!(
                    "expected the result of {what}, got frame kind {}",
                    f.kind
                )));
            }
            let mut at = 8;
            let mut blobs = Vec::with_capacity(self.cfg.world);
            for _ in 0..self.cfg.world {
                let len = u32_at(&f.payload, at)
                    .ok_or_else(|| bad(format!("{what} result truncated")))?
                    as usize;
                let b = f
                    .payload
                    .get(at + 4..at + 4 + len)
                    .ok_or_else(|| bad(format!("{what} result truncated")))?;
                blobs.push(b.to_vec());
                at += 4 + len;
            }
            Ok(blobs)
        }
    }

    /// Waits for the next frame, failing on a vanished peer, a departed
    /// peer we still wait for, or the deadline.
    fn next_frame(
        &self,
        inbox: &Inbox,
        what: &str,
        start: Instant,
        timeout: Duration,
        waiting_for: &[usize],
        idle: &mut dyn FnMut(),
    ) -> Result<(usize, Frame), BootstrapError> {
        loop {
            match inbox.recv_timeout(POLL) {
                Ok(f) => return Ok(f),
                Err(RecvTimeoutError::Disconnected) | Err(RecvTimeoutError::Timeout) => {}
            }
            self.check_peers()?;
            for &r in waiting_for {
                if self.peer_state(r) == PeerState::Departed {
                    return Err(BootstrapError::PeerGone {
                        rank: self.cfg.rank,
                        peer: r,
                        reason: format!("it shut down before {what}"),
                    });
                }
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(BootstrapError::Timeout {
                    rank: self.cfg.rank,
                    what: what.into(),
                    waited,
                    missing: waiting_for.to_vec(),
                });
            }
            idle();
        }
    }

    /// All ranks reach this point, or an error within `timeout`.
    pub fn barrier(&self, timeout: Duration) -> Result<(), BootstrapError> {
        self.all_gather(&[], timeout).map(|_| ())
    }

    /// As [`Self::barrier`], calling `idle` while waiting.
    pub fn barrier_with(
        &self,
        timeout: Duration,
        idle: &mut dyn FnMut(),
    ) -> Result<(), BootstrapError> {
        self.all_gather_with(&[], timeout, idle).map(|_| ())
    }

    /// Leaves without a goodbye, as a crash would: peers see this rank gone.
    /// For failure tests.
    pub fn abandon(mut self) {
        self.closed = true;
        for l in &self.links {
            let _ = lock(&l.writer).shutdown(Shutdown::Both);
        }
        for h in self.readers.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Bootstrap {
    fn drop(&mut self) {
        if !self.closed {
            for l in &self.links {
                let mut w = lock(&l.writer);
                let _ = write_frame(&mut w, K_BYE, &[]);
            }
            // Mark everyone departed so our own readers stop quietly on the close.
            for p in lock(&self.shared.peers).iter_mut() {
                if *p == PeerState::Alive {
                    *p = PeerState::Departed;
                }
            }
            for l in &self.links {
                let _ = lock(&l.writer).shutdown(Shutdown::Both);
            }
        }
        for h in self.readers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_is_parsed_and_checked() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let c = BootstrapConfig::from_lookup(env(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "4"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap();
        assert_eq!(
            (c.rank, c.world, c.local_rank, c.master_port),
            (2, 4, 2, 1234)
        );
        assert_eq!(c.master_addr, "127.0.0.1");
        assert!(matches!(
            BootstrapConfig::from_lookup(env(&[("WORLD_SIZE", "4")])),
            Err(BootstrapError::Env { var: "RANK", .. })
        ));
        assert!(matches!(
            BootstrapConfig::from_lookup(env(&[("RANK", "4"), ("WORLD_SIZE", "4")])),
            Err(BootstrapError::RankOutOfRange { rank: 4, world: 4 })
        ));
        assert!(matches!(
            BootstrapConfig::from_lookup(env(&[("RANK", "0"), ("WORLD_SIZE", "x")])),
            Err(BootstrapError::Env {
                var: "WORLD_SIZE",
                ..
            })
        ));
        assert!(matches!(
            BootstrapConfig::from_lookup(env(&[
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("MASTER_PORT", "70000")
            ])),
            Err(BootstrapError::Env {
                var: "MASTER_PORT",
                ..
            })
        ));
    }

    #[test]
    fn world_of_one_needs_no_network() {
        let b = Bootstrap::with_listener(
            BootstrapConfig::local(0, 1, 0),
            listen("127.0.0.1", 0).unwrap(),
        )
        .unwrap();
        assert_eq!(
            b.all_gather(b"x", Duration::from_secs(1)).unwrap(),
            vec![b"x".to_vec()]
        );
        b.barrier(Duration::from_secs(1)).unwrap();
    }
}
