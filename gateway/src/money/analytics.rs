//! Revenue and usage analytics for the admin, and transaction history, read from the
//! ledger and the usage records. Time buckets are UTC.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use sqlx::Row;

use crate::store::{now_ms, Store};
use crate::money::units::usd;

const DAY_MS: i64 = 86_400_000;
const HOUR_MS: i64 = 3_600_000;


/// `YYYY-MM-DD` of a day number since the epoch (civil-from-days, Howard Hinnant's algorithm).
pub fn day_string(day: i64) -> String {
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since the epoch of a civil date (Howard Hinnant's days-from-civil).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Start of the UTC day and of the UTC calendar month containing `ms`.
pub fn day_and_month_start(ms: i64) -> (i64, i64) {
    let day = ms.div_euclid(DAY_MS);
    let date = day_string(day);
    let (y, m) = (date[..4].parse().unwrap_or(1970), date[5..7].parse().unwrap_or(1));
    (day * DAY_MS, days_from_civil(y, m, 1) * DAY_MS)
}

/// The `[from, to)` window in ms: defaults to the last 30 days.
pub fn window(from: Option<i64>, to: Option<i64>) -> (i64, i64) {
    let to = to.unwrap_or_else(|| now_ms() + 1);
    (from.unwrap_or(to.saturating_sub(30 * DAY_MS)), to)
}

pub async fn revenue(store: &Store, from: i64, to: i64) -> Result<Value, sqlx::Error> {
    // Platform income by day and source: fees (platform:fees credits) and what the ad
    // account spent paying providers for free-tier tokens.
    let rows = sqlx::query(
        "SELECT e.created_at / $3 AS day, l.account_id, CAST(SUM(l.amount) AS BIGINT) AS amount \
         FROM ledger_lines l JOIN ledger_entries e ON e.id = l.entry_id \
         WHERE e.created_at >= $1 AND e.created_at < $2 AND l.account_id IN ('platform:fees', 'platform:ad_revenue') \
         GROUP BY e.created_at / $3, l.account_id",
    )
    .bind(from)
    .bind(to)
    .bind(DAY_MS)
    .fetch_all(&store.pool)
    .await?;
    let mut daily: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for r in &rows {
        let day: i64 = r.try_get("day")?;
        let account: String = r.try_get("account_id")?;
        let amount: i64 = r.try_get("amount")?;
        let entry = daily.entry(day).or_default();
        if account == "platform:fees" {
            entry.0 += amount;
        } else {
            entry.1 += amount;
        }
    }
    let mut monthly: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for (day, (fees, ads)) in &daily {
        let m = monthly.entry(day_string(*day)[..7].to_owned()).or_default();
        m.0 += fees;
        m.1 += ads;
    }
    let (fees, ads): (i64, i64) = daily.values().fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
    let by = |column: &'static str| {
        let sql = format!(
            "SELECT {column} AS k, CAST(SUM(cost_micros) AS BIGINT) AS cost, COUNT(*) AS n FROM usage_records \
             WHERE created_at >= $1 AND created_at < $2 AND {column} IS NOT NULL GROUP BY {column} ORDER BY cost DESC"
        );
        async move {
            let rows = sqlx::query(&sql).bind(from).bind(to).fetch_all(&store.pool).await?;
            rows.iter()
                .map(|r| {
                    let cost: i64 = r.try_get("cost")?;
                    Ok(json!({ "key": r.try_get::<String, _>("k")?, "spend": usd(cost), "spendMicros": cost, "requests": r.try_get::<i64, _>("n")? }))
                })
                .collect::<Result<Vec<Value>, sqlx::Error>>()
        }
    };
    Ok(json!({
        "from": from, "to": to,
        "total": { "fees": usd(fees), "feesMicros": fees, "adRevenueBalanceChange": usd(ads), "adRevenueBalanceChangeMicros": ads },
        "bySource": { "fees": usd(fees), "feesMicros": fees, "ads": usd(ads), "adsMicros": ads },
        "daily": daily.iter().map(|(d, (f, a))| json!({ "date": day_string(*d), "fees": usd(*f), "feesMicros": f, "ads": usd(*a), "adsMicros": a })).collect::<Vec<_>>(),
        "monthly": monthly.iter().map(|(m, (f, a))| json!({ "month": m, "fees": usd(*f), "feesMicros": f, "ads": usd(*a), "adsMicros": a })).collect::<Vec<_>>(),
        "byModel": by("model").await?,
        "byProvider": by("provider_id").await?,
        "series": revenue_series(store, from, to).await?,
    }))
}

pub async fn usage(store: &Store, from: i64, to: i64) -> Result<Value, sqlx::Error> {
    let groups = sqlx::query(
        "SELECT model, quality, COUNT(*) AS n, CAST(SUM(prompt_tokens) AS BIGINT) AS p, CAST(SUM(completion_tokens) AS BIGINT) AS c, \
         CAST(SUM(CASE WHEN status = 'ok' THEN 0 ELSE 1 END) AS BIGINT) AS errors \
         FROM usage_records WHERE created_at >= $1 AND created_at < $2 GROUP BY model, quality ORDER BY model, quality",
    )
    .bind(from)
    .bind(to)
    .fetch_all(&store.pool)
    .await?;
    let mut total = (0i64, 0i64, 0i64, 0i64);
    let mut by_model_quality = Vec::new();
    for r in &groups {
        let (n, p, c, e): (i64, i64, i64, i64) = (r.try_get("n")?, r.try_get("p")?, r.try_get("c")?, r.try_get("errors")?);
        total = (total.0 + n, total.1 + p, total.2 + c, total.3 + e);
        by_model_quality.push(json!({
            "model": r.try_get::<String, _>("model")?, "quality": r.try_get::<String, _>("quality")?,
            "requests": n, "promptTokens": p, "completionTokens": c, "errors": e,
        }));
    }
    let hours = sqlx::query(
        "SELECT (created_at / $3) % 24 AS hour, COUNT(*) AS n FROM usage_records WHERE created_at >= $1 AND created_at < $2 \
         GROUP BY (created_at / $3) % 24 ORDER BY n DESC, hour",
    )
    .bind(from)
    .bind(to)
    .bind(HOUR_MS)
    .fetch_all(&store.pool)
    .await?;
    let peak: Vec<Value> = hours
        .iter()
        .map(|r| Ok(json!({ "hourUtc": r.try_get::<i64, _>("hour")?, "requests": r.try_get::<i64, _>("n")? })))
        .collect::<Result<_, sqlx::Error>>()?;
    let active: i64 = sqlx::query_scalar(
        "SELECT COUNT(DISTINCT provider_id) FROM usage_records WHERE created_at >= $1 AND created_at < $2 AND provider_id IS NOT NULL",
    )
    .bind(from)
    .bind(to)
    .fetch_one(&store.pool)
    .await?;
    Ok(json!({
        "from": from, "to": to,
        "requests": total.0, "promptTokens": total.1, "completionTokens": total.2,
        "errorRate": if total.0 > 0 { total.3 as f64 / total.0 as f64 } else { 0.0 },
        "byModelAndQuality": by_model_quality,
        "peakHours": peak,
        "activeProviders": active,
        "series": usage_series(store, from, to).await?,
    }))
}

/// Chart buckets: hours for windows up to three days, days beyond.
pub fn bucket_ms(from: i64, to: i64) -> i64 {
    // Saturating: the window comes from the query string and may be anything.
    if to.saturating_sub(from) <= 3 * DAY_MS { HOUR_MS } else { DAY_MS }
}

/// Platform income per time bucket by source (fees, net change of the ad-revenue
/// account) and what was billed, by payer (users, the ad-revenue account for free tier).
async fn revenue_series(store: &Store, from: i64, to: i64) -> Result<Value, sqlx::Error> {
    let bucket = bucket_ms(from, to);
    let mut points: BTreeMap<i64, [i64; 4]> = BTreeMap::new();
    let ledger = sqlx::query(
        "SELECT e.created_at / $3 AS b, l.account_id, CAST(SUM(l.amount) AS BIGINT) AS amount \
         FROM ledger_lines l JOIN ledger_entries e ON e.id = l.entry_id \
         WHERE e.created_at >= $1 AND e.created_at < $2 AND l.account_id IN ('platform:fees', 'platform:ad_revenue') \
         GROUP BY e.created_at / $3, l.account_id",
    )
    .bind(from)
    .bind(to)
    .bind(bucket)
    .fetch_all(&store.pool)
    .await?;
    for r in &ledger {
        let slot = if r.try_get::<String, _>("account_id")? == "platform:fees" { 0 } else { 1 };
        points.entry(r.try_get("b")?).or_default()[slot] += r.try_get::<i64, _>("amount")?;
    }
    let billed = sqlx::query(
        "SELECT created_at / $3 AS b, payer, CAST(SUM(cost_micros) AS BIGINT) AS cost FROM usage_records \
         WHERE created_at >= $1 AND created_at < $2 AND payer IS NOT NULL GROUP BY created_at / $3, payer",
    )
    .bind(from)
    .bind(to)
    .bind(bucket)
    .fetch_all(&store.pool)
    .await?;
    for r in &billed {
        let slot = if r.try_get::<String, _>("payer")? == "user" { 2 } else { 3 };
        points.entry(r.try_get("b")?).or_default()[slot] += r.try_get::<i64, _>("cost")?;
    }
    let data: Vec<Value> = points
        .iter()
        .map(|(b, [fees, ads, users, ad_funded])| {
            json!({
                "t": b * bucket,
                "fees": usd(*fees), "feesMicros": fees,
                "ads": usd(*ads), "adsMicros": ads,
                "billedUsers": usd(*users), "billedUsersMicros": users,
                "billedAdFunded": usd(*ad_funded), "billedAdFundedMicros": ad_funded,
            })
        })
        .collect();
    Ok(json!({ "bucketMs": bucket, "data": data }))
}

/// Tokens per time bucket by model, and requests per time bucket by quality tier.
async fn usage_series(store: &Store, from: i64, to: i64) -> Result<Value, sqlx::Error> {
    let bucket = bucket_ms(from, to);
    let rows = sqlx::query(
        "SELECT created_at / $3 AS b, model, quality, COUNT(*) AS n, CAST(SUM(prompt_tokens + completion_tokens) AS BIGINT) AS tokens \
         FROM usage_records WHERE created_at >= $1 AND created_at < $2 GROUP BY created_at / $3, model, quality ORDER BY b",
    )
    .bind(from)
    .bind(to)
    .bind(bucket)
    .fetch_all(&store.pool)
    .await?;
    let mut tokens: BTreeMap<(i64, String), i64> = BTreeMap::new();
    let mut requests: BTreeMap<(i64, String), i64> = BTreeMap::new();
    for r in &rows {
        let b: i64 = r.try_get("b")?;
        *tokens.entry((b * bucket, r.try_get("model")?)).or_default() += r.try_get::<i64, _>("tokens")?;
        *requests.entry((b * bucket, r.try_get("quality")?)).or_default() += r.try_get::<i64, _>("n")?;
    }
    Ok(json!({
        "bucketMs": bucket,
        "tokensByModel": tokens.iter().map(|((t, model), n)| json!({ "t": t, "model": model, "tokens": n })).collect::<Vec<_>>(),
        "requestsByQuality": requests.iter().map(|((t, quality), n)| json!({ "t": t, "quality": quality, "requests": n })).collect::<Vec<_>>(),
    }))
}

/// One account's ledger lines, newest first, `limit` at a time; pass the returned
/// `nextCursor` as `before` for the next page.
pub async fn history(store: &Store, account: &str, before: Option<&str>, limit: i64) -> Result<Value, sqlx::Error> {
    let limit = limit.clamp(1, 500);
    let rows = sqlx::query(
        "SELECT e.id, e.kind, e.request_id, e.memo, e.created_at, l.amount FROM ledger_lines l JOIN ledger_entries e ON e.id = l.entry_id \
         WHERE l.account_id = $1 AND ($2 IS NULL OR e.id < $2) ORDER BY e.id DESC LIMIT $3",
    )
    .bind(account)
    .bind(before)
    .bind(limit)
    .fetch_all(&store.pool)
    .await?;
    let data: Vec<Value> = rows
        .iter()
        .map(|r| {
            let amount: i64 = r.try_get("amount")?;
            Ok(json!({
                "id": r.try_get::<String, _>("id")?, "kind": r.try_get::<String, _>("kind")?,
                "requestId": r.try_get::<Option<String>, _>("request_id")?, "memo": r.try_get::<String, _>("memo")?,
                "createdAt": r.try_get::<i64, _>("created_at")?, "amount": usd(amount), "amountMicros": amount,
            }))
        })
        .collect::<Result<_, sqlx::Error>>()?;
    let next = (data.len() as i64 == limit).then(|| data.last().and_then(|v| v["id"].as_str()).map(str::to_owned)).flatten();
    Ok(json!({ "object": "list", "data": data, "nextCursor": next }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn day_strings() {
        assert_eq!(super::day_string(0), "1970-01-01");
        assert_eq!(super::day_string(20_782), "2026-11-25");
        assert_eq!(super::day_string(11_016), "2000-02-29");
        assert_eq!(super::days_from_civil(2026, 11, 25), 20_782);
        let (day, month) = super::day_and_month_start(20_782 * super::DAY_MS + 5_000);
        assert_eq!((day, month), (20_782 * super::DAY_MS, 20_758 * super::DAY_MS));
    }
}
