//! Request holds in memory, for the embedded SQLite store.
//!
//! An embedded SQLite database belongs to exactly one gateway process, so the funds a
//! request reserves need not be written to it: a hold is a few map updates under one
//! lock, and the request path does no database write at all (one read of the posted
//! balance, on a read-only connection that never waits for the writer). A crash loses
//! nothing but reservations, which is what a crash should do to them. PostgreSQL, shared
//! by several replicas, keeps its holds in the `holds` table (`Ledger::hold`).
//!
//! Safety argument (concurrent requests can never spend more than the balance):
//! - `available = posted − held_in_db − held_here − charged_meanwhile ≥ amount` is
//!   checked and the hold recorded under one lock, so holds taken here never overlap.
//! - `posted` is read from the database before the lock. A settlement lowers `posted`
//!   (in the usage writer's transaction) and then, *after* its commit, releases its hold
//!   here (`finish`). If that release happens between our read and our check, the read
//!   may predate the commit, so the check subtracts every charge finished since the
//!   read (`charged_meanwhile`, from a per-account running total): counting a charge
//!   twice is only ever conservative. Credits only raise `posted`, so a stale read of
//!   them is conservative too.
//! - A hold being settled (`begin_close`) is never swept, and a swept hold is never
//!   charged (`begin_close` answers false), exactly like a voided row in `holds`.

use std::collections::HashMap;
use std::time::Instant;

use parking_lot::Mutex;

use crate::money::units::Micros;

/// Funds reserved for one request; consumed by a settlement or a void.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub id: String,
    pub account_id: String,
    pub amount: Micros,
    /// Kept in the store's `HoldBook` rather than the `holds` table.
    pub in_memory: bool,
}

#[derive(Default)]
pub struct HoldBook {
    inner: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    holds: HashMap<String, Open>,
    accounts: HashMap<String, Tally>,
    keys: HashMap<String, Micros>,
}

#[derive(Default)]
struct Tally {
    held: Micros,
    /// The part of `held` whose settlement has begun (`begin_close`).
    closing: Micros,
    /// Running total of charges whose holds were released after their commit.
    charged: Micros,
}

struct Open {
    account: String,
    key: Option<String>,
    amount: Micros,
    created: Instant,
    closing: bool,
}

/// Where an account stood when its posted balance was read.
#[derive(Debug, Clone, Copy)]
pub struct Mark(Micros);

impl HoldBook {
    /// Call before reading the account's posted balance.
    pub fn mark(&self, account: &str) -> Mark {
        Mark(self.inner.lock().accounts.get(account).map_or(0, |t| t.charged))
    }

    /// Reserves `amount` when `unheld` (posted minus the database's holds, read after
    /// `mark`) covers it beside this book's holds; `None` when it does not.
    pub fn try_hold(&self, id: String, account: &str, key: Option<&str>, amount: Micros, unheld: Micros, mark: Mark) -> Option<Hold> {
        let mut book = self.inner.lock();
        let tally = book.accounts.entry(account.to_owned()).or_default();
        let available = unheld - tally.held - (tally.charged - mark.0);
        if available < amount {
            return None;
        }
        tally.held += amount;
        if let Some(key) = key {
            *book.keys.entry(key.to_owned()).or_default() += amount;
        }
        let hold = Hold { id, account_id: account.to_owned(), amount, in_memory: true };
        book.holds.insert(
            hold.id.clone(),
            Open { account: account.to_owned(), key: key.map(str::to_owned), amount, created: Instant::now(), closing: false },
        );
        Some(hold)
    }

    /// The settlement of `hold` starts: `false` when the hold is gone (swept), in which
    /// case nothing may be charged. Repeatable (a retried batch asks again).
    pub fn begin_close(&self, hold: &Hold) -> bool {
        let mut book = self.inner.lock();
        let Some(open) = book.holds.get_mut(&hold.id) else { return false };
        if !open.closing {
            open.closing = true;
            let (account, amount) = (open.account.clone(), open.amount);
            if let Some(tally) = book.accounts.get_mut(&account) {
                tally.closing += amount;
            }
        }
        true
    }

    /// Releases `hold` after the transaction that charged `charged` of it committed (or
    /// definitively failed, with `charged` 0).
    pub fn finish(&self, hold: &Hold, charged: Micros) {
        let mut book = self.inner.lock();
        let Some(open) = book.holds.remove(&hold.id) else { return };
        release(&mut book, &open, charged);
    }

    /// Drops holds older than `max_age_ms` that no settlement has started on: their
    /// request died without finishing (a panic). Returns how many.
    pub fn sweep(&self, max_age_ms: i64) -> u64 {
        let mut book = self.inner.lock();
        let stale: Vec<String> = book
            .holds
            .iter()
            .filter(|(_, h)| !h.closing && i64::try_from(h.created.elapsed().as_millis()).unwrap_or(i64::MAX) > max_age_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &stale {
            if let Some(open) = book.holds.remove(id) {
                release(&mut book, &open, 0);
            }
        }
        stale.len() as u64
    }

    /// Funds held here on `account`, settling holds included (what `try_hold` counts).
    pub fn held(&self, account: &str) -> Micros {
        self.inner.lock().accounts.get(account).map_or(0, |t| t.held)
    }

    /// Funds held here on `account` by holds whose settlement has not begun: what a
    /// balance read from the database must subtract. A settling hold's charge may
    /// already be in `posted` (it commits before the hold is released), so counting
    /// its hold as well would show the charge twice, and a balance below zero.
    pub fn held_unsettled(&self, account: &str) -> Micros {
        self.inner.lock().accounts.get(account).map_or(0, |t| t.held - t.closing)
    }

    /// Funds held here by requests of `key`.
    pub fn held_by_key(&self, key: &str) -> Micros {
        self.inner.lock().keys.get(key).copied().unwrap_or(0)
    }

    /// Holds open right now (for tests and diagnostics).
    pub fn open(&self) -> usize {
        self.inner.lock().holds.len()
    }
}

fn release(book: &mut Book, open: &Open, charged: Micros) {
    if let Some(tally) = book.accounts.get_mut(&open.account) {
        tally.held -= open.amount;
        tally.charged += charged;
        if open.closing {
            tally.closing -= open.amount;
        }
    }
    if let Some(key) = &open.key {
        if let Some(held) = book.keys.get_mut(key) {
            *held -= open.amount;
            if *held == 0 {
                book.keys.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next_id() -> String {
        crate::store::new_id("hold")
    }

    #[test]
    fn holds_never_exceed_what_is_available() {
        let book = HoldBook::default();
        let m = book.mark("user:a");
        let a = book.try_hold(next_id(), "user:a", Some("k"), 60, 100, m).unwrap();
        assert!(book.try_hold(next_id(), "user:a", Some("k"), 50, 100, m).is_none());
        let b = book.try_hold(next_id(), "user:a", None, 40, 100, m).unwrap();
        assert_eq!((book.held("user:a"), book.held_by_key("k")), (100, 60));
        assert!(book.begin_close(&a));
        book.finish(&a, 25);
        book.finish(&b, 0);
        assert_eq!((book.held("user:a"), book.held_by_key("k"), book.open()), (0, 0, 0));
    }

    #[test]
    fn a_charge_finished_after_the_read_is_counted() {
        let book = HoldBook::default();
        let first = book.try_hold(next_id(), "user:a", None, 80, 100, book.mark("user:a")).unwrap();
        // A hold reads posted (100, before the settlement's commit) ...
        let mark = book.mark("user:a");
        // ... the settlement commits (posted 100 → 30) and releases its hold ...
        book.finish(&first, 70);
        // ... so the stale 100 must not buy 100: only 30 are left.
        assert!(book.try_hold(next_id(), "user:a", None, 31, 100, mark).is_none());
        assert!(book.try_hold(next_id(), "user:a", None, 30, 100, mark).is_some());
    }

    #[test]
    fn a_settling_hold_is_not_subtracted_from_a_balance_twice() {
        let book = HoldBook::default();
        let m = book.mark("user:a");
        let settling = book.try_hold(next_id(), "user:a", None, 80, 100, m).unwrap();
        let open = book.try_hold(next_id(), "user:a", None, 20, 100, m).unwrap();
        assert_eq!(book.held_unsettled("user:a"), 100);
        // The settlement begins; its charge may now be committed (posted 100 → 30)
        // before the hold is released, so a balance leaves the hold out: 30 − 20 ≥ 0.
        assert!(book.begin_close(&settling));
        assert!(book.begin_close(&settling), "asking again changes nothing");
        assert_eq!((book.held("user:a"), book.held_unsettled("user:a")), (100, 20));
        book.finish(&settling, 70);
        assert_eq!((book.held("user:a"), book.held_unsettled("user:a")), (20, 20));
        book.finish(&open, 0);
        assert_eq!((book.held("user:a"), book.held_unsettled("user:a")), (0, 0));
    }

    #[test]
    fn swept_holds_are_not_charged_and_closing_ones_are_not_swept() {
        let book = HoldBook::default();
        let m = book.mark("user:a");
        let idle = book.try_hold(next_id(), "user:a", None, 10, 100, m).unwrap();
        let settling = book.try_hold(next_id(), "user:a", None, 10, 100, m).unwrap();
        assert!(book.begin_close(&settling));
        assert_eq!(book.sweep(-1), 1);
        assert!(!book.begin_close(&idle));
        assert!(book.begin_close(&settling));
        assert_eq!(book.held("user:a"), 10);
    }
}
