"""`llmstream replay`: fold the log into request state; rebuild and verify the projection.

Exit codes: 0 done / projections match; 1 verify found differences, or `--request-id` found no
event; 2 usage, configuration or connection error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import psycopg
from aiokafka.errors import KafkaError
from google.protobuf.json_format import MessageToDict

from aggregator import replay
from aggregator.projection import Coords
from aggregator.store import ProjectionStore
from llmstream import config, kafka, topics
from llmstream.fold import RequestState
from llmstream.v1 import events_pb2

TABLE_COLUMNS = (
    "request_id",
    "tenant",
    "model",
    "status",
    "prompt",
    "completion",
    "ttft_ms",
    "finish",
    "events",
    "text",
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmstream replay",
        description="Read the prompts and tokens topics and fold their events into request "
        "state (the same fold as the aggregator). Prints a table or JSON lines per request; "
        "--rebuild projects into a separate schema and --verify compares it with the live "
        "projection. See docs/aggregator.md.",
    )
    p.add_argument("--topics", nargs="+", help="topics to read (default: prompts and tokens)")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--from-beginning", action="store_true", help="start at the beginning (default)"
    )
    where.add_argument(
        "--from-offset", type=int, metavar="N", help="start at offset N of every partition"
    )
    where.add_argument(
        "--from-time",
        metavar="TIME",
        help="start at the first record at/after TIME (ISO 8601, epoch ms, or -15m / 2h ago), "
        "per partition via offsets_for_times (Kafka record timestamps)",
    )
    p.add_argument("--partition", type=int, action="append", help="only these partitions")
    p.add_argument(
        "--request-id", metavar="ID", help="only this request: print its full event history"
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--no-text", action="store_true", help="leave generated text out")
    p.add_argument("--follow", action="store_true", help="keep reading new events (Ctrl-C stops)")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="project the whole log into a separate schema (--schema) with the aggregator's code",
    )
    p.add_argument(
        "--schema",
        default="replay_rebuild",
        help="schema the rebuild (re)creates (default: replay_rebuild)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="rebuild up to the live projection's offsets and compare; exit 1 on any difference",
    )
    p.add_argument(
        "--group",
        default=config.get("AGGREGATOR_GROUP"),
        help="aggregator group whose live projection --verify compares with",
    )
    p.add_argument("--max-diffs", type=int, default=50, help="differences to print (--verify)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


# -- output -----------------------------------------------------------------------------------


def _short(text: str, width: int = 40) -> str:
    text = json.dumps(text, ensure_ascii=False)[1:-1]
    return text if len(text) <= width else text[: width - 1] + "…"


def table_row(s: RequestState, with_text: bool) -> list[str]:
    return [
        s.request_id,
        s.tenant_id,
        s.model,
        s.status.value,
        str(s.prompt_tokens),
        str(s.completion_tokens),
        "" if s.ttft_ms is None else str(s.ttft_ms),
        s.finish_reason + (f":{s.error_code}" if s.error_code else ""),
        str(s.events),
        _short(s.text) if with_text else "",
    ]


def print_table(rows: Sequence[Sequence[str]], out: TextIO, header: Sequence[str]) -> None:
    table = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


def iso(ms: int) -> str:
    t = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def describe(event: events_pb2.Event) -> tuple[str, str]:
    kind = event.WhichOneof("body") or "?"
    if kind == "submitted":
        s = event.submitted
        detail = (
            f"model={s.model} max_tokens={s.max_tokens} reserved={s.reserved_tokens} "
            f"reply={s.reply.topic}/{s.reply.partition}"
        )
    elif kind == "cancel_requested":
        detail = f"reason={event.cancel_requested.reason}"
    elif kind == "started":
        st = event.started
        detail = (
            f"attempt={st.attempt} worker={st.worker_id} resumed_after_seq={st.resumed_after_seq}"
        )
    elif kind == "token_delta":
        d = event.token_delta
        detail = f"seq={d.seq} text={json.dumps(d.text, ensure_ascii=False)}"
    elif kind == "completed":
        c = event.completed
        from llmstream.fold import finish_reason_name

        detail = (
            f"finish={finish_reason_name(c.finish_reason)} prompt={c.usage.prompt_tokens} "
            f"completion={c.usage.completion_tokens} last_seq={c.last_seq}"
        )
    elif kind == "failed":
        f = event.failed
        detail = (
            f"code={f.code} prompt={f.usage.prompt_tokens} "
            f"completion={f.usage.completion_tokens} message={json.dumps(f.message)}"
        )
    else:
        detail = ""
    return kind, detail


def event_json(coords: Coords, event: events_pb2.Event) -> str:
    return json.dumps(
        {
            "topic": coords.topic,
            "partition": coords.partition,
            "offset": coords.offset,
            "timestamp_ms": coords.timestamp_ms,
            "event": MessageToDict(event, preserving_proto_field_name=True),
        },
        ensure_ascii=False,
    )


def event_row(coords: Coords, event: events_pb2.Event) -> list[str]:
    kind, detail = describe(event)
    at = iso(int(event.event_time.ToMilliseconds())) if event.HasField("event_time") else ""
    return [str(coords), at, kind, detail]


# -- commands ---------------------------------------------------------------------------------


async def _fold(args: argparse.Namespace, out: TextIO) -> int:
    consumer = replay.new_consumer(config.kafka_bootstrap())
    await asyncio.wait_for(consumer.start(), replay.TIMEOUT_S)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with_text = not args.no_text
    folded = replay.Folded()
    try:
        tps = await replay.partitions(consumer, _topics(args))
        if args.partition:
            tps = [tp for tp in tps if tp.partition in set(args.partition)]
        ranges = await replay.resolve(consumer, tps, _start(args), follow=args.follow)
        progress = None if args.quiet else replay.Progress(replay.total_records(ranges))
        on_terminal = on_event = None
        if args.follow and args.request_id:

            def on_event(c: Coords, e: events_pb2.Event, _s: RequestState) -> None:
                line = event_json(c, e) if args.json else "  ".join(event_row(c, e))
                print(line, file=out, flush=True)

        elif args.follow:
            if not args.json:
                print_table([], out, TABLE_COLUMNS)

            def on_terminal(s: RequestState) -> None:
                if args.json:
                    line = json.dumps(s.as_dict(include_text=with_text), ensure_ascii=False)
                else:
                    line = "  ".join(table_row(s, with_text))
                print(line, file=out, flush=True)

        async for records in kafka.read_range(consumer, ranges, stop=stop):
            replay.fold_records(records, folded, args.request_id, on_terminal, on_event)
            if progress is not None:
                progress.add(len(records))
        if progress is not None:
            progress.finish()
    finally:
        await consumer.stop()
    for bad in folded.bad[:20]:
        print(f"replay: skipped undecodable record {bad.coords}: {bad.reason}", file=sys.stderr)
    if len(folded.bad) > 20:
        print(f"replay: {len(folded.bad)} undecodable records in all", file=sys.stderr)
    if args.follow:
        return 0
    if args.request_id:
        state = folded.states.get(args.request_id)
        if state is None:
            print(f"replay: no event of request {args.request_id!r} in range", file=sys.stderr)
            return 1
        # The two topics are read concurrently: show the history in event-time order (each
        # topic's own order kept).
        folded.history.sort(key=_chronological)
        if args.json:
            for c, e in folded.history:
                print(event_json(c, e), file=out)
            print(json.dumps({"state": state.as_dict(include_text=with_text)}), file=out)
        else:
            print_table(
                [event_row(c, e) for c, e in folded.history],
                out,
                ("record", "event_time", "event", "detail"),
            )
            print(file=out)
            for k, v in state.as_dict(include_text=with_text).items():
                print(f"{k}: {v}", file=out)
        return 0
    states = list(folded.states.values())
    if args.json:
        for s in states:
            print(json.dumps(s.as_dict(include_text=with_text), ensure_ascii=False), file=out)
    else:
        print_table([table_row(s, with_text) for s in states], out, TABLE_COLUMNS)
    return 0


async def _rebuild(args: argparse.Namespace, out: TextIO) -> int:
    url = config.database_url()
    consumer = replay.new_consumer(config.kafka_bootstrap())
    await asyncio.wait_for(consumer.start(), replay.TIMEOUT_S)
    # Every statement has a deadline too (a rebuild batch or a verify page takes far less).
    options = "-c statement_timeout=300000"
    live = await psycopg.AsyncConnection.connect(url, connect_timeout=10, options=options)
    work = await psycopg.AsyncConnection.connect(
        url, autocommit=True, connect_timeout=10, options=options
    )
    try:
        live_schema = await replay.current_schema(work)
        if args.schema == live_schema:
            raise replay.ReplayError(f"--schema must not be the live schema {live_schema!r}")
        store = ProjectionStore(
            args.group,
            schema=args.schema,
            store_text=config.get_bool("STORE_TEXT"),
            quota_outbox=False,
            prices_schema=live_schema,
        )
        stop_at = None
        if args.verify:
            stop_at = await replay.live_offsets_snapshot(live, args.group)
            if not stop_at:
                raise replay.ReplayError(
                    f"no live projection for group {args.group!r} (no stored offsets): "
                    "has the aggregator run?"
                )
        await store.create_schema_like(work, live_schema)
        tps = await replay.partitions(consumer, _topics(args))
        ranges = await replay.resolve(consumer, tps, replay.Start(), False, stop_at)
        progress = None if args.quiet else replay.Progress(replay.total_records(ranges))
        result = await replay.rebuild(consumer, ranges, work, store, progress)
        if progress is not None:
            progress.finish()
        summary: dict[str, Any] = {
            "schema": args.schema,
            "records": result.records,
            "events": result.events,
            "bills": result.bills,
            "bad_records": result.bad,
            "seconds": round(result.seconds, 3),
            "records_per_s": round(result.records / max(result.seconds, 1e-9)),
        }
        code = 0
        if stop_at is not None:
            total, diffs = await replay.compare(
                live, live_schema, work, args.schema, args.group, limit=args.max_diffs
            )
            summary["differences"] = total
            summary["verified_up_to"] = {f"{t}/{p}": o for (t, p), o in sorted(stop_at.items())}
            for d in diffs:
                print(f"DIFF {d}", file=out)
            code = 1 if total else 0
            print(
                f"verify: {'MATCH' if not total else f'{total} DIFFERENCES'} "
                f"(live schema {live_schema} vs {args.schema})",
                file=out,
            )
        print(json.dumps(summary), file=out if args.json else sys.stderr)
        return code
    finally:
        await consumer.stop()
        with contextlib.suppress(Exception):
            await live.rollback()
        await live.close()
        await work.close()


def _chronological(item: tuple[Coords, events_pb2.Event]) -> tuple[int, int, int]:
    coords, event = item
    at = int(event.event_time.ToMilliseconds()) if event.HasField("event_time") else 0
    prompt_first = 0 if event.WhichOneof("body") in ("submitted", "cancel_requested") else 1
    return at, prompt_first, coords.offset


def _topics(args: argparse.Namespace) -> list[str]:
    return list(args.topics or [topics.prompts(), topics.tokens()])


def _start(args: argparse.Namespace) -> replay.Start:
    if args.from_offset is not None:
        if args.from_offset < 0:
            raise replay.ReplayError("--from-offset must be >= 0")
        return replay.Start(offset=args.from_offset)
    if args.from_time is not None:
        return replay.Start(time_ms=replay.parse_time(args.from_time))
    return replay.Start()


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    p = parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.verify:
        args.rebuild = True
    if args.rebuild and (
        args.follow
        or args.request_id
        or args.from_offset is not None
        or args.from_time
        or args.partition
    ):
        p.error("--rebuild/--verify always read whole topics (no follow, filters or start)")
    try:
        run = _rebuild if args.rebuild else _fold
        return asyncio.run(run(args, out or sys.stdout))
    except (replay.ReplayError, config.ConfigError) as exc:
        print(f"llmstream replay: {exc}", file=sys.stderr)
        return 2
    except (KafkaError, psycopg.OperationalError, TimeoutError) as exc:
        print(f"llmstream replay: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
