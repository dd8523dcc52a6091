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

client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
chunks = 0
try:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "write as much as you can"}],
        max_tokens=200,
        stream=True,
        extra_headers=faults,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
    out["openai"] = {"raised": None, "chunks": chunks}
except openai.APIError as e:
    out["openai"] = {"raised": type(e).__name__, "api_error": True, "chunks": chunks, "message": str(e)}
except Exception as e:  # a parse failure or anything else: the test fails on it
    out["openai"] = {"raised": type(e).__name__, "api_error": False, "chunks": chunks, "message": str(e)}

client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
chunks = 0
try:
    stream = client.messages.create(
        model="claude-3-5-haiku",
        messages=[{"role": "user", "content": "write as much as you can"}],
        max_tokens=200,
        stream=True,
        extra_headers=faults,
    )
    for event in stream:
        if event.type == "content_block_delta":
            chunks += 1
    out["anthropic"] = {"raised": None, "chunks": chunks}
except anthropic.APIError as e:
    out["anthropic"] = {"raised": type(e).__name__, "api_error": True, "chunks": chunks, "message": str(e)}
except Exception as e:
    out["anthropic"] = {"raised": type(e).__name__, "api_error": False, "chunks": chunks, "message": str(e)}

print(json.dumps(out))
