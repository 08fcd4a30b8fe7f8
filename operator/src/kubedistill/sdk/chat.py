"""One chat request through the gateway (or any OpenAI-compatible endpoint), and who answered it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from kubedistill.errors import DistillerError

# LiteLLM's proxy names the deployment (model_list[].model_info.id) that answered in this header.
DEPLOYMENT_HEADER = "x-litellm-model-id"


@dataclass(frozen=True)
class ChatReply:
    text: str
    model: str
    deployment_id: str | None
    seconds: float


def chat(
    base_url: str, model: str, prompt: str, api_key: str | None = None, timeout: float = 120.0
) -> ChatReply:
    """POST {base_url}/chat/completions with one user message."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{base_url.rstrip('/')}/chat/completions", body, headers, method="POST")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
            deployment = response.headers.get(DEPLOYMENT_HEADER)
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:500]
        raise DistillerError(f"{base_url}: HTTP {err.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError) as err:
        raise DistillerError(f"cannot reach {base_url}: {getattr(err, 'reason', err)}") from None
    text = payload["choices"][0]["message"].get("content") or ""
    return ChatReply(text, str(payload.get("model", model)), deployment, time.monotonic() - started)
