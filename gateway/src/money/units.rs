//! One money convention for the HTTP API: USD as a JSON number in the named field
//! (`amount`, `cpmBid`, `dailyBudget`, `balance`, …) and the exact amount in integer
//! micro-USD in its `…Micros` twin (`amountMicros`, `cpmBidMicros`, …). Both are
//! accepted on input and both are returned. Inside, money is always integer micro-USD.

use crate::edge::error::ApiError;

/// Micro-USD: every amount inside the gateway.
pub type Micros = i64;

pub const MICROS_PER_USD: i64 = 1_000_000;

/// Micro-USD as USD, for the named field of a response.
#[allow(clippy::cast_precision_loss)]
pub fn usd(micros: i64) -> f64 {
    micros as f64 / MICROS_PER_USD as f64
}

/// One money field of a request: `name` in USD, `twin` (`nameMicros`) in micro-USD.
pub struct Field<'a> {
    pub name: &'a str,
    pub twin: &'a str,
    /// The largest amount the field takes, in micro-USD.
    pub max_micros: i64,
}

impl Field<'_> {
    /// The amount in micro-USD from either form, `None` when neither is given. Refused
    /// with a 400 naming the field: a negative amount, USD with more than six decimals,
    /// an amount over the maximum (a micro-USD amount sent in the USD field, say), or
    /// both forms given and disagreeing.
    pub fn micros(&self, in_usd: Option<f64>, micros: Option<i64>) -> Result<Option<i64>, ApiError> {
        let (name, twin) = (self.name, self.twin);
        let max = self.max_micros;
        let from_usd = match in_usd {
            None => None,
            Some(v) => {
                if !v.is_finite() || v < 0.0 {
                    return Err(ApiError::param(format!("`{name}` must be a non-negative USD amount"), name));
                }
                let scaled = v * 1e6;
                #[allow(clippy::cast_precision_loss)]
                if scaled > max as f64 {
                    return Err(ApiError::param(
                        format!(
                            "`{name}` is at most {} USD, got {v}; for an amount in micro-USD use `{twin}`",
                            usd(max)
                        ),
                        name,
                    ));
                }
                if (scaled - scaled.round()).abs() > 1e-3 {
                    return Err(ApiError::param(format!("`{name}` has more than six decimals (micro-USD is the unit); use `{twin}` for exact amounts"), name));
                }
                #[allow(clippy::cast_possible_truncation)]
                Some(scaled.round() as i64)
            }
        };
        if let Some(m) = micros {
            if m < 0 || m > max {
                return Err(ApiError::param(format!("`{twin}` must be between 0 and {max} micro-USD"), twin));
            }
        }
        match (from_usd, micros) {
            (Some(a), Some(b)) if a != b => Err(ApiError::param(
                format!("`{name}` ({} USD) and `{twin}` ({b}) disagree; send one of them", in_usd.unwrap_or_default()),
                name,
            )),
            (a, b) => Ok(a.or(b)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AMOUNT: Field<'static> = Field { name: "amount", twin: "amountMicros", max_micros: 1_000_000_000_000 };

    fn param(r: Result<Option<i64>, ApiError>) -> Option<String> {
        r.err().and_then(|e| e.body().error.param)
    }

    #[test]
    fn either_form_gives_micros() {
        assert_eq!(AMOUNT.micros(Some(2.5), None).unwrap(), Some(2_500_000));
        assert_eq!(AMOUNT.micros(None, Some(2_500_000)).unwrap(), Some(2_500_000));
        assert_eq!(AMOUNT.micros(Some(0.1), Some(100_000)).unwrap(), Some(100_000));
        assert_eq!(AMOUNT.micros(Some(0.000_001), None).unwrap(), Some(1));
        assert_eq!(AMOUNT.micros(None, None).unwrap(), None);
    }

    #[test]
    fn ambiguous_or_impossible_amounts_are_refused() {
        // A micro-USD amount in the USD field: over the maximum.
        assert_eq!(param(AMOUNT.micros(Some(1_000_000_000.0), None)).as_deref(), Some("amount"));
        assert_eq!(param(AMOUNT.micros(Some(1.5), Some(1_000_000))).as_deref(), Some("amount"));
        assert_eq!(param(AMOUNT.micros(Some(0.000_000_5), None)).as_deref(), Some("amount"));
        assert_eq!(param(AMOUNT.micros(Some(-1.0), None)).as_deref(), Some("amount"));
        assert_eq!(param(AMOUNT.micros(None, Some(-1))).as_deref(), Some("amountMicros"));
    }
}
