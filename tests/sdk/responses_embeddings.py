"""Call the gateway with the official OpenAI SDK, unchanged: a streamed Responses API call and an
embeddings call (the SDK asks for base64 vectors by default), and report what the SDK saw.

Usage: responses_embeddings.py BASE_URL API_KEY  (prints one JSON object)
"""

import json
import sys

import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
out = {}

deltas, last, usage = 0, None, None
stream = client.responses.create(
    model="gpt-4o",
    instructions="answer briefly",
    input=[{"role": "user", "content": [{"type": "input_text", "text": "how are tokens billed"}]}],
    max_output_tokens=200,
    stream=True,
    extra_headers={
        "x-request-id": "py-responses",
        "x-mock-tokens": "25",
        "x-mock-cached-tokens": "4",
        "x-mock-reasoning-tokens": "7",
    },
)
for event in stream:
    if event.type == "response.output_text.delta":
        deltas += 1
    last = event.type
    if event.type == "response.completed":
        usage = event.response.usage
out["responses"] = {
    "deltas": deltas,
    "last": last,
    "output_tokens": usage.output_tokens if usage else None,
    "cached_tokens": usage.input_tokens_details.cached_tokens if usage else None,
}

emb = client.embeddings.create(
    model="text-embedding-3-small",
    input=["the gateway bills tokens", "and embeddings too"],
    extra_headers={"x-request-id": "py-embeddings"},
)
out["embeddings"] = {
    "vectors": len(emb.data),
    "dimensions": len(emb.data[0].embedding),
    "prompt_tokens": emb.usage.prompt_tokens,
}

print(json.dumps(out))
