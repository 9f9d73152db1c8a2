//! Users and API keys. Keys are shown once and stored as SHA-256 hashes (they are
//! 192-bit random secrets, so a fast hash is enough); a moka cache in front of the
//! look-up keeps the database off the hot path, and a revoke invalidates it at once on
//! this replica, and on every other one at once through Redis when it is configured
//! (`listen_for_changes`; without Redis, within `key_cache_ttl_secs`).

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::store::{new_id, now_ms, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Sees ads; provider paid from ad revenue.
    Free,
    Premium,
}

impl Tier {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "free" => Some(Self::Free),
            "premium" => Some(Self::Premium),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Premium => "premium",
        }
    }
}

/// A key that passed authentication.
#[derive(Debug, Clone)]
pub struct AuthedKey {
    pub key_id: String,
    pub user_id: String,
    pub tier: Tier,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Spending limits in micro-USD per UTC day and calendar month.
    pub daily_limit_micros: Option<i64>,
    pub monthly_limit_micros: Option<i64>,
    /// The key's standing ad preferences (a request's `ad_preferences` add to them).
    pub ad_preferences: Option<openapi::openai::AdPreferences>,
}

#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub tier: Option<Tier>,
    pub user_id: Option<String>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub daily_limit_micros: Option<i64>,
    pub monthly_limit_micros: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("user {0} does not exist")]
    UnknownUser(String),
    #[error("key {0} does not exist")]
    UnknownKey(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

pub fn hash_key(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A fresh secret: `prefix` followed by 48 hex characters of OS randomness.
pub fn generate_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

#[derive(Clone)]
pub struct Keys {
    store: Store,
    cache: Cache<String, Arc<AuthedKey>>,
    /// With Redis: where a change to a key is announced, so every replica's cache
    /// forgets it at once (`listen_for_changes`).
    redis: Option<(redis::aio::ConnectionManager, String)>,
}

/// The Redis channel (after the `redis_prefix`) on which replicas announce changed
/// keys (by hash).
pub const CHANGED_CHANNEL: &str = "keys:changed";

impl Keys {
    pub fn new(store: Store, ttl: Duration) -> Self {
        Self { store, cache: Cache::builder().max_capacity(100_000).time_to_live(ttl).build(), redis: None }
    }

    /// Announces key changes on Redis, on `{prefix}keys:changed` (see
    /// `listen_for_changes`).
    pub fn with_redis(mut self, redis: redis::aio::ConnectionManager, prefix: &str) -> Self {
        self.redis = Some((redis, format!("{prefix}{CHANGED_CHANNEL}")));
        self
    }

    /// This replica forgets `hash` at once; with Redis, so does every other replica.
    async fn forget_everywhere(&self, hash: &str) {
        self.cache.invalidate(hash);
        if let Some((redis, channel)) = &self.redis {
            let mut conn = redis.clone();
            let sent: Result<i64, redis::RedisError> = redis::cmd("PUBLISH").arg(channel).arg(hash).query_async(&mut conn).await;
            if let Err(e) = sent {
                tracing::warn!(error = %e, "cannot announce a key change on Redis; other replicas keep it up to key_cache_ttl_secs");
            }
        }
    }

    /// Follows the other replicas' key changes on Redis until `stop`, reconnecting
    /// after a failure (and then forgetting every cached key, since announcements may
    /// have been missed meanwhile).
    pub async fn listen_for_changes(self, url: String, stop: tokio_util::sync::CancellationToken) {
        use futures::StreamExt;
        let Some(channel) = self.redis.as_ref().map(|(_, c)| c.clone()) else { return };
        let mut first = true;
        loop {
            let subscribed = async {
                let client = redis::Client::open(url.as_str())?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match subscribed.await {
                Ok(pubsub) => {
                    if !first {
                        self.cache.invalidate_all();
                    }
                    first = false;
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            message = messages.next() => match message {
                                Some(m) => {
                                    if let Ok(hash) = m.get_payload::<String>() {
                                        self.cache.invalidate(&hash);
                                    }
                                }
                                None => break,
                            },
                        }
                    }
                    tracing::warn!("lost the Redis subscription to key changes; reconnecting");
                }
                Err(e) => tracing::warn!(error = %e, "cannot subscribe to key changes on Redis; retrying"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    pub async fn create(&self, new: NewKey) -> Result<openapi::platform::CreatedKey, KeyError> {
        let now = now_ms();
        let tier = new.tier.unwrap_or(Tier::Free);
        let mut tx = self.store.pool.begin().await?;
        let user_id = match new.user_id {
            Some(id) => {
                let exists: Option<String> = sqlx::query_scalar("SELECT id FROM users WHERE id = $1")
                    .bind(&id)
                    .fetch_optional(&mut *tx)
                    .await?;
                exists.ok_or(KeyError::UnknownUser(id))?
            }
            None => {
                let id = new_id("user");
                sqlx::query("INSERT INTO users (id, name, tier, created_at) VALUES ($1, $2, $3, $4)")
                    .bind(&id)
                    .bind(&new.name)
                    .bind(tier.as_str())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                id
            }
        };
        let secret = generate_secret("sk-");
        let prefix: String = secret.chars().take(10).collect();
        let id = new_id("key");
        sqlx::query(
            "INSERT INTO api_keys (id, user_id, name, key_hash, prefix, tier, requests_per_minute, tokens_per_minute, created_at, \
             daily_limit_micros, monthly_limit_micros) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&id)
        .bind(&user_id)
        .bind(&new.name)
        .bind(hash_key(&secret))
        .bind(&prefix)
        .bind(tier.as_str())
        .bind(new.requests_per_minute.map(i64::from))
        .bind(new.tokens_per_minute.map(i64::from))
        .bind(now)
        .bind(new.daily_limit_micros)
        .bind(new.monthly_limit_micros)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(openapi::platform::CreatedKey {
            id,
            user_id,
            name: new.name,
            tier: tier.as_str().to_owned(),
            key: secret,
            prefix,
        })
    }

    /// Looks a presented secret up; `None` for unknown or revoked keys.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<Arc<AuthedKey>>, sqlx::Error> {
        if !secret.starts_with("sk-") {
            return Ok(None);
        }
        let hash = hash_key(secret);
        if let Some(hit) = self.cache.get(&hash) {
            return Ok(Some(hit));
        }
        let row = sqlx::query(
            "SELECT id, user_id, tier, requests_per_minute, tokens_per_minute, daily_limit_micros, monthly_limit_micros, ad_preferences FROM api_keys \
             WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(&hash)
        .fetch_optional(&self.store.read)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let tier: String = row.try_get("tier")?;
        let key = Arc::new(AuthedKey {
            key_id: row.try_get("id")?,
            user_id: row.try_get("user_id")?,
            tier: Tier::parse(&tier).unwrap_or(Tier::Free),
            requests_per_minute: limit(row.try_get("requests_per_minute")?),
            tokens_per_minute: limit(row.try_get("tokens_per_minute")?),
            daily_limit_micros: row.try_get("daily_limit_micros")?,
            monthly_limit_micros: row.try_get("monthly_limit_micros")?,
            ad_preferences: row
                .try_get::<Option<String>, _>("ad_preferences")?
                .and_then(|json| serde_json::from_str(&json).ok()),
        });
        self.cache.insert(hash, key.clone());
        Ok(Some(key))
    }

    pub async fn revoke(&self, key_id: &str) -> Result<(), KeyError> {
        let hash: Option<String> = sqlx::query_scalar("SELECT key_hash FROM api_keys WHERE id = $1")
            .bind(key_id)
            .fetch_optional(&self.store.pool)
            .await?;
        let hash = hash.ok_or_else(|| KeyError::UnknownKey(key_id.to_owned()))?;
        sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now_ms())
            .bind(key_id)
            .execute(&self.store.pool)
            .await?;
        self.forget_everywhere(&hash).await;
        Ok(())
    }

    /// Stores a key's standing ad preferences; this replica's cache forgets the key at once.
    pub async fn set_ad_preferences(&self, key_id: &str, prefs: &openapi::openai::AdPreferences) -> Result<(), KeyError> {
        let json = serde_json::to_string(prefs).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        let hash: Option<String> = sqlx::query_scalar("SELECT key_hash FROM api_keys WHERE id = $1")
            .bind(key_id)
            .fetch_optional(&self.store.pool)
            .await?;
        let hash = hash.ok_or_else(|| KeyError::UnknownKey(key_id.to_owned()))?;
        sqlx::query("UPDATE api_keys SET ad_preferences = $1 WHERE id = $2").bind(json).bind(key_id).execute(&self.store.pool).await?;
        self.forget_everywhere(&hash).await;
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<openapi::platform::KeyInfo>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, user_id, name, tier, prefix, created_at, revoked_at, requests_per_minute, tokens_per_minute, \
             daily_limit_micros, monthly_limit_micros FROM api_keys ORDER BY created_at, id",
        )
        .fetch_all(&self.store.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(openapi::platform::KeyInfo {
                    id: row.try_get("id")?,
                    user_id: row.try_get("user_id")?,
                    name: row.try_get("name")?,
                    tier: row.try_get("tier")?,
                    prefix: row.try_get("prefix")?,
                    created_at: row.try_get("created_at")?,
                    revoked_at: row.try_get("revoked_at")?,
                    requests_per_minute: limit(row.try_get("requests_per_minute")?),
                    tokens_per_minute: limit(row.try_get("tokens_per_minute")?),
                    daily_limit_micros: row.try_get("daily_limit_micros")?,
                    monthly_limit_micros: row.try_get("monthly_limit_micros")?,
                })
            })
            .collect()
    }
}

fn limit(value: Option<i64>) -> Option<u32> {
    value.and_then(|v| u32::try_from(v).ok())
}
