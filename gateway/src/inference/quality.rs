//! Quality tiers (DESIGN.md's table): what a tier changes on the provider side — the
//! max-tokens cap, the worker queue priority, the minimum provider score, the numeric
//! precision it requires — and what it costs. Custom levels are added at run time (admin API) and persisted; a custom level
//! is served by providers streaming it by name or, failing that, their `standard` stream.

use std::collections::HashMap;

use axum::http::HeaderMap;
use parking_lot::RwLock;
use sqlx::Row;

use crate::edge::error::ApiError;
use crate::store::{now_ms, Store};

#[derive(Debug, Clone, PartialEq)]
pub struct QualityLevel {
    pub name: String,
    /// Price multiplier in basis points (1.0 = 10_000) so money math stays integral.
    pub cost_multiplier_bp: u32,
    pub latency_multiplier: f64,
    /// Cap on completion tokens sent to the provider.
    pub max_tokens: u32,
    /// Worker queue priority; higher runs first.
    pub priority: i32,
    /// Only providers with at least this routing score serve the tier.
    pub min_score: f64,
    /// The numeric precision the tier's requests need from the provider.
    pub precision: Precision,
    /// The seed's general quality multiplier.
    pub multiplier: f64,
    pub custom: bool,
}

/// What a level requires of the provider's numerics (DESIGN.md: low and standard allow
/// lower precision, high and ultra need full precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Only providers that serve full precision qualify, and they are asked for it.
    Full,
    /// Any provider qualifies and may use its faster, reduced-precision kernels.
    ReducedAllowed,
}

impl Precision {
    /// The level's requirement from its general multiplier: full from `high` (1.5) up.
    fn for_multiplier(multiplier: f64) -> Self {
        if multiplier >= 1.5 { Self::Full } else { Self::ReducedAllowed }
    }

    /// The wire value: in level listings and in the body sent to providers, `reduced`
    /// means reduced precision is allowed.
    pub fn wire(self) -> openapi::platform::Precision {
        match self {
            Self::Full => openapi::platform::Precision::Full,
            Self::ReducedAllowed => openapi::platform::Precision::Reduced,
        }
    }
}

/// The built-in tiers, lowest first.
pub const BUILTIN: [&str; 4] = ["low", "standard", "high", "ultra"];

pub fn builtin(name: &str) -> Option<QualityLevel> {
    let (multiplier, cost, latency, max_tokens, priority, min_score) = match name {
        "low" => (0.8, 8_000, 0.7, 1024, 0, 0.0),
        "standard" => (1.0, 10_000, 1.0, 4096, 1, 0.0),
        "high" => (1.5, 15_000, 1.3, 8192, 2, 0.5),
        "ultra" => (2.0, 20_000, 1.6, 16384, 3, 0.7),
        _ => return None,
    };
    Some(QualityLevel {
        name: name.to_owned(),
        cost_multiplier_bp: cost,
        latency_multiplier: latency,
        max_tokens,
        priority,
        min_score,
        precision: Precision::for_multiplier(multiplier),
        multiplier,
        custom: false,
    })
}

/// A custom level from the seed's fields. Priority, minimum score and precision follow
/// the general multiplier the way the built-ins do (1.0 → standard, 1.5 → high, 2.0 → ultra).
pub fn custom(name: &str, multiplier: f64, latency_multiplier: f64, cost_multiplier: f64, max_tokens: u32) -> QualityLevel {
    QualityLevel {
        name: name.to_owned(),
        cost_multiplier_bp: (cost_multiplier * 10_000.0).round() as u32,
        latency_multiplier,
        max_tokens,
        // Saturating: `add` rejects out-of-range multipliers, but only after this runs.
        priority: ((multiplier * 2.0).round() as i32).saturating_sub(1).clamp(0, 10),
        min_score: if multiplier >= 2.0 { 0.7 } else if multiplier >= 1.5 { 0.5 } else { 0.0 },
        precision: Precision::for_multiplier(multiplier),
        multiplier,
        custom: true,
    }
}

/// Built-in and custom levels; custom ones are reloaded from the database.
pub struct Qualities {
    store: Store,
    custom: RwLock<HashMap<String, QualityLevel>>,
}

impl Qualities {
    pub async fn load(store: Store) -> Result<Self, sqlx::Error> {
        let q = Self { store, custom: RwLock::new(HashMap::new()) };
        q.reload().await?;
        Ok(q)
    }

    pub async fn reload(&self) -> Result<(), sqlx::Error> {
        let rows = sqlx::query("SELECT name, multiplier, latency_multiplier, cost_multiplier, max_tokens FROM quality_levels")
            .fetch_all(&self.store.pool)
            .await?;
        let mut map = HashMap::new();
        for r in rows {
            let name: String = r.try_get("name")?;
            let level = custom(
                &name,
                r.try_get("multiplier")?,
                r.try_get("latency_multiplier")?,
                r.try_get("cost_multiplier")?,
                u32::try_from(r.try_get::<i64, _>("max_tokens")?).unwrap_or(u32::MAX),
            );
            map.insert(name, level);
        }
        *self.custom.write() = map;
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<QualityLevel> {
        builtin(name).or_else(|| self.custom.read().get(name).cloned())
    }

    pub fn all(&self) -> Vec<QualityLevel> {
        let mut all: Vec<QualityLevel> = BUILTIN.iter().filter_map(|n| builtin(n)).collect();
        let mut custom: Vec<QualityLevel> = self.custom.read().values().cloned().collect();
        custom.sort_by(|a, b| a.name.cmp(&b.name));
        all.extend(custom);
        all
    }

    pub async fn add(&self, level: QualityLevel) -> Result<QualityLevel, ApiError> {
        let valid_name = !level.name.is_empty() && level.name.len() <= 32 && level.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_name {
            return Err(ApiError::param("`name` is 1 to 32 letters, digits, - or _", "name"));
        }
        if builtin(&level.name).is_some() {
            return Err(ApiError::Conflict(format!("`{}` is a built-in level", level.name)));
        }
        let ranges = [
            (level.multiplier, "multiplier"),
            (level.latency_multiplier, "latencyMultiplier"),
            (f64::from(level.cost_multiplier_bp) / 10_000.0, "costMultiplier"),
        ];
        for (v, param) in ranges {
            if !v.is_finite() || v <= 0.0 || v > 100.0 {
                return Err(ApiError::param(format!("`{param}` must be more than 0 and at most 100"), param));
            }
        }
        if level.max_tokens == 0 {
            return Err(ApiError::param("`maxTokens` must be at least 1", "maxTokens"));
        }
        let inserted = sqlx::query(
            "INSERT INTO quality_levels (name, multiplier, latency_multiplier, cost_multiplier, max_tokens, created_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&level.name)
        .bind(level.multiplier)
        .bind(level.latency_multiplier)
        .bind(f64::from(level.cost_multiplier_bp) / 10_000.0)
        .bind(i64::from(level.max_tokens))
        .bind(now_ms())
        .execute(&self.store.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(ApiError::Conflict(format!("level `{}` exists already", level.name)));
        }
        self.reload().await?;
        Ok(level)
    }
}

/// Splits `model:high` into the model and its quality suffix when the suffix is a level.
pub fn split_model_suffix<'a>(model: &'a str, levels: &Qualities) -> (&'a str, Option<&'a str>) {
    match model.rsplit_once(':') {
        Some((base, suffix)) if levels.get(suffix).is_some() && !base.is_empty() => (base, Some(suffix)),
        _ => (model, None),
    }
}

/// Resolves the level from, in order: the body's `quality`, a model suffix, the
/// `x-quality` header; `standard` when none is given.
pub fn resolve(levels: &Qualities, body: Option<&str>, suffix: Option<&str>, headers: &HeaderMap) -> Result<QualityLevel, ApiError> {
    let (name, param) = if let Some(q) = body {
        (q.to_owned(), "quality")
    } else if let Some(q) = suffix {
        (q.to_owned(), "model")
    } else if let Some(h) = headers.get("x-quality") {
        let q = h.to_str().map_err(|_| ApiError::param("x-quality header is not valid text", "x-quality"))?;
        (q.trim().to_owned(), "x-quality")
    } else {
        ("standard".to_owned(), "quality")
    };
    levels.get(&name).ok_or_else(|| {
        ApiError::param(format!("unknown quality `{name}`; expected low, standard, high, ultra or a custom level"), param)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_levels_follow_the_builtin_scale() {
        let turbo = custom("turbo", 2.0, 0.5, 3.0, 2048);
        assert_eq!(turbo.priority, 3);
        assert_eq!(turbo.min_score, 0.7);
        assert_eq!(turbo.cost_multiplier_bp, 30_000);
        assert_eq!(custom("eco", 1.0, 1.0, 0.5, 512).priority, 1);
        assert_eq!(turbo.precision, Precision::Full);
        assert_eq!(custom("eco", 1.0, 1.0, 0.5, 512).precision, Precision::ReducedAllowed);
        assert_eq!(custom("edge", 1.5, 1.0, 1.5, 512).precision, Precision::Full);
    }

    #[test]
    fn low_and_standard_allow_reduced_precision_high_and_ultra_need_full() {
        let precision = |name| builtin(name).map(|l| l.precision);
        assert_eq!(precision("low"), Some(Precision::ReducedAllowed));
        assert_eq!(precision("standard"), Some(Precision::ReducedAllowed));
        assert_eq!(precision("high"), Some(Precision::Full));
        assert_eq!(precision("ultra"), Some(Precision::Full));
    }
}
