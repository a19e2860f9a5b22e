//! A benchmark, not a test: the staged proxy's two wire formats
//! (`WireFormat::Tokens`, token-once both ways, against `Rows`) over a real link, two processes
//! over UCX (TCP, then shared memory), on a Qwen2-57B-A14B-shaped layer
//! (hidden 3584, 64 experts, top-8, 2048 tokens per rank). Everything a
//! call sends is ready before it starts, so a call's time is the proxy's
//! own: copies out of the "mirrors", puts, landings (each landed byte
//! copied once, as from a registered inbox). Host memory stands in for
//! the GPU, so copies that would cross PCIe are memcpys here: the GPU
//! figure is `scripts/device-checks.sh wire`. Run it with
//!   cargo test --release -p comet-sched --features ucx --test staged_wire \
//!     -- --ignored --nocapture wire_bench
#![cfg(feature = "ucx")]

mod common;

use comet_core::layout::LayoutPlan;
use comet_core::{Dtype, MoeConfig};
use comet_sched::proxy_plan::{Buf, Geometry, Region, TokenPlace, WireFormat};
use comet_sched::staged::{SendOrder, SlotRows, Source, StagedDevice, StagedProxy, Ticket};
use comet_sched::SchedError;
use comet_transport::launch::OnFailure;
use comet_transport::ucx::UcxTransport;
use comet_transport::{BufferId, Transport};
use common::{launch_world, marker, text};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};

const HIDDEN: usize = 3584;
const EXPERTS: usize = 64;
const TOP_K: usize = 8;
const TOKENS: usize = 2048;
const CHUNKS: usize = 4;
const CALLS: usize = 8;
const T: Duration = Duration::from_secs(60);

/// One rank whose kernels finished everything before the call: mirrors
/// written, every ready word up. It lands as a GPU with a registered inbox
/// does: every landed byte read once from the inbox, token-once pieces
/// expanded straight from it.
struct Prefilled<'t> {
    t: &'t dyn Transport,
    inbox: [BufferId; 3],
    mirror: [Vec<u8>; 3],
    send: [Vec<u8>; 3],
    landing: [Vec<u8>; 3],
    own: [Vec<u8>; 3],
    order: SendOrder,
}

fn copy_2d(r: Region, from: &[u8], packed: bool, to: &mut [u8]) {
    for row in 0..r.rows {
        let (dev, wire) = (r.offset + row * r.pitch, row * r.width);
        if packed {
            to[wire..wire + r.width].copy_from_slice(&from[dev..dev + r.width]);
        } else {
            to[dev..dev + r.width].copy_from_slice(&from[wire..wire + r.width]);
        }
    }
}

impl StagedDevice for Prefilled<'_> {
    fn ready(&self, _: usize, _: usize) -> u64 {
        u64::MAX
    }

    fn download(&mut self, _: usize, region: Region, wire: usize) -> Result<Ticket, SchedError> {
        let b = region.buf.index();
        let n = region.bytes();
        copy_2d(
            region,
            &self.mirror[b],
            true,
            &mut self.send[b][wire..wire + n],
        );
        Ok(0)
    }

    fn download_tokens(
        &mut self,
        _: usize,
        region: Region,
        at: usize,
        rows: &[u32],
    ) -> Result<Ticket, SchedError> {
        let rb = 2 * HIDDEN;
        for (i, &r) in rows.iter().enumerate() {
            let from = region.offset + r as usize * rb;
            let to = at + i * rb;
            self.send[1][to..to + rb].copy_from_slice(&self.mirror[1][from..from + rb]);
        }
        Ok(0)
    }

    fn downloaded(&mut self, _: Ticket) -> Result<bool, SchedError> {
        Ok(true)
    }

    fn sent_bytes(&self, _: usize, buf: Buf, wire: usize, len: usize) -> &[u8] {
        &self.send[buf.index()][wire..wire + len]
    }

    fn landing_bytes(&mut self, buf: Buf, wire: usize, len: usize) -> &mut [u8] {
        &mut self.landing[buf.index()][wire..wire + len]
    }

    fn lands_from_inbox(&self, _: Buf) -> bool {
        true
    }

    fn land(
        &mut self,
        region: Region,
        wire: usize,
        from: Source,
        _: usize,
        _: u64,
    ) -> Result<(), SchedError> {
        let b = region.buf.index();
        let n = region.bytes();
        if region.rows == 1 && from == Source::Inbox {
            // One copy of each landed byte, as a GPU's from the inbox.
            let at = region.offset;
            return Ok(self
                .t
                .read(self.inbox[b], wire, &mut self.own[b][at..at + n])?);
        }
        let mut packed = vec![0u8; n];
        match from {
            Source::Inbox => self.t.read(self.inbox[b], wire, &mut packed)?,
            Source::Image => packed.copy_from_slice(&self.landing[b][wire..wire + n]),
        }
        copy_2d(region, &packed, false, &mut self.own[b]);
        Ok(())
    }

    fn token_kernels(&self) -> bool {
        true
    }

    fn land_tokens(
        &mut self,
        region: Region,
        place: TokenPlace,
        _: std::ops::Range<usize>,
        _: usize,
        _: u64,
    ) -> Result<(), SchedError> {
        let rb = 2 * HIDDEN;
        let n = region.bytes() / rb;
        let mut index = vec![0u8; 4 * n];
        self.t.read(self.inbox[1], place.index, &mut index)?;
        for (r, slot) in index.chunks_exact(4).enumerate() {
            let s = u32::from_le_bytes([slot[0], slot[1], slot[2], slot[3]]) as usize;
            let at = region.offset + r * rb;
            self.t.read(
                self.inbox[1],
                place.tokens + s * rb,
                &mut self.own[1][at..at + rb],
            )?;
        }
        Ok(())
    }

    /// What the GPU's sum kernel does, here on the proxy's thread.
    fn download_sums(
        &mut self,
        _: usize,
        region: Region,
        wire: usize,
        sums: SlotRows<'_>,
    ) -> Result<Ticket, SchedError> {
        let (w, cols) = (region.width, region.width / 2);
        let mut acc = vec![0f32; cols];
        for s in 0..sums.slots {
            acc.fill(0.0);
            for &r in &sums.rows[sums.starts[s] as usize..sums.starts[s + 1] as usize] {
                let at = region.offset + r as usize * region.pitch;
                let row = &self.mirror[2][at..at + w];
                let a = sums.ratio[r as usize];
                for (x, b) in acc.iter_mut().zip(row.chunks_exact(2)) {
                    *x += a * f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
                }
            }
            let out = &mut self.send[2][wire + s * w..wire + (s + 1) * w];
            for (o, &x) in out.chunks_exact_mut(2).zip(&acc) {
                o.copy_from_slice(&((x.to_bits() >> 16) as u16).to_le_bytes());
            }
        }
        Ok(0)
    }

    /// What the GPU's expand kernel does with arrived sums: one copy of
    /// each, zeros elsewhere.
    fn land_sums(
        &mut self,
        _: usize,
        _: u64,
        region: Region,
        wire: usize,
        index: &[u32],
        _: usize,
        _: u64,
    ) -> Result<(), SchedError> {
        for (r, &s) in index.iter().enumerate() {
            let at = region.offset + r * region.pitch;
            let row = &mut self.own[2][at..at + region.width];
            match s {
                u32::MAX => row.fill(0),
                s => self
                    .t
                    .read(self.inbox[2], wire + s as usize * region.width, row)?,
            }
        }
        Ok(())
    }

    fn send_order(&mut self, rows: usize) -> Result<SendOrder, SchedError> {
        let n = rows.min(self.order.slots.len());
        Ok(SendOrder {
            slots: self.order.slots[..n].to_vec(),
            weights: self.order.weights[..n].to_vec(),
        })
    }

    fn end_call(&mut self) -> Result<(), SchedError> {
        Ok(())
    }
}

fn geometry(w: usize) -> (MoeConfig, Geometry) {
    let cfg = MoeConfig {
        hidden: HIDDEN,
        ffn: 2560,
        experts: EXPERTS,
        top_k: TOP_K,
        ranks: w,
        dtype: Dtype::Bf16,
    };
    let rows = TOKENS * TOP_K;
    let g = Geometry {
        ranks: w,
        experts: EXPERTS,
        row_bytes: 2 * HIDDEN,
        chunks: CHUNKS,
        chunk_bytes: 2 * HIDDEN / CHUNKS,
        groups: 1,
        recv_rows: w * rows,
        send_rows: rows,
        top_k: TOP_K,
    };
    (cfg, g)
}

/// Uniform routing: every expert gets the same rows; row `j` of token `t`
/// is the `(t + j * TOKENS)`-th row in expert order, so a token's experts
/// are spread evenly (4 on each of 2 ranks). Segments are shuffled, as the
/// device's atomics leave them. Returns the count row and the send order.
fn routing(seed: u64) -> (Vec<u32>, Vec<u32>) {
    let per = TOKENS * TOP_K / EXPERTS;
    let mut slots = vec![0u32; TOKENS * TOP_K];
    for t in 0..TOKENS {
        for j in 0..TOP_K {
            slots[t + j * TOKENS] = (t * TOP_K + j) as u32;
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for seg in slots.chunks_mut(per) {
        seg.shuffle(&mut rng);
    }
    (vec![per as u32; EXPERTS], slots)
}

/// One rank: the proxy with each wire format in turn, `CALLS` calls each
/// after one warm-up, twice over; rank 0 prints the medians.
fn bench_rank(t: &UcxTransport, label: &str) -> Result<(), SchedError> {
    let (cfg, g) = geometry(t.world());
    let me = t.rank();
    let inbox = StagedProxy::allocate(t, g, T)?;
    let (row, order) = routing(me as u64);
    let rows: Vec<Vec<usize>> = (0..g.ranks)
        .map(|_| row.iter().map(|&c| c as usize).collect())
        .collect();
    LayoutPlan::new(&cfg, rows)?;
    let image = || Buf::ALL.map(|b| vec![0u8; g.bytes(b)]);
    let mut dev = Prefilled {
        t,
        inbox,
        mirror: image(),
        send: image(),
        landing: image(),
        own: image(),
        order: SendOrder {
            weights: vec![1.0 / TOP_K as f32; order.len()],
            slots: order,
        },
    };
    // The count row at both epoch slots of the mirror (one peer's image
    // stands for every peer's: the bench sends the same rows to each).
    let counts: Vec<u8> = row.iter().flat_map(|c| c.to_le_bytes()).collect();
    for epoch in [1, 2] {
        for to in (0..g.ranks).filter(|&r| r != me) {
            let off = g.counts_piece(me, to, epoch).region.offset;
            dev.mirror[0][off..off + counts.len()].copy_from_slice(&counts);
        }
    }
    let mut proxies = [WireFormat::Tokens, WireFormat::Rows].map(|w| {
        StagedProxy::new(t, g, inbox, T, w).map(|p| (w, p, Vec::new(), 0usize, Vec::new()))
    });
    let mut epoch = 0;
    for _ in 0..2 {
        for p in proxies.iter_mut() {
            let (_, proxy, times, bytes, split) = p.as_mut().map_err(|e| SchedError::Input {
                rank: me,
                message: e.to_string(),
            })?;
            for i in 0..=CALLS {
                epoch += 1;
                let start = Instant::now();
                let stats = proxy.call(&mut dev, epoch)?;
                if i > 0 {
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                    *bytes = stats.bytes_sent;
                    let ms = |d: Duration| d.as_secs_f64() * 1e3;
                    split.push((ms(stats.on_wire), ms(stats.landing)));
                }
            }
        }
    }
    t.barrier(T)?;
    if me == 0 {
        let mut med = Vec::new();
        for p in proxies.iter_mut().flatten() {
            let (wire, _, times, bytes, split) = p;
            times.sort_by(f64::total_cmp);
            let m = times[times.len() / 2];
            med.push(m);
            let mut on_wire: Vec<f64> = split.iter().map(|s| s.0).collect();
            let mut landing: Vec<f64> = split.iter().map(|s| s.1).collect();
            on_wire.sort_by(f64::total_cmp);
            landing.sort_by(f64::total_cmp);
            println!(
                "| {label} | {wire:?} | {m:.1} | {:.1} | {:.1} | {:.1} |",
                on_wire[on_wire.len() / 2],
                landing[landing.len() / 2],
                *bytes as f64 / (1 << 20) as f64
            );
        }
        println!(
            "| {label} | rows / tokens | {:.2}x | | | |",
            med[1] / med[0]
        );
    }
    Ok(())
}

/// One rank (inert unless the launcher set `COMET_TEST_SCENARIO`).
#[test]
#[ignore = "a rank of the benchmark, started by wire_bench"]
fn wire_rank() {
    let Ok(scenario) = std::env::var("COMET_TEST_SCENARIO") else {
        return;
    };
    let t = UcxTransport::from_env().expect("ucx transport");
    bench_rank(&t, &scenario).unwrap_or_else(|e| panic!("rank {}: {e}", t.rank()));
    println!("{}", marker(t.rank(), &scenario));
}

#[test]
#[ignore = "a benchmark: run it by name, in release"]
fn wire_bench() {
    println!(
        "| link | wire | median call ms | of it in sends (sums, puts, signals) | in landings | MiB sent per call |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    for tls in ["tcp", "sm,self"] {
        let rep = launch_world(
            "wire_rank",
            tls,
            2,
            tls,
            OnFailure::KillAll,
            Duration::from_secs(600),
        )
        .unwrap_or_else(|e| panic!("{tls}: {e}"));
        let out = text(&rep);
        assert!(
            rep.ranks
                .iter()
                .all(|r| r.text().contains(&marker(r.rank, tls))),
            "{tls}: {out}"
        );
        // A row may follow the harness's "test wire_rank ... " on its line.
        for line in rep.ranks[0]
            .text()
            .lines()
            .filter_map(|l| l.find("| ").map(|i| &l[i..]))
        {
            println!("{line}");
        }
    }
}
