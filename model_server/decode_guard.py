"""Requests that are not valid protobuf: INVALID_ARGUMENT naming the message type.

gRPC decodes a request before (unary) or while (streams, `context.read()`) the servicer runs; a
decoding failure otherwise ends the call with UNKNOWN "Unexpected <class 'DecodeError'>", and a
traceback in the log, as if the server were at fault. `DecodeGuard` decodes in its own handler
instead and answers INVALID_ARGUMENT. On a stream only the first message (the `start`) is
guarded this way; a later one that does not decode fails that `read()` as before (the model
service then stops reading control messages and the generation runs to its end).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

Decode = Callable[[bytes], Any]


def _message_type(decode: Decode, method: str) -> str:
    """`llmstream.v1.GenerateRequest` for GenerateRequest.FromString, else the method."""
    owner = getattr(decode, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", method))


class _DecodingContext:
    """A servicer context whose `read()` decodes raw request bytes."""

    def __init__(self, context: Any, decode: Decode, method: str) -> None:
        self._context = context
        self._decode = decode
        self._method = method
        self._first = True

    async def read(self) -> Any:
        raw = await self._context.read()
        if raw is grpc.aio.EOF:
            return raw
        first, self._first = self._first, False
        try:
            return self._decode(raw)
        except Exception:
            if first:
                await self._context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"not a valid {_message_type(self._decode, self._method)} message",
                )
            raise ValueError("a message on this stream is not valid protobuf") from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class DecodeGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode: Decode = handler.request_deserializer
        method: str = handler_call_details.method
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(raw: bytes, context: Any) -> Any:
                try:
                    request = decode(raw)
                except Exception:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"not a valid {_message_type(decode, method)} message",
                    )
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, response_serializer=handler.response_serializer
            )
        stream = handler.stream_stream
        if stream is not None and not inspect.isasyncgenfunction(stream):
            # A servicer that reads with context.read() and writes with context.write()
            # (Generate); async-generator servicers (reflection) are left as they are.
            async def stream_stream(raw_iterator: Any, context: Any) -> Any:
                return await stream(raw_iterator, _DecodingContext(context, decode, method))

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, response_serializer=handler.response_serializer
            )
        return handler
