//! The tests crate's one integration binary: in-process suites through `gateway::app()`
//! and end-to-end suites over real processes and SDKs.

mod cli;
mod console;
mod inproc;
mod ledger_props;
mod observability;
mod openapi_doc;
mod real_worker;
mod sdk;
