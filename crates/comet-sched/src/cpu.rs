//! The CPU executor: the fused layer0/layer1 protocol run tile by tile on
//! the CPU over any [`Transport`], and the non-overlapped baseline.
//!
//! Each rank runs a compute worker and a communication worker, as the GPU
//! kernels specialise thread blocks. Per call (epoch `n`):
//! 1. count exchange: every rank puts its row of the W x E count matrix to
//!    all ranks (double-buffered by epoch parity) and raises `counts[src]`;
//!    it doubles as the fence that keeps call n+1's writes out of buffers
//!    still read by call n;
//! 2. layer0: the comm worker puts each segment straight to its final row on
//!    the destination, in ring order, raising `dispatch(expert, src)`; the
//!    compute worker runs FC1+SwiGLU tiles in schedule order, each waiting
//!    first on exactly the segments its rows overlap;
//! 3. layer1: the compute worker runs FC2 tiles chunk-major and counts
//!    finished tiles per chunk; the comm worker sends each chunk as soon as
//!    its count is complete and raises `combine(rank, chunk)` on every
//!    source; sources reduce each chunk (weighted top-k sum) as it lands.
//!
//! With expert groups ([`TileShape::groups`]) the compute worker runs
//! layer0 then layer1 group by group, and layer1's chunks are pieces
//! (group, column chunk): a group's combine leaves while the later groups
//! compute, as the device forward does.

use crate::error::SchedError;
use crate::protocol::{
    build_ranks, check_input, check_inputs, exchange_counts, panic_text, rank_err, run_ranks,
};
use crate::tile_math::{as_bytes, fc1_swiglu, fc2_cols, from_bytes};
use crate::trace::{Trace, Track};
use comet_core::layout::{ring_dest, LayoutPlan};
use comet_core::schedule::{
    combine_waits, Layer0Schedule, Layer1Schedule, SignalId, SignalMap, TileShape,
};
use comet_core::{ExpertWeights, MoeConfig, Routing};
use comet_transport::local::{local_world_with_link, DelayModel, LinkModel, LocalTransport};
use comet_transport::{BufferId, SignalOp, Transport, TransportError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Overlapped (fused layers) or everything in sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecMode {
    Fused,
    Baseline,
}

/// Deliberate protocol faults, to prove the checks catch a broken schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Layer0 tiles skip their dependency waits.
    DropLayer0Deps,
    /// Sources reduce without waiting for the combine signals.
    SkipCombineWaits,
}

#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Bound on a call's waits, all of them together: a call that has run
    /// this long while waiting fails, naming the rank and the signal.
    pub timeout: Duration,
    pub trace: bool,
    pub fault: Option<Fault>,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            timeout: Duration::from_secs(30),
            trace: false,
            fault: None,
        }
    }
}

/// Wall-clock phases of one call on one rank.
#[derive(Debug, Clone, Default)]
pub struct CallStats {
    pub total: Duration,
    pub exchange: Duration,
    /// Dispatch + FC1 (overlapped in fused mode).
    pub layer0: Duration,
    /// FC2 + combine + reduce (overlapped in fused mode).
    pub layer1: Duration,
    /// Time the compute worker spent blocked on signals.
    pub waiting: Duration,
    pub rows_received: usize,
}

/// The result of one call on one rank.
#[derive(Debug, Clone)]
pub struct RankOutput {
    pub y: Vec<f32>,
    pub stats: CallStats,
    pub trace: Trace,
}

struct Buffers {
    counts: BufferId,
    recv: BufferId,
    combine: BufferId,
}

/// One rank of the CPU executor, holding its symmetric buffers and epoch.
pub struct CpuRank<T: Transport> {
    cfg: MoeConfig,
    t: T,
    weights: ExpertWeights,
    shape: TileShape,
    map: SignalMap,
    max_tokens: usize,
    recv_cap_rows: usize,
    bufs: Buffers,
    epoch: u64,
    chunk_base: Vec<u64>,
}

/// Everything a worker needs for one call, borrowed from the rank.
struct Call<'a, T: Transport> {
    rank: usize,
    cfg: &'a MoeConfig,
    t: &'a T,
    bufs: &'a Buffers,
    map: &'a SignalMap,
    shape: TileShape,
    epoch: u64,
    /// When the call started and when its waits give up: the timeout
    /// bounds the whole call, not each wait in turn.
    start: Instant,
    deadline: Instant,
    plan: LayoutPlan,
    l0: Layer0Schedule,
    l1: Layer1Schedule,
    x: &'a [f32],
    /// Tokens this rank sends to each global expert, in slot order.
    by_expert: Vec<Vec<usize>>,
    /// FC2 output per column chunk, `[total_rows, cols]`, shared by the
    /// workers (each expert group's pieces fill their own rows of it).
    chunk_out: Vec<Mutex<Vec<f32>>>,
    trace_on: bool,
}

impl<T: Transport> CpuRank<T> {
    /// Collective: every rank of the transport's world calls it together.
    /// `max_tokens` bounds the tokens of any rank in any later call.
    pub fn new(
        cfg: &MoeConfig,
        t: T,
        weights: ExpertWeights,
        max_tokens: usize,
        shape: TileShape,
        timeout: Duration,
    ) -> Result<Self, SchedError> {
        cfg.validate()?;
        shape.validate(cfg)?;
        let rank = t.rank();
        if t.world() != cfg.ranks {
            return Err(rank_err(
                rank,
                format!(
                    "transport world {} but config has {} ranks",
                    t.world(),
                    cfg.ranks
                ),
            ));
        }
        if weights.experts.len() != cfg.experts_per_rank()
            || weights.hidden != cfg.hidden
            || weights.ffn != cfg.ffn
        {
            return Err(rank_err(
                rank,
                "expert weights do not match the config".to_string(),
            ));
        }
        let w = cfg.ranks;
        // Each (src, expert) segment holds at most `max_tokens` rows, since
        // a token picks an expert once.
        let recv_cap_rows = w * max_tokens * cfg.top_k.min(cfg.experts_per_rank());
        let counts = t.alloc_buffer(2 * w * cfg.experts * 8)?;
        let recv = t.alloc_buffer(recv_cap_rows * cfg.hidden * 4)?;
        let combine = t.alloc_buffer(max_tokens * cfg.top_k * cfg.hidden * 4)?;
        let map = SignalMap::new(cfg, shape.pieces(cfg));
        t.alloc_signals(map.wire_len())?;
        // Poisoned, so a tile that reads rows before they land computes NaN
        // instead of plausible zeros.
        let nan = as_bytes(&[f32::NAN]);
        for (buf, rows) in [(recv, recv_cap_rows), (combine, max_tokens * cfg.top_k)] {
            t.put(rank, buf, 0, &nan.repeat(rows * cfg.hidden))?;
        }
        t.barrier(timeout)?;
        Ok(CpuRank {
            cfg: cfg.clone(),
            t,
            weights,
            shape,
            map,
            max_tokens,
            recv_cap_rows,
            bufs: Buffers {
                counts,
                recv,
                combine,
            },
            epoch: 0,
            chunk_base: vec![0; map.chunks],
        })
    }

    pub fn transport(&self) -> &T {
        &self.t
    }

    pub fn rank(&self) -> usize {
        self.t.rank()
    }

    /// One layer call: `x` is `[routing.tokens, hidden]`; returns `y` of the same shape.
    pub fn call(
        &mut self,
        x: &[f32],
        routing: &Routing,
        mode: ExecMode,
        opts: &ExecOptions,
        origin: Instant,
    ) -> Result<RankOutput, SchedError> {
        let start = Instant::now();
        let rank = self.t.rank();
        let cfg = &self.cfg;
        check_input(cfg, rank, x, routing, self.max_tokens)?;
        self.epoch += 1;
        let epoch = self.epoch;
        let mut trace = Trace::new(origin);
        let deadline = start + opts.timeout;

        // 1. Count exchange.
        let t_ex = Instant::now();
        let plan = exchange_counts(
            &self.t,
            &self.cfg,
            self.bufs.counts,
            self.recv_cap_rows,
            routing,
            epoch,
            deadline.saturating_duration_since(t_ex),
        )?;
        let recv_rows = plan.recv[rank].total_rows;
        if opts.trace {
            trace.record(rank, Track::Comm, "count exchange", t_ex);
        }
        let exchange = t_ex.elapsed();

        let mut by_expert = vec![Vec::new(); cfg.experts];
        for (slot, &e) in routing.ids.iter().enumerate() {
            by_expert[e as usize].push(slot / cfg.top_k);
        }
        let l0 = Layer0Schedule::new(&plan, rank, self.shape, &self.map);
        let l1 = Layer1Schedule::new(&plan, rank, self.shape, &self.map);
        let positions = plan.send_positions(rank, routing)?;
        let call = Call {
            rank,
            cfg,
            t: &self.t,
            bufs: &self.bufs,
            map: &self.map,
            shape: self.shape,
            epoch,
            start,
            deadline,
            chunk_out: (0..self.shape.chunks(cfg))
                .map(|_| Mutex::new(vec![f32::NAN; recv_rows * self.shape.chunk_cols]))
                .collect(),
            plan,
            l0,
            l1,
            x,
            by_expert,
            trace_on: opts.trace,
        };

        let (y, mut stats, worker_traces) = match mode {
            ExecMode::Fused => call.run_fused(
                &self.weights,
                &self.chunk_base,
                routing,
                &positions,
                opts,
                origin,
            )?,
            ExecMode::Baseline => {
                call.run_baseline(&self.weights, routing, &positions, opts, origin)?
            }
        };
        if mode == ExecMode::Fused {
            for (b, c) in self.chunk_base.iter_mut().zip(&call.l1.chunks) {
                *b += c.tiles as u64;
            }
        }
        trace.extend(worker_traces);
        stats.exchange = exchange;
        stats.total = start.elapsed();
        stats.rows_received = recv_rows;
        Ok(RankOutput { y, stats, trace })
    }
}

impl<T: Transport> Call<'_, T> {
    /// The fused call: a communication worker (dispatch, then each layer1
    /// chunk as it completes) beside the compute worker.
    fn run_fused(
        &self,
        weights: &ExpertWeights,
        chunk_base: &[u64],
        routing: &Routing,
        positions: &[usize],
        opts: &ExecOptions,
        origin: Instant,
    ) -> Result<(Vec<f32>, CallStats, Trace), SchedError> {
        std::thread::scope(|s| {
            let comm = s.spawn(|| -> Result<Trace, SchedError> {
                let mut tr = Trace::new(origin);
                self.dispatch(&mut tr)?;
                self.send_chunks(Some(chunk_base), &mut tr)?;
                Ok(tr)
            });
            let mut tr = Trace::new(origin);
            let computed = self.compute(weights, routing, positions, opts.fault, &mut tr);
            let comm = comm.join().map_err(|p| SchedError::Panicked {
                rank: self.rank,
                message: panic_text(p),
            })?;
            // A failed send makes the compute worker time out: report the send.
            let (comm, computed) = match (comm, computed) {
                (Err(e), Err(_)) => return Err(e),
                pair => pair,
            };
            let (y, stats) = computed?;
            let mut ctr = comm?;
            ctr.extend(tr);
            Ok((y, stats, ctr))
        })
    }

    /// The baseline call: the whole dispatch, then every tile, then the
    /// whole combine and the reduce.
    fn run_baseline(
        &self,
        weights: &ExpertWeights,
        routing: &Routing,
        positions: &[usize],
        opts: &ExecOptions,
        origin: Instant,
    ) -> Result<(Vec<f32>, CallStats, Trace), SchedError> {
        let mut tr = Trace::new(origin);
        let t0 = Instant::now();
        self.dispatch(&mut tr)?;
        self.wait_all_segments(&mut tr)?;
        let (y, mut stats) =
            self.compute_baseline(weights, routing, positions, opts.fault, &mut tr)?;
        stats.layer0 += t0.elapsed() - stats.layer0 - stats.layer1;
        Ok((y, stats, tr))
    }

    /// The transports' index of map signal `id`.
    fn sig(&self, id: SignalId) -> comet_transport::SignalId {
        self.map.wire(id).index()
    }

    /// Waits until the call's deadline at most; a timeout reports how long
    /// the call had been running, not only this last wait.
    fn wait(&self, id: SignalId, target: u64) -> Result<(), SchedError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.t.wait(self.sig(id), target, left) {
            Ok(_) => Ok(()),
            Err(TransportError::WaitTimeout {
                rank,
                signal,
                expected,
                observed,
                ..
            }) => Err(TransportError::WaitTimeout {
                rank,
                signal,
                expected,
                observed,
                waited: self.start.elapsed(),
            }
            .into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Layer0 communication: every segment to its final rows, ring order.
    fn dispatch(&self, tr: &mut Trace) -> Result<(), SchedError> {
        let (w, h) = (self.cfg.ranks, self.cfg.hidden);
        for i in 0..w {
            let dst = ring_dest(self.rank, i, w);
            let t0 = Instant::now();
            let mut any = false;
            for le in 0..self.cfg.experts_per_rank() {
                let seg = self.plan.recv[dst].segment(le, self.rank, w);
                if seg.rows == 0 {
                    continue;
                }
                let tokens = &self.by_expert[self.cfg.global_expert(dst, le)];
                let mut staging = Vec::with_capacity(tokens.len() * h);
                for &t in tokens {
                    staging.extend_from_slice(&self.x[t * h..(t + 1) * h]);
                }
                self.t
                    .put(dst, self.bufs.recv, seg.row * h * 4, &as_bytes(&staging))?;
                self.t.signal(
                    dst,
                    self.sig(self.map.dispatch(le, self.rank)),
                    SignalOp::Set(self.epoch),
                )?;
                any = true;
            }
            if self.trace_on && any {
                tr.record(self.rank, Track::Comm, format!("dispatch -> {dst}"), t0);
            }
        }
        Ok(())
    }

    /// Layer1 communication: each chunk leaves once its tiles are done
    /// (`chunk_base` given: fused mode, wait on the local counters).
    fn send_chunks(&self, chunk_base: Option<&[u64]>, tr: &mut Trace) -> Result<(), SchedError> {
        for chunk in &self.l1.chunks {
            if let Some(base) = chunk_base {
                self.wait(chunk.done_signal, base[chunk.index] + chunk.tiles as u64)?;
            }
            let t0 = Instant::now();
            let out = self.chunk_out[chunk.index % self.chunk_out.len()]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for s in &chunk.sends {
                let rows_sent = self.plan.rows_sent(s.dst);
                let offset = chunk.col * rows_sent + s.dst_pos * chunk.cols;
                let data = &out[s.row * chunk.cols..(s.row + s.rows) * chunk.cols];
                self.t
                    .put(s.dst, self.bufs.combine, offset * 4, &as_bytes(data))?;
            }
            drop(out);
            for &(dst, sig) in &chunk.raises {
                self.t
                    .signal(dst, self.sig(sig), SignalOp::Set(self.epoch))?;
            }
            if self.trace_on && !chunk.sends.is_empty() {
                tr.record(
                    self.rank,
                    Track::Comm,
                    format!("combine chunk {}", chunk.index),
                    t0,
                );
            }
        }
        Ok(())
    }

    fn wait_all_segments(&self, tr: &mut Trace) -> Result<(), SchedError> {
        let t0 = Instant::now();
        for seg in self.plan.recv[self.rank]
            .segments
            .iter()
            .filter(|s| s.rows > 0)
        {
            self.wait(self.map.dispatch(seg.expert, seg.src), self.epoch)?;
        }
        if self.trace_on {
            tr.record(self.rank, Track::Comm, "wait dispatch", t0);
        }
        Ok(())
    }

    fn fc1_tile(
        &self,
        weights: &ExpertWeights,
        expert: usize,
        row: usize,
        rows: usize,
        act: &mut [f32],
    ) -> Result<(), SchedError> {
        let (h, f) = (self.cfg.hidden, self.cfg.ffn);
        let mut raw = vec![0u8; rows * h * 4];
        self.t.read(self.bufs.recv, row * h * 4, &mut raw)?;
        fc1_swiglu(
            &from_bytes(&raw),
            &weights.fc1[expert],
            h,
            f,
            &mut act[row * f..(row + rows) * f],
        );
        Ok(())
    }

    fn fc2_tile(&self, weights: &ExpertWeights, act: &[f32], t: &comet_core::schedule::Layer1Tile) {
        let (h, f) = (self.cfg.hidden, self.cfg.ffn);
        let mut out = vec![0f32; t.rows * t.cols];
        fc2_cols(
            &act[t.row * f..(t.row + t.rows) * f],
            &weights.fc2[t.expert],
            f,
            h,
            t.col,
            t.cols,
            &mut out,
        );
        let mut buf = self.chunk_out[t.chunk % self.chunk_out.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        buf[t.row * t.cols..(t.row + t.rows) * t.cols].copy_from_slice(&out);
    }

    /// The fused compute worker: layer0 tiles behind their signals, layer1
    /// tiles raising chunk counters, then the chunk-by-chunk reduce.
    fn compute(
        &self,
        weights: &ExpertWeights,
        routing: &Routing,
        positions: &[usize],
        fault: Option<Fault>,
        tr: &mut Trace,
    ) -> Result<(Vec<f32>, CallStats), SchedError> {
        let mut stats = CallStats::default();
        let f = self.cfg.ffn;
        let total_rows = self.plan.recv[self.rank].total_rows;
        let mut act = vec![f32::NAN; total_rows * f];
        let (shape, nchunks) = (self.shape, self.shape.chunks(self.cfg));
        let t1 = Instant::now();
        for g in 0..shape.groups {
            let t0 = Instant::now();
            let group = self
                .l0
                .tiles
                .iter()
                .filter(|t| shape.group_of(self.cfg, t.expert) == g);
            for tile in group {
                if fault != Some(Fault::DropLayer0Deps) {
                    let tw = Instant::now();
                    for &d in &tile.deps {
                        self.wait(d, self.epoch)?;
                    }
                    stats.waiting += tw.elapsed();
                }
                let ts = Instant::now();
                self.fc1_tile(weights, tile.expert, tile.row, tile.rows, &mut act)?;
                if self.trace_on {
                    tr.record(
                        self.rank,
                        Track::Compute,
                        format!("fc1 e{} r{}+{}", tile.expert, tile.row, tile.rows),
                        ts,
                    );
                }
            }
            stats.layer0 += t0.elapsed();
            let group = self.l1.tiles.iter().filter(|t| t.chunk / nchunks == g);
            self.fc2_tiles(weights, &act, group, tr)?;
        }
        let y = self.reduce(routing, positions, fault, &mut stats, tr)?;
        stats.layer1 = t1.elapsed() - stats.layer0;
        Ok((y, stats))
    }

    /// FC2 tiles, each adding one to its piece's counter.
    fn fc2_tiles<'t>(
        &self,
        weights: &ExpertWeights,
        act: &[f32],
        tiles: impl Iterator<Item = &'t comet_core::schedule::Layer1Tile>,
        tr: &mut Trace,
    ) -> Result<(), SchedError> {
        for tile in tiles {
            let ts = Instant::now();
            self.fc2_tile(weights, act, tile);
            self.t.signal(
                self.rank,
                self.sig(self.map.chunk_done(tile.chunk)),
                SignalOp::Add(1),
            )?;
            if self.trace_on {
                tr.record(
                    self.rank,
                    Track::Compute,
                    format!(
                        "fc2 c{} e{} r{}+{}",
                        tile.chunk, tile.expert, tile.row, tile.rows
                    ),
                    ts,
                );
            }
        }
        Ok(())
    }

    /// The baseline: all data is present; compute everything, then send
    /// everything, then reduce.
    fn compute_baseline(
        &self,
        weights: &ExpertWeights,
        routing: &Routing,
        positions: &[usize],
        fault: Option<Fault>,
        tr: &mut Trace,
    ) -> Result<(Vec<f32>, CallStats), SchedError> {
        let mut stats = CallStats::default();
        let f = self.cfg.ffn;
        let layout = &self.plan.recv[self.rank];
        let mut act = vec![f32::NAN; layout.total_rows * f];
        let t0 = Instant::now();
        for le in 0..self.cfg.experts_per_rank() {
            if layout.expert_rows[le] > 0 {
                self.fc1_tile(
                    weights,
                    le,
                    layout.expert_row[le],
                    layout.expert_rows[le],
                    &mut act,
                )?;
            }
        }
        if self.trace_on {
            tr.record(self.rank, Track::Compute, "fc1 (all experts)", t0);
        }
        stats.layer0 = t0.elapsed();
        let t1 = Instant::now();
        let ts = Instant::now();
        for tile in &self.l1.tiles {
            self.fc2_tile(weights, &act, tile);
        }
        if self.trace_on {
            tr.record(self.rank, Track::Compute, "fc2 (all experts)", ts);
        }
        self.send_chunks(None, tr)?;
        let y = self.reduce(routing, positions, fault, &mut stats, tr)?;
        stats.layer1 = t1.elapsed();
        Ok((y, stats))
    }

    /// Weighted top-k sum, column chunk by column chunk as the combine
    /// signals of every expert group's piece of it arrive.
    fn reduce(
        &self,
        routing: &Routing,
        positions: &[usize],
        fault: Option<Fault>,
        stats: &mut CallStats,
        tr: &mut Trace,
    ) -> Result<Vec<f32>, SchedError> {
        let (h, k) = (self.cfg.hidden, self.cfg.top_k);
        let rows_sent = self.plan.rows_sent(self.rank);
        let mut y = vec![0f32; routing.tokens * h];
        if rows_sent == 0 {
            return Ok(y);
        }
        let nchunks = self.shape.chunks(self.cfg);
        for chunk in &self.l1.chunks[..nchunks.min(self.l1.chunks.len())] {
            if fault != Some(Fault::SkipCombineWaits) {
                let tw = Instant::now();
                for g in 0..self.shape.groups {
                    let piece = g * nchunks + chunk.index;
                    for sig in combine_waits(&self.plan, self.rank, piece, self.map) {
                        self.wait(sig, self.epoch)?;
                    }
                }
                stats.waiting += tw.elapsed();
            }
            let ts = Instant::now();
            let mut raw = vec![0u8; rows_sent * chunk.cols * 4];
            self.t
                .read(self.bufs.combine, chunk.col * rows_sent * 4, &mut raw)?;
            let region = from_bytes(&raw);
            for t in 0..routing.tokens {
                let yrow = &mut y[t * h + chunk.col..t * h + chunk.col + chunk.cols];
                for j in 0..k {
                    let w = routing.weights[t * k + j];
                    let p = positions[t * k + j];
                    for (o, &v) in yrow
                        .iter_mut()
                        .zip(&region[p * chunk.cols..(p + 1) * chunk.cols])
                    {
                        *o += w * v;
                    }
                }
            }
            if self.trace_on {
                tr.record(
                    self.rank,
                    Track::Compute,
                    format!("reduce chunk {}", chunk.index),
                    ts,
                );
            }
        }
        Ok(y)
    }
}

/// W ranks of the CPU executor as threads of this process over the local transport.
pub struct CpuWorld {
    pub cfg: MoeConfig,
    ranks: Vec<CpuRank<LocalTransport>>,
    origin: Instant,
}

/// What every rank feeds into one call.
#[derive(Debug, Clone)]
pub struct RankInput {
    pub x: Vec<f32>,
    pub routing: Routing,
}

impl CpuWorld {
    pub fn new(
        cfg: &MoeConfig,
        max_tokens: usize,
        shape: TileShape,
        delay: Option<DelayModel>,
        weight_seed: u64,
        timeout: Duration,
    ) -> Result<CpuWorld, SchedError> {
        CpuWorld::with_link(cfg, max_tokens, shape, delay, None, weight_seed, timeout)
    }

    /// Like [`CpuWorld::new`], with transfers between ranks paced by an
    /// emulated link, so that overlap has something to hide on a CPU.
    pub fn with_link(
        cfg: &MoeConfig,
        max_tokens: usize,
        shape: TileShape,
        delay: Option<DelayModel>,
        link: Option<LinkModel>,
        weight_seed: u64,
        timeout: Duration,
    ) -> Result<CpuWorld, SchedError> {
        cfg.validate()?;
        shape.validate(cfg)?;
        let transports = local_world_with_link(cfg.ranks, delay, link);
        let ranks = build_ranks(transports, |r, t| {
            let w = ExpertWeights::for_rank(cfg, r, weight_seed);
            CpuRank::new(cfg, t, w, max_tokens, shape, timeout)
        })?;
        Ok(CpuWorld {
            cfg: cfg.clone(),
            ranks,
            origin: Instant::now(),
        })
    }

    pub fn rank(&self, r: usize) -> &CpuRank<LocalTransport> {
        &self.ranks[r]
    }

    /// One call on every rank; the first error of any rank is returned.
    pub fn run(
        &mut self,
        inputs: &[RankInput],
        mode: ExecMode,
        opts: &ExecOptions,
    ) -> Result<Vec<RankOutput>, SchedError> {
        let caps: Vec<usize> = self.ranks.iter().map(|r| r.max_tokens).collect();
        check_inputs(&self.cfg, inputs, &caps)?;
        let origin = self.origin;
        run_ranks(&mut self.ranks, inputs, |rank, inp| {
            rank.call(&inp.x, &inp.routing, mode, opts, origin)
        })
    }
}
