"""`llmstream model-server`: run the gRPC model server.

Examples::

    llmstream model-server --engine llamacpp            # SmolLM2-135M-Instruct on CPU
    llmstream model-server --engine vllm                # the same model on vLLM (`make vllm`)
    llmstream model-server --engine synthetic --synthetic-itl-ms 5
    llmstream model-server --models models.yaml        # several named models

vLLM lives in its own virtualenv: when it is not importable here, the command re-executes
itself with that virtualenv's Python (`model_server/vllm_env.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence

from llmstream import config, runner
from model_server import vllm_env
from model_server.admin import AdminTokenError, AdminTokens
from model_server.admin_options import AdminPolicy, known_models, model_dirs
from model_server.engines import ENGINES
from model_server.registry import ModelSpec
from model_server.settings import ModelsConfigError, load_models_file
from model_server.types import ModelLimits

DEFAULT_NAMES = {"llamacpp": "smollm2", "synthetic": "synthetic"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmstream model-server",
        description="gRPC model server (ModelService): bidirectional token streaming over "
        "llama.cpp, vLLM or a synthetic engine. Defaults come from LLMSTREAM_* variables.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--engine",
        choices=sorted(ENGINES),
        default=config.get("ENGINE"),
        help="engine of the single model served when --models is not given",
    )
    p.add_argument(
        "--models",
        default=config.get("MODEL_SERVER_MODELS") or None,
        help="YAML file with several named models (overrides --engine)",
    )
    p.add_argument(
        "--model-name",
        default=None,
        help="name of the single model (default: smollm2 / synthetic / vLLM model)",
    )
    p.add_argument("--host", default=config.get("MODEL_SERVER_HOST"))
    p.add_argument("--port", type=int, default=config.get_int("MODEL_SERVER_PORT"))
    p.add_argument(
        "--metrics-port",
        type=int,
        default=config.get_int("MODEL_SERVER_METRICS_PORT"),
        help="Prometheus /metrics port; 0 disables it",
    )
    p.add_argument(
        "--metrics-host", default=None, help="bind address of /metrics (default: --host)"
    )
    limits = p.add_argument_group("limits (per model; the models file can override them)")
    limits.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="sequences decoded at once (default: llamacpp instances; synthetic 256; vLLM 64)",
    )
    limits.add_argument("--max-queue", type=int, default=config.get_int("MODEL_SERVER_MAX_QUEUE"))
    limits.add_argument("--max-context", type=int, default=2048)
    limits.add_argument("--max-tokens", type=int, default=1024)
    limits.add_argument("--default-max-tokens", type=int, default=256)
    limits.add_argument("--queue-timeout-s", type=float, default=30.0)
    limits.add_argument("--request-timeout-s", type=float, default=600.0)
    srv = p.add_argument_group("server")
    srv.add_argument(
        "--drain-timeout-s", type=float, default=float(config.get("MODEL_SERVER_DRAIN_TIMEOUT_S"))
    )
    srv.add_argument(
        "--max-message-bytes", type=int, default=config.get_int("MODEL_SERVER_MAX_MESSAGE_BYTES")
    )
    srv.add_argument(
        "--tls-cert",
        default=config.get("MODEL_SERVER_TLS_CERT"),
        help="PEM certificate: serve gRPC over TLS (with --tls-key)",
    )
    srv.add_argument("--tls-key", default=config.get("MODEL_SERVER_TLS_KEY"))
    srv.add_argument(
        "--start-timeout-s",
        type=float,
        default=10.0,
        help="longest wait for the start message of a Generate stream",
    )
    srv.add_argument(
        "--reflection",
        action=argparse.BooleanOptionalAction,
        default=config.get_bool("MODEL_SERVER_REFLECTION"),
        help="gRPC server reflection (grpcurl without .proto files); --no-reflection in production",
    )
    adm = p.add_argument_group(
        "admin RPC (ModelAdminService: LoadModel/UnloadModel; docs/model_server.md). The bearer "
        "token comes from LLMSTREAM_MODEL_SERVER_ADMIN_TOKEN_FILE or "
        "LLMSTREAM_MODEL_SERVER_ADMIN_TOKEN, never from the command line"
    )
    adm.add_argument(
        "--admin",
        action=argparse.BooleanOptionalAction,
        default=config.get_bool("MODEL_SERVER_ADMIN"),
        help="serve the admin RPC on its own port (needs a token)",
    )
    adm.add_argument("--admin-host", default=config.get("MODEL_SERVER_ADMIN_HOST"))
    adm.add_argument("--admin-port", type=int, default=config.get_int("MODEL_SERVER_ADMIN_PORT"))
    adm.add_argument(
        "--admin-model-dirs",
        default=config.get("MODEL_SERVER_ADMIN_MODEL_DIRS"),
        help="comma-separated directories LoadModel may load weights from (empty: "
        "$LLMSTREAM_CACHE_DIR/models)",
    )
    adm.add_argument(
        "--admin-max-instances",
        type=int,
        default=config.get_int("MODEL_SERVER_ADMIN_MAX_INSTANCES"),
        help="most llama.cpp instances one LoadModel may ask for",
    )
    srv.add_argument("--log-level", default=config.get("LOG_LEVEL"))
    lc = p.add_argument_group("llamacpp engine")
    lc.add_argument("--llamacpp-model-path", default=config.get("LLAMACPP_MODEL_PATH") or None)
    lc.add_argument("--llamacpp-instances", type=int, default=config.get_int("LLAMACPP_INSTANCES"))
    lc.add_argument("--llamacpp-threads", type=int, default=config.get_int("LLAMACPP_THREADS"))
    syn = p.add_argument_group("synthetic engine (not a model)")
    syn.add_argument(
        "--synthetic-ttft-ms", type=float, default=float(config.get("SYNTHETIC_TTFT_MS"))
    )
    syn.add_argument(
        "--synthetic-itl-ms", type=float, default=float(config.get("SYNTHETIC_ITL_MS"))
    )
    vl = p.add_argument_group("vllm engine (max_num_seqs is --max-concurrency)")
    vl.add_argument(
        "--vllm-model",
        default=config.get("VLLM_MODEL") or None,
        help="model name or local path (default: SmolLM2-135M-Instruct converted by make vllm)",
    )
    vl.add_argument(
        "--vllm-tensor-parallel-size",
        type=int,
        default=config.get_int("VLLM_TENSOR_PARALLEL_SIZE"),
        help="GPUs one replica of the model is split over",
    )
    vl.add_argument(
        "--vllm-gpu-memory-utilization",
        type=float,
        default=config.get_float("VLLM_GPU_MEMORY_UTILIZATION"),
        help="share of each GPU's memory for weights and KV cache (ignored on CPU)",
    )
    return p


def base_limits(args: argparse.Namespace) -> ModelLimits:
    """The limits of the command line (a models file may override them per model)."""
    return ModelLimits(
        max_concurrency=args.max_concurrency or 4,
        max_queue=args.max_queue,
        max_context=args.max_context,
        max_tokens=args.max_tokens,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        queue_timeout_s=args.queue_timeout_s,
        request_timeout_s=args.request_timeout_s,
    )


def single_model_spec(args: argparse.Namespace, base: ModelLimits) -> ModelSpec:
    engine: str = args.engine
    options: dict[str, object] = {}
    concurrency = args.max_concurrency
    if engine == "llamacpp":
        options = {"instances": args.llamacpp_instances, "n_threads": args.llamacpp_threads}
        if args.llamacpp_model_path:
            options["model_path"] = args.llamacpp_model_path
        concurrency = concurrency or args.llamacpp_instances
    elif engine == "synthetic":
        options = {"ttft_ms": args.synthetic_ttft_ms, "itl_ms": args.synthetic_itl_ms}
        concurrency = concurrency or 256
    elif engine == "vllm":
        try:
            model = args.vllm_model or vllm_env.default_model()
        except FileNotFoundError as exc:
            raise ModelsConfigError(str(exc)) from None
        options = {
            "model": model,
            "tensor_parallel_size": args.vllm_tensor_parallel_size,
            "gpu_memory_utilization": args.vllm_gpu_memory_utilization,
        }
        concurrency = concurrency or 64
    name = args.model_name or DEFAULT_NAMES.get(engine)
    if not name:  # vllm: the converted SmolLM2 keeps the llama.cpp engine's name
        name = (
            os.path.basename(str(args.vllm_model).rstrip("/"))
            if args.vllm_model
            else vllm_env.SMOLLM2_NAME
        )
    limits = dataclasses.replace(base, max_concurrency=int(concurrency))
    return ModelSpec(name=name, engine=engine, limits=limits, options=options)


def main(argv: Sequence[str], *, reexec: bool = True) -> int:
    """``reexec``: run under the vLLM virtualenv when a vllm model needs it (``python -m
    model_server``, which that re-execution runs, passes False)."""
    try:
        args = build_parser().parse_args(list(argv))
    except config.ConfigError as exc:
        return runner.fail("model-server", str(exc))
    base = base_limits(args)
    try:
        specs = (
            load_models_file(args.models, base) if args.models else [single_model_spec(args, base)]
        )
    except (ModelsConfigError, config.ConfigError) as exc:
        return runner.fail("model-server", str(exc))
    if reexec and any(s.engine == "vllm" for s in specs) and not vllm_env.vllm_importable():
        vllm_env.reexec_in_vllm_venv(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        return runner.fail("model-server", "--tls-cert and --tls-key go together")
    tokens = AdminTokens(
        file=config.get("MODEL_SERVER_ADMIN_TOKEN_FILE"),
        value=config.get("MODEL_SERVER_ADMIN_TOKEN"),
    )
    if args.admin:
        try:
            tokens.load()  # refuse to start an admin port nobody can (or everybody could) use
        except AdminTokenError as exc:
            return runner.fail("model-server", f"--admin needs a token: {exc}")
    policy = AdminPolicy(
        model_dirs=model_dirs(args.admin_model_dirs, config.cache_dir() / "models"),
        known_models=known_models(specs),
        max_instances=args.admin_max_instances,
    )

    from model_server.server import Settings, serve

    cfg = Settings(
        host=args.host,
        port=args.port,
        models=specs,
        max_message_bytes=args.max_message_bytes,
        drain_timeout_s=args.drain_timeout_s,
        start_timeout_s=args.start_timeout_s,
        admin=args.admin,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        admin_tokens=tokens,
        admin_policy=policy,
        reflection=args.reflection,
        default_limits=base,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    proc = runner.ServiceProcess(
        name="model-server",
        log_level=args.log_level,
        listens=[
            runner.Listen(args.host, args.port, "model server gRPC", "LLMSTREAM_MODEL_SERVER_PORT"),
            *(
                [
                    runner.Listen(
                        args.admin_host,
                        args.admin_port,
                        "model server admin gRPC",
                        "LLMSTREAM_MODEL_SERVER_ADMIN_PORT",
                    )
                ]
                if args.admin
                else []
            ),
        ],
        metrics=runner.Listen(
            args.metrics_host or args.host,
            args.metrics_port,
            "model server metrics",
            "LLMSTREAM_MODEL_SERVER_METRICS_PORT",
        ),
    )
    return runner.run(proc, lambda shutdown: serve(cfg, shutdown))
