-- Stored Responses API answers (`store: true`), for `GET /v1/responses/{id}` and
-- `previous_response_id`. `messages` is this turn's part of the conversation as chat
-- messages (its input items, then the assistant's answer without our ad), so a chain is
-- replayed by following `previous_id`; `body` is the response object as returned.
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    previous_id TEXT,
    created_at BIGINT NOT NULL,
    messages TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created_at ON responses (created_at);
