"""Fault injection against a whole local deployment (`llmstream chaos`, `make chaos`).

- `check`: pure verdicts (what a client assembled vs the expected text, the event log, the
  ledger and the quota counters) and the table; `recovery`: stall spreads and the recovery
  goals (pure); `owner`: who owned a request when, for the zombie fault (pure);
- `client`: a WebSocket client session that reconnects to another gateway replica and resumes
  its open requests, and can stop reading (a network stall);
- `infra`: a private Kafka/PostgreSQL/Redis instance, so that faults of the infrastructure
  never touch the servers other tests and developers use;
- `runner`: the faults, one phase each on one `llmstream_tools.stack.local_stack`, and the CLI.
"""
