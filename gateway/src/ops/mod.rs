//! Operations: `config` (file, environment, defaults), `server` (builds the state,
//! listens, runs the background tasks), `replicas` (the replicas on one database),
//! `metrics`, `telemetry` (logs and traces) and `demo` (one command that starts a
//! gateway with a worker).

pub mod config;
pub mod demo;
pub mod metrics;
pub mod replicas;
pub mod server;
pub mod telemetry;
