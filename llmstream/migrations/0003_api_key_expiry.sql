-- API keys may carry an expiry: the gateway refuses a key from expires_at on, on the next
-- action of an open socket too (not only at connect). NULL: the key does not expire.
ALTER TABLE api_keys ADD COLUMN expires_at timestamptz;
