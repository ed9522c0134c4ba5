"""Load and unload LoRA adapters in a running vLLM (OpenAI-compatible) server.

Why: a model served on another machine cannot be hot-swapped by replacing a folder, but
vLLM loads and unloads LoRA adapters at run time, and a request then names the adapter in
its `model` field. The routes, as vLLM implements them (vllm/entrypoints/serve/lora/
api_router.py and vllm/entrypoints/openai/models/serving.py):

- ``POST {base_url}/load_lora_adapter`` ``{"lora_name": ..., "lora_path": ...}``: 200 with a
  plain-text "Success: ..." body; 400 (InvalidUserInput) when the name is already loaded or a
  field is missing, 400 (BadRequestError) when the adapter does not load, 404
  (NotFoundError) when no adapter is found at the path;
- ``POST {base_url}/unload_lora_adapter`` ``{"lora_name": ...}``: 200, or 404 (NotFoundError)
  when no adapter of that name is loaded;
- ``GET {base_url}/models``: the base model(s) and every loaded adapter (an adapter's card
  has a ``parent``).

Errors are JSON: ``{"error": {"message", "type", "code"}}`` (older vLLM: the same fields at the
top level). The routes exist only when the server runs with ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; without them FastAPI answers 404 ``{"detail":
"Not Found"}``, which is reported as exactly that. The API key comes from the environment
(MYNAH_ENGINE_API_KEY), never from config, and is never logged.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath

from engine.serving.urls import public_url, redact, split_credentials

log = logging.getLogger(__name__)

API_KEY_ENV = "MYNAH_ENGINE_API_KEY"
NOT_ENABLED = ("the backend has no runtime LoRA routes: start vLLM with --enable-lora and the environment "
               "variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (docs/SCALING.md)")


class LoraAdminError(RuntimeError):
    """The backend refused or could not be reached; the message says which and why."""


def backend_path(folder: str | Path, registry_root: str | Path, prefix: str = "") -> str:
    """Where the backend machine finds a registry folder: [learning] adapter_path_prefix replaces
    the registry root (a shared volume mounted elsewhere); empty means the same absolute path."""
    folder = Path(folder).resolve()
    if not prefix:
        return str(folder)
    try:
        relative = folder.relative_to(Path(registry_root).resolve())
    except ValueError:
        raise LoraAdminError(f"{folder} is not inside the registry {registry_root}; "
                             "[learning] adapter_path_prefix cannot map it") from None
    return str(PurePosixPath(prefix.rstrip("/") or "/") / PurePosixPath(*relative.parts))


def _error(response) -> tuple[str, str]:
    """(type, message) of a vLLM error body, whichever shape it has."""
    try:
        body = response.json()
    except ValueError:
        return "", response.text.strip()[:300]
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if "message" in inner:
            return str(inner.get("type") or ""), str(inner["message"])
        if "detail" in body:
            return "route", str(body["detail"])
    return "", str(body)[:300]


class LoraAdmin:
    """One backend's adapter routes (httpx; a client per call keeps this free of event-loop ties)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 300.0):
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
        self.timeout = timeout   # loading a large adapter can take minutes

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    async def _call(self, method: str, route: str, body: dict | None = None):
        import httpx

        url, credentials = split_credentials(self.base_url)   # httpx logs the URL of every request
        try:
            async with httpx.AsyncClient(timeout=self.timeout, headers=self._headers(), auth=credentials) as client:
                return await client.request(method, f"{url}/{route}", json=body)
        except httpx.HTTPError as exc:   # never the password of a user:password@ base_url
            raise LoraAdminError(redact(f"the backend at {public_url(self.base_url)} could not be reached: "
                                        f"{type(exc).__name__}: {exc}", self.base_url)) from None

    async def load(self, name: str, path: str) -> str:
        """Load the adapter at `path` (as the backend sees it) under `name`. An adapter already
        loaded under that name counts as loaded: version names are never reused."""
        response = await self._call("POST", "load_lora_adapter", {"lora_name": name, "lora_path": path})
        if response.status_code == 200:
            log.info("backend loaded LoRA adapter %s from %s", name, path)
            return response.text
        kind, message = _error(response)
        if response.status_code == 400 and "already been loaded" in message:
            return message
        raise LoraAdminError(self._explain(response.status_code, kind, message, f"load the adapter {name}"))

    async def unload(self, name: str) -> bool:
        """Unload `name`; False when it was not loaded (nothing to do)."""
        response = await self._call("POST", "unload_lora_adapter", {"lora_name": name})
        if response.status_code == 200:
            log.info("backend unloaded LoRA adapter %s", name)
            return True
        kind, message = _error(response)
        if response.status_code == 404 and kind != "route":
            return False
        raise LoraAdminError(self._explain(response.status_code, kind, message, f"unload the adapter {name}"))

    async def loaded(self) -> list[str]:
        """Names of the adapters loaded now (model cards with a parent)."""
        response = await self._call("GET", "models")
        if response.status_code != 200:
            kind, message = _error(response)
            raise LoraAdminError(self._explain(response.status_code, kind, message, "list its models"))
        return [card["id"] for card in response.json().get("data", []) if card.get("parent")]

    def _explain(self, status: int, kind: str, message: str, what: str) -> str:
        if status == 404 and kind == "route":
            return NOT_ENABLED
        if status in (401, 403):
            return f"the backend refused to {what}: HTTP {status} (check {API_KEY_ENV})"
        text = f"the backend could not {what}: HTTP {status} {kind}: {message}".replace(" : ", ": ")
        return redact(text, self.base_url)   # a server may echo the URL it was asked on
