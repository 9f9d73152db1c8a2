//! The payout-service connector: each new withdrawal is sent to `payout_webhook_url`
//! as a JSON POST signed with HMAC-SHA256 (`x-signature: sha256=<hex>` over the raw
//! body), with `idempotency-key` = the withdrawal id so the service can dedupe retries.
//! Failed deliveries are retried with exponential backoff; a 2xx moves the withdrawal to
//! `processing`. The service reports the outcome to `POST /api/payment/payout-webhook`,
//! signed the same way. Without a URL the connector is manual (an admin marks payouts).

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ops::config::Config;
use crate::money::payments::{Payments, Withdrawal};

pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub fn verify(secret: &str, body: &[u8], header: Option<&str>) -> bool {
    let Some(given) = header.and_then(|h| h.strip_prefix("sha256=")).and_then(|h| hex::decode(h).ok()) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return false };
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// Sends the withdrawal to the payout service in the background, when one is configured.
pub fn dispatch(http: reqwest::Client, config: &Config, payments: Payments, withdrawal: Withdrawal) {
    let (Some(url), Some(secret)) = (config.payout_webhook_url.clone(), config.payout_webhook_secret.clone()) else { return };
    tokio::spawn(async move {
        let body = serde_json::json!({ "event": "payout.requested", "withdrawal": withdrawal }).to_string();
        let signature = sign(secret.expose(), body.as_bytes());
        for attempt in 0..6u32 {
            let sent = http
                .post(&url)
                .header("content-type", "application/json")
                .header("x-signature", &signature)
                .header("idempotency-key", &withdrawal.id)
                .body(body.clone())
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    if let Err(e) = payments.transition(&withdrawal.id, "processing", None).await {
                        tracing::warn!(withdrawal = %withdrawal.id, error = %e, "payout accepted but not moved to processing");
                    }
                    return;
                }
                Ok(r) => tracing::warn!(withdrawal = %withdrawal.id, status = %r.status(), attempt, "payout service refused; retrying"),
                Err(e) => tracing::warn!(withdrawal = %withdrawal.id, error = %e, attempt, "payout service unreachable; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        tracing::error!(withdrawal = %withdrawal.id, "payout service never accepted the withdrawal; it stays requested for an admin");
    });
}
