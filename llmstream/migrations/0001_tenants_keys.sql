-- Tenants, their API keys and quota tiers: shared by the gateway (auth, quota limits) and
-- the aggregator (billing). Keys are stored as SHA-256 of the whole key: keys are 256-bit
-- random secrets, so a slow password hash would add latency without adding safety.

CREATE TABLE quota_tiers (
    name                    text PRIMARY KEY,
    requests_per_minute     integer NOT NULL CHECK (requests_per_minute > 0),
    tokens_per_day          bigint  NOT NULL CHECK (tokens_per_day > 0),
    tokens_per_month        bigint  NOT NULL CHECK (tokens_per_month > 0),
    max_concurrent_streams  integer NOT NULL CHECK (max_concurrent_streams > 0),
    max_tokens_per_request  integer NOT NULL CHECK (max_tokens_per_request > 0),
    max_sockets             integer NOT NULL CHECK (max_sockets > 0)
);

INSERT INTO quota_tiers VALUES
    ('free',        20,      50000,     1000000,  4,   512,  8),
    ('standard',   600,    5000000,   100000000, 64,  2048, 256),
    ('enterprise', 6000, 100000000,  2000000000, 512, 4096, 4096);

CREATE TABLE tenants (
    id          text PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    tier        text NOT NULL REFERENCES quota_tiers (name),
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz
);

CREATE TABLE api_keys (
    id          text PRIMARY KEY,              -- public part of the key: lsk_<id>_<secret>
    tenant_id   text NOT NULL REFERENCES tenants (id),
    key_sha256  bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
