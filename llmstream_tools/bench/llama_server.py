"""`python -m llmstream_tools.bench.llama_server ARGS`: llama-cpp-python's OpenAI server
(`python -m llama_cpp.server ARGS`, the baseline of `llmstream bench llamacpp`) with its models
built like our engine's: without llama.cpp's weight repacking, which segfaults at the first
decode on AMX CPUs (model_server/engines/llamacpp.py, `new_llama`). Everything else is the
unmodified server, so the comparison stays fair."""

from __future__ import annotations

import runpy

from llama_cpp import llama_cpp as lib

from model_server.engines.llamacpp import without_repacking

# A process of its own: the patch lasts its lifetime (the server reads the defaults at every
# model load, through the module attribute).
lib.llama_model_default_params = without_repacking(lib.llama_model_default_params)
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
