"""kcat with the tooling's Kafka credentials, kept off its command line."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from llmstream import config


@contextlib.contextmanager
def kcat_auth_args() -> Iterator[list[str]]:
    """`-F <file>`: a 0600 librdkafka properties file with the `admin` principal's credentials,
    removed afterwards; no arguments against a Kafka without authentication. SASL/PLAIN, not
    SCRAM: Debian's kcat links librdkafka 2.0.2, whose SCRAM exchange Kafka 4 refuses
    (confluentinc/librdkafka#4895, fixed in 2.6.1); the local broker accepts PLAIN for `admin`
    only (llmstream_tools/infra/_kafka_auth.py)."""
    auth = config.kafka_auth(config.ADMIN)
    if auth.security_protocol == "PLAINTEXT":
        yield []
        return
    fd, path = tempfile.mkstemp(prefix="kcat-", suffix=".properties")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(
                f"security.protocol={auth.security_protocol}\n"
                "sasl.mechanism=PLAIN\n"
                f"sasl.username={auth.username}\n"
                f"sasl.password={auth.password}\n"
            )
        yield ["-F", path]
    finally:
        os.unlink(path)
