//! `/v1/embeddings`: one JSON answer per request, not a stream. The handler reads the
//! inputs with the same rules as the worker (`tokenize::embeddings`), counts their
//! tokens with the model's WordPiece tokenizer when the gateway has it (else bounds
//! them: a piece per character), routes to a live provider that lists the model in
//! `capabilities.embeddingModels`, and hands the request to `relay::embed`, which holds
//! the prompt's cost at the chosen provider's price, fails over until a provider
//! answers with one well-formed vector per input, and settles (usage row and ledger
//! entry, prompt tokens only) before the answer is sent. No ad rides on an embedding.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::{Extension, Json};
use bytes::Bytes;
use openapi::embeddings::{CreateEmbeddingRequest, Embedding, EmbeddingList, EmbeddingUsage, EncodingFormat};
use tokenize::embeddings::{Inputs, Refusal};

use crate::edge::error::ApiError;
use crate::edge::extract::{self, RequestId};
use crate::edge::keys::AuthedKey;
use crate::edge::ratelimit::RateCtx;
use crate::inference::relay::{self, Dispatch, Endpoint};
use crate::inference::{quality, routing};
use crate::state::AppState;
use crate::store::now_ms;

/// Bodies up to this size are tokenized on the request's task; larger ones on the
/// blocking pool (a 4 MiB body of text takes tens of milliseconds).
const INLINE_TOKENIZE_BYTES: usize = 64 * 1024;

fn refused(r: Refusal) -> ApiError {
    ApiError::param(r.message, r.param)
}

#[utoipa::path(
    post,
    path = "/v1/embeddings",
    tag = "openai",
    summary = "Create embeddings",
    request_body = openapi::embeddings::CreateEmbeddingRequest,
    security(("user_key" = [])),
    responses(
        (status = 200, description = "A vector per input, in order; `usage` counts the prompt tokens (`[CLS]` and `[SEP]` included) and `usage.cost` is the charge.", body = openapi::embeddings::EmbeddingList),
        (status = 400, description = "Invalid request: a bad or missing field, an empty or oversized `input`, a token id outside the vocabulary, an input longer than the model's context without `truncate`, or `dimensions` the model does not have (`param` names it), or malformed JSON.", body = openapi::error::ErrorBody),
        crate::api::schemas::Unauthorized,
        (status = 404, description = "No live provider serves this embedding model.", body = openapi::error::ErrorBody),
        crate::api::schemas::RelayFailures,
    ),
)]
pub async fn create_embeddings(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<AuthedKey>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    rate: Option<Extension<Arc<RateCtx>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<EmbeddingList>, ApiError> {
    let started = Instant::now();
    let mut request: CreateEmbeddingRequest = extract::parse(&headers, &body)?;
    if request.model.trim().is_empty() {
        return Err(ApiError::param("`model` must not be empty", "model"));
    }
    if request.dimensions == Some(0) {
        return Err(ApiError::param("`dimensions` must be at least 1", "dimensions"));
    }
    let (inputs, prompt_tokens) = if body.len() <= INLINE_TOKENIZE_BYTES {
        count(&state, &request)?
    } else {
        let (s, r) = (state.clone(), request.clone());
        tokio::task::spawn_blocking(move || count(&s, &r)).await.map_err(|e| ApiError::Internal(format!("tokenizing: {e}")))??
    };
    let base64 = request.encoding_format == Some(EncodingFormat::Base64);
    request.encoding_format = Some(if base64 { EncodingFormat::Base64 } else { EncodingFormat::Float });
    request.user = Some(state.pseudonym(&key.user_id));
    let upstream = serde_json::to_vec(&request).map_err(|e| ApiError::Internal(format!("encode upstream request: {e}")))?;
    let level = quality::builtin("standard").ok_or_else(|| ApiError::Internal("no standard level".into()))?;
    let candidates = routing::embedding_candidates(&state.registry.snapshot(), &request.model, now_ms(), state.config.stale_after_ms());
    let dispatch = Dispatch {
        endpoint: Endpoint::Embeddings { inputs, base64 },
        request_id,
        key,
        model: request.model.clone(),
        quality: level.name.clone(),
        cost_multiplier_bp: level.cost_multiplier_bp,
        level,
        body_bytes: u32::try_from(upstream.len()).unwrap_or(u32::MAX),
        max_completion_tokens: 0,
        prompt_tokens: Some(prompt_tokens),
        reservation: None,
        rate: rate.map(|r| r.0),
        body: Bytes::from(upstream),
        features: Vec::new(),
        candidates,
        started,
    };
    let answer = relay::embed(&state, dispatch).await?;
    let data = answer
        .embeddings
        .into_iter()
        .zip(0u32..)
        .map(|(embedding, index)| Embedding { object: "embedding".to_owned(), index, embedding })
        .collect();
    let usage = answer.usage;
    Ok(Json(EmbeddingList {
        object: "list".to_owned(),
        data,
        model: request.model,
        usage: EmbeddingUsage { prompt_tokens: usage.prompt_tokens, total_tokens: usage.total_tokens, cost: usage.cost.unwrap_or(0.0) },
    }))
}

/// The request's inputs and prompt tokens: counted with the model's tokenizer (which
/// also refuses token ids outside its vocabulary and, when its context is known,
/// inputs longer than it), else the most they can be.
fn count(state: &AppState, request: &CreateEmbeddingRequest) -> Result<(u32, u32), ApiError> {
    let inputs = Inputs::parse(request.input.as_ref()).map_err(refused)?;
    let tokens = match state.tokenizers.embedding(&request.model) {
        Some(t) => {
            let context = t.max_positions.unwrap_or(usize::MAX);
            let sequences = inputs.sequences(&t.wordpiece, context, request.truncate).map_err(refused)?;
            sequences.iter().map(|s| s.len() as u64).sum()
        }
        None => inputs.most_tokens(),
    };
    let as_u32 = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    Ok((as_u32(inputs.len() as u64), as_u32(tokens)))
}
