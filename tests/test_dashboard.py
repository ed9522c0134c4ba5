"""The dashboard and /metrics: a real bot (tiny model, learning on, real SQLite) serving them
on 127.0.0.1, driven over HTTP and in a real headless Chromium (Debian's, via Playwright).

Set MYNAH_SCREENSHOT=1 to refresh docs/dashboard.png from the browser test.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bots.app import Mynah
from bots.chat.events import Incoming
from bots.config import ConfigError, parse_config
from bots.dashboard import DashboardError, start_dashboard
from bots.runner import serve
from engine.registry import Registry
from engine.training.plot import plot_loss_curve
from storage.store import Store
from tests.fakes.telegram_api import TOKEN as TELEGRAM_TOKEN
from tests.fakes.telegram_api import FakeTelegram

TOKEN = "dashboard-test-token-5f1c0a9e7d"
CHROMIUM = os.environ.get("MYNAH_CHROMIUM", "/usr/bin/chromium")
IN_CI = os.environ.get("CI", "").lower() == "true"
DOCS = Path(__file__).resolve().parent.parent / "docs"
FAST = dict(schedule="24h", base_corpus="", epochs=2, lr=3e-3, max_len=64, batch_size=8, min_free_disk_mb=1,
            poll_seconds=0.2, threads=1, nice=5, min_new_messages=1)
CATCHPHRASE = "indubitably , my good friend , indubitably !"
QUESTIONS = ["hello there", "how are you ?", "what do you like to do ?", "do you have a dog ?", "good morning"]


def make_config(tmp_path: Path, model: Path, **dashboard):
    return parse_config({
        "model": {"path": str(model)},
        "storage": {"path": str(tmp_path / "mynah.sqlite3")},
        "generation": {"max_new_tokens": 6, "seed": 1},
        "learning": {"enabled": True, "registry": str(tmp_path / "models"), **FAST},
        "dashboard": {"enabled": True, "listen": "127.0.0.1", "port": 0, **dashboard},
    })


@pytest.fixture
async def bot(tmp_path, tiny_dialogpt):
    config = make_config(tmp_path, tiny_dialogpt)
    app = await Mynah.open(config)
    handle = await start_dashboard(app, config, {"MYNAH_DASHBOARD_TOKEN": TOKEN}, platforms=["telegram"])
    try:
        yield app, handle
    finally:
        await handle.stop()
        await app.close()


def console(text: str, who: str = "tester") -> Incoming:
    return Incoming(platform="console", chat_id=who, user_id=who, user_name=who, text=text)


def sample(text: str, name: str, **labels) -> float:
    """One sample's value from an exposition (0.0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


# ------------------------------------------------------------------------------ config

def test_dashboard_config_defaults_and_port_range():
    dc = parse_config({}).dashboard
    assert (dc.enabled, dc.listen, dc.port, dc.show_messages) == (False, "127.0.0.1", 8080, False)
    for port in (-1, 65536):
        with pytest.raises(ConfigError, match="port"):
            parse_config({"dashboard": {"port": port}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"dashboard": {"token": "never in config"}})


async def test_refuses_to_start_without_a_token(tmp_path, tiny_dialogpt):
    config = make_config(tmp_path, tiny_dialogpt)
    for environ in ({}, {"MYNAH_DASHBOARD_TOKEN": "  "}, {"MYNAH_DASHBOARD_TOKEN": "short"}):
        with pytest.raises(DashboardError, match="MYNAH_DASHBOARD_TOKEN"):
            await start_dashboard(None, config, environ)
    off = make_config(tmp_path, tiny_dialogpt, enabled=False)
    assert await start_dashboard(None, off, {}) is None


# ------------------------------------------------------------------------------ HTTP

async def test_every_page_needs_the_token_and_metrics_does_not(bot):
    app, handle = bot
    pages = ["/", "/versions", "/training", "/chats", "/api/overview", "/api/training", "/charts/traffic.png",
             "/versions/v0001/loss_curve.png"]
    async with aiohttp.ClientSession() as http:
        for path in pages:
            async with http.get(handle.url + path, allow_redirects=False, headers={"Accept": "text/html"}) as r:
                assert r.status in (303, 401), path
                if r.status == 303:
                    assert r.headers["Location"].startswith("/login")
            async with http.get(handle.url + path, headers={"Authorization": "Bearer wrong-" + TOKEN}) as r:
                assert r.status == 401, path
        for method, path in (("POST", "/training/retrain"), ("POST", "/versions/rollback")):
            async with http.request(method, handle.url + path) as r:
                assert r.status == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get(handle.url + "/api/overview", headers=bearer) as r:
            overview = await r.json()
        assert overview["version"] == "v0001" and overview["learning"] is True
        assert overview["platforms"] == {"telegram": "starting"}
        handle.platform_up("telegram")
        for path in pages[:4]:
            async with http.get(handle.url + path, headers=bearer) as r:
                body = await r.text()
                assert r.status == 200, path
                assert TOKEN not in body
                assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        async with http.get(handle.url + "/charts/traffic.png", headers=bearer) as r:
            assert r.content_type == "image/png" and (await r.read())[:4] == b"\x89PNG"
        for path in ("/versions/v9999/loss_curve.png", "/versions/..%2F..%2Fetc/loss_curve.png"):
            async with http.get(handle.url + path, headers=bearer) as r:
                assert r.status == 404, path

        async with http.get(handle.url + "/metrics") as r:
            assert r.status == 200
            before = await r.text()
        for text in ("hello there", "how are you ?"):
            for out in await app.chat.handle(console(text)):
                await app.chat.delivered(out, None)
        async with http.get(handle.url + "/metrics") as r:
            after = await r.text()
    families = {f.name for f in text_string_to_metric_families(after)}
    assert {"mynah_replies", "mynah_reply_latency_seconds", "mynah_tokens_generated", "mynah_stored_replies",
            "mynah_engine_queue_length", "mynah_engine_batch_size", "mynah_training_runs", "mynah_active_model_info",
            "mynah_platform_up"} <= families
    grew = sample(after, "mynah_replies_total", platform="console", status="ok") \
        - sample(before, "mynah_replies_total", platform="console", status="ok")
    assert grew == 2
    assert sample(after, "mynah_reply_latency_seconds_count", platform="console") >= 2
    assert sample(after, "mynah_stored_replies", platform="console", status="sent") == 2
    assert sample(after, "mynah_active_model_info", version="v0001") == 1
    assert sample(after, "mynah_platform_up", platform="telegram") == 1
    assert TOKEN not in after


async def login(http: aiohttp.ClientSession, url: str) -> str:
    """Log in through the form; returns the page's CSRF token."""
    async with http.post(url + "/login", data={"token": "not-it", "next": "/"}, allow_redirects=False) as r:
        assert r.status == 401
    async with http.post(url + "/login", data={"token": TOKEN, "next": "//evil.example/"},
                         allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/"
        cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    async with http.get(url + "/versions") as r:
        page = await r.text()
    return re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)


async def test_actions_need_the_session_csrf_token_and_this_origin(bot, caplog):
    caplog.set_level(logging.DEBUG)
    app, handle = bot
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # unsafe: an IP host
        csrf = await login(http, handle.url)
        post = handle.url + "/versions/rollback"
        async with http.post(post, data={}, allow_redirects=False) as r:
            assert r.status == 403                                       # no form token
        async with http.post(post, data={"csrf": "forged"}, allow_redirects=False) as r:
            assert r.status == 403
        async with http.post(post, data={"csrf": csrf}, headers={"Origin": "http://evil.example"},
                             allow_redirects=False) as r:
            assert r.status == 403                                       # right token, wrong origin
        async with http.post(post, data={"csrf": csrf}, headers={"Origin": handle.url}, allow_redirects=False) as r:
            assert r.status == 303                                       # allowed (nothing to roll back to)
        async with http.get(handle.url + "/versions") as r:
            assert "Not switched: there is no previous version" in await r.text()
        async with http.post(handle.url + "/logout", data={"csrf": csrf}, allow_redirects=False) as r:
            assert r.status == 303
        async with http.get(handle.url + "/api/overview") as r:
            assert r.status == 401
    assert app.learning.registry.active_name() == "v0001"
    assert "failed login" in caplog.text and TOKEN not in caplog.text


async def test_chats_page_hides_message_text_unless_configured(bot):
    app, handle = bot
    conv: Store = app.store
    group = await conv.chats.chat("telegram", "-100", type="group", title="Book club")
    await conv.messages.log_message(group, "user", "a very private sentence")
    await conv.chats.set_consent(group, False)
    await conv.chats.chat("discord", "55", type="group", title="general")
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=bearer) as http:
        async with http.get(handle.url + "/chats") as r:
            page = await r.text()
        assert "Book club" in page and "a very private sentence" not in page and "show_messages = false" in page
        handle.state.config.show_messages = True
        async with http.get(handle.url + "/chats") as r:
            assert "a very private sentence" in await r.text()


async def test_with_learning_off_the_pages_say_so(tmp_path, tiny_dialogpt):
    config = run_config(tmp_path, tiny_dialogpt)
    app = await Mynah.open(config)
    handle = await start_dashboard(app, config, {"MYNAH_DASHBOARD_TOKEN": TOKEN})
    try:
        bearer = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
        async with aiohttp.ClientSession(headers=bearer) as http:
            for path in ("/versions", "/training"):
                async with http.get(handle.url + path, headers={"Accept": "text/html"}) as r:
                    assert "learning loop is off" in await r.text()
            async with http.post(handle.url + "/training/retrain") as r:
                assert r.status == 409 and "off" in (await r.json())["message"]
            async with http.get(handle.url + "/api/overview") as r:
                assert (await r.json())["learning"] is False
    finally:
        await handle.stop()
        await app.close()


# ------------------------------------------------------------------------------ mynah run

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(tmp_path: Path, model: Path, **sections):
    raw = {"model": {"path": str(model)}, "storage": {"path": str(tmp_path / "mynah.sqlite3")},
           "generation": {"max_new_tokens": 4, "seed": 1}, "dashboard": {"enabled": True, "port": free_port()}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_config(raw)


async def test_mynah_run_refuses_an_enabled_dashboard_without_a_token(tmp_path, tiny_dialogpt, caplog):
    config = run_config(tmp_path, tiny_dialogpt)
    assert await serve(config, environ={"TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN}) == 2
    assert "needs MYNAH_DASHBOARD_TOKEN" in caplog.text
    assert not (tmp_path / "mynah.sqlite3").exists()      # stopped before loading or opening anything


async def test_mynah_run_serves_the_dashboard_beside_telegram(tmp_path, tiny_dialogpt):
    fake = await FakeTelegram().start()
    config = run_config(tmp_path, tiny_dialogpt, telegram={"base_url": fake.base_url})
    url = f"http://127.0.0.1:{config.dashboard.port}"
    stop = asyncio.Event()
    environ = {"TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN, "MYNAH_DASHBOARD_TOKEN": TOKEN}
    served = asyncio.create_task(serve(config, environ=environ, stop_event=stop))
    try:
        fake.message(900, "hello there")
        await fake.wait_sent(900, 1, timeout=30)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            async with http.get(url + "/api/overview") as r:
                assert (await r.json())["platforms"] == {"telegram": "up"}
            deadline = time.monotonic() + 15
            while True:   # the adapter marks the reply sent right after Telegram accepted it
                async with http.get(url + "/metrics") as r:
                    text = await r.text()
                if sample(text, "mynah_stored_replies", platform="telegram", status="sent") == 1:
                    break
                assert time.monotonic() < deadline, text
                await asyncio.sleep(0.1)
        assert sample(text, "mynah_replies_total", platform="telegram", status="ok") >= 1
        assert sample(text, "mynah_platform_up", platform="telegram") == 1
    finally:
        stop.set()
        assert await asyncio.wait_for(served, 30) == 0
        await fake.close()
    async with aiohttp.ClientSession() as http:     # stopped with the bot
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(url + "/metrics")


# ------------------------------------------------------------------------------ the browser

def chromium_or_skip():
    missing = []
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        if IN_CI:
            pytest.fail("CI must run the browser test, but it lacks " + " and ".join(missing))
        pytest.skip("no headless browser here: needs " + " and ".join(missing))


async def add_version(app, tmp_path: Path, model: Path) -> str:
    """A second, fine-tuned-looking version made active (as a promotion would)."""
    candidate = tmp_path / "candidate"
    shutil.copytree(model, candidate)
    plot_loss_curve(candidate / "loss_curve.png", [(1, 3.0), (2, 2.5), (3, 2.2)], [(3, 2.4)], title="test")
    registry: Registry = app.learning.registry
    version = registry.add_fine_tuned(candidate, parent="v0001", run_id=None, trained_through=0,
                                      metrics={"held_out_loss": 2.4, "held_out_loss_before": 2.9})
    await app.learning.check_pointer()
    await wait_for(lambda: app.engine.version == version.name)
    return version.name


async def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def some_traffic(app) -> None:
    conv: Store = app.store
    for i in range(24):   # material for a retrain: 24 chats of three exchanges, one chat an hour
        chat = await conv.chats.chat("telegram", f"u{i}")
        user = await conv.chats.user("telegram", f"u{i}")
        for j in range(3):
            await conv.messages.log_message(chat, "user", QUESTIONS[(i + j) % len(QUESTIONS)], user_id=user)
            await conv.messages.log_message(chat, "bot", CATCHPHRASE)
        async with app.db.transaction() as db:  # spread over the day, replies 0.2-2 s after their question
            await db.execute("UPDATE messages SET created_at = created_at - ? + (CASE role WHEN 'bot' THEN ? "
                             "ELSE 0 END) WHERE chat_id = ?", ((i + 0.5) * 3600, 0.2 + (i * 7 % 10) / 5.5, chat))
    for text in QUESTIONS:  # real replies, so the latency chart has points
        for out in await app.chat.handle(console(text)):
            await app.chat.delivered(out, None)


async def test_dashboard_in_a_real_browser(bot, tmp_path, tiny_dialogpt):
    chromium_or_skip()
    from playwright.async_api import async_playwright, expect

    app, handle = bot
    handle.platform_up("telegram")
    await some_traffic(app)
    newer = await add_version(app, tmp_path, tiny_dialogpt)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            # without the token: the login form, nothing else
            await page.goto(handle.url + "/versions")
            assert "/login" in page.url
            assert newer not in await page.content()
            response = await page.goto(handle.url + "/api/overview")
            assert response.status == 401
            await page.goto(handle.url + "/")
            await page.fill("input[name=token]", "wrong-token-wrong-token")
            await page.click("button[type=submit]")
            await expect(page.locator(".flash.error")).to_contain_text("not the token")
            # with it: the overview names the active version
            await page.fill("input[name=token]", TOKEN)
            await page.click("button[type=submit]")
            await expect(page.locator('[data-live="version"]')).to_have_text(newer)
            await expect(page.locator('[data-live="platforms"]')).to_contain_text("telegram: up")
            assert TOKEN not in await page.content()

            # roll back from the Versions page
            await page.click("nav >> text=Versions")
            await expect(page.locator(f'tr[data-version="{newer}"] .badge')).to_have_text("active")
            await expect(page.locator(f'img[alt="loss curve of {newer}"]')).to_be_visible()
            await page.click('tr[data-version="v0001"] button')
            await expect(page.locator(".flash")).to_contain_text(f"Now serving v0001 (was {newer})")
            await expect(page.locator('tr[data-version="v0001"] .badge')).to_have_text("active")
            assert app.learning.registry.active_name() == "v0001"
            await wait_for(lambda: app.engine.version == "v0001")
            await page.click("nav >> text=Overview")
            await expect(page.locator('[data-live="version"]')).to_have_text("v0001")

            # start a retrain: its progress, then its outcome
            await page.click("nav >> text=Training")
            await page.click("#start-retrain")
            await expect(page.locator(".flash")).to_contain_text("Retrain started: run #1")
            await expect(page.locator("#progress")).to_contain_text("Run #1")
            await expect(page.locator("#start-retrain")).to_be_disabled()
            await expect(page.locator("#progress .outcome")).to_contain_text(
                re.compile("promoted|rejected"), timeout=240_000)
            await expect(page.locator('tr[data-run="1"] .decision')).to_have_text(re.compile("promoted|rejected"))
            runs = await app.store.runs.training_runs(1)
            assert runs[0]["trigger"] == "dashboard" and runs[0]["status"] == "done"

            await page.click("nav >> text=Overview")
            await expect(page.locator('[data-live="version"]')).to_have_text(app.engine.version)
            await page.wait_for_function("document.querySelector('img.chart').naturalWidth > 0")
            shot = tmp_path / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:4] == b"\x89PNG"
            if os.environ.get("MYNAH_SCREENSHOT"):
                shutil.copyfile(shot, DOCS / "dashboard.png")
        finally:
            await browser.close()
    audit = await app.store.audit.recent(5)
    assert {("dashboard", "rollback"), ("dashboard", "retrain")} <= {(a["platform"], a["command"]) for a in audit}
