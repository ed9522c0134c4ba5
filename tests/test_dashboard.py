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
            poll_seconds=0.2, threads=1, nice=5, min_new_messages=1, min_account_age_hours=0)
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


async def test_login_next_only_redirects_to_a_single_slash_path_here(bot):
    app, handle = bot
    evil = ["/\t/evil.example", "/\n/evil.example", "/\r\n/evil.example/x", "/\\evil.example", "//evil.example",
            "https://evil.example/", "/ /evil.example", "\t//evil.example", "/\x00/evil.example", "javascript:alert(1)"]
    async with aiohttp.ClientSession() as http:
        for target in evil:
            async with http.post(handle.url + "/login", data={"token": TOKEN, "next": target},
                                 allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/", repr(target)
            async with http.get(handle.url + "/login", params={"next": target}) as r:
                assert "evil.example" not in await r.text(), repr(target)
        async with http.post(handle.url + "/login", data={"token": TOKEN, "next": "/versions?x=1"},
                             allow_redirects=False) as r:
            assert r.headers["Location"] == "/versions?x=1"


async def test_metrics_needs_the_token_when_listening_beyond_loopback(tmp_path, tiny_dialogpt, caplog):
    config = make_config(tmp_path, tiny_dialogpt, listen="0.0.0.0")
    app = await Mynah.open(config)
    handle = await start_dashboard(app, config, {"MYNAH_DASHBOARD_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{handle.port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/metrics") as r:
                assert r.status == 401
            async with http.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 200 and "mynah_stored_replies" in await r.text()
    finally:
        await handle.stop()
        await app.close()
    assert "/metrics needs the token" in caplog.text


async def test_concurrent_scrapes_read_no_table_scan_and_do_not_hold_a_user_message(tmp_path, tiny_dialogpt):
    """20 scrapes at once over 400,000 stored messages: every query a scrape makes reads the
    messages table by primary key (EXPLAIN QUERY PLAN says SEARCH, never SCAN), and a user's
    message stored meanwhile waits no more than a few milliseconds."""
    import sqlite3

    config = make_config(tmp_path, tiny_dialogpt)
    app = await Mynah.open(config)
    chat = await app.store.chats.chat("telegram", 1)
    await app.close()
    with sqlite3.connect(config.storage.path) as db:
        now = time.time()
        db.executemany("INSERT INTO messages (chat_id, role, text, status, created_at) VALUES (?, ?, ?, 'ok', ?)",
                       ((chat, "bot" if i % 2 else "user", f"message {i}", now) for i in range(400_000)))
    app = await Mynah.open(config)
    handle = await start_dashboard(app, config, {"MYNAH_DASHBOARD_TOKEN": TOKEN})
    statements: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:
            async def scrape() -> str:
                async with http.get(handle.url + "/metrics") as r:
                    return await r.text()

            first = await scrape()      # the first read walks the table once, in primary-key chunks
            assert sample(first, "mynah_stored_replies", platform="telegram", status="sent") == 200_000
            started = time.perf_counter()
            await app.store.messages.log_message(chat, "user", "baseline")
            baseline = time.perf_counter() - started
            await app.db.conn.set_trace_callback(statements.append)
            scrapes = [asyncio.ensure_future(scrape()) for _ in range(20)]
            await asyncio.sleep(0)
            started = time.perf_counter()
            await app.store.messages.log_message(chat, "user", "hello while scraped")
            during = time.perf_counter() - started
            texts = await asyncio.gather(*scrapes)
            all_scrapes = time.perf_counter() - started
            await app.db.conn.set_trace_callback(None)
            await app.store.messages.log_message(chat, "bot", "a new reply", status="pending")
            last = await scrape()
        print(f"store: {baseline * 1000:.1f} ms alone, {during * 1000:.1f} ms during 20 scrapes "
              f"({all_scrapes * 1000:.0f} ms for all 20)")
        assert all(sample(t, "mynah_stored_replies", platform="telegram", status="sent") == 200_000 for t in texts)
        assert sample(last, "mynah_stored_replies", platform="telegram", status="pending") == 1
        reads = {q for q in statements if "messages" in q and q.lstrip().upper().startswith("SELECT")}
        assert reads
        with sqlite3.connect(config.storage.path) as db:
            for query in reads:
                plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + query))
                assert "SCAN" not in plan, (query, plan)
        assert during < max(0.5, 20 * baseline)
    finally:
        await handle.stop()
        await app.close()


async def test_counts_of_one_read_in_the_singular(bot, tmp_path, capsys):
    from bots.durations import plural
    from scripts.cli import main

    assert [plural(n, "reply") for n in (0, 1, 2)] == ["0 replies", "1 reply", "2 replies"]
    assert plural(1, "version") == "1 version" and plural(3, "day") == "3 days"
    app, handle = bot
    for out in await app.chat.handle(console("hello there")):
        await app.chat.delivered(out, None)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        async with http.get(handle.url + "/api/overview") as r:
            assert (await r.json())["display"]["stored"] == "1 chat, 1 user, 2 messages"
    status = "\n".join(o.text for o in await app.chat.handle(console("/status")))
    assert "Stored: 1 chat, 2 messages" in status and "over 1 reply" in status, status
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\npath = "{app.config.storage.path}"\n[learning]\nregistry = "{tmp_path / "models"}"\n')
    assert await asyncio.to_thread(main, ["--config", str(config), "models"]) == 0
    assert "(1 version; * = active)" in capsys.readouterr().out


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


async def test_mynah_run_serves_the_dashboard_alone_without_a_platform_token(tmp_path, tiny_dialogpt, caplog):
    caplog.set_level(logging.INFO)
    config = run_config(tmp_path, tiny_dialogpt)
    url = f"http://127.0.0.1:{config.dashboard.port}"
    stop = asyncio.Event()
    served = asyncio.create_task(serve(config, environ={"MYNAH_DASHBOARD_TOKEN": TOKEN}, stop_event=stop))
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            deadline = time.monotonic() + 30
            while True:
                assert not served.done(), "mynah run exited instead of serving the dashboard"
                try:
                    async with http.get(url + "/api/overview") as r:
                        overview = await r.json()
                        break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
        assert overview["platforms"] == {} and overview["version"]
    finally:
        stop.set()
        assert await asyncio.wait_for(served, 30) == 0
    assert "serving the dashboard alone on " + url in caplog.text
    off = run_config(tmp_path, tiny_dialogpt, dashboard={"enabled": False})
    assert await serve(off, environ={}) == 2     # nothing to serve at all


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
