"""OpenAI-compatible HTTP API over the same pipeline as the WebSocket (docs/openai.md).

Split per endpoint like vLLM's `entrypoints/openai`: `protocol` parses request bodies into one
neutral `GenerationRequest`; `errors` renders every refusal in OpenAI's shape; `sse` frames
Server-Sent Events with resumable ids; `serving_chat` and `serving_completions` (over the
`chunks` they share), `serving_responses` and `serving_models` turn a request's token events,
its state and the model catalog into OpenAI's objects. All pure: no I/O here.
"""
