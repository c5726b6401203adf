// streamText from `ai` with @ai-sdk/openai-compatible against qwen3-jax-serve; prints what it collected as JSON.
// usage: node stream_text.mjs BASE_URL API_KEY MODEL
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { jsonSchema, streamText, tool } from "ai";

const [baseURL, apiKey, modelId] = process.argv.slice(2);
const provider = createOpenAICompatible({ name: "qwen", baseURL, apiKey, includeUsage: true });
const model = provider.chatModel(modelId);

async function collect(options) {
  const result = streamText({ model, temperature: 0, maxOutputTokens: 200, ...options });
  const out = { text: "", reasoning: "", toolCalls: [], finishReason: null, usage: null, errors: [], types: [] };
  for await (const part of result.fullStream) {
    if (!out.types.includes(part.type)) out.types.push(part.type);
    if (part.type === "text-delta") out.text += part.text;
    else if (part.type === "reasoning-delta") out.reasoning += part.text;
    else if (part.type === "tool-call") out.toolCalls.push({ id: part.toolCallId, name: part.toolName, input: part.input });
    else if (part.type === "error") out.errors.push(String(part.error));
    else if (part.type === "finish") { out.finishReason = part.finishReason; out.usage = part.totalUsage; }
  }
  return out;
}

const weather = tool({
  description: "The weather in a city.",
  inputSchema: jsonSchema({ type: "object", properties: { city: { type: "string" } }, required: ["city"] }),
});
const thinking = await collect({ prompt: "What is the weather in Paris?", tools: { get_weather: weather } });
const plain = await collect({
  prompt: "Say hello.",
  providerOptions: { qwen: { chat_template_kwargs: { enable_thinking: false } } },
});
console.log(JSON.stringify({ thinking, plain }));
