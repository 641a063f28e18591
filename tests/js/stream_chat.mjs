// Streams one chat completion with the official `openai` JavaScript SDK and prints what it
// received as one JSON line: {"text", "finish_reason", "role", "usage", "chunks"}.
// The SDK reads its endpoint and key from OPENAI_BASE_URL and OPENAI_API_KEY (never argv: other
// users of the machine can read a process's arguments).
//
//   OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=lsk_... \
//     node tests/js/stream_chat.mjs --model smollm2 --prompt "Tell me about rivers." --max-tokens 40
//
// A failure (HTTP error, or an error event in the stream) prints {"error": {status, message}}
// and exits 1.
import { parseArgs } from "node:util";
import OpenAI from "openai";

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    prompt: { type: "string" },
    "max-tokens": { type: "string" },
    seed: { type: "string" },
  },
});

const client = new OpenAI({ maxRetries: 0 });
const request = {
  model: values.model,
  messages: [{ role: "user", content: values.prompt }],
  max_tokens: Number(values["max-tokens"]),
  stream: true,
  stream_options: { include_usage: true },
};
if (values.seed !== undefined) request.seed = Number(values.seed);

const out = { text: "", finish_reason: null, role: null, usage: null, chunks: 0 };
try {
  const stream = await client.chat.completions.create(request);
  for await (const chunk of stream) {
    out.chunks += 1;
    const choice = chunk.choices[0];
    if (choice) {
      out.role ??= choice.delta.role ?? null;
      out.text += choice.delta.content ?? "";
      out.finish_reason = choice.finish_reason ?? out.finish_reason;
    }
    if (chunk.usage) out.usage = chunk.usage;
  }
} catch (err) {
  console.log(JSON.stringify({ ...out, error: { status: err.status ?? null, message: err.message } }));
  process.exit(1);
}
console.log(JSON.stringify(out));
