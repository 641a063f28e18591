"""Authentication and authorization of the local Kafka: SASL/SCRAM users, a principal per
service, and the ACLs that say what each may do (docs/security.md has the matrix as a table).

- Users are generated once into `$LLMSTREAM_STATE_DIR/kafka/credentials.json` (0600) before a
  new cluster is formatted, and bootstrapped into the KRaft metadata by the storage format
  (`--add-scram`, KIP-900; read by the tool from an argument file, never the command line).
- The client listener is SASL_PLAINTEXT with SCRAM-SHA-512; the controller listener SASL/PLAIN
  with the brokers' own static user (KRaft controllers cannot use SCRAM: the credentials live
  in the metadata they serve). `admin` may also use PLAIN on the client listener, for
  Debian's kcat: librdkafka before 2.6.1 cannot finish a SCRAM exchange with Kafka 4
  (confluentinc/librdkafka#4895).
- StandardAuthorizer with `allow.everyone.if.no.acl.found=false`: a principal may do only what
  an ACL grants; `broker` and `admin` are super users.
- The ACLs are re-applied on every `infra up` (CreateAcls is idempotent; ~20 small requests),
  so a changed matrix takes effect without reformatting.

A cluster formatted before authentication existed has no credentials file: a running broker of
that kind is reused as it is (PLAINTEXT), a stopped one is refused with how to reformat it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstream import config, kafka, topics

from ._common import InfraError, read_text, write_text
from ._kafka_nodes import NAME, is_external, kafka_dir, props_file

MECHANISM = "SCRAM-SHA-512"
PROTOCOL = "SASL_PLAINTEXT"
ADMIN = "admin"  # `llmstream infra`, topic creation, tests' admin operations: a super user
BROKER = "broker"  # the brokers themselves: inter-broker and controller connections
SERVICES = ("gateway", "worker", "aggregator")
USERS = (ADMIN, BROKER, *SERVICES)

# Topic and consumer-group name prefixes of tests and benchmarks that start services with names
# of their own (`test.agg.<hex>.prompts`, groups `agg-cli-<hex>`, `g-<hex>`): each service
# principal may read and write them, so those runs work under the service's own principal.
# Local infra only (compose and k8s grant the platform names alone).
TEST_PREFIXES = ("test", "bench")
TEST_GROUP_PREFIXES = (*TEST_PREFIXES, "agg-", "g-")


def credentials_file() -> Path:
    return kafka_dir() / "credentials.json"


def load() -> dict[str, str] | None:
    """user -> password, or None for a cluster formatted before authentication existed."""
    text = read_text(credentials_file())
    if not text:
        return None
    data = json.loads(text)
    users = data.get("users", {})
    missing = [u for u in USERS if u not in users]
    if missing:
        raise InfraError(
            NAME,
            f"{credentials_file()} lacks user(s) {', '.join(missing)}",
            f"restore the file, or `llmstream infra down` and delete {kafka_dir()} to start over",
        )
    return {str(k): str(v) for k, v in users.items()}


def ensure() -> dict[str, str]:
    """The users of a cluster about to be formatted: generated once (0600)."""
    users = load()
    if users is None:
        users = {u: secrets.token_hex(24) for u in USERS}
        body = {"mechanism": MECHANISM, "users": users}
        write_text(credentials_file(), json.dumps(body, indent=2) + "\n", mode=0o600)
    return users


def active() -> bool:
    """True if the (last rendered) broker config authenticates clients."""
    return credentials_file().exists() and PROTOCOL in (read_text(props_file()) or "")


def describe() -> str:
    if active():
        return f"{PROTOCOL}/{MECHANISM} + ACLs"
    return "PLAINTEXT without authentication (formatted before it; delete the data to reformat)"


def client_kwargs(user: str = ADMIN) -> dict[str, Any]:
    """aiokafka keyword arguments of `user` on the local cluster (nothing when it runs without
    authentication); on an external cluster (LLMSTREAM_KAFKA_BOOTSTRAP), this process's own
    (`llmstream.kafka.Connection.from_env`)."""
    if is_external():
        return kafka.Connection.from_env().security_kwargs()
    users = load() if active() else None
    if users is None:
        return {}
    return {
        "security_protocol": PROTOCOL,
        "sasl_mechanism": MECHANISM,
        "sasl_plain_username": user,
        "sasl_plain_password": users[user],
    }


def record_values() -> dict[str, Any]:
    """What infra.json says about Kafka's credentials (`llmstream.config.kafka_auth` reads it):
    every principal's password, or none for a cluster without authentication."""
    users = load() if active() else None
    if users is None:
        return {"kafka_security_protocol": "PLAINTEXT", "kafka_users": {}}
    return {
        "kafka_security_protocol": PROTOCOL,
        "kafka_sasl_mechanism": MECHANISM,
        "kafka_users": {u: p for u, p in users.items() if u != BROKER},
    }


def write_client_configs() -> tuple[Path, Path]:
    """`kafka/admin.properties` (Kafka's own tools: `--command-config`) and
    `kafka/kcat.properties` (`kcat -F`, SASL/PLAIN: see the module docstring), both 0600, with
    the `admin` user, for operators of the local infra (docs/security.md)."""
    password = ensure()[ADMIN]
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
    java, kcat = kafka_dir() / "admin.properties", kafka_dir() / "kcat.properties"
    write_text(
        java,
        f"security.protocol={PROTOCOL}\nsasl.mechanism={MECHANISM}\n"
        f"sasl.jaas.config={_jaas(scram, ADMIN, password)}\n",
        mode=0o600,
    )
    write_text(
        kcat,
        f"security.protocol={PROTOCOL}\nsasl.mechanism=PLAIN\n"
        f"sasl.username={ADMIN}\nsasl.password={password}\n",
        mode=0o600,
    )
    return java, kcat


def _jaas(module: str, user: str, password: str, extra: str = "") -> str:
    return f'{module} required username="{user}" password="{password}"{extra};'


def broker_properties(users: dict[str, str]) -> dict[str, str]:
    """The security block of every node's server.properties."""
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
    plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
    broker_pw = users[BROKER]
    return {
        "client_protocol": PROTOCOL,
        "controller_protocol": PROTOCOL,
        "security": "\n".join(
            [
                f"sasl.enabled.mechanisms={MECHANISM}",
                f"sasl.mechanism.inter.broker.protocol={MECHANISM}",
                f"listener.name.client.sasl.enabled.mechanisms={MECHANISM},PLAIN",
                "listener.name.client.scram-sha-512.sasl.jaas.config="
                + _jaas(scram, BROKER, broker_pw),
                "listener.name.client.plain.sasl.jaas.config="
                + _jaas(plain, BROKER, broker_pw, f' user_{ADMIN}="{users[ADMIN]}"'),
                "sasl.mechanism.controller.protocol=PLAIN",
                "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
                "listener.name.controller.plain.sasl.jaas.config="
                + _jaas(plain, BROKER, broker_pw, f' user_{BROKER}="{broker_pw}"'),
                "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                "allow.everyone.if.no.acl.found=false",
                f"super.users=User:{BROKER};User:{ADMIN}",
            ]
        ),
    }


class ArgFile:
    """The storage tool's SCRAM arguments in a 0600 file it reads (`@file`), so passwords never
    appear on a command line; removed afterwards."""

    def __init__(self, users: dict[str, str]) -> None:
        self.lines = [
            line
            for user, password in users.items()
            for line in ("--add-scram", f'{MECHANISM}=[name="{user}",password="{password}"]')
        ]

    def __enter__(self) -> str:
        fd, self.path = tempfile.mkstemp(prefix=".format-args.", dir=kafka_dir())
        with os.fdopen(fd, "w") as f:  # mkstemp: mode 0600
            f.write("\n".join(self.lines) + "\n")
        return "@" + self.path

    def __exit__(self, *exc: object) -> None:
        os.unlink(self.path)


# --------------------------------------------------------------------------- ACLs

# Kafka protocol codes (org.apache.kafka.common.resource / acl).
RESOURCE = {"topic": 2, "group": 3}
PATTERN = {"literal": 3, "prefixed": 4}
OPERATION = {"read": 3, "write": 4, "describe": 8}
ALLOW = 3


@dataclass(frozen=True)
class Grant:
    principal: str  # a user of USERS
    resource: str  # topic | group
    name: str
    pattern: str  # literal | prefixed
    operation: str  # read | write | describe (read and write imply describe)


def matrix(test_prefixes: bool = True) -> list[Grant]:
    """Every ACL. Prefixed on the configured topic and group names, so the per-run copies of
    `llmstream_tools.stack` (`llmstream.prompts.stack-<hex>`) get the same rules as the
    platform's own topics; `test_prefixes` (local infra only) adds TEST_PREFIXES."""
    prompts, tokens, dlq, models = topics.prompts(), topics.tokens(), topics.dlq(), topics.models()
    workers, aggregators = config.get("WORKER_GROUP"), config.get("AGGREGATOR_GROUP")
    rows: list[tuple[str, str, str, str]] = [
        # gateway: writes prompts (submit, cancel), reads tokens and the model catalog, reads
        # the workers' committed offsets (GATEWAY_MAX_PROMPT_LAG)
        ("gateway", "topic", prompts, "write"),
        ("gateway", "topic", tokens, "read"),
        ("gateway", "topic", models, "read"),
        ("gateway", "group", workers, "describe"),
        # worker: consumes prompts in its group, writes tokens, reads them back (takeover),
        # dead-letters, announces its models
        ("worker", "topic", prompts, "read"),
        ("worker", "group", workers, "read"),
        ("worker", "topic", tokens, "write"),
        ("worker", "topic", tokens, "read"),
        ("worker", "topic", dlq, "write"),
        ("worker", "topic", models, "write"),
        # aggregator: consumes prompts and tokens in its group, dead-letters
        ("aggregator", "topic", prompts, "read"),
        ("aggregator", "topic", tokens, "read"),
        ("aggregator", "group", aggregators, "read"),
        ("aggregator", "topic", dlq, "write"),
    ]
    grants = [Grant(p, r, n, "prefixed", op) for p, r, n, op in rows]
    if test_prefixes:
        for service in SERVICES:
            grants += [
                Grant(service, "topic", prefix, "prefixed", op)
                for prefix in TEST_PREFIXES
                for op in ("read", "write")
            ]
            grants += [
                Grant(service, "group", prefix, "prefixed", "read")
                for prefix in TEST_GROUP_PREFIXES
            ]
    return grants


def _requests(grants: list[Grant]) -> Iterator[Any]:
    from aiokafka.protocol.admin import CreateAclsRequest

    for g in grants:
        yield CreateAclsRequest(
            resource_type=RESOURCE[g.resource],
            resource_name=g.name,
            resource_pattern_type_filter=PATTERN[g.pattern],
            principal=f"User:{g.principal}",
            host="*",
            operation=OPERATION[g.operation],
            permission_type=ALLOW,
        )


async def apply_acls(servers: str, timeout_s: float, test_prefixes: bool = True) -> int:
    """Create every ACL of `matrix()` (existing ones stay as they are); returns how many."""
    from aiokafka.client import AIOKafkaClient

    grants = matrix(test_prefixes)
    client = AIOKafkaClient(
        bootstrap_servers=servers,
        client_id="llmstream-infra-acls",
        request_timeout_ms=max(int(timeout_s * 1000), 1000),
        **client_kwargs(ADMIN),
    )
    try:
        await client.bootstrap()
        node = client.get_random_node()
        responses = await asyncio.gather(*(client.send(node, r) for r in _requests(grants)))
    finally:
        await client.close()
    for grant, response in zip(grants, responses, strict=True):
        for code, message in response.creation_responses:
            if code != 0:
                raise InfraError(
                    NAME,
                    f"creating the ACL {grant} failed (error {code}: {message})",
                    "check the broker log",
                )
    return len(grants)
