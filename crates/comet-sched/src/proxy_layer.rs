//! The device forward over a proxy: [`StagedLayer`] is a [`MoeLayer`] on a
//! [`StagedTransport`] (kernels that store into local mirrors of the
//! peers' buffers and raise local ready words) plus the thread that moves
//! the bytes. Each `forward` hands the call's epoch to the thread, which
//! runs its [`ProxyRun`] over every call in order: the staged proxy over
//! host memory (`staged_device::CudaStaging`: UCX, the local transport) or
//! the NCCL proxy (`nccl_device::CudaLanes`). The kernels' waits are
//! bounded, so a proxy that fails leaves them to time out with an error,
//! not a hang; its own error is returned by the next `forward` or `check`.

use crate::cpu::ExecMode;
use crate::device_plan::DevicePlan;
use crate::error::SchedError;
use crate::forward::{CallInfo, DeviceLayout, ForwardArgs, MoeLayer, WeightType};
use crate::staged_device::StagedTransport;
use comet_transport::cuda;
use comet_transport::Transport;
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::DriverError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One call handed to the proxy: its epoch and where its routing weights
/// are (a token-once proxy sums a token's rows with them before combine).
/// The weights stay in place until the call's reduce has run on the
/// caller's stream, which waits for everything the proxy moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyCall {
    pub epoch: u64,
    /// `topk_weights` of the call: a device address, its element type and
    /// its slots (`tokens * top_k`).
    pub weights: CUdeviceptr,
    pub weight_type: WeightType,
    pub slots: usize,
}

/// What a layer's proxy thread runs: the device side of one rank's proxy,
/// moved onto the thread once the layer is built.
pub trait ProxyRun<T: Transport>: Send + 'static {
    /// Runs every call of `calls`, in order, until the channel closes or
    /// a call fails (or the layer's stop flag ends the call in flight);
    /// returns only once nothing it enqueued can still touch the layer's
    /// memory, within a bound. Called on a thread with the device's
    /// context bound and its stream-capture mode relaxed.
    fn run(
        self,
        t: &StagedTransport<T>,
        calls: &mpsc::Receiver<ProxyCall>,
    ) -> Result<(), SchedError>;
}

/// The device layer over a [`StagedTransport`], with its proxy thread. As
/// for [`MoeLayer`], drop it only after `check` and a barrier; dropping it
/// stops the proxy's call in flight at once and waits for its thread.
/// Built by `StagedLayer::new` (staged through host memory) or
/// `nccl_device::NcclLayer::new` (over NCCL).
pub struct StagedLayer<T: Transport + 'static> {
    layer: MoeLayer<StagedTransport<T>>,
    calls: Option<mpsc::Sender<ProxyCall>>,
    proxy: Option<JoinHandle<()>>,
    failure: Arc<Mutex<Option<SchedError>>>,
    stop: Arc<AtomicBool>,
    /// Calls handed to the proxy (it follows `MoeLayer::calls`).
    epoch: u64,
}

impl<T: Transport + 'static> StagedLayer<T> {
    /// The layer and the proxy thread that runs what `proxy` makes of it
    /// (given the stop flag that [`Drop`] raises).
    pub fn with_proxy<D: ProxyRun<T>>(
        layer: MoeLayer<StagedTransport<T>>,
        proxy: impl FnOnce(&MoeLayer<StagedTransport<T>>, Arc<AtomicBool>) -> Result<D, SchedError>,
    ) -> Result<Self, SchedError> {
        let stop = Arc::new(AtomicBool::new(false));
        let dev = proxy(&layer, Arc::clone(&stop))?;
        let t = layer.transport().clone();
        let (calls, epochs) = mpsc::channel::<ProxyCall>();
        let failure = Arc::new(Mutex::new(None));
        let failed = Arc::clone(&failure);
        let rank = layer.rank();
        let proxy = std::thread::Builder::new()
            .name(format!("comet-proxy-{rank}"))
            .spawn(move || {
                // The error is stored before `epochs` goes, so a forward
                // that finds the channel closed finds the cause too.
                if let Err(e) = run_proxy(&t, dev, &epochs) {
                    tracing::debug!(rank, error = %e, "proxy stopped");
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
                drop(epochs);
            })
            .map_err(|e| SchedError::Device {
                rank,
                message: format!("start proxy thread: {e}"),
            })?;
        Ok(StagedLayer {
            layer,
            calls: Some(calls),
            proxy: Some(proxy),
            failure,
            stop,
            epoch: 0,
        })
    }

    pub fn layer(&self) -> &MoeLayer<StagedTransport<T>> {
        &self.layer
    }

    /// As [`MoeLayer::time_phases`].
    pub fn time_phases(&mut self, on: bool) -> Result<(), SchedError> {
        self.layer.time_phases(on)
    }

    /// As [`MoeLayer::gemms_only`] (no call of the protocol).
    ///
    /// # Safety
    /// As [`MoeLayer::gemms_only`].
    pub unsafe fn gemms_only(
        &mut self,
        stream: CUstream,
        a: &ForwardArgs,
    ) -> Result<(), SchedError> {
        // SAFETY: forwarded contract.
        unsafe { self.layer.gemms_only(stream, a) }
    }

    /// As [`MoeLayer::poison`], and this rank's mirrors of the peers'
    /// receive and combine buffers too (a piece sent before the kernels
    /// wrote it shows up).
    ///
    /// # Safety
    /// As [`MoeLayer::poison`].
    pub unsafe fn poison(&self, stream: CUstream) -> Result<(), SchedError> {
        // SAFETY: forwarded contract; the mirrors are this transport's.
        unsafe {
            self.layer.poison(stream)?;
            self.layer
                .transport()
                .poison_mirrors(stream, self.layer.symmetric_buffers())
        }
    }

    /// As [`MoeLayer::layout_tables`].
    ///
    /// # Safety
    /// As [`MoeLayer::layout_tables`].
    pub unsafe fn layout_tables(&mut self, stream: CUstream) -> Result<DeviceLayout, SchedError> {
        // SAFETY: forwarded contract.
        let t = unsafe { self.layer.layout_tables(stream) };
        // A proxy failure is the cause of whatever the tables show.
        self.proxy_failure()?;
        t
    }

    pub fn plan(&self) -> &DevicePlan {
        self.layer.plan()
    }

    pub fn rank(&self) -> usize {
        self.layer.rank()
    }

    pub fn set_mode(&mut self, mode: ExecMode) {
        self.layer.set_mode(mode);
    }

    /// The proxy's error, once it has stopped on one (it stays stopped).
    fn proxy_failure(&self) -> Result<(), SchedError> {
        let f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        match f.as_ref() {
            None => Ok(()),
            Some(e) => Err(SchedError::Device {
                rank: self.rank(),
                message: format!("the proxy stopped: {e}"),
            }),
        }
    }

    /// As [`MoeLayer::forward`], and hands the call to the proxy.
    ///
    /// # Safety
    /// As [`MoeLayer::forward`].
    pub unsafe fn forward(&mut self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError> {
        // SAFETY: forwarded contract.
        unsafe { self.call(stream, a, false) }
    }

    /// As [`MoeLayer::comms_only`], and hands the call to the proxy.
    ///
    /// # Safety
    /// As [`MoeLayer::forward`].
    pub unsafe fn comms_only(
        &mut self,
        stream: CUstream,
        a: &ForwardArgs,
    ) -> Result<(), SchedError> {
        // SAFETY: forwarded contract.
        unsafe { self.call(stream, a, true) }
    }

    /// One call of the protocol (the whole layer, or its communication
    /// only), enqueued and then handed to the proxy.
    unsafe fn call(
        &mut self,
        stream: CUstream,
        a: &ForwardArgs,
        comms: bool,
    ) -> Result<(), SchedError> {
        self.proxy_failure()?;
        let rank = self.rank();
        let device = |what: &str, e: DriverError| SchedError::Device {
            rank,
            message: format!("{what}: {e}"),
        };
        self.layer
            .transport()
            .context()
            .bind_to_thread()
            .map_err(|e| device("bind context", e))?;
        // A replayed graph would run the kernels without the proxy.
        // SAFETY: `stream` is live (the caller's contract).
        if unsafe { cuda::is_capturing(stream) }.map_err(|e| device("query stream capture", e))? {
            return Err(SchedError::Input {
                rank,
                message: "a proxied layer's calls cannot be captured in a CUDA graph: its \
                          proxy must see every call"
                    .into(),
            });
        }
        // SAFETY: forwarded contract.
        let enqueued = unsafe {
            if comms {
                self.layer.comms_only(stream, a)
            } else {
                self.layer.forward(stream, a)
            }
        };
        // Every call whose route went out bumped the device's epoch, even
        // if a later phase failed: the proxy follows each of them.
        while self.epoch < self.layer.calls() {
            self.epoch += 1;
            let call = ProxyCall {
                epoch: self.epoch,
                weights: a.topk_weights,
                weight_type: a.weights,
                slots: a.tokens * self.plan().cfg.top_k,
            };
            let sent = self.calls.as_ref().map(|c| c.send(call));
            if sent.is_none_or(|s| s.is_err()) {
                self.proxy_failure()?;
                return Err(SchedError::Device {
                    rank,
                    message: "the proxy thread is gone".into(),
                });
            }
        }
        enqueued
    }

    /// As [`MoeLayer::check`]; a proxy error, then a peer the transport
    /// knows to be lost, come first: either is the cause of the kernels'
    /// timeouts that follow it.
    ///
    /// # Safety
    /// As [`MoeLayer::check`].
    pub unsafe fn check(&mut self, stream: CUstream) -> Result<CallInfo, SchedError> {
        // SAFETY: forwarded contract.
        let r = unsafe { self.layer.check(stream) };
        self.proxy_failure()?;
        if r.is_err() {
            self.layer.transport().inner().peers_alive()?;
        }
        r
    }
}

impl<T: Transport + 'static> Drop for StagedLayer<T> {
    fn drop(&mut self) {
        // Closing the channel ends the proxy's loop; the stop flag ends the
        // call in flight, if any, at once.
        self.stop.store(true, Ordering::Release);
        self.calls = None;
        if let Some(h) = self.proxy.take() {
            let _ = h.join();
        }
    }
}

/// Refuses a layer whose kernels wait for work that other streams of this
/// process queue (`what`) when CUDA gives the process one hardware queue
/// (`queues`, [`comet_transport::cuda::hardware_queues`]): there that work
/// waits behind the waiting kernels until their timeout. Measured on an
/// H100 (docs/PERF.md, 2026-12-06): a staged rank's count downloads never
/// finished, and ranks of one process never saw each other's counts. Only
/// one queue is refused, the measured failure: 2 and 3 were not run, 4 to
/// 32 held nothing back, and the message asks for 8 or more.
pub(crate) fn needs_queues(rank: usize, queues: usize, what: &str) -> Result<(), SchedError> {
    if queues > 1 {
        return Ok(());
    }
    Err(SchedError::Input {
        rank,
        message: format!(
            "CUDA_DEVICE_MAX_CONNECTIONS=1 puts every stream of this process in one hardware \
             queue, where {what} would wait behind the kernels waiting for them; unset it \
             (CUDA gives 8) or set 8 or more before CUDA starts"
        ),
    })
}

/// The proxy thread's life: the context bound and the capture mode
/// relaxed (a graph captured elsewhere in the process is not disturbed by
/// its synchronous calls), then `dev`'s run.
fn run_proxy<T: Transport, D: ProxyRun<T>>(
    t: &StagedTransport<T>,
    dev: D,
    epochs: &mpsc::Receiver<ProxyCall>,
) -> Result<(), SchedError> {
    let rank = t.rank();
    let device = |what: &str, e: DriverError| SchedError::Device {
        rank,
        message: format!("proxy {what}: {e}"),
    };
    t.context()
        .bind_to_thread()
        .map_err(|e| device("bind context", e))?;
    cuda::relax_capture_mode().map_err(|e| device("relax capture mode", e))?;
    dev.run(t, epochs)
}

#[cfg(test)]
mod tests {
    use super::needs_queues;

    #[test]
    fn one_hardware_queue_is_refused_naming_the_variable() {
        let e = needs_queues(3, 1, "the proxy's downloads")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rank 3")
                && e.contains("CUDA_DEVICE_MAX_CONNECTIONS=1")
                && e.contains("the proxy's downloads"),
            "{e}"
        );
        assert!(needs_queues(0, 2, "x").is_ok());
        assert!(needs_queues(0, 8, "x").is_ok());
    }
}
