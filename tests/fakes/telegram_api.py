"""A fake Telegram Bot API server for tests: aiohttp on 127.0.0.1, reached through
`[telegram] base_url`, so the real python-telegram-bot Application runs against it.

It answers getMe (401 for an unknown token), serves queued updates from getUpdates
honouring `offset` (long polling included), records every call (sendMessage,
sendChatAction, setMyCommands, …), checks sendMessage like Telegram does (1-4096
characters), and can be told to fail or delay the next calls of a method:

    fake.fail_next("sendMessage", 429, retry_after=1)
    fake.delay_next("sendMessage", 2.0)

PTB posts form data (values that are objects or lists are JSON-encoded); JSON bodies and
multipart uploads (sendPhoto) are parsed too.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from aiohttp import web

TOKEN = "123456789:AAFakeTokenForTests-0123456789abcdefXYZ"
BOT_ID = 123456789
BOT_USERNAME = "mynah_test_bot"
BOT_USER = {"id": BOT_ID, "is_bot": True, "first_name": "Mynah", "username": BOT_USERNAME,
            "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}

_JSON_KEYS = {"reply_parameters", "commands", "scope", "allowed_updates", "entities", "reply_markup",
              "link_preview_options"}
_ERROR_TEXT = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden: bot was blocked by the user",
    404: "Not Found", 409: "Conflict", 429: "Too Many Requests", 502: "Bad Gateway",
}


@dataclass
class Call:
    method: str
    params: dict
    at: float
    status: int = 200
    result: object = None


@dataclass
class _Fault:
    status: int
    description: str
    parameters: dict = field(default_factory=dict)


class FakeTelegram:
    def __init__(self, token: str = TOKEN):
        self.tokens = {token}
        self.calls: list[Call] = []
        self.updates: list[dict] = []          # not yet confirmed by an offset
        self.served: set[int] = set()          # update ids returned by getUpdates at least once
        self.chat_admins: dict[int, set[int]] = defaultdict(set)     # getChatMember: "administrator"
        self.chat_creators: dict[int, set[int]] = defaultdict(set)   # getChatMember: "creator"
        self.confirmed_below = 0               # every update id below this is acknowledged
        self.get_updates_hooks = []            # fn(offset) called on every getUpdates
        self.chats: dict[int, dict] = {}
        self.bot_messages: dict[tuple[int, int], dict] = {}   # (chat id, message id) -> what the bot sent, as edited
        self._faults: dict[str, deque[_Fault]] = defaultdict(deque)
        self._delays: dict[str, deque[float]] = defaultdict(deque)
        self._next_update_id = 1000
        self._next_message_id = 1
        self._changed: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0
        self.offline = False                   # go_offline(): connections refused, open ones dropped
        self.exclusive_polling = False         # like Telegram: a new getUpdates ends the waiting one with 409
        self._poll_generation = 0

    # ---- server -----------------------------------------------------------------------
    async def start(self) -> "FakeTelegram":
        self._changed = asyncio.Condition()
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]
        return self

    async def go_offline(self) -> None:
        """The Bot API becomes unreachable: new connections are refused, open ones dropped."""
        self.offline = True
        await self._site.stop()
        await self._notify()            # waiting long polls wake up and drop their connection

    async def go_online(self) -> None:
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await self._site.start()
        self.offline = False

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _not_found(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": False, "error_code": 404, "description": "Not Found"}, status=404)

    async def _params(self, request: web.Request) -> dict:
        if request.content_type == "application/json":
            return dict(await request.json())
        raw = await request.post() if request.can_read_body else request.query
        params = {}
        for key, value in raw.items():
            if hasattr(value, "file"):          # a multipart upload
                params[key] = value.file.read()
            elif key in _JSON_KEYS and isinstance(value, str):
                params[key] = json.loads(value)
            else:
                params[key] = value
        return params

    async def _handle(self, request: web.Request) -> web.Response:
        if self.offline:                # a kept-alive connection from before: cut it
            request.transport.abort()
            raise asyncio.CancelledError
        try:
            response = await self._answer(request)
        finally:
            await self._notify()    # whoever waits on what happened looks again
        if self.offline:
            request.transport.abort()
            raise asyncio.CancelledError
        return response

    async def _answer(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await self._params(request)
        if request.match_info["token"] not in self.tokens:
            self.calls.append(Call(method, params, time.monotonic(), 401))
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        if self._delays[method]:
            await asyncio.sleep(self._delays[method].popleft())
        fault = self._faults[method].popleft() if self._faults[method] else None
        if fault is not None:
            self.calls.append(Call(method, params, time.monotonic(), fault.status))
            body = {"ok": False, "error_code": fault.status, "description": fault.description}
            if fault.parameters:
                body["parameters"] = fault.parameters
            return web.json_response(body, status=fault.status)
        handler = getattr(self, "_api_" + method, None)
        call = Call(method, params, time.monotonic())
        if method != "getUpdates":
            self.calls.append(call)
        if handler is None:
            if method in ("deleteWebhook", "setWebhook", "setMyCommands", "deleteMyCommands", "sendChatAction",
                          "answerCallbackQuery"):
                if method.endswith("Webhook") and str(params.get("drop_pending_updates")).lower() == "true":
                    self.updates.clear()          # what users sent while the bot was down: gone
                result = True
            else:
                call.status = 404
                return web.json_response({"ok": False, "error_code": 404, "description": "Not Found: method not found"},
                                         status=404)
        else:
            try:
                result = await handler(params)
            except _ApiError as exc:
                call.status = exc.status
                return web.json_response({"ok": False, "error_code": exc.status, "description": exc.description},
                                         status=exc.status)
        call.result = result
        return web.json_response({"ok": True, "result": result})

    # ---- Bot API methods --------------------------------------------------------------
    async def _api_getMe(self, params):
        return BOT_USER

    async def _api_getChatMember(self, params):
        """Members are "member" unless a test put them in `chat_admins[chat_id]` (administrators)
        or `chat_creators[chat_id]`."""
        chat_id, user_id = int(params["chat_id"]), int(params["user_id"])
        status = ("creator" if user_id in self.chat_creators.get(chat_id, set()) else
                  "administrator" if user_id in self.chat_admins.get(chat_id, set()) else "member")
        member = {"status": status, "user": {"id": user_id, "is_bot": False, "first_name": f"user{user_id}"}}
        if status == "administrator":
            member.update({k: False for k in (
                "can_be_edited", "can_manage_chat", "can_delete_messages", "can_manage_video_chats",
                "can_restrict_members", "can_promote_members", "can_change_info", "can_invite_users",
                "can_post_stories", "can_edit_stories", "can_delete_stories")}, is_anonymous=False)
        elif status == "creator":
            member["is_anonymous"] = False
        return member

    async def _api_getChat(self, params):
        """A chat the fake has seen (or a test put in `chats`), by id or "@username"."""
        key = str(params["chat_id"])
        for chat in self.chats.values():
            if str(chat["id"]) == key or (chat.get("username") and "@" + chat["username"] == key):
                return {**chat, "accent_color_id": 0, "max_reaction_count": 11}
        raise _ApiError(400, "Bad Request: chat not found")

    async def _api_getUpdates(self, params):
        offset = int(params.get("offset") or 0)
        timeout = float(params.get("timeout") or 0)
        limit = int(params.get("limit") or 100)
        if offset > 0:
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
            self.confirmed_below = max(self.confirmed_below, offset)
        self.calls.append(Call("getUpdates", params, time.monotonic()))
        for hook in list(self.get_updates_hooks):
            hook(offset)

        self._poll_generation += 1
        generation = self._poll_generation
        if self.exclusive_polling:
            await self._notify()        # the request this one supersedes answers 409 now

        def ready():
            superseded = self.exclusive_polling and generation != self._poll_generation
            return superseded or self.offline or [u for u in self.updates if u["update_id"] >= offset][:limit]

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout)
            except TimeoutError:
                pass
        if self.exclusive_polling and generation != self._poll_generation:
            raise _ApiError(409, "Conflict: terminated by other getUpdates request; make sure that only one "
                                 "bot instance is running")
        batch = [u for u in self.updates if u["update_id"] >= offset][:limit]
        self.served.update(u["update_id"] for u in batch)
        return batch

    async def _api_sendMessage(self, params):
        text = params.get("text", "")
        if not text.strip():
            raise _ApiError(400, "Bad Request: message text is empty")
        if len(text.encode("utf-16-le")) // 2 > 4096:
            raise _ApiError(400, "Bad Request: message is too long")
        return self._bot_message(params, text=text)

    async def _api_editMessageText(self, params):
        """Like Telegram: the bot's own message in that chat, new non-empty text that differs."""
        key = (int(params["chat_id"]), int(params["message_id"]))
        message = self.bot_messages.get(key)
        if message is None:
            raise _ApiError(400, "Bad Request: message to edit not found")
        text = params.get("text", "")
        if not text.strip():
            raise _ApiError(400, "Bad Request: message text is empty")
        if len(text.encode("utf-16-le")) // 2 > 4096:
            raise _ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        if text == message.get("text"):
            raise _ApiError(400, "Bad Request: message is not modified: specified new message content and reply "
                                 "markup are exactly the same as a current content and reply markup of the message")
        message["text"] = text
        message["edit_date"] = int(time.time())
        return message

    async def _api_sendPhoto(self, params):
        message = self._bot_message(params, photo=[{"file_id": "photo1", "file_unique_id": "p1",
                                                     "width": 10, "height": 10}])
        if params.get("caption"):
            message["caption"] = params["caption"]
        return message

    def _bot_message(self, params, **content) -> dict:
        chat_id = int(params["chat_id"])
        message = {"message_id": self._message_id(), "date": int(time.time()), "from": BOT_USER,
                   "chat": self.chats.get(chat_id, {"id": chat_id, "type": "private", "first_name": "someone"}),
                   **content}
        if params.get("message_thread_id"):
            message["message_thread_id"] = int(params["message_thread_id"])
            message["is_topic_message"] = True
        self.bot_messages[(chat_id, message["message_id"])] = message
        return message

    def _message_id(self) -> int:
        self._next_message_id += 1
        return self._next_message_id

    # ---- test controls ----------------------------------------------------------------
    def fail_next(self, method: str, status: int, *, times: int = 1, retry_after: int | None = None,
                  description: str | None = None, after: int = 0) -> None:
        """The next `times` calls of `method` fail (once `after` calls went through)."""
        self._faults[method].extend([None] * after)
        description = description or _ERROR_TEXT.get(status, "Error")
        parameters = {}
        if retry_after is not None:
            parameters["retry_after"] = retry_after
            description = f"Too Many Requests: retry after {retry_after}"
        for _ in range(times):
            self._faults[method].append(_Fault(status, description, parameters))

    def clear_faults(self) -> None:
        self._faults.clear()

    def delay_next(self, method: str, seconds: float) -> None:
        self._delays[method].append(seconds)

    def push(self, update: dict) -> dict:
        """Queue a raw update (an update_id is assigned)."""
        self._next_update_id += 1
        update = {"update_id": self._next_update_id, **update}
        self.updates.append(update)
        asyncio.get_running_loop().create_task(self._notify())
        return update

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def message(self, chat_id: int, text: str | None = None, *, user_id: int | None = None,
                chat_type: str = "private", title: str | None = None, reply_to: dict | None = None,
                thread_id: int | None = None, entities: list | None = None, edited: bool = False,
                first_name: str = "Ann", **content) -> dict:
        """Queue a message from a user (a command gets its bot_command entity, @mentions theirs)."""
        user_id = user_id if user_id is not None else chat_id
        chat = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = first_name
        else:
            chat["title"] = title or f"group {chat_id}"
            if thread_id is not None:
                chat["is_forum"] = True
        self.chats[chat_id] = chat
        message = {"message_id": self._message_id(), "date": int(time.time()), "chat": chat,
                   "from": {"id": user_id, "is_bot": False, "first_name": first_name}, **content}
        if text is not None:
            message["text"] = text
            message["entities"] = entities if entities is not None else _entities(text)
            if not message["entities"]:
                del message["entities"]
        if reply_to is not None:
            message["reply_to_message"] = reply_to
        if thread_id is not None:
            message["message_thread_id"] = thread_id
            message["is_topic_message"] = True
            if reply_to is None:  # like Telegram: a topic message "replies" to the topic's root
                message["reply_to_message"] = {"message_id": thread_id, "date": int(time.time()), "chat": chat,
                                               "from": {"id": 999, "is_bot": False, "first_name": "Root"},
                                               "forum_topic_created": {"name": "topic", "icon_color": 1}}
        if edited:
            message["edit_date"] = int(time.time())
            return self.push({"edited_message": message})
        return self.push({"message": message})

    def reaction(self, chat_id: int, message_id: int, emojis: list[str], *, user_id: int | None = None,
                 old: list[str] = (), first_name: str = "Ann", custom: list[str] = ()) -> dict:
        """Queue a message_reaction update: the user's reactions on a message are now `emojis`."""
        user_id = user_id if user_id is not None else chat_id
        chat = self.chats.get(chat_id, {"id": chat_id, "type": "private", "first_name": first_name})
        new = ([{"type": "emoji", "emoji": e} for e in emojis]
               + [{"type": "custom_emoji", "custom_emoji_id": c} for c in custom])
        return self.push({"message_reaction": {
            "chat": chat, "message_id": message_id, "date": int(time.time()),
            "user": {"id": user_id, "is_bot": False, "first_name": first_name},
            "old_reaction": [{"type": "emoji", "emoji": e} for e in old], "new_reaction": new}})

    def button_press(self, chat_id: int, message_id: int, data: str, *, user_id: int | None = None,
                     first_name: str = "Ann") -> dict:
        """Queue a callback_query: the user pressed an inline button under the bot's message."""
        user_id = user_id if user_id is not None else chat_id
        chat = self.chats.get(chat_id, {"id": chat_id, "type": "private", "first_name": first_name})
        return self.push({"callback_query": {
            "id": f"cb{self._next_update_id + 1}", "chat_instance": str(chat_id), "data": data,
            "from": {"id": user_id, "is_bot": False, "first_name": first_name},
            "message": {"message_id": message_id, "date": int(time.time()), "chat": chat, "from": BOT_USER,
                        "text": "..."}}})

    # ---- looking at what happened -----------------------------------------------------
    def calls_to(self, method: str, chat_id: int | None = None, *, ok_only: bool = True) -> list[Call]:
        return [c for c in self.calls if c.method == method and (not ok_only or c.status == 200)
                and (chat_id is None or int(c.params.get("chat_id", 0)) == chat_id)]

    def sent(self, chat_id: int | None = None) -> list[Call]:
        """Successful sendMessage calls (to chat_id)."""
        return self.calls_to("sendMessage", chat_id)

    def texts(self, chat_id: int) -> list[str]:
        return [c.params["text"] for c in self.sent(chat_id)]

    def edits(self, chat_id: int | None = None) -> list[Call]:
        """Successful editMessageText calls (each with its time in `at`)."""
        return self.calls_to("editMessageText", chat_id)

    def shown(self, chat_id: int) -> list[str]:
        """The bot's messages in a chat as they read now (after every edit), oldest first."""
        return [m.get("text", "") for (chat, _), m in sorted(self.bot_messages.items()) if chat == chat_id]

    async def wait_for(self, predicate, timeout: float = 15.0) -> None:
        async def wait():
            async with self._changed:
                await self._changed.wait_for(predicate)

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout} s waiting for the fake Telegram server") from None

    async def wait_sent(self, chat_id: int, count: int = 1, timeout: float = 15.0) -> list[Call]:
        await self.wait_for(lambda: len(self.sent(chat_id)) >= count, timeout)
        return self.sent(chat_id)

    async def wait_served(self, update: dict, timeout: float = 15.0) -> None:
        await self.wait_for(lambda: update["update_id"] in self.served, timeout)


class _ApiError(Exception):
    def __init__(self, status: int, description: str):
        super().__init__(description)
        self.status = status
        self.description = description


def _entities(text: str) -> list[dict]:
    """bot_command at the start, @mentions anywhere (UTF-16 offsets, like Telegram)."""
    import re

    def u16(s: str) -> int:
        return len(s.encode("utf-16-le")) // 2

    found = []
    command = re.match(r"/[A-Za-z0-9_]+(@[A-Za-z0-9_]+)?", text)
    if command:
        found.append({"type": "bot_command", "offset": 0, "length": u16(command.group())})
    for m in re.finditer(r"(?<![A-Za-z0-9_/])@[A-Za-z0-9_]{3,}", text):
        found.append({"type": "mention", "offset": u16(text[:m.start()]), "length": u16(m.group())})
    return found
