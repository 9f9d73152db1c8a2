//! Money: the double-entry `ledger` (with request `holds`), `funding` (who pays for a
//! request, decided before each provider call and settled after), `usage` (the
//! request-end writer that settles), the `free_budget` of the free tier, provider
//! `payments` and their `payout_connector`, hourly `reservations`, revenue `analytics`,
//! and `units`, the one convention for amounts on the HTTP API.

pub mod analytics;
pub mod free_budget;
pub mod funding;
pub mod holds;
pub mod ledger;
pub mod payments;
pub mod payout_connector;
pub mod reservations;
pub mod units;
pub mod usage;
