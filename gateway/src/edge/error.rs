//! The one error type of the HTTP edge. Every failure a client can see maps here, and
//! one exhaustive `match` gives its status, OpenAI `type`/`code` and log level.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use openapi::error::{ErrorBody, ErrorObject};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest { message: String, param: Option<String>, code: Option<&'static str> },
    #[error("request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The request body did not arrive within `body_read_timeout_secs`.
    #[error("The request body did not arrive within {0} s.")]
    RequestTimeout(u64),
    #[error("Incorrect API key provided.")]
    InvalidApiKey,
    #[error("{0}")]
    PermissionDenied(String),
    #[error("The model `{model}` does not exist or no provider is serving it right now.")]
    ModelNotFound { model: String },
    #[error("{0}")]
    NotFound(String),
    /// A resource the request names (`param`) does not exist for this caller.
    #[error("{message}")]
    NotFoundParam { message: String, param: Option<String> },
    #[error("{0}")]
    Conflict(String),
    #[error("You exceeded your current quota: this request may cost up to ${:.6} but ${:.6} is available. Add credit and try again.", *needed as f64 / 1e6, *available as f64 / 1e6)]
    InsufficientQuota { needed: i64, available: i64 },
    /// A free key's request when the free tier is off or today's free budget is spent.
    #[error("{0}")]
    FreeTierClosed(String),
    #[error("Rate limit reached for {what} per minute; try again in {:.3}s.", retry_after.as_secs_f64())]
    RateLimited { what: &'static str, retry_after: std::time::Duration },
    /// A client address already holds `max_links_per_ip` provider links.
    #[error("This address already holds {0} provider links, the most this gateway allows (max_links_per_ip).")]
    TooManyLinks(u32),
    #[error("This key's {period} spending limit of ${:.2} would be exceeded by this request.", *limit as f64 / 1e6)]
    SpendingLimit { period: &'static str, limit: i64 },
    #[error("No provider is available for model `{model}` right now; try again shortly.")]
    NoProvider { model: String },
    /// The provider rejected the request itself (4xx): the client's request is at fault.
    #[error("{message}")]
    ProviderRejected { status: StatusCode, message: String, param: Option<String>, code: Option<String> },
    #[error("The provider failed: {0}")]
    ProviderFailed(String),
    #[error("The provider did not respond in time.")]
    ProviderTimeout,
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        Self::InvalidRequest { message: message.into(), param: param.into(), code: None }
    }

    pub fn param(message: impl Into<String>, param: &str) -> Self {
        Self::InvalidRequest { message: message.into(), param: Some(param.to_owned()), code: None }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::InvalidApiKey => StatusCode::UNAUTHORIZED,
            Self::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Self::ModelNotFound { .. } | Self::NotFound(_) | Self::NotFoundParam { .. } => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::InsufficientQuota { .. } | Self::FreeTierClosed(_) | Self::SpendingLimit { .. } | Self::RateLimited { .. } | Self::TooManyLinks(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::NoProvider { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::ProviderRejected { status, .. } => *status,
            Self::ProviderFailed(_) => StatusCode::BAD_GATEWAY,
            Self::ProviderTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error object: `(type, code, param)`.
    pub fn body(&self) -> ErrorBody {
        let (kind, code, param): (&str, Option<String>, Option<String>) = match self {
            Self::InvalidRequest { param, code, .. } => {
                ("invalid_request_error", code.map(str::to_owned), param.clone())
            }
            Self::UnsupportedMediaType => ("invalid_request_error", Some("unsupported_media_type".into()), None),
            Self::PayloadTooLarge { .. } => ("invalid_request_error", Some("request_too_large".into()), None),
            Self::RequestTimeout(_) => ("invalid_request_error", Some("request_timeout".into()), None),
            Self::InvalidApiKey => ("invalid_request_error", Some("invalid_api_key".into()), None),
            Self::PermissionDenied(_) => ("permission_error", Some("permission_denied".into()), None),
            Self::ModelNotFound { .. } => ("invalid_request_error", Some("model_not_found".into()), Some("model".into())),
            Self::NotFound(_) => ("invalid_request_error", Some("not_found".into()), None),
            Self::NotFoundParam { param, .. } => ("invalid_request_error", Some("not_found".into()), param.clone()),
            Self::Conflict(_) => ("invalid_request_error", Some("conflict".into()), None),
            Self::InsufficientQuota { .. } => ("insufficient_quota", Some("insufficient_quota".into()), None),
            Self::SpendingLimit { .. } => ("insufficient_quota", Some("spending_limit_exceeded".into()), None),
            Self::FreeTierClosed(_) => ("insufficient_quota", Some("free_tier_budget_exhausted".into()), None),
            Self::RateLimited { what, .. } => (*what, Some("rate_limit_exceeded".into()), None),
            Self::TooManyLinks(_) => ("requests", Some("too_many_links".into()), None),
            Self::NoProvider { .. } => ("server_error", Some("no_provider_available".into()), None),
            Self::ProviderRejected { param, code, .. } => ("invalid_request_error", code.clone(), param.clone()),
            Self::ProviderFailed(_) => ("server_error", Some("provider_error".into()), None),
            Self::ProviderTimeout => ("server_error", Some("provider_timeout".into()), None),
            Self::Internal(_) => ("server_error", Some("internal_error".into()), None),
        };
        ErrorBody { error: ErrorObject { message: self.to_string(), kind: kind.to_owned(), param, code } }
    }

    fn log(&self) {
        match self {
            Self::Internal(detail) => tracing::error!(%detail, "internal error"),
            Self::ProviderFailed(_) | Self::ProviderTimeout => tracing::warn!(error = %self, "provider error"),
            Self::NoProvider { .. } => tracing::warn!(error = %self, "no provider"),
            _ => tracing::debug!(error = %self, "request refused"),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::Internal(format!("database: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let status = self.status();
        let mut response = (status, axum::Json(self.body())).into_response();
        if matches!(self, Self::InsufficientQuota { .. } | Self::FreeTierClosed(_) | Self::SpendingLimit { .. }) {
            // Retrying cannot help until someone adds credit; the SDKs honour this header.
            response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if let Self::RateLimited { retry_after, .. } = &self {
            // The limiter's real wait, for the limit that denied the request.
            let ms = retry_after.as_millis().max(1);
            let secs = ms.div_ceil(1000);
            if let (Ok(s), Ok(m)) = (HeaderValue::from_str(&secs.to_string()), HeaderValue::from_str(&ms.to_string())) {
                response.headers_mut().insert("retry-after", s);
                response.headers_mut().insert("retry-after-ms", m);
            }
        }
        if matches!(self, Self::NoProvider { .. }) {
            response.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        }
        response
    }
}
