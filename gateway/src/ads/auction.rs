//! The ad auction: second price on effective CPM over the campaigns eligible for one
//! request. Pure functions over a snapshot, so the table-driven tests pin every rule.
//!
//! - Eligible: status `active`, inside its dates, targets the request's category, not
//!   blocked by the user, under its frequency cap for this user today, the advertiser
//!   can pay the most this impression may cost, and both budgets leave room for it.
//! - Pacing: a campaign may have spent at most `daily budget × (share of the UTC day
//!   gone + PACING_SLACK)` so far today, so a budget lasts the day instead of the
//!   first hour.
//! - eCPM: a CPM bid as is; a CPC bid × estimated CTR × 1000; a campaign with both
//!   bids competes with the larger and is charged in that unit.
//! - Price: the winner pays the larger of the second eCPM and the reserve, never more
//!   than its own bid; per impression (CPM, rounded up to the micro-USD) or per click
//!   (CPC: clearing eCPM / (1000 × CTR), rounded up).

use std::sync::Arc;

use crate::money::units::Micros;

/// Share of a day's budget a campaign may run ahead of an even spread.
pub const PACING_SLACK: f64 = 0.1;
/// Prior for the click-through rate: 1% as if seen over 100 impressions.
pub const PRIOR_CTR: f64 = 0.01;
pub const PRIOR_IMPRESSIONS: f64 = 100.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pricing {
    Cpm,
    Cpc,
}

impl Pricing {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpm => "cpm",
            Self::Cpc => "cpc",
        }
    }
}

/// One campaign as the auction sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Bidder {
    pub id: Arc<str>,
    pub advertiser_id: Arc<str>,
    /// Bit `i` set for `classify::CATEGORIES[i]` (see `classify::mask`).
    pub categories: u8,
    /// Micro-USD per thousand impressions; 0 = none.
    pub cpm_bid: Micros,
    /// Micro-USD per click; 0 = none.
    pub cpc_bid: Micros,
    pub daily_budget: Micros,
    pub total_budget: Micros,
    pub starts_at: Option<i64>,
    pub ends_at: Option<i64>,
    pub active: bool,
    /// Impressions per user per UTC day; 0 = no cap.
    pub frequency_cap: u32,
    pub spent_total: Micros,
    pub spent_today: Micros,
    pub impressions: u64,
    pub clicks: u64,
}

impl Bidder {
    /// Estimated click-through rate, learning from this campaign's clicks.
    pub fn ctr(&self) -> f64 {
        (self.clicks as f64 + PRIOR_CTR * PRIOR_IMPRESSIONS) / (self.impressions as f64 + PRIOR_IMPRESSIONS)
    }

    /// Effective CPM (micro-USD per thousand impressions) and the unit it bids in.
    pub fn ecpm(&self) -> (f64, Pricing) {
        let cpm = self.cpm_bid as f64;
        let cpc = self.cpc_bid as f64 * self.ctr() * 1000.0;
        if cpm >= cpc && self.cpm_bid > 0 {
            (cpm, Pricing::Cpm)
        } else {
            (cpc, Pricing::Cpc)
        }
    }

    /// The most one impression can cost this campaign (a CPC campaign may be clicked).
    pub fn max_charge(&self, pricing: Pricing) -> Micros {
        match pricing {
            Pricing::Cpm => ceil_div(self.cpm_bid, 1000),
            Pricing::Cpc => self.cpc_bid,
        }
    }
}

fn ceil_div(a: Micros, b: Micros) -> Micros {
    (a + b - 1).div_euclid(b)
}

/// Everything about the request and the moment that eligibility depends on.
pub struct Request<'a> {
    pub category: &'a str,
    pub now_ms: i64,
    /// Share of the current UTC day gone, in [0, 1).
    pub day_fraction: f64,
    pub blocked_categories: &'a [String],
    pub reserve_cpm: Micros,
}

/// The auction's winner and what it pays.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub campaign_id: String,
    pub pricing: Pricing,
    /// Per impression (CPM) or per click (CPC), micro-USD.
    pub price: Micros,
    pub clearing_ecpm: f64,
}

/// Why a campaign did not take part (for tests and debugging).
pub fn ineligible<'a>(
    b: &Bidder,
    r: &Request<'_>,
    views_today: u32,
    advertiser_available: Micros,
) -> Option<&'a str> {
    let (_, pricing) = b.ecpm();
    let max = b.max_charge(pricing);
    if !b.active {
        Some("not active")
    } else if b.starts_at.is_some_and(|s| r.now_ms < s) {
        Some("not started")
    } else if b.ends_at.is_some_and(|e| r.now_ms >= e) {
        Some("ended")
    } else if b.categories & super::classify::mask(&[r.category]) == 0 {
        Some("category")
    } else if r.blocked_categories.iter().any(|c| c == r.category) {
        Some("blocked by user")
    } else if b.frequency_cap > 0 && views_today >= b.frequency_cap {
        Some("frequency cap")
    } else if max <= 0 {
        Some("no bid")
    } else if advertiser_available < max {
        Some("advertiser balance")
    } else if b.spent_total + max > b.total_budget {
        Some("total budget")
    } else if b.spent_today + max > b.daily_budget {
        Some("daily budget")
    } else if b.spent_today as f64 > b.daily_budget as f64 * (r.day_fraction + PACING_SLACK).min(1.0) {
        Some("pacing")
    } else {
        None
    }
}

/// Runs the auction. `views` gives a campaign's impressions to this user today,
/// `available` an advertiser's spendable balance.
pub fn run(
    bidders: &[Bidder],
    r: &Request<'_>,
    views: impl Fn(&str) -> u32,
    available: impl Fn(&str) -> Micros,
) -> Option<Outcome> {
    let mut best: Option<(&Bidder, f64, Pricing)> = None;
    let mut second = 0.0f64;
    for b in bidders {
        // Views are looked up only for capped campaigns: most are not.
        let seen = if b.frequency_cap > 0 { views(&b.id) } else { 0 };
        if ineligible(b, r, seen, available(&b.advertiser_id)).is_some() {
            continue;
        }
        let (ecpm, pricing) = b.ecpm();
        match best {
            // Ties go to the campaign listed first (the inventory is sorted by id).
            Some((_, top, _)) if ecpm <= top => second = second.max(ecpm),
            _ => {
                if let Some((_, top, _)) = best {
                    second = second.max(top);
                }
                best = Some((b, ecpm, pricing));
            }
        }
    }
    let (winner, ecpm, pricing) = best?;
    let reserve = r.reserve_cpm as f64;
    if ecpm < reserve {
        return None;
    }
    let clearing = second.max(reserve).min(ecpm);
    let price = match pricing {
        Pricing::Cpm => (clearing / 1000.0).ceil() as Micros,
        Pricing::Cpc => (clearing / (1000.0 * winner.ctr())).ceil() as Micros,
    }
    .clamp(1, winner.max_charge(pricing));
    Some(Outcome { campaign_id: winner.id.to_string(), pricing, price, clearing_ecpm: clearing })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn bidder(id: &str, cpm: Micros, cpc: Micros) -> Bidder {
        Bidder {
            id: id.into(),
            advertiser_id: format!("adv_{id}").into(),
            categories: crate::ads::classify::mask(&["technology"]),
            cpm_bid: cpm,
            cpc_bid: cpc,
            daily_budget: 1_000_000,
            total_budget: 10_000_000,
            starts_at: None,
            ends_at: None,
            active: true,
            frequency_cap: 0,
            spent_total: 0,
            spent_today: 0,
            impressions: 0,
            clicks: 0,
        }
    }

    fn request(now_ms: i64) -> Request<'static> {
        Request { category: "technology", now_ms, day_fraction: 0.5, blocked_categories: &[], reserve_cpm: 100_000 }
    }

    fn auction(bidders: &[Bidder]) -> Option<Outcome> {
        run(bidders, &request(10 * DAY), |_| 0, |_| 1_000_000_000)
    }

    #[test]
    fn second_price_table() {
        // (bidders as (id, cpm, cpc), winner, pricing, price per impression/click)
        type Case<'a> = (&'a [(&'a str, Micros, Micros)], Option<(&'a str, Pricing, Micros)>);
        let cases: &[Case<'_>] = &[
            // Two CPM bids: $3 pays the $2 second price: 2000 µUSD per impression.
            (&[("a", 2_000_000, 0), ("b", 3_000_000, 0)], Some(("b", Pricing::Cpm, 2_000))),
            // Alone: pays the reserve ($0.10 CPM = 100 µUSD).
            (&[("a", 2_000_000, 0)], Some(("a", Pricing::Cpm, 100))),
            // Below the reserve: no ad.
            (&[("a", 50_000, 0)], None),
            // Equal bids: the first listed wins and pays its own bid.
            (&[("a", 2_000_000, 0), ("b", 2_000_000, 0)], Some(("a", Pricing::Cpm, 2_000))),
            // CPC $0.50 at the 1% prior = $5 eCPM beats $3 CPM; pays $3 eCPM per click:
            // 3_000_000 / (1000 × 0.01) = 300_000 µUSD per click.
            (&[("a", 3_000_000, 0), ("c", 0, 500_000)], Some(("c", Pricing::Cpc, 300_000))),
            // Three bidders: second price is the runner-up, not the last.
            (&[("a", 1_000_000, 0), ("b", 5_000_000, 0), ("c", 4_000_000, 0)], Some(("b", Pricing::Cpm, 4_000))),
            // Rounding up: a $1.0005 CPM second price is 1000.5 µUSD per impression → 1001.
            (&[("a", 1_000_500, 0), ("b", 9_000_000, 0)], Some(("b", Pricing::Cpm, 1_001))),
        ];
        for (bidders, want) in cases {
            let bidders: Vec<Bidder> = bidders.iter().map(|(id, cpm, cpc)| bidder(id, *cpm, *cpc)).collect();
            let got = auction(&bidders).map(|o| (o.campaign_id, o.pricing, o.price));
            let want = want.map(|(id, p, price)| (id.to_owned(), p, price));
            assert_eq!(got, want, "bidders {bidders:?}");
        }
    }

    #[test]
    fn ctr_learns_from_clicks() {
        let mut c = bidder("c", 0, 500_000);
        assert!((c.ctr() - 0.01).abs() < 1e-12);
        c.impressions = 900;
        c.clicks = 90;
        // (90 + 1) / (900 + 100) = 9.1%.
        assert!((c.ctr() - 0.091).abs() < 1e-12);
        assert!((c.ecpm().0 - 500_000.0 * 0.091 * 1000.0).abs() < 1e-3);
        // Better CTR now beats a CPM bid that won before.
        let a = bidder("a", 3_000_000, 0);
        assert_eq!(auction(&[a, c]).map(|o| o.campaign_id), Some("c".to_owned()));
    }

    #[test]
    fn eligibility_table() {
        let now = 10 * DAY;
        let base = bidder("a", 2_000_000, 0);
        let r = request(now);
        let cases: Vec<(&str, Bidder, u32, Micros, Option<&str>)> = vec![
            ("eligible", base.clone(), 0, 1_000_000, None),
            ("paused", Bidder { active: false, ..base.clone() }, 0, 1_000_000, Some("not active")),
            ("starts tomorrow", Bidder { starts_at: Some(now + DAY), ..base.clone() }, 0, 1_000_000, Some("not started")),
            ("started", Bidder { starts_at: Some(now - DAY), ..base.clone() }, 0, 1_000_000, None),
            ("ended", Bidder { ends_at: Some(now), ..base.clone() }, 0, 1_000_000, Some("ended")),
            ("ends later", Bidder { ends_at: Some(now + 1), ..base.clone() }, 0, 1_000_000, None),
            ("other category", Bidder { categories: crate::ads::classify::mask(&["finance"]), ..base.clone() }, 0, 1_000_000, Some("category")),
            ("capped", Bidder { frequency_cap: 3, ..base.clone() }, 3, 1_000_000, Some("frequency cap")),
            ("under cap", Bidder { frequency_cap: 3, ..base.clone() }, 2, 1_000_000, None),
            ("advertiser broke", base.clone(), 0, 1_999, Some("advertiser balance")),
            ("total budget spent", Bidder { spent_total: 9_998_001, ..base.clone() }, 0, 1_000_000, Some("total budget")),
            ("total budget exact", Bidder { spent_total: 9_998_000, ..base.clone() }, 0, 1_000_000, None),
            ("daily budget spent", Bidder { spent_today: 999_000, ..base.clone() }, 0, 1_000_000, Some("daily budget")),
            // Half the day gone: up to 60% of the daily budget may be spent.
            ("ahead of pace", Bidder { spent_today: 600_001, ..base.clone() }, 0, 1_000_000, Some("pacing")),
            ("on pace", Bidder { spent_today: 600_000, ..base.clone() }, 0, 1_000_000, None),
            ("no bid", bidder("z", 0, 0), 0, 1_000_000, Some("no bid")),
        ];
        for (name, b, views, available, want) in cases {
            assert_eq!(ineligible(&b, &r, views, available), want, "{name}");
        }
        let blocked = vec!["technology".to_owned()];
        let r = Request { blocked_categories: &blocked, ..request(now) };
        assert_eq!(ineligible(&base, &r, 0, 1_000_000), Some("blocked by user"));
    }

    #[test]
    fn ineligible_bidders_do_not_set_the_second_price() {
        let capped = Bidder { frequency_cap: 1, ..bidder("b", 9_000_000, 0) };
        let a = bidder("a", 2_000_000, 0);
        let got = run(&[a, capped], &request(10 * DAY), |id| u32::from(id == "b"), |_| 1_000_000_000);
        assert_eq!(got.map(|o| (o.campaign_id, o.price)), Some(("a".to_owned(), 100)));
    }
}
