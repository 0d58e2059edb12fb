// The official Ollama JavaScript client against the server: one step per run, what the client parsed as JSON.
// Run by tests/server/test_ollama_js.py as: node ollama_client.mjs PACKAGE_DIRECTORY HOST STEP
import { pathToFileURL } from "node:url";
import { join } from "node:path";

const [packageDirectory, host, step] = process.argv.slice(2);
const { Ollama } = await import(pathToFileURL(join(packageDirectory, "dist", "index.mjs")).href);
const ollama = new Ollama({ host });
const weather = {
  type: "function",
  function: {
    name: "get_weather",
    description: "The weather in a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};

const steps = {
  async list() {
    return (await ollama.list()).models.map((model) => model.name);
  },
  async show() {
    const shown = await ollama.show({ model: "chat" });
    return { capabilities: shown.capabilities, info: Object.keys(shown.model_info ?? {}) };
  },
  async chat() {
    const reply = await ollama.chat({ model: "chat", messages: [{ role: "user", content: "Hi" }] });
    return { content: reply.message.content, done: reply.done, reason: reply.done_reason, eval: reply.eval_count };
  },
  async stream() {
    const parts = [];
    for await (const part of await ollama.chat({
      model: "chat", messages: [{ role: "user", content: "Hi" }], stream: true,
    })) {
      parts.push({ content: part.message.content, done: part.done });
    }
    return parts;
  },
  async tools() {
    const reply = await ollama.chat({
      model: "chat", messages: [{ role: "user", content: "Weather in Lima?" }], tools: [weather],
    });
    return reply.message.tool_calls.map((call) => call.function);
  },
  async embed() {
    return (await ollama.embed({ model: "embed", input: ["one", "two three"] })).embeddings.length;
  },
  async missing() {
    try {
      await ollama.show({ model: "no-such-model" });
      return "answered";
    } catch (error) {
      return { status: error.status_code, error: error.error };
    }
  },
};

process.stdout.write(JSON.stringify(await steps[step]()));
