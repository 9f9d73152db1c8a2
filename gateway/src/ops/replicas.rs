//! The replicas running on one database (`replicas` table): each upserts its row every
//! `BEAT` and is live while its row is younger than `LIVE`. A replica starting on
//! PostgreSQL without Redis while another one is live, or with Redis beside a live one
//! that runs without it, refuses to start: their provider slots, limits and key
//! changes would not be shared. The live count divides provider caps while Redis is
//! unreachable (`inference::capacity`).

use sqlx::Row;

use crate::store::{now_ms, Backend, Store};

/// How often a replica says it is alive.
pub const BEAT: std::time::Duration = std::time::Duration::from_secs(5);
/// A replica not heard from for this long is gone (kill -9, a lost host).
pub const LIVE_MS: i64 = 15_000;

/// Refuses a start that would run replicas that do not share state, then records this
/// replica.
pub async fn join(store: &Store, id: &str, redis: bool) -> anyhow::Result<()> {
    if store.backend == Backend::Postgres {
        let rows = sqlx::query("SELECT id, redis FROM replicas WHERE seen_at > $1 AND id <> $2")
            .bind(now_ms() - LIVE_MS)
            .bind(id)
            .fetch_all(&store.pool)
            .await?;
        for row in rows {
            let (other, other_redis): (String, i64) = (row.try_get("id")?, row.try_get("redis")?);
            if !redis {
                anyhow::bail!(
                    "replica {other} is running on this database: more than one replica needs Redis (set redis_url on every replica), \
                     or wait {} s after it stopped",
                    LIVE_MS / 1000
                );
            }
            if other_redis == 0 {
                anyhow::bail!("replica {other} runs on this database without Redis: set redis_url on it too, or stop it first");
            }
        }
    }
    beat(store, id, redis).await?;
    Ok(())
}

/// Records that this replica is alive; returns the live replicas (this one included).
pub async fn beat(store: &Store, id: &str, redis: bool) -> anyhow::Result<u32> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO replicas (id, started_at, seen_at, redis) VALUES ($1, $2, $2, $3) \
         ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at, redis = excluded.redis",
    )
    .bind(id)
    .bind(now)
    .bind(i64::from(redis))
    .execute(&store.pool)
    .await?;
    let live: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM replicas WHERE seen_at > $1").bind(now - LIVE_MS).fetch_one(&store.read).await?;
    Ok(u32::try_from(live).unwrap_or(1).max(1))
}

/// Takes this replica off the table (a clean stop: the next start need not wait).
pub async fn leave(store: &Store, id: &str) {
    if let Err(e) = sqlx::query("DELETE FROM replicas WHERE id = $1").bind(id).execute(&store.pool).await {
        tracing::warn!(error = %e, "cannot remove this replica from the replicas table");
    }
}
