//! Operations: `config` (file, environment, defaults), `server` (builds the state,
//! listens, runs the background tasks), `metrics`, `telemetry` (logs and traces) and
//! `demo` (one command that starts a gateway with a worker).

pub mod config;
pub mod demo;
pub mod metrics;
pub mod server;
pub mod telemetry;
