"""A fake vLLM OpenAI-compatible server: runtime LoRA routes, /v1/models, a minimal /v1/completions.

The LoRA routes answer as vLLM's do (vllm/entrypoints/serve/lora/api_router.py and
vllm/entrypoints/openai/models/serving.py): 200 with a plain-text "Success: ..." body;
400 InvalidUserInput for a missing field or a name already loaded; 404 NotFoundError
"No adapter found" when the folder has no adapter, or for unloading an unknown name; errors
as ``{"error": {"message", "type", "param", "code"}}``. With ``runtime_updating=False`` (the
server started without VLLM_ALLOW_RUNTIME_LORA_UPDATING) the routes do not exist: FastAPI's
404 ``{"detail": "Not Found"}``. ``path_map`` plays the shared volume: the backend's prefix →
the local folder it is mounted from, so the fake checks that the path it got really holds
the adapter files. /v1/completions records the ``model`` each request named and refuses an
unknown one (404, as vLLM does).
"""
from __future__ import annotations

from pathlib import Path

from aiohttp import web


class FakeVLLM:
    def __init__(self, base_model: str = "tiny-base", *, api_key: str = "", runtime_updating: bool = True,
                 path_map: dict[str, str] | None = None):
        self.base_model = base_model
        self.api_key = api_key
        self.runtime_updating = runtime_updating
        self.path_map = dict(path_map or {})
        self.refuse_load = ""                       # non-empty: the next loads fail with this message (400)
        self.adapters: dict[str, str] = {}          # name → path, as loaded
        self.loads: list[dict] = []                 # every load request body
        self.unloads: list[str] = []
        self.completions: list[str] = []            # the model field of every completion request
        self.seen_paths_ok: list[bool] = []         # did each load's path (mapped) hold both adapter files?
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> "FakeVLLM":
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.complete)
        if self.runtime_updating:
            app.router.add_post("/v1/load_lora_adapter", self.load)
            app.router.add_post("/v1/unload_lora_adapter", self.unload)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _auth(self, request, handler):
        if request.match_info.http_exception is not None:   # FastAPI's answer for a route that does not exist
            return web.json_response({"detail": "Not Found"}, status=404)
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    @staticmethod
    def _error(message: str, kind: str, status: int) -> web.Response:
        return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": status}},
                                 status=status)

    def local_path(self, path: str) -> Path:
        for prefix, local in self.path_map.items():
            if path.startswith(prefix):
                return Path(local) / path[len(prefix):].lstrip("/")
        return Path(path)

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.loads.append(body)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return self._error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
        if name in self.adapters and not body.get("load_inplace"):
            return self._error(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                               "in place, set 'load_inplace' to True.", "InvalidUserInput", 400)
        folder = self.local_path(path)
        ok = (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        self.seen_paths_ok.append(ok)
        if not ok:
            return self._error(f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError", 404)
        if self.refuse_load:
            return self._error(self.refuse_load, "BadRequestError", 400)
        self.adapters[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body.get("lora_name")
        self.unloads.append(name)
        if name not in self.adapters:
            return self._error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        del self.adapters[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def models(self, request: web.Request) -> web.Response:
        cards = [{"id": self.base_model, "object": "model", "owned_by": "vllm", "root": self.base_model,
                  "parent": None}]
        cards += [{"id": name, "object": "model", "owned_by": "vllm", "root": path, "parent": self.base_model}
                  for name, path in self.adapters.items()]
        return web.json_response({"object": "list", "data": cards})

    async def complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = body.get("model")
        self.completions.append(model)
        if model != self.base_model and model not in self.adapters:
            return self._error(f"The model `{model}` does not exist.", "NotFoundError", 404)
        return web.json_response({"id": "cmpl-1", "object": "text_completion", "model": model, "created": 0,
                                  "choices": [{"index": 0, "text": f"hello from {model}", "finish_reason": "stop",
                                               "logprobs": None}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}})
