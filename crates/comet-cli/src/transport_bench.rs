//! `comet bench transport`: bandwidth and latency of each transport per
//! message size, side by side in one run with a plain baseline.
//!
//! Each transport has one function returning [`Measurement`]s for the
//! sizes asked for; `run` calls those that were selected and prints one
//! table, every row next to the baseline of its memory kind at the same
//! size (CPU rows: a plain TCP socket copy over loopback). GPU transports
//! add their own function and rows the same way.
//!
//! What is measured, between two ranks of one process (one thread each):
//! - bandwidth: rank 0 streams `iters` messages to rank 1, each a put
//!   followed by its signal (the protocol a layer uses per chunk); rank 1
//!   waits for the last signal and acknowledges; bytes / elapsed.
//! - latency: ping-pong of one message (put + signal) each way; half the
//!   round trip.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use comet_transport::{SignalOp, Transport};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const WAIT: Duration = Duration::from_secs(120);

#[derive(Args, Debug, Clone)]
pub struct TransportBenchArgs {
    /// Transports to measure, comma-separated: tcp (baseline), local, ucx,
    /// ucx-procs (UCX between two processes), nvlink (GPU; rows next to the
    /// driver's own device copy), nccl (two GPUs).
    #[arg(long, value_delimiter = ',', default_values_t = default_transports())]
    pub transports: Vec<String>,
    /// Message sizes (4K, 1M, ...), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = default_sizes())]
    pub sizes: Vec<String>,
    /// UCX transport selections (UCX_TLS values) to measure, comma-separated
    /// groups separated by `;`, e.g. `sm,self;tcp` (the default). Needs a
    /// build with `--features ucx` and the ucx or ucx-procs transport.
    #[arg(long)]
    pub ucx_tls: Option<String>,
    /// Bytes each bandwidth measurement streams (the iteration count
    /// follows from it, within [10, 4000]).
    #[arg(long, default_value = "256M")]
    pub volume: String,
    /// Print the table as Markdown (for docs/PERF.md).
    #[arg(long)]
    pub markdown: bool,
    /// Internal: run as one rank of `ucx-procs` with this UCX_TLS.
    #[arg(long, hide = true, value_name = "UCX_TLS")]
    pub rank_worker: Option<String>,
}

fn default_transports() -> Vec<String> {
    let mut v = vec!["tcp".to_string(), "local".to_string()];
    if cfg!(feature = "ucx") {
        v.push("ucx".into());
        v.push("ucx-procs".into());
    }
    if cfg!(feature = "nvlink") {
        v.push("nvlink".into());
    }
    v
}

fn default_sizes() -> Vec<String> {
    ["4K", "16K", "64K", "256K", "1M", "4M", "16M", "64M"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// One row: a transport at one message size.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// Transport name, with its variant (e.g. `ucx[tcp]`).
    pub transport: String,
    /// Whether it moves host memory (compared with the TCP baseline) or
    /// device memory (compared with a device copy baseline).
    pub device: bool,
    /// Whether this row is the baseline of its memory kind.
    pub baseline: bool,
    pub bytes: usize,
    /// One direction, bytes per second / 1e9.
    pub gbps: f64,
    /// One way, microseconds.
    pub latency_us: f64,
    pub iters: usize,
}

/// Parses `4K`, `1M`, `64MiB`, `4096`.
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim().to_ascii_uppercase();
    let t = t.trim_end_matches("IB").trim_end_matches('B');
    let (num, mult) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], KIB),
        Some('M') => (&t[..t.len() - 1], MIB),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: usize = num
        .parse()
        .map_err(|_| anyhow!("bad size {s:?} (want e.g. 4K, 1M, 4096)"))?;
    if n == 0 {
        bail!("size {s:?} is zero");
    }
    n.checked_mul(mult)
        .ok_or_else(|| anyhow!("size {s:?} overflows"))
}

fn human(bytes: usize) -> String {
    if bytes >= MIB && bytes & (MIB - 1) == 0 {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= KIB && bytes & (KIB - 1) == 0 {
        format!("{} KiB", bytes / KIB)
    } else {
        format!("{bytes} B")
    }
}

/// How many messages of `size` make up `volume` bytes, within bounds.
fn iters_for(size: usize, volume: usize) -> usize {
    (volume / size).clamp(10, 4000)
}

fn lat_iters_for(size: usize) -> usize {
    ((16 * MIB) / size).clamp(5, 1000)
}

/// Bandwidth and latency of `size`-byte messages between ranks 0 and 1 of
/// any [`Transport`] (one thread per rank). `pair` holds the two ranks.
pub fn measure_pair<T: Transport>(
    name: &str,
    pair: &[T],
    sizes: &[usize],
    volume: usize,
) -> Result<Vec<Measurement>> {
    if pair.len() != 2 {
        bail!("{name}: a pair of ranks is needed, got {}", pair.len());
    }
    let max = sizes.iter().copied().max().unwrap_or(0);
    let results = std::thread::scope(|s| {
        let hs: Vec<_> = pair
            .iter()
            .map(|t| {
                s.spawn(move || -> Result<Vec<(usize, f64, f64, usize)>> {
                    pair_rank(t, sizes, max, volume)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow!("{name}: a rank thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(results[0]
        .iter()
        .map(|&(bytes, gbps, latency_us, iters)| Measurement {
            transport: name.to_string(),
            device: false,
            baseline: false,
            bytes,
            gbps,
            latency_us,
            iters,
        })
        .collect())
}

/// One rank's side of [`measure_pair`]; rank 0 returns the measurements.
fn pair_rank(
    t: &dyn Transport,
    sizes: &[usize],
    max: usize,
    volume: usize,
) -> Result<Vec<(usize, f64, f64, usize)>> {
    let me = t.rank();
    let peer = 1 - me;
    // Signals: 0 data arrived (epoch), 1 acknowledged (epoch); epochs only grow.
    let buf = t.alloc_buffer(max)?;
    t.alloc_signals(2)?;
    let data = vec![0x5au8; max];
    t.barrier(WAIT)?;
    let mut epoch = 0u64;
    let mut out = Vec::new();
    for &size in sizes {
        // Bandwidth: a stream of put + signal, one acknowledgement at the end.
        let iters = iters_for(size, volume);
        t.barrier(WAIT)?;
        let start = Instant::now();
        if me == 0 {
            for _ in 0..iters {
                epoch += 1;
                t.put(peer, buf, 0, &data[..size])?;
                t.signal(peer, 0, SignalOp::Set(epoch))?;
            }
            t.wait(1, epoch, WAIT)?;
        } else {
            epoch += iters as u64;
            t.wait(0, epoch, WAIT)?;
            t.signal(peer, 1, SignalOp::Set(epoch))?;
        }
        let bw_time = start.elapsed().as_secs_f64();
        // Latency: ping-pong.
        let lat_iters = lat_iters_for(size);
        t.barrier(WAIT)?;
        let start = Instant::now();
        for _ in 0..lat_iters {
            epoch += 1;
            if me == 0 {
                t.put(peer, buf, 0, &data[..size])?;
                t.signal(peer, 0, SignalOp::Set(epoch))?;
                t.wait(0, epoch, WAIT)?;
            } else {
                t.wait(0, epoch, WAIT)?;
                t.put(peer, buf, 0, &data[..size])?;
                t.signal(peer, 0, SignalOp::Set(epoch))?;
            }
        }
        let lat = start.elapsed().as_secs_f64() / lat_iters as f64 / 2.0;
        out.push((
            size,
            (iters * size) as f64 / bw_time / 1e9,
            lat * 1e6,
            iters,
        ));
    }
    t.barrier(WAIT)?;
    Ok(out)
}

/// The CPU baseline: a plain TCP socket over loopback, same traffic shape
/// (a stream with one acknowledgement, and a ping-pong).
pub fn bench_tcp(sizes: &[usize], volume: usize) -> Result<Vec<Measurement>> {
    let l = TcpListener::bind("127.0.0.1:0").context("tcp baseline: bind")?;
    let addr = l.local_addr()?;
    let max = sizes.iter().copied().max().unwrap_or(0);
    let sizes2 = sizes.to_vec();
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; max];
        for size in sizes2 {
            let iters = iters_for(size, volume);
            for _ in 0..iters {
                s.read_exact(&mut buf[..size])?;
            }
            s.write_all(&[1])?;
            for _ in 0..lat_iters_for(size) {
                s.read_exact(&mut buf[..size])?;
                s.write_all(&buf[..size])?;
            }
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr).context("tcp baseline: connect")?;
    s.set_nodelay(true)?;
    let data = vec![0x5au8; max];
    let mut back = vec![0u8; max];
    let mut out = Vec::new();
    for &size in sizes {
        let iters = iters_for(size, volume);
        let start = Instant::now();
        for _ in 0..iters {
            s.write_all(&data[..size])?;
        }
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack)?;
        let bw_time = start.elapsed().as_secs_f64();
        let lat_iters = lat_iters_for(size);
        let start = Instant::now();
        for _ in 0..lat_iters {
            s.write_all(&data[..size])?;
            s.read_exact(&mut back[..size])?;
        }
        let lat = start.elapsed().as_secs_f64() / lat_iters as f64 / 2.0;
        out.push(Measurement {
            transport: "tcp copy (baseline)".into(),
            device: false,
            baseline: true,
            bytes: size,
            gbps: (iters * size) as f64 / bw_time / 1e9,
            latency_us: lat * 1e6,
            iters,
        });
    }
    server
        .join()
        .map_err(|_| anyhow!("tcp baseline: server thread panicked"))??;
    Ok(out)
}

/// The `local` transport (threads, no delays).
pub fn bench_local(sizes: &[usize], volume: usize) -> Result<Vec<Measurement>> {
    let pair = comet_transport::local::local_world(2, None);
    measure_pair("local", &pair, sizes, volume)
}

/// UCX with `UCX_TLS=tls`: two workers in this process, bootstrapped over
/// loopback, moving data through whatever that selection allows.
#[cfg(feature = "ucx")]
pub fn bench_ucx(tls: &str, sizes: &[usize], volume: usize) -> Result<Vec<Measurement>> {
    use comet_transport::ucx::{UcxConfig, UcxTransport};
    // UCX reads its configuration from the environment when a context is
    // created; no other thread runs at this point.
    std::env::set_var("UCX_TLS", tls);
    let cfg = UcxConfig {
        peer_errors: Some(tls.contains("tcp")),
        ..UcxConfig::default()
    };
    let pair = UcxTransport::in_process(2, cfg)?;
    measure_pair(&format!("ucx[{tls}]"), &pair, sizes, volume)
}

/// The `nvlink` transport between two ranks of this process (devices 0
/// and 1, or both on device 0 when there is one GPU), next to the plain
/// driver copy of the same bytes (`cuMemcpyDtoD` on one GPU, where no link
/// is measured; `cuMemcpyPeer` between two). Bandwidth: back-to-back put +
/// signal on the communication stream, timed with device events; latency:
/// device time of one put + signal (the host-observed time is in
/// `comet_transport::nvlink::bench`'s own report). No GPU: no rows.
#[cfg(feature = "nvlink")]
pub fn bench_nvlink(sizes: &[usize]) -> Result<Vec<Measurement>> {
    use comet_transport::{cuda, nvlink::bench};
    if !cuda::gpu_available() {
        eprintln!("nvlink: no CUDA device, no rows");
        return Ok(Vec::new());
    }
    let ordinals = if cuda::device_count() >= 2 {
        [0, 1]
    } else {
        [0, 0]
    };
    let r = bench::run(ordinals, sizes)?;
    for n in &r.notes {
        eprintln!("nvlink on {}: {n}", r.device);
    }
    Ok(r.rows
        .iter()
        .map(|row| Measurement {
            transport: row.method.clone(),
            device: true,
            baseline: !row.method.starts_with("nvlink"),
            bytes: row.bytes,
            gbps: row.gb_per_s,
            latency_us: row.device_us,
            iters: 0,
        })
        .collect())
}

/// The `nccl` transport between two GPUs of this process: one chunk per
/// step (an NCCL group of one send and one recv), the receiver's signal
/// raised on its stream after the recv. Latency: device time of one step
/// on the sender. Needs two GPUs; with fewer, no rows.
#[cfg(feature = "nccl")]
pub fn bench_nccl(sizes: &[usize]) -> Result<Vec<Measurement>> {
    use comet_transport::{cuda, nccl};
    if cuda::device_count() < 2 || !nccl::ffi::nccl_available() {
        eprintln!("nccl: needs two GPUs and libnccl (NCCL refuses two ranks on one GPU), no rows");
        return Ok(Vec::new());
    }
    Ok(nccl::bench::run([0, 1], sizes)?
        .into_iter()
        .map(|row| Measurement {
            transport: row.method,
            device: true,
            baseline: false,
            bytes: row.bytes,
            gbps: row.gb_per_s,
            latency_us: row.device_us,
            iters: 0,
        })
        .collect())
}

/// UCX with `UCX_TLS=tls` between two processes (this binary, started by
/// the launcher, bootstrapped from the environment): the cross-process
/// path (shared memory segments, CMA, TCP) as a job would use it.
#[cfg(feature = "ucx")]
pub fn bench_ucx_processes(tls: &str, sizes: &[usize], volume: usize) -> Result<Vec<Measurement>> {
    use comet_transport::launch::{launch, LaunchConfig};
    let exe = std::env::current_exe().context("ucx-procs: path of this program")?;
    let sizes_arg = sizes
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut cfg = LaunchConfig::new(2, exe)
        .args([
            "bench",
            "transport",
            "--rank-worker",
            tls,
            "--sizes",
            &sizes_arg,
        ])
        .args(["--volume", &volume.to_string()])
        .env("UCX_TLS", tls);
    cfg.capture = true;
    cfg.forward = false;
    cfg.timeout = Some(Duration::from_secs(600));
    let rep = launch(&cfg).map_err(|e| {
        let out: Vec<String> = e
            .report()
            .map(|r| {
                r.ranks
                    .iter()
                    .map(|o| format!("rank {}: {}", o.rank, o.text()))
                    .collect()
            })
            .unwrap_or_default();
        anyhow!("{e}\n{}", out.join("\n"))
    })?;
    let name = format!("ucx-procs[{tls}]");
    let mut rows = Vec::new();
    for line in rep.ranks[0]
        .output
        .iter()
        .filter_map(|l| l.strip_prefix("COMET_MEASURE "))
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = || anyhow!("ucx-procs: unreadable measurement {line:?}");
        if f.len() != 4 {
            return Err(bad());
        }
        rows.push(Measurement {
            transport: name.clone(),
            device: false,
            baseline: false,
            bytes: f[0].parse().map_err(|_| bad())?,
            gbps: f[1].parse().map_err(|_| bad())?,
            latency_us: f[2].parse().map_err(|_| bad())?,
            iters: f[3].parse().map_err(|_| bad())?,
        });
    }
    if rows.len() != sizes.len() {
        bail!(
            "ucx-procs: rank 0 reported {} of {} sizes",
            rows.len(),
            sizes.len()
        );
    }
    Ok(rows)
}

/// One rank of [`bench_ucx_processes`]; rank 0 prints the measurements.
#[cfg(feature = "ucx")]
fn ucx_rank_worker(tls: &str, sizes: &[usize], volume: usize) -> Result<()> {
    use comet_transport::ucx::{UcxConfig, UcxTransport};
    let boot = comet_transport::bootstrap::Bootstrap::from_env()?;
    if boot.world() != 2 {
        bail!(
            "ucx-procs needs 2 ranks, the environment has {}",
            boot.world()
        );
    }
    let cfg = UcxConfig {
        peer_errors: Some(tls.contains("tcp")),
        ..UcxConfig::from_env()?
    };
    let t = UcxTransport::new(boot, cfg)?;
    let max = sizes.iter().copied().max().unwrap_or(0);
    let out = pair_rank(&t, sizes, max, volume)?;
    if t.rank() == 0 {
        for (bytes, gbps, lat, iters) in out {
            println!("COMET_MEASURE {bytes} {gbps} {lat} {iters}");
        }
    }
    Ok(())
}

fn table(rows: &[Measurement], markdown: bool) -> String {
    let base = |m: &Measurement| {
        rows.iter()
            .find(|b| b.baseline && b.device == m.device && b.bytes == m.bytes)
    };
    let mut s = String::new();
    if markdown {
        s.push_str("| transport | size | GB/s | latency (us) | GB/s vs baseline | iters |\n");
        s.push_str("| --- | ---: | ---: | ---: | ---: | ---: |\n");
    } else {
        s.push_str(&format!(
            "{:<24} {:>9} {:>10} {:>13} {:>10} {:>6}\n",
            "transport", "size", "GB/s", "latency(us)", "x base", "iters"
        ));
    }
    for m in rows {
        let ratio = base(m)
            .filter(|b| b.gbps > 0.0)
            .map_or("-".to_string(), |b| format!("{:.2}", m.gbps / b.gbps));
        if markdown {
            s.push_str(&format!(
                "| {} | {} | {:.3} | {:.1} | {} | {} |\n",
                m.transport,
                human(m.bytes),
                m.gbps,
                m.latency_us,
                ratio,
                m.iters
            ));
        } else {
            s.push_str(&format!(
                "{:<24} {:>9} {:>10.3} {:>13.1} {:>10} {:>6}\n",
                m.transport,
                human(m.bytes),
                m.gbps,
                m.latency_us,
                ratio,
                m.iters
            ));
        }
    }
    s
}

#[cfg(feature = "ucx")]
const DEFAULT_UCX_TLS: &str = "sm,self;tcp";

/// `--ucx-tls` is only meaningful where a UCX transport is measured.
fn check_ucx_tls(args: &TransportBenchArgs) -> Result<()> {
    let Some(tls) = &args.ucx_tls else {
        return Ok(());
    };
    if !cfg!(feature = "ucx") {
        bail!(
            "--ucx-tls {tls:?}: this comet was built without UCX; rebuild with \
             `cargo build --release -p comet-cli --features ucx` (needs libucx-dev)"
        );
    }
    if !args
        .transports
        .iter()
        .any(|t| t == "ucx" || t == "ucx-procs")
    {
        bail!("--ucx-tls {tls:?} needs ucx or ucx-procs in --transports");
    }
    Ok(())
}

pub fn run(args: TransportBenchArgs) -> Result<()> {
    let sizes = args
        .sizes
        .iter()
        .map(|s| parse_size(s).with_context(|| format!("--sizes {s}")))
        .collect::<Result<Vec<_>>>()?;
    let volume = parse_size(&args.volume).with_context(|| format!("--volume {}", args.volume))?;
    if sizes.is_empty() {
        bail!("--sizes: no message sizes given");
    }
    check_ucx_tls(&args)?;
    #[cfg(feature = "ucx")]
    let ucx_tls = args.ucx_tls.as_deref().unwrap_or(DEFAULT_UCX_TLS);
    #[cfg(feature = "ucx")]
    if let Some(tls) = &args.rank_worker {
        return ucx_rank_worker(tls, &sizes, volume);
    }
    let mut rows = Vec::new();
    for t in &args.transports {
        match t.as_str() {
            "tcp" => rows.extend(bench_tcp(&sizes, volume)?),
            "local" => rows.extend(bench_local(&sizes, volume)?),
            #[cfg(feature = "ucx")]
            "ucx" => {
                for tls in ucx_tls.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    rows.extend(
                        bench_ucx(tls, &sizes, volume)
                            .with_context(|| format!("ucx with UCX_TLS={tls}"))?,
                    );
                }
            }
            #[cfg(feature = "ucx")]
            "ucx-procs" => {
                for tls in ucx_tls.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    rows.extend(
                        bench_ucx_processes(tls, &sizes, volume)
                            .with_context(|| format!("ucx-procs with UCX_TLS={tls}"))?,
                    );
                }
            }
            #[cfg(not(feature = "ucx"))]
            "ucx" | "ucx-procs" => bail!("this comet was built without the `ucx` feature"),
            #[cfg(feature = "nvlink")]
            "nvlink" => rows.extend(bench_nvlink(&sizes)?),
            #[cfg(not(feature = "nvlink"))]
            "nvlink" => bail!("this comet was built without the `nvlink` feature"),
            #[cfg(feature = "nccl")]
            "nccl" => rows.extend(bench_nccl(&sizes)?),
            #[cfg(not(feature = "nccl"))]
            "nccl" => bail!("this comet was built without the `nccl` feature"),
            other => bail!(
                "unknown transport {other:?} (known: tcp, local, ucx, ucx-procs, nvlink, nccl)"
            ),
        }
    }
    // Baselines first; otherwise in the order measured (stable sort).
    rows.sort_by_key(|m| (m.device, !m.baseline));
    print!("{}", table(&rows, args.markdown));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn local_and_tcp_rows_come_out() {
        let sizes = [4096, 65536];
        let rows = bench_local(&sizes, 1 << 20).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows
            .iter()
            .all(|m| m.gbps > 0.0 && m.latency_us > 0.0 && m.gbps.is_finite()));
        let rows = bench_tcp(&sizes, 1 << 20).unwrap();
        assert_eq!(rows.iter().map(|m| m.bytes).collect::<Vec<_>>(), sizes);
        assert!(rows.iter().all(|m| m.baseline && m.gbps > 0.0));
        assert!(table(&rows, true).contains("| tcp copy (baseline) | 4 KiB |"));
    }
}
