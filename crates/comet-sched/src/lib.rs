//! comet-sched: turns (config, routing, transport) into plans and runs them.
