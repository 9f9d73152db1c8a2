//! Operators' endpoints: `GET /health` (this replica and its database) and
//! `GET /metrics` (Prometheus).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::schemas;
use crate::inference::{health, routing};
use crate::state::AppState;
use crate::store;

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4.", body = String, content_type = "text/plain; version=0.0.4; charset=utf-8")),
)]
pub async fn metrics_text(State(state): State<AppState>) -> Response {
    let stale_ms = state.config.stale_after_ms();
    let now = store::now_ms();
    let snapshot = state.registry.snapshot();
    let weights = state.config.weights();
    let base = routing::Baseline::of(snapshot.values());
    let online = snapshot.values().filter(|p| p.is_live(now, stale_ms)).count();
    let mut scores = Vec::new();
    let mut breakers = Vec::new();
    let mut in_flight = Vec::new();
    let mut fleet = Vec::new();
    for p in snapshot.values() {
        let label = format!("provider=\"{}\"", p.id);
        scores.push((label.clone(), routing::score(p, &weights, &base)));
        let open = p.load.health.snapshot().breaker != health::Breaker::Closed;
        breakers.push((label.clone(), if open { 1.0 } else { 0.0 }));
        in_flight.push((label.clone(), f64::from(p.load.in_flight.load(std::sync::atomic::Ordering::Relaxed))));
        fleet.push((label, f64::from(p.load.used())));
    }
    let replica = vec![(
        format!("replica=\"{}\",capacity=\"{}\",health=\"{}\"", state.replica, state.capacity.mode(), state.fleet_health.mode()),
        1.0,
    )];
    let gauges = [
        ("gs_active_streams", "Streams being relayed now.", vec![(String::new(), state.active_streams.load(std::sync::atomic::Ordering::Relaxed) as f64)]),
        ("gs_queued_requests", "Requests waiting for a provider slot.", vec![(String::new(), state.queued.load(std::sync::atomic::Ordering::Relaxed) as f64)]),
        ("gs_providers_online", "Providers on line (active, fresh heartbeat, a stream up).", vec![(String::new(), online as f64)]),
        ("gs_provider_score", "Routing score in [0, 1].", scores),
        ("gs_provider_breaker_open", "1 while the provider's circuit breaker is open or half-open.", breakers),
        ("gs_provider_in_flight", "Requests in flight per provider (this replica).", in_flight),
        ("gs_provider_fleet_in_flight", "Streams open to each provider as this replica sees the fleet (its own without Redis).", fleet),
        ("gs_replica_info", "This replica's id, how it counts provider slots (shared, fallback or local) and judges provider health (shared, alone or local).", replica),
        ("gs_live_replicas", "Replicas heard from on this database in the last 15 s.", vec![(String::new(), f64::from(state.capacity.replicas()))]),
        ("gs_capacity_fallback", "1 while Redis is unreachable and provider caps are divided among the replicas.",
            vec![(String::new(), if state.capacity.in_fallback() { 1.0 } else { 0.0 })]),
    ];
    let mut body = state.metrics.render(&gauges);
    state.ads.counters.render(&mut body);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// `GET /health`: 200 while the database answers, 503 otherwise.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    summary = "Liveness and database health",
    responses(
        (status = 200, description = "Healthy.", body = schemas::Health),
        (status = 503, description = "The database does not answer.", body = schemas::Health),
    ),
)]
pub async fn health(State(state): State<AppState>) -> Response {
    let db_ok = sqlx::query("SELECT 1").execute(&state.store.pool).await.is_ok();
    let body = serde_json::json!({
        "status": if db_ok { "ok" } else { "degraded" },
        "database": if db_ok { "ok" } else { "unreachable" },
        "activeStreams": state.active_streams.load(std::sync::atomic::Ordering::Relaxed),
        "providers": state.registry.snapshot().len(),
        "replica": {
            "id": state.replica,
            "liveReplicas": state.capacity.replicas(),
            "capacity": state.capacity.mode(),
            "health": state.fleet_health.mode(),
        },
    });
    let status = if db_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

