"""A local stand-in for Discord's REST API and gateway, on 127.0.0.1, for the real
discord.py client.

`install(monkeypatch)` points `discord.http.Route.BASE` (REST, webhooks, interaction
callbacks) and `DiscordWebSocket.DEFAULT_GATEWAY` at it. It knows one guild with one text
channel and one thread; it answers login, application info, slash-command sync, message
sends, typing, interaction callbacks and follow-ups, and records every request. The
gateway says HELLO, checks IDENTIFY (token, intents) and sends READY + GUILD_CREATE; tests
push MESSAGE_CREATE / INTERACTION_CREATE with `dispatch`.

Only what discord.py parses is here: JSON responses carry exactly
`Content-Type: application/json` (discord.py ignores anything else).
"""
from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import re
import time

import yarl
from aiohttp import web

BOT_ID = 900000000000000001
APP_ID = BOT_ID
OWNER_ID = 900000000000000002
GUILD_ID = 900000000000000010
CHANNEL_ID = 900000000000000011
THREAD_ID = 900000000000000012
MOD_ROLE_ID = 900000000000000013       # "mods": manage messages (a group admin for Mynah)
BOT_ROLE_ID = 900000000000000014
MANAGE_MESSAGES = 1 << 13
# view channel, send messages, embed links, attach files, read history, use application commands
EVERYONE_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 14) | (1 << 15) | (1 << 16) | (1 << 31)
INTENT_MESSAGE_CONTENT = 1 << 15

_ids = itertools.count(910000000000000000)


def new_id() -> int:
    return next(_ids)


def snowflake_at(when: datetime.datetime) -> int:
    """A fresh message id whose timestamp is `when` (Discord ids are time-ordered)."""
    return ((int(when.timestamp() * 1000) - 1420070400000) << 22) + next(_ids) % (1 << 22)


def user_payload(user_id: int, name: str, *, bot: bool = False) -> dict:
    return {"id": str(user_id), "username": name, "discriminator": "0", "global_name": None,
            "avatar": None, "bot": bot}


BOT_USER = user_payload(BOT_ID, "Mynah", bot=True)


def _json(data, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(), headers={"Content-Type": "application/json"})


class FakeDiscord:
    def __init__(self, token: str = "fake-token.abc.def", *, refuse_intents: bool = False):
        self.token = token
        self.refuse_intents = refuse_intents      # close the gateway with 4014, as Discord does
        self.requests: list[tuple[str, str]] = []  # (method, path) of every REST call
        self.sent: list[dict] = []                 # channel messages the bot posted (payload + channel_id)
        self.callbacks: list[dict] = []            # interaction callbacks (payload + interaction_id)
        self.followups: list[dict] = []            # follow-up messages (payload)
        self.synced: dict[str, list[str]] = {}     # "global" or guild id -> command names
        self.identify: dict | None = None          # the IDENTIFY payload, token removed
        self.login_tokens: list[str] = []          # every Authorization header seen on REST
        self.typing: list[str] = []                # channel ids that got a typing indicator
        self.forbidden: set[str] = set()           # channel ids where sending gets 403 Missing Permissions
        self.messages: dict[str, dict] = {}        # message id -> the bot's channel message as it reads now
        self.edits: list[dict] = []                # PATCHes of the bot's messages (payload + message_id + at)
        self.events = asyncio.Event()              # set whenever something is recorded
        self.history: dict[str, list[dict]] = {}   # channel id -> every user message posted there, oldest first
        self.dm_channels: dict[str, dict] = {}     # DM channel id -> channel payload
        self.gateway_down = False                  # the gateway refuses connections (503)
        self.sessions = 0                          # READYs sent (a failed resume makes a new one)
        self._ws: web.WebSocketResponse | None = None
        self._seq = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- server ---------------------------------------------------------------------
    async def __aenter__(self) -> "FakeDiscord":
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        await self._runner.cleanup()

    def install(self, monkeypatch) -> None:
        import discord.gateway
        import discord.http

        monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{self.port}/api/v10")
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                            yarl.URL(f"ws://127.0.0.1:{self.port}/gateway"))

    def _record(self) -> None:
        self.events.set()

    async def wait_for(self, predicate, timeout: float = 10.0):
        """Wait until predicate() is truthy (checked whenever something is recorded)."""
        async def loop():
            while not (result := predicate()):
                self.events.clear()
                await self.events.wait()
            return result
        return await asyncio.wait_for(loop(), timeout)

    # ---- REST -----------------------------------------------------------------------
    async def _payload(self, request: web.Request):
        if request.content_type == "application/json":
            return await request.json()
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            payload = json.loads(form.get("payload_json", "{}"))
            payload["_files"] = [k for k in form if k.startswith("files[")]
            return payload
        return None

    def _message(self, channel_id: str, payload: dict, **extra) -> dict:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat()
        return {"id": str(new_id()), "channel_id": str(channel_id), "author": BOT_USER,
                "content": payload.get("content") or "", "timestamp": now, "edited_timestamp": None, "tts": False,
                "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
                "pinned": False, "type": 0, "flags": payload.get("flags", 0), **extra}

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        method = request.method
        self.requests.append((method, path))
        self.login_tokens.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") not in (f"Bot {self.token}", None):
            return _json({"message": "401: Unauthorized", "code": 0}, 401)
        payload = await self._payload(request) if request.can_read_body else None
        self._query = dict(request.query)
        try:
            return await self._route(method, path, payload)
        finally:
            self._record()

    async def _route(self, method: str, path: str, payload) -> web.Response:
        if (method, path) == ("GET", "/users/@me"):
            return _json(BOT_USER)
        if (method, path) == ("GET", "/oauth2/applications/@me"):
            return _json({"id": str(APP_ID), "name": "Mynah", "description": "", "icon": None, "bot_public": True,
                          "bot_require_code_grant": False, "owner": user_payload(OWNER_ID, "owner"),
                          "verify_key": "0" * 64, "flags": 0})
        if m := re.fullmatch(r"/applications/(\d+)(?:/guilds/(\d+))?/commands", path):
            if method == "PUT":
                self.synced[m.group(2) or "global"] = [c["name"] for c in payload]
                return _json([{**c, "id": str(new_id()), "application_id": m.group(1), "version": "1",
                               **({"guild_id": m.group(2)} if m.group(2) else {})} for c in payload])
        if m := re.fullmatch(r"/channels/(\d+)/typing", path):
            self.typing.append(m.group(1))
            return web.Response(status=204)
        if (m := re.fullmatch(r"/channels/(\d+)/messages", path)) and method == "GET":
            after, limit = int(self._query.get("after", 0)), int(self._query.get("limit", 50))
            newer = [d for d in self.history.get(m.group(1), []) if int(d["id"]) > after][:limit]
            return _json(list(reversed(newer)))       # like Discord: newest first
        if (m := re.fullmatch(r"/channels/(\d+)", path)) and method == "GET":
            if m.group(1) in self.dm_channels:
                return _json(self.dm_channels[m.group(1)])
            return _json({"message": "Unknown Channel", "code": 10003}, 404)
        if (method, path) == ("POST", "/users/@me/channels"):
            user_id = str(payload["recipient_id"])
            dm = next((c for c in self.dm_channels.values() if c["recipients"][0]["id"] == user_id), None)
            if dm is None:
                dm = self.dm_channel(new_id(), int(user_id))
            return _json(dm)
        if m := re.fullmatch(r"/channels/(\d+)/messages", path):
            if m.group(1) in self.forbidden:
                return _json({"message": "Missing Permissions", "code": 50013}, 403)
            self.sent.append({**payload, "channel_id": m.group(1)})
            message = self._message(m.group(1), payload, guild_id=str(GUILD_ID))
            self.messages[message["id"]] = message
            return _json(message)
        if (m := re.fullmatch(r"/channels/(\d+)/messages/(\d+)", path)) and method == "PATCH":
            message = self.messages.get(m.group(2))
            if message is None or message["channel_id"] != m.group(1):
                return _json({"message": "Unknown Message", "code": 10008}, 404)
            self.edits.append({**payload, "message_id": m.group(2), "at": time.monotonic()})
            message.update(content=payload.get("content", message["content"]),
                           edited_timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat())
            return _json(message)
        if m := re.fullmatch(r"/interactions/(\d+)/([^/]+)/callback", path):
            kind = payload["type"]
            self.callbacks.append({**payload, "interaction_id": m.group(1)})
            data = payload.get("data") or {}
            message = self._message(CHANNEL_ID, data)
            interaction = {"id": m.group(1), "type": 2, "response_message_id": message["id"],
                           "response_message_loading": kind == 5,
                           "response_message_ephemeral": bool(data.get("flags", 0) & 64)}
            resource = {"type": kind, **({"message": message} if kind == 4 else {})}
            return _json({"interaction": interaction, "resource": resource})
        if m := re.fullmatch(r"/webhooks/(\d+)/([^/]+)", path):
            if method == "POST":
                self.followups.append(payload)
                return _json(self._message(CHANNEL_ID, payload, webhook_id=m.group(1)))
        return _json({"message": f"fake Discord has no {method} {path}", "code": 0}, 404)

    # ---- gateway --------------------------------------------------------------------
    async def drop_gateway(self, *, down: bool) -> None:
        """The connection drops (close code 4000: discord.py tries to resume); with `down`, the
        gateway then refuses connections until `gateway_down` is cleared."""
        self.gateway_down = down
        if self._ws is not None and not self._ws.closed:
            await self._ws.close(code=4000, message=b"Unknown error")

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        if self.gateway_down:
            return web.Response(status=503)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 45000}, "s": None, "t": None}))
        async for msg in ws:
            data = json.loads(msg.data)
            if data["op"] == 1:
                await ws.send_str(json.dumps({"op": 11, "d": None}))
            elif data["op"] == 6:                     # RESUME: this fake keeps no sessions
                await ws.send_str(json.dumps({"op": 9, "d": False, "s": None, "t": None}))
            elif data["op"] == 2:
                identify = dict(data["d"])
                token = identify.pop("token")
                self.identify = identify
                self._record()
                if token != self.token:
                    await ws.close(code=4004, message=b"Authentication failed.")
                elif self.refuse_intents and identify.get("intents", 0) & INTENT_MESSAGE_CONTENT:
                    await ws.close(code=4014, message=b"Disallowed intent(s).")
                else:
                    await self._ready()
        return ws

    async def dispatch(self, event: str, data: dict) -> None:
        self._seq += 1
        await self._ws.send_str(json.dumps({"op": 0, "t": event, "s": self._seq, "d": data}))

    async def _ready(self) -> None:
        self.sessions += 1
        await self.dispatch("READY", {
            "v": 10, "user": BOT_USER, "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
            "session_id": "fake-session", "resume_gateway_url": f"ws://127.0.0.1:{self.port}/gateway",
            "application": {"id": str(APP_ID), "flags": 0}})
        # @everyone may talk; the "mods" role may manage messages (a group admin for Mynah); the
        # bot's own role may do everything.
        everyone = {"id": str(GUILD_ID), "name": "@everyone", "permissions": str(EVERYONE_PERMISSIONS),
                    "position": 0, "color": 0, "hoist": False, "managed": False, "mentionable": False}
        mods = {**everyone, "id": str(MOD_ROLE_ID), "name": "mods", "position": 1,
                "permissions": str(EVERYONE_PERMISSIONS | MANAGE_MESSAGES)}
        bots = {**everyone, "id": str(BOT_ROLE_ID), "name": "bot", "position": 2, "permissions": str((1 << 41) - 1)}
        await self.dispatch("GUILD_CREATE", {
            "id": str(GUILD_ID), "name": "Test Server", "icon": None, "owner_id": str(OWNER_ID),
            "roles": [everyone, mods, bots], "emojis": [], "stickers": [], "features": [], "member_count": 2,
            "members": [{"user": BOT_USER, "roles": [str(BOT_ROLE_ID)], "joined_at": "2024-01-01T00:00:00+00:00", "deaf": False,
                         "mute": False, "flags": 0}],
            "channels": [{"id": str(CHANNEL_ID), "type": 0, "name": "general", "position": 0,
                          "permission_overwrites": [], "guild_id": str(GUILD_ID)}],
            "threads": [{"id": str(THREAD_ID), "type": 11, "name": "a thread", "parent_id": str(CHANNEL_ID),
                         "guild_id": str(GUILD_ID), "owner_id": str(OWNER_ID), "member_count": 1,
                         "message_count": 0,
                         "thread_metadata": {"archived": False, "auto_archive_duration": 1440,
                                             "archive_timestamp": "2024-01-01T00:00:00+00:00", "locked": False}}],
            "voice_states": [], "presences": [], "unavailable": False, "large": False,
            "joined_at": "2024-01-01T00:00:00+00:00", "verification_level": 0, "default_message_notifications": 0,
            "explicit_content_filter": 0, "mfa_level": 0, "nsfw_level": 0, "premium_tier": 0,
            "preferred_locale": "en-US", "system_channel_flags": 0, "afk_timeout": 300,
        })

    # ---- what a user does -------------------------------------------------------------
    def dm_channel(self, channel_id: int, user_id: int, name: str = "alice") -> dict:
        """A DM channel between the bot and a user (GET /channels/{id} answers it)."""
        channel = {"id": str(channel_id), "type": 1, "last_message_id": None,
                   "recipients": [user_payload(user_id, name)]}
        self.dm_channels[str(channel_id)] = channel
        return channel

    def message_data(self, content: str, *, user_id: int, name: str = "alice", channel_id: int = CHANNEL_ID,
                     guild: bool = True, mentions: list[dict] | None = None, bot: bool = False,
                     roles: list[int] | None = None, minutes_ago: float = 0.0) -> dict:
        """A user's message as Discord records it (also kept in the channel's history)."""
        when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=minutes_ago)
        message_id = snowflake_at(when)
        now = when.isoformat()
        data = {"id": str(message_id), "channel_id": str(channel_id), "author": user_payload(user_id, name, bot=bot),
                "content": content, "timestamp": now, "edited_timestamp": None, "tts": False,
                "mention_everyone": False, "mentions": mentions or [], "mention_roles": [], "attachments": [],
                "embeds": [], "pinned": False, "type": 0}
        if guild:
            data["guild_id"] = str(GUILD_ID)
            data["member"] = {"roles": [str(r) for r in roles or []], "joined_at": now, "deaf": False,
                              "mute": False, "flags": 0}
        self.history.setdefault(str(channel_id), []).append(data)
        self.history[str(channel_id)].sort(key=lambda d: int(d["id"]))
        return data

    def sent_while_offline(self, content: str, **options) -> int:
        """A message posted while the bot is not connected: in the history, never dispatched."""
        return int(self.message_data(content, **options)["id"])

    async def user_message(self, content: str, **options) -> int:
        data = self.message_data(content, **options)
        await self.dispatch("MESSAGE_CREATE", data)
        return int(data["id"])

    async def slash_command(self, name: str, *, user_id: int, options: list[dict] | None = None,
                            channel_id: int = CHANNEL_ID, channel_type: int = 0,
                            permissions: int = EVERYONE_PERMISSIONS) -> int:
        interaction_id = new_id()
        user = user_payload(user_id, f"user{user_id % 1000}")
        channel = {"id": str(channel_id), "type": channel_type, "name": "general", "guild_id": str(GUILD_ID),
                   "permission_overwrites": [], "position": 0}
        if channel_type == 11:
            channel.update(name="a thread", parent_id=str(CHANNEL_ID),
                           thread_metadata={"archived": False, "auto_archive_duration": 1440,
                                            "archive_timestamp": "2024-01-01T00:00:00+00:00", "locked": False})
        await self.dispatch("INTERACTION_CREATE", {
            "id": str(interaction_id), "application_id": str(APP_ID), "type": 2, "token": f"itoken{interaction_id}",
            "version": 1, "guild_id": str(GUILD_ID), "channel_id": str(channel_id), "channel": channel,
            "member": {"user": user, "roles": [], "joined_at": "2024-01-01T00:00:00+00:00", "deaf": False,
                       "mute": False, "flags": 0, "permissions": str(permissions)},
            "data": {"id": str(new_id()), "name": name, "type": 1, "options": options or []},
            "locale": "en-US", "guild_locale": "en-US", "app_permissions": str((1 << 41) - 1),
            "attachment_size_limit": 8 << 20, "authorizing_integration_owners": {"0": str(GUILD_ID)}, "context": 0,
        })
        return interaction_id

    async def reaction(self, message_id: int, emoji: str, *, user_id: int, channel_id: int = CHANNEL_ID,
                       guild: bool = True, remove: bool = False, bot: bool = False) -> None:
        """A user adds (or removes) a unicode emoji reaction: MESSAGE_REACTION_ADD / _REMOVE."""
        data = {"user_id": str(user_id), "channel_id": str(channel_id), "message_id": str(message_id),
                "emoji": {"id": None, "name": emoji}, "type": 0, "burst": False}
        if guild:
            data["guild_id"] = str(GUILD_ID)
            if not remove:
                user = BOT_USER if user_id == BOT_ID else user_payload(user_id, f"user{user_id % 1000}", bot=bot)
                data["member"] = {"user": user, "roles": [],
                                  "joined_at": "2024-01-01T00:00:00+00:00", "deaf": False, "mute": False, "flags": 0}
        await self.dispatch("MESSAGE_REACTION_REMOVE" if remove else "MESSAGE_REACTION_ADD", data)
