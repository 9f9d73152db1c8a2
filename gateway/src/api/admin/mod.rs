//! The operator's API: every `/api/admin/*` and `/api/analytics/*` route, served only
//! to the admin key (`edge::require_admin_key`), one file per subject.

pub mod ads;
pub mod keys;
pub mod payouts;
pub mod providers;
pub mod reports;
pub mod users;
