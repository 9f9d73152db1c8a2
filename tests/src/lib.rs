//! Test support: a counted mock OpenAI-compatible provider.
