-- taskexec store, SQLite schema v2: the request digest of an idempotency key.
--
-- `request_hash` is the SHA-256 (lowercase hex) of the canonical JSON of the
-- task as submitted; a later submission of the same idempotency key with
-- another digest is refused. NULL (rows stored before v2, and submissions
-- that carry no digest) matches any request.
--
-- `idempotency_key` now holds the stored key: the client's key, after its
-- credential's scope and a unit separator (U+001F) when the scope is not
-- the shared one. Rows stored before v2 are in the shared scope.

ALTER TABLE tasks ADD COLUMN request_hash TEXT;
