"""Shared fixtures. Integration fixtures talk to the real Kafka/PostgreSQL/Redis that
`llmstream infra up` started (or that LLMSTREAM_* variables point at); `make test` starts them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Subprocesses (CLI tests) must find the venv's console scripts.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
