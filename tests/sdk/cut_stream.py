"""Stream through the gateway with the official OpenAI and Anthropic SDKs from an upstream that
ignores max_tokens, and report how each SDK ended: the gateway cuts the stream at its reservation
with an error event, which the SDK must raise as an API error (not a parse failure).

Usage: cut_stream.py BASE_URL API_KEY  (prints one JSON object)
"""

import json
import sys

import anthropic
import openai

base, key = sys.argv[1], sys.argv[2]
faults = {"x-mock-tokens": "5000", "x-mock-ignore-max-tokens": "1"}
out = {}

def run(name, errors, create, is_text):
    """Stream with `create`, count the events `is_text` accepts, record how the stream ended."""
    chunks = 0
    try:
        for event in create():
            if is_text(event):
                chunks += 1
        out[name] = {"raised": None, "chunks": chunks}
    except Exception as e:  # a parse failure or anything else: the test fails on it
        out[name] = {
            "raised": type(e).__name__,
            "api_error": isinstance(e, errors),
            "chunks": chunks,
            "message": str(e),
        }


request = {
    "messages": [{"role": "user", "content": "write as much as you can"}],
    "max_tokens": 200,
    "stream": True,
    "extra_headers": faults,
}
oa = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
run(
    "openai",
    openai.APIError,
    lambda: oa.chat.completions.create(model="gpt-4o-mini", **request),
    lambda c: bool(c.choices and c.choices[0].delta.content),
)
an = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
run(
    "anthropic",
    anthropic.APIError,
    lambda: an.messages.create(model="claude-3-5-haiku", **request),
    lambda e: e.type == "content_block_delta",
)

print(json.dumps(out))
