"""Pure parts of the benchmark tooling: py-spy output ranked by function
(llmstream_tools/bench/profile.py), the synthetic shim's text (openai_shim.py) and the LiteLLM
proxy's config (litellm_proxy.py)."""

from __future__ import annotations

import json

from llmstream_tools.bench import litellm_proxy, openai_shim, profile
from model_server.engines.synthetic import next_token, prompt_digest, token_bytes

RAW = """\
<module> (llmstream_tools/cli.py:97);run (asyncio/runners.py:118);_read (gateway/feed.py:40) 6
<module> (llmstream_tools/cli.py:97);run (asyncio/runners.py:118);_read (gateway/feed.py:41) 2
<module> (llmstream_tools/cli.py:97);run (asyncio/runners.py:118) 2
not a stack line
"""


def test_rank_counts_own_and_inclusive_samples_per_function_over_its_lines() -> None:
    ranked = profile.rank(RAW, top=2)
    assert ranked["samples"] == 10
    assert ranked["self"] == [
        {"function": "_read (gateway/feed.py)", "share": 0.8},
        {"function": "run (asyncio/runners.py)", "share": 0.2},
    ]
    # every sample had run and <module> on the stack; ties keep the first seen
    assert [f["share"] for f in ranked["inclusive"]] == [1.0, 1.0]
    assert profile.summary({"gateway": {**ranked, "file": "x"}}, top=1) == (
        "gateway (10 samples): _read (gateway/feed.py) 80%"
    )
    assert profile.summary({"worker-0": {"error": "py-spy wrote nothing"}}) == (
        "worker-0: py-spy wrote nothing"
    )


def test_shim_text_is_the_synthetic_engines_and_holds_back_split_characters() -> None:
    prompt, n = "bench 3.7", 400
    pieces = list(openai_shim.completion_pieces(prompt, n))
    assert len(pieces) == n
    digest, prev, raw = prompt_digest(list(prompt.encode())), -1, b""
    for position in range(n):
        prev = next_token(digest, 0, position, prev)
        raw += token_bytes(prev)
    assert "".join(pieces) == raw.decode() == openai_shim.expected_text(prompt, n)
    # the engine emits multi-byte characters byte by byte: some pieces are empty, none broken
    assert "" in pieces and all("\ufffd" not in p for p in pieces)


def test_litellm_config_routes_one_model_to_the_backend_with_a_master_key() -> None:
    cfg = json.loads(litellm_proxy.litellm_config("synthetic", 4321, "sk-test"))
    (model,) = cfg["model_list"]
    assert model == {
        "model_name": "synthetic",
        "litellm_params": {
            "model": "text-completion-openai/synthetic",
            "api_base": "http://127.0.0.1:4321/v1",
            "api_key": "unused",
        },
    }
    assert cfg["general_settings"] == {"master_key": "sk-test"}
