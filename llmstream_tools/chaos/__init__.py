"""Fault injection against a whole local deployment (`llmstream chaos`, `make chaos`;
docs/chaos.md).

- `check`: pure verdicts (what a client assembled vs the expected text, the event log, the
  ledger and the quota counters) and the table; `recovery`: stall spreads and the recovery
  goals (pure); `owner`: who owned a request when, for the zombie fault (pure);
- `client`: a WebSocket client session that reconnects to another gateway replica and resumes
  its open requests, and can stop reading (a network stall);
- `infra`: a private Kafka/PostgreSQL/Redis instance, so that faults of the infrastructure
  never touch the servers other tests and developers use;
- `faults`: injecting each fault with the evidence that it took effect; `netns` and `forward`:
  a stack process in its own network namespace, its link cut or slowed;
- `runner`: one phase per fault on one `llmstream_tools.stack.local_stack`, the verdict's
  inputs (`stores`: the ledger and Redis), the CLI; `soak` and `resources`: `--soak`, steady
  traffic and faults for a long time, RSS and fds of every process judged for growth;
- `options`, `report`: the faults and options of a run; its summary.
"""
