//! The tests crate's one integration binary: in-process suites through `gateway::edge::app()`
//! and end-to-end suites over real processes and SDKs.

// Test code, helpers included: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod ads;
mod attacks;
mod billing;
mod bounds;
mod cli;
mod embeddings;
mod console;
mod fleet;
mod inproc;
mod layout;
mod ledger_props;
mod links;
mod money;
mod nat;
mod observability;
mod openai_surface;
mod openapi_doc;
mod real_worker;
mod replicas;
mod responses;
mod routing;
mod sdk;
