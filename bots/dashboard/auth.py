"""Who may see the dashboard: one operator token, bearer header or a login session.

- The token comes only from MYNAH_DASHBOARD_TOKEN; it is compared with hmac.compare_digest
  and never written to a page, a log line or a cookie (the cookie holds a random session id).
- The session cookie is HttpOnly and SameSite=Strict (Secure when served over https).
- Every state-changing request made with a session (POST) must carry the session's CSRF
  token (hidden form field or X-CSRF-Token header) and, when the browser sends one, an
  Origin (or Referer) of this very host. Bearer requests cannot be forged cross-site, so
  they need no CSRF token.
- /metrics needs no token on a loopback address (a local Prometheus); listening beyond this
  machine, it needs the bearer token like every page.
- Failed logins are counted per client address: too many in a minute and the login form
  answers 429 for a while.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from aiohttp import web

log = logging.getLogger(__name__)

TOKEN_ENV = "MYNAH_DASHBOARD_TOKEN"
MIN_TOKEN_CHARS = 16
COOKIE = "mynah_session"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 64
LOGIN_FAILURES_PER_MINUTE = 10
PUBLIC_PATHS = {"/login", "/metrics", "/static/dashboard.css", "/static/dashboard.js"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
# Where the gate leaves the login session for the handlers (typed keys where aiohttp has them).
SESSION = web.RequestKey("mynah_session", object) if hasattr(web, "RequestKey") else "mynah_session"

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class DashboardError(RuntimeError):
    """The dashboard cannot start; the message says what to fix."""


def read_token(environ) -> str:
    token = (environ.get(TOKEN_ENV) or "").strip()
    if not token:
        raise DashboardError(
            f"[dashboard] enabled = true needs {TOKEN_ENV} in the environment (a long random secret, e.g. the "
            "output of: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if len(token) < MIN_TOKEN_CHARS:
        raise DashboardError(f"{TOKEN_ENV} is too short: use at least {MIN_TOKEN_CHARS} random characters")
    return token


@dataclass
class Session:
    csrf: str
    expires: float
    flash: list[str] = field(default_factory=list)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def safe_next(target: str | None) -> str:
    """Only a single-slash path on this site: no open redirect through ?next=. Browsers drop
    tabs and newlines and read a backslash as a slash, so `/\t/evil.example` is `//evil.example`:
    any control character, whitespace or backslash, a `//` start, a scheme or a host refuses it."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(c) < 0x21 or c == "\x7f" for c in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


class Auth:
    def __init__(self, token: str, *, metrics_public: bool = True):
        self._token = token.encode()
        # /metrics without the token only while the dashboard listens on loopback
        self.public_paths = PUBLIC_PATHS if metrics_public else PUBLIC_PATHS - {"/metrics"}
        self._sessions: dict[str, Session] = {}          # keyed by the id's digest, never the id
        self._failures: dict[str, collections.deque] = {}

    # ---- the token and sessions --------------------------------------------------
    def token_ok(self, candidate: str | None) -> bool:
        return hmac.compare_digest((candidate or "").encode(), self._token)

    def bearer(self, request: web.Request) -> bool | None:
        """True/False for a bearer header that is right/wrong; None when there is none."""
        header = request.headers.get("Authorization", "")
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value.strip())

    def new_session(self) -> tuple[str, Session]:
        now = time.time()
        for key in [k for k, s in self._sessions.items() if s.expires < now]:
            del self._sessions[key]
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[min(self._sessions, key=lambda k: self._sessions[k].expires)]
        sid = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), expires=now + SESSION_TTL_S)
        self._sessions[_digest(sid)] = session
        return sid, session

    def session(self, request: web.Request) -> Session | None:
        sid = request.cookies.get(COOKIE)
        if not sid:
            return None
        session = self._sessions.get(_digest(sid))
        if session is None or session.expires < time.time():
            return None
        return session

    def end_session(self, request: web.Request) -> None:
        sid = request.cookies.get(COOKIE)
        if sid:
            self._sessions.pop(_digest(sid), None)

    @staticmethod
    def set_cookie(response: web.StreamResponse, request: web.Request, sid: str) -> None:
        response.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", path="/", secure=request.secure,
                            max_age=SESSION_TTL_S)

    # ---- login throttling ---------------------------------------------------------
    def login_allowed(self, client: str) -> bool:
        window = self._failures.get(client)
        now = time.monotonic()
        while window and now - window[0] > 60:
            window.popleft()
        return not window or len(window) < LOGIN_FAILURES_PER_MINUTE

    def login_failed(self, client: str) -> None:
        self._failures.setdefault(client, collections.deque(maxlen=LOGIN_FAILURES_PER_MINUTE)).append(
            time.monotonic())
        log.warning("dashboard: failed login from %s", client)

    # ---- cross-site request forgery -------------------------------------------------
    @staticmethod
    def same_origin(request: web.Request) -> bool:
        """The Origin (else the Referer) names this host; True when the browser sent neither."""
        source = request.headers.get("Origin") or request.headers.get("Referer")
        if not source:
            return True
        if source == "null":
            return False
        return urlsplit(source).netloc.lower() == (request.host or "").lower()

    async def csrf_ok(self, request: web.Request, session: Session) -> bool:
        sent = request.headers.get(CSRF_HEADER)
        if sent is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            sent = (await request.post()).get(CSRF_FIELD)
        return isinstance(sent, str) and hmac.compare_digest(sent.encode(), session.csrf.encode())

    # ---- the gate in front of every handler -----------------------------------------
    def middleware(self):
        @web.middleware
        async def gate(request: web.Request, handler):
            response = await self._check(request, handler)
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return gate

    async def _check(self, request: web.Request, handler) -> web.StreamResponse:
        if request.path in self.public_paths:
            return await handler(request)
        bearer = self.bearer(request)
        if bearer is False:
            client = request.remote or "?"
            if not self.login_allowed(client):
                return refuse(request, 429, "too many wrong tokens; wait a minute")
            self.login_failed(client)
            return refuse(request, 401, "wrong token")
        if bearer:
            return await handler(request)
        session = self.session(request)
        if session is None:
            return refuse(request, 401, "log in first")
        if request.method not in SAFE_METHODS:
            if not self.same_origin(request):
                return refuse(request, 403, "cross-site request refused")
            if not await self.csrf_ok(request, session):
                return refuse(request, 403, "missing or stale form token; reload the page")
        request[SESSION] = session
        return await handler(request)


def wants_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return request.path.startswith("/api/") or ("application/json" in accept and "text/html" not in accept)


def refuse(request: web.Request, status: int, reason: str) -> web.StreamResponse:
    """401/403: a login redirect for a browser page, JSON for everything else."""
    if status == 401 and request.method in SAFE_METHODS and not wants_json(request) \
            and "text/html" in request.headers.get("Accept", ""):
        return web.Response(status=303, headers={"Location": f"/login?next={quote(safe_next(request.path_qs))}"})
    headers = {"WWW-Authenticate": 'Bearer realm="mynah"'} if status == 401 else None
    return web.json_response({"error": reason}, status=status, headers=headers)
