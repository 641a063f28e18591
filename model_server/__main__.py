"""`python -m model_server ARGS` = `llmstream model-server ARGS`, without re-executing: what
`llmstream model-server --engine vllm` runs under the vLLM virtualenv (`vllm_env.py`). The
guard matters: vLLM starts its engine core in a spawned process, which imports this module."""

import sys

from model_server.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], reexec=False))
