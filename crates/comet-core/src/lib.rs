//! comet-core: everything about a COMET MoE layer that needs no GPU.
//!
//! The configuration and its presets, routing, the layout plan that every
//! rank derives identically from the W x E count matrix, the tile schedules
//! of the two fused layers with their exact signal dependencies, the cost
//! model that picks communication blocks and chunk sizes, and the
//! higher-precision CPU reference of the whole layer. The crates above this
//! one (transport, kernels, sched) consume these plans; nothing here knows
//! how bytes move.

pub mod config;
pub mod cost;
pub mod error;
pub mod layout;
pub mod reference;
pub mod routing;
pub mod schedule;
pub mod weights;

pub use config::{Dtype, MoeConfig, Preset};
pub use cost::{CostEstimate, CostModel, DeviceFigures, WireFormat};
pub use error::CoreError;
pub use layout::LayoutPlan;
pub use routing::{Routing, RoutingKind};
pub use schedule::{Layer0Schedule, Layer1Schedule, SignalMap, WireSignal};
pub use weights::ExpertWeights;
