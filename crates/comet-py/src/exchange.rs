//! How the ranks of a Python layer find each other: the blob all-gather
//! (comet_transport's [`BlobExchange`]) through which the nvlink transport
//! swaps CUDA IPC handles.
//!
//! - a torch.distributed group: [`PyExchange`] calls back into Python
//!   (`comet._GroupExchange.all_gather`, an `all_gather_object` on the
//!   group), so gloo and nccl groups both work;
//! - no group but torchrun's environment (`WORLD_SIZE` > 1): the TCP
//!   bootstrap of comet-transport, rank 0 listening on the master port;
//! - neither: a world of one rank.

use comet_transport::bootstrap::{Bootstrap, BootstrapConfig};
use comet_transport::gpu::{BlobExchange, ThreadExchange};
use comet_transport::TransportError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::sync::Arc;
use std::time::Duration;

/// A Python object with `rank`, `world` and `all_gather(blob: bytes,
/// timeout_s: float) -> list[bytes]`.
pub struct PyExchange {
    obj: Py<PyAny>,
    rank: usize,
    world: usize,
}

impl PyExchange {
    pub fn new(obj: &Bound<'_, PyAny>) -> PyResult<PyExchange> {
        let rank: usize = obj.getattr("rank")?.extract()?;
        let world: usize = obj.getattr("world")?.extract()?;
        if world == 0 || rank >= world {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "comet: the group says rank {rank} of {world} ranks"
            )));
        }
        Ok(PyExchange {
            obj: obj.clone().unbind(),
            rank,
            world,
        })
    }
}

impl BlobExchange for PyExchange {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_gather(&self, blob: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>, TransportError> {
        let fail = |m: String| {
            TransportError::Bootstrap(format!(
                "rank {}: all_gather through the torch.distributed group: {m}",
                self.rank
            ))
        };
        Python::attach(|py| {
            let out = self
                .obj
                .bind(py)
                .call_method1(
                    "all_gather",
                    (PyBytes::new(py, blob), timeout.as_secs_f64()),
                )
                .map_err(|e| fail(e.to_string()))?;
            let all: Vec<Vec<u8>> = out
                .extract()
                .map_err(|e| fail(format!("did not return a list of bytes: {e}")))?;
            if all.len() != self.world {
                return Err(fail(format!(
                    "returned {} blobs for {} ranks",
                    all.len(),
                    self.world
                )));
            }
            Ok(all)
        })
    }
}

/// torchrun's environment of this process, with the port comet listens
/// on: `COMET_MASTER_PORT` if set; else under torchrun (which already
/// serves its own store on `MASTER_PORT`) `MASTER_PORT + 1`; else
/// `MASTER_PORT`.
pub fn env_config(timeout: Duration) -> Result<Option<BootstrapConfig>, TransportError> {
    let get = |k: &str| std::env::var(k).ok();
    match get("WORLD_SIZE") {
        None => return Ok(None),
        Some(w) if w.trim() == "1" => return Ok(None),
        Some(_) => {}
    }
    let port = match (get("COMET_MASTER_PORT"), get("MASTER_PORT")) {
        (Some(p), _) => Some(p),
        (None, Some(p)) if get("TORCHELASTIC_RUN_ID").is_some() => Some(
            p.trim()
                .parse::<u32>()
                .map(|n| (n + 1).to_string())
                .unwrap_or(p),
        ),
        (None, p) => p,
    };
    let mut cfg = BootstrapConfig::from_lookup(|k| {
        if k == "MASTER_PORT" {
            port.clone()
        } else {
            get(k)
        }
    })
    .map_err(TransportError::from)?;
    cfg.timeout = timeout;
    Ok(Some(cfg))
}

/// The world size the exchange will have, known before connecting.
pub enum Plan {
    Group(PyExchange),
    Env(BootstrapConfig),
    Alone,
}

impl Plan {
    pub fn world(&self) -> usize {
        match self {
            Plan::Group(g) => g.world,
            Plan::Env(c) => c.world,
            Plan::Alone => 1,
        }
    }

    /// Connects (collective for a group or the environment).
    pub fn connect(self) -> Result<Arc<dyn BlobExchange>, TransportError> {
        Ok(match self {
            Plan::Group(g) => Arc::new(g),
            Plan::Env(cfg) => Arc::new(Bootstrap::connect(cfg).map_err(TransportError::from)?),
            Plan::Alone => ThreadExchange::world(1)
                .pop()
                .map(|x| x as Arc<dyn BlobExchange>)
                .ok_or_else(|| TransportError::Bootstrap("empty world".into()))?,
        })
    }
}
