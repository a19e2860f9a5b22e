//! Execution traces in the Chrome / Perfetto trace-event JSON format: one
//! process per rank, one thread track for compute and one for
//! communication, a complete ("X") event per tile, send or wait.

use serde_json::{json, Value};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    Compute,
    Comm,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TraceSlice {
    pub rank: usize,
    pub track: Track,
    pub name: String,
    pub start_us: f64,
    pub dur_us: f64,
}

/// Collected slices, timed from one shared origin.
#[derive(Debug, Clone)]
pub struct Trace {
    pub origin: Instant,
    pub slices: Vec<TraceSlice>,
}

impl Trace {
    pub fn new(origin: Instant) -> Trace {
        Trace {
            origin,
            slices: Vec::new(),
        }
    }

    pub fn record(&mut self, rank: usize, track: Track, name: impl Into<String>, start: Instant) {
        let now = Instant::now();
        self.slices.push(TraceSlice {
            rank,
            track,
            name: name.into(),
            start_us: start.duration_since(self.origin).as_secs_f64() * 1e6,
            dur_us: now.duration_since(start).as_secs_f64() * 1e6,
        });
    }

    pub fn extend(&mut self, other: Trace) {
        self.slices.extend(other.slices);
    }

    /// The trace-event JSON document.
    pub fn to_json(&self) -> Value {
        let mut events: Vec<Value> = Vec::with_capacity(self.slices.len() + 8);
        let mut ranks: Vec<usize> = self.slices.iter().map(|s| s.rank).collect();
        ranks.sort();
        ranks.dedup();
        for r in ranks {
            events.push(json!({"ph": "M", "name": "process_name", "pid": r, "tid": 0, "args": {"name": format!("rank {r}")}}));
            events.push(json!({"ph": "M", "name": "thread_name", "pid": r, "tid": 0, "args": {"name": "compute"}}));
            events.push(json!({"ph": "M", "name": "thread_name", "pid": r, "tid": 1, "args": {"name": "comm"}}));
        }
        for s in &self.slices {
            events.push(json!({
                "ph": "X",
                "name": s.name,
                "cat": match s.track { Track::Compute => "compute", Track::Comm => "comm" },
                "pid": s.rank,
                "tid": match s.track { Track::Compute => 0, Track::Comm => 1 },
                "ts": s.start_us,
                "dur": s.dur_us,
            }));
        }
        json!({ "traceEvents": events, "displayTimeUnit": "ms" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_complete_events_per_rank() {
        let mut t = Trace::new(Instant::now());
        t.record(1, Track::Comm, "send", Instant::now());
        t.record(0, Track::Compute, "tile", Instant::now());
        let v = t.to_json();
        let ev = v["traceEvents"].as_array().unwrap();
        assert_eq!(ev.iter().filter(|e| e["ph"] == "X").count(), 2);
        assert!(ev
            .iter()
            .any(|e| e["ph"] == "X" && e["pid"] == 1 && e["tid"] == 1));
        let text = serde_json::to_string(&v).unwrap();
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["traceEvents"].as_array().unwrap().len(), ev.len());
    }
}
