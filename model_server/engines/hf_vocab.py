"""The bytes of every token of a Hugging Face tokenizer (for the vLLM engine).

The vLLM engine streams token ids only and leaves text to the generation core's
``IncrementalDetokenizer``/``StopMatcher``, which need each token's bytes: that is what makes
text and stop strings continuous across a takeover (the core primes both with the
continuation; vLLM's own detokenizer and stop checker only see the new tokens).

Two vocabulary kinds cover the models vLLM serves in practice:

- byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen, ...): a token's string spells its bytes in
  GPT-2's printable alphabet (``bytes_to_unicode``);
- SentencePiece (Llama 2, Mistral, Gemma, ...): U+2581 is a space and ``<0xNN>`` is one byte
  (byte fallback).

Added tokens are their text as written; special ones (``special: true``) have no text, as with
vLLM's default ``skip_special_tokens``. Anything else is refused by name rather than guessed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from model_server.errors import EngineError

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable bytes map to themselves, the other
    bytes to code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + n)] = b
            n += 1
    return table


_GPT2 = _gpt2_unicode_to_byte()


def _byte_level(token: str) -> bytes:
    try:
        return bytes(_GPT2[c] for c in token)
    except KeyError:  # not in the byte alphabet: a token added as plain text
        return token.encode()


def _sentencepiece(token: str) -> bytes:
    if m := _BYTE_TOKEN.fullmatch(token):
        return bytes([int(m.group(1), 16)])
    return token.replace("\u2581", " ").encode()


def decoder_kind(decoder: Mapping[str, Any] | None) -> str:
    """``byte_level`` or ``sentencepiece`` from a tokenizer.json ``decoder`` section."""
    if not decoder:
        raise EngineError("the tokenizer has no decoder: cannot map its tokens to bytes")
    kind = decoder.get("type")
    if kind == "ByteLevel":
        return "byte_level"
    if kind == "Metaspace":
        return "sentencepiece"
    if kind == "Sequence":
        parts = [d.get("type") for d in decoder.get("decoders", [])]
        if "ByteLevel" in parts:
            return "byte_level"
        if "ByteFallback" in parts or "Metaspace" in parts:
            return "sentencepiece"
        if any(
            d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "\u2581"
            for d in decoder.get("decoders", [])
        ):
            return "sentencepiece"
    raise EngineError(f"unsupported tokenizer decoder {json.dumps(decoder)[:200]}")


def vocab_bytes(
    tokens: Sequence[str | None],
    kind: str,
    added: Mapping[int, tuple[str, bool]],
) -> list[bytes]:
    """Bytes of token ``i`` at index ``i``. ``tokens``: the model vocabulary's strings (None:
    no token); ``added``: id -> (content, special) of added tokens."""
    convert = _byte_level if kind == "byte_level" else _sentencepiece
    out = [b"" if t is None else convert(t) for t in tokens]
    for token_id, (content, special) in added.items():
        if token_id >= len(out):
            out.extend([b""] * (token_id + 1 - len(out)))
        out[token_id] = b"" if special else content.encode()
    return out


def tokenizer_vocab_bytes(tokenizer: Any, size: int) -> list[bytes]:
    """``vocab_bytes`` of a transformers fast tokenizer (what vLLM's ``get_tokenizer`` gives),
    padded with empty tokens to ``size`` (models often have more embeddings than tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EngineError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer: "
            "cannot map its tokens to bytes"
        )
    spec = json.loads(backend.to_str())
    kind = decoder_kind(spec.get("decoder"))
    added = {int(a["id"]): (str(a["content"]), bool(a["special"])) for a in spec["added_tokens"]}
    n = max(size, backend.get_vocab_size(with_added_tokens=True))
    tokens = [backend.id_to_token(i) for i in range(n)]
    return vocab_bytes(tokens, kind, added)
