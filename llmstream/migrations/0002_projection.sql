-- Projection of the event log (written by the aggregator, see docs/aggregator.md).
-- Kafka is the source of truth: every table here except `prices` can be rebuilt from the
-- topics with `llmstream replay --rebuild`.

-- Effective-dated prices per 1,000 tokens. The price of a bill is the row of its model (or of
-- the wildcard model '*') with the latest effective_from <= the bill's time.
CREATE TABLE prices (
    model               text        NOT NULL,
    effective_from      timestamptz NOT NULL,
    prompt_per_1k       numeric(20, 9) NOT NULL CHECK (prompt_per_1k >= 0),
    completion_per_1k   numeric(20, 9) NOT NULL CHECK (completion_per_1k >= 0),
    currency            text        NOT NULL DEFAULT 'USD',
    PRIMARY KEY (model, effective_from)
);

-- One row per request: its folded state. `fold_state` is RequestState.as_dict() (without text)
-- from llmstream/fold.py, the state the aggregator resumes folding from; the other columns
-- are the same facts typed for queries. No foreign key to tenants: the log is the truth and a
-- request is projected even if its tenant row is missing.
CREATE TABLE requests (
    request_id          text PRIMARY KEY,
    tenant_id           text,
    model               text,
    status              text NOT NULL DEFAULT 'unknown' CHECK (status IN
                            ('unknown', 'queued', 'running', 'completed', 'cancelled', 'failed')),
    submitted_at        timestamptz,
    started_at          timestamptz,
    first_token_at      timestamptz,
    finished_at         timestamptz,
    ttft_ms             bigint,
    finish_reason       text,
    finish_message      text,
    error_code          text,
    prompt_tokens       bigint  NOT NULL DEFAULT 0,
    completion_tokens   bigint  NOT NULL DEFAULT 0,
    reserved_tokens     bigint  NOT NULL DEFAULT 0,
    attempts            integer NOT NULL DEFAULT 0,
    last_seq            bigint  NOT NULL DEFAULT 0,
    cancel_requested    boolean NOT NULL DEFAULT false,
    text                text,            -- NULL when LLMSTREAM_STORE_TEXT=0
    fold_state          jsonb   NOT NULL DEFAULT '{}',
    billed              boolean NOT NULL DEFAULT false,
    terminal_topic      text,            -- the record that made the request terminal
    terminal_partition  integer,
    terminal_offset     bigint,
    updated_at          timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 80);  -- room for HOT updates: a running request is rewritten per batch

CREATE INDEX requests_tenant_submitted ON requests (tenant_id, submitted_at);
CREATE INDEX requests_submitted ON requests (submitted_at);
-- Terminal requests that cannot be billed yet (no submitted event): monitored, see docs.
CREATE INDEX requests_parked ON requests (finished_at)
    WHERE status IN ('completed', 'cancelled', 'failed') AND NOT billed;

-- The bill: one row per terminal request, append-only. billed_at is the terminal event's time.
CREATE TABLE usage_ledger (
    id                  bigserial PRIMARY KEY,
    request_id          text    NOT NULL UNIQUE,
    tenant_id           text    NOT NULL,
    model               text    NOT NULL,
    status              text    NOT NULL,
    finish_reason       text    NOT NULL,
    prompt_tokens       bigint  NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens   bigint  NOT NULL CHECK (completion_tokens >= 0),
    total_tokens        bigint  GENERATED ALWAYS AS (prompt_tokens + completion_tokens) STORED,
    cost                numeric(20, 9),  -- NULL: no price was effective (see prices)
    currency            text,
    price_effective_from timestamptz,
    billed_at           timestamptz NOT NULL,
    submitted_at        timestamptz NOT NULL,
    reserved_tokens     bigint  NOT NULL,
    source_topic        text,
    source_partition    integer,
    source_offset       bigint,
    recorded_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX usage_ledger_tenant_billed ON usage_ledger (tenant_id, billed_at);

CREATE FUNCTION usage_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'usage_ledger is append-only (% refused)', TG_OP;
END $$;

CREATE TRIGGER usage_ledger_append_only
    BEFORE UPDATE OR DELETE ON usage_ledger
    FOR EACH ROW EXECUTE FUNCTION usage_ledger_append_only();

CREATE TRIGGER usage_ledger_no_truncate
    BEFORE TRUNCATE ON usage_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION usage_ledger_append_only();

-- Daily rollup per tenant and model (UTC day of billed_at), maintained by the aggregator in the
-- same transaction as the ledger rows (table, not view: see docs/aggregator.md for the numbers).
CREATE TABLE usage_daily (
    day                 date    NOT NULL,
    tenant_id           text    NOT NULL,
    model               text    NOT NULL,
    requests            bigint  NOT NULL DEFAULT 0,
    completed           bigint  NOT NULL DEFAULT 0,
    cancelled           bigint  NOT NULL DEFAULT 0,
    failed              bigint  NOT NULL DEFAULT 0,
    prompt_tokens       bigint  NOT NULL DEFAULT 0,
    completion_tokens   bigint  NOT NULL DEFAULT 0,
    cost                numeric(20, 9) NOT NULL DEFAULT 0,
    unpriced_requests   bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tenant_id, model)
);

CREATE INDEX usage_daily_tenant ON usage_daily (tenant_id, day);

-- Next offset to consume per (consumer group, topic, partition): written in the same
-- transaction as the projection rows it produced. The aggregator seeks to these on assignment
-- (Kafka's committed offsets are only informational, for lag monitoring).
CREATE TABLE consumer_offsets (
    consumer_group      text    NOT NULL,
    topic               text    NOT NULL,
    partition           integer NOT NULL,
    next_offset         bigint  NOT NULL CHECK (next_offset >= 0),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Quota settlements committed with their bill but not yet applied to Redis (outbox). Rows are
-- deleted once Redis accepted them; Redis remembers settled ids, so retries never double-apply.
CREATE TABLE quota_outbox (
    request_id          text PRIMARY KEY,
    tenant_id           text    NOT NULL,
    submitted_at        timestamptz NOT NULL,
    reserved_tokens     bigint  NOT NULL,
    used_tokens         bigint  NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);
