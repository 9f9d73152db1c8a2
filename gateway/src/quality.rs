//! Quality tiers (DESIGN.md's table): what a tier changes on the provider side.
//! Custom levels at run time come with the routing issue; the four built-ins are here.

use axum::http::HeaderMap;

use crate::error::ApiError;

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
}

pub fn builtin(name: &str) -> Option<QualityLevel> {
    let (cost, latency, max_tokens, priority) = match name {
        "low" => (8_000, 0.7, 1024, 0),
        "standard" => (10_000, 1.0, 4096, 1),
        "high" => (15_000, 1.3, 8192, 2),
        "ultra" => (20_000, 1.6, 16384, 3),
        _ => return None,
    };
    Some(QualityLevel { name: name.to_owned(), cost_multiplier_bp: cost, latency_multiplier: latency, max_tokens, priority })
}

/// Splits `model:high` into the model and its quality suffix when the suffix is a tier.
pub fn split_model_suffix(model: &str) -> (&str, Option<&str>) {
    match model.rsplit_once(':') {
        Some((base, suffix)) if builtin(suffix).is_some() && !base.is_empty() => (base, Some(suffix)),
        _ => (model, None),
    }
}

/// Resolves the tier from, in order: the body's `quality`, a model suffix, the `x-quality` header.
pub fn resolve(body: Option<&str>, suffix: Option<&str>, headers: &HeaderMap) -> Result<QualityLevel, ApiError> {
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
    builtin(&name).ok_or_else(|| {
        ApiError::param(format!("unknown quality `{name}`; expected one of low, standard, high, ultra"), param)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_order_and_errors() {
        let mut headers = HeaderMap::new();
        headers.insert("x-quality", "ultra".parse().unwrap());
        assert_eq!(resolve(Some("low"), Some("high"), &headers).unwrap().name, "low");
        assert_eq!(resolve(None, Some("high"), &headers).unwrap().name, "high");
        assert_eq!(resolve(None, None, &headers).unwrap().name, "ultra");
        assert_eq!(resolve(None, None, &HeaderMap::new()).unwrap().name, "standard");
        assert!(resolve(Some("turbo"), None, &headers).is_err());
        assert_eq!(split_model_suffix("llama:high"), ("llama", Some("high")));
        assert_eq!(split_model_suffix("org/model:v2"), ("org/model:v2", None));
    }
}
