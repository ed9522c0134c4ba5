"""Server-rendered HTML for every page. Every value from the database, the registry or the
request goes through `e()` (html.escape); nothing here ever sees the operator token."""
from __future__ import annotations

import datetime as dt
import html

from bots.durations import duration as format_duration, plural

NAV = (("/", "Overview"), ("/versions", "Versions"), ("/training", "Training"), ("/chats", "Chats"))


def e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def duration(seconds) -> str:
    return format_duration(seconds, missing="–")


def when(timestamp) -> str:
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "–"


def number(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def seconds(value) -> str:
    return "–" if value is None else f"{value:.2f} s"


def csrf_field(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{e(csrf)}">' if csrf else ""


def layout(title: str, path: str, body: str, *, csrf: str = "", flash: list[str] | None = None,
           head: str = "") -> str:
    nav = "".join(f'<a href="{href}"{" class=active" if href == path else ""}>{label}</a>' for href, label in NAV)
    logout = (f'<form method="post" action="/logout" class="logout">{csrf_field(csrf)}'
              '<button type="submit">Log out</button></form>') if csrf else ""
    notes = "".join(f'<p class="flash">{e(note)}</p>' for note in flash or [])
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>Mynah · {e(title)}</title><link rel="stylesheet" href="/static/dashboard.css">'
            f'<meta name="csrf-token" content="{e(csrf)}"><script src="/static/dashboard.js" defer></script>{head}'
            f'</head><body><header><strong class="brand">Mynah</strong><nav>{nav}</nav>{logout}</header>'
            f'<main><h1>{e(title)}</h1>{notes}{body}</main></body></html>')


def login_page(next_path: str, error: str = "") -> str:
    message = f'<p class="flash error">{e(error)}</p>' if error else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Mynah · log in</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="stylesheet" href="/static/dashboard.css"></head><body class="login"><main>'
            f'<h1>Mynah dashboard</h1>{message}<form method="post" action="/login">'
            f'<input type="hidden" name="next" value="{e(next_path)}">'
            f'<label>Token <input type="password" name="token" autocomplete="current-password" autofocus required>'
            f'</label><button type="submit">Log in</button></form>'
            f'<p class="hint">The token is MYNAH_DASHBOARD_TOKEN from the bot\'s environment.</p></main></body></html>')


def _card(label: str, value: str, key: str = "") -> str:
    live = f' data-live="{key}"' if key else ""
    return f'<div class="card"><div class="label">{e(label)}</div><div class="value"{live}>{value}</div></div>'


def platforms_text(platforms: dict) -> str:
    if not platforms:
        return "none (console only)"
    return ", ".join(f"{name}: {state}" for name, state in sorted(platforms.items()))


def overview_display(ov) -> dict[str, str]:
    """The Overview cards as text, keyed like their data-live cells (the page's script refreshes them)."""
    run = ov.running
    running = "none"
    if run:
        running = f"run #{run['run_id']}: {run['stage']}" + (
            f" {run['step']}/{run['total_steps']}" if run["total_steps"] else "")
    dash = lambda v: "–" if v is None else str(v)  # noqa: E731
    return {
        "platforms": platforms_text(ov.platforms), "uptime": duration(ov.uptime_s),
        "messages_per_min": f"{ov.messages_per_min:.1f}", "replies_per_min": f"{ov.replies_per_min:.1f}",
        "latency": f"{seconds(ov.latency_p50_s)} / {seconds(ov.latency_p95_s)}",
        "queue": f"{dash(ov.queue_length)} / {dash(ov.batch_size)}", "version": ov.version, "backend": ov.backend,
        "stored": f"{plural(ov.chats, 'chat')}, {plural(ov.users, 'user')}, {plural(ov.messages, 'message')}",
        "running": running,
        "learning": "on" if ov.learning else "off ([learning] enabled = false)",
        "workers": workers_text(ov.workers),
    }


def workers_text(workers: list) -> str:
    """One worker (SQLite), or each worker sharing the PostgreSQL database: alive, version, last seen."""
    if not workers:
        return "this one only"
    return "; ".join(f"{w['id']}: {'alive' if w['alive'] else 'gone'}, {w['version'] or '?'}, "
                     f"{w['last_seen_s']:.0f} s ago" for w in workers)


OVERVIEW_CARDS = (("platforms", "Platforms"), ("uptime", "Uptime"), ("messages_per_min", "Messages / min (5 min)"),
                  ("replies_per_min", "Replies / min (5 min)"), ("latency", "Reply latency p50 / p95"),
                  ("queue", "Queue / batch"), ("version", "Active model"), ("backend", "Backend"),
                  ("stored", "Stored"), ("learning", "Learning"), ("running", "Retrain running"), ("workers", "Workers"))


def overview_page(ov, *, csrf: str, flash=None) -> str:
    display = overview_display(ov)
    cards = "".join(_card(label, e(display[key]), key) for key, label in OVERVIEW_CARDS)
    body = (f'<section class="cards" data-poll="/api/overview">{cards}</section>'
            '<h2>The last 24 hours</h2><img class="chart" src="/charts/traffic.png" '
            'alt="messages, replies and reply latency over the last day" width="800" height="450">')
    return layout("Overview", "/", body, csrf=csrf, flash=flash)


def _metrics_cell(m: dict) -> str:
    parts = []
    if m.get("held_out_loss") is not None:
        before = m.get("held_out_loss_before")
        parts.append(f"held-out {number(before)} → {number(m['held_out_loss'])}" if before is not None
                     else f"held-out {number(m['held_out_loss'])}")
    if m.get("base_loss") is not None:
        before = m.get("base_loss_before")
        parts.append(f"base {number(before)} → {number(m['base_loss'])}" if before is not None
                     else f"base {number(m['base_loss'])}")
    if m.get("held_out_dialogues") is not None:
        parts.append(plural(m['held_out_dialogues'], "held-out dialogue"))
    return e("; ".join(parts)) if parts else "not measured"


def _version_row(v, active: str | None, serving: str | None, replies: dict, csrf: str) -> str:
    mark = "active" if v.name == active else ""
    if v.name == serving and v.name != active:
        mark = "serving"
    lineage = f"from {v.parent}" if v.parent else (v.source or v.kind)
    curve = (f'<a href="/versions/{e(v.name)}/loss_curve.png"><img class="thumb" alt="loss curve of {e(v.name)}" '
             f'src="/versions/{e(v.name)}/loss_curve.png"></a>') if v.loss_curve else "–"
    action = "" if v.name == active else (
        f'<form method="post" action="/versions/activate">{csrf_field(csrf)}'
        f'<input type="hidden" name="version" value="{e(v.name)}">'
        f'<button type="submit" data-confirm="Serve {e(v.name)} now?">Make active</button></form>')
    return (f'<tr class="{mark}" data-version="{e(v.name)}"><td><strong>{e(v.name)}</strong>'
            f'{" <span class=badge>" + mark + "</span>" if mark else ""}</td><td>{e(v.kind)}</td>'
            f'<td>{e(lineage)}</td><td>{e(when(v.created_at))}</td><td>{e(v.run_id or "–")}</td>'
            f'<td>{e(replies.get(v.name, 0))}</td><td>{_metrics_cell(v.metrics)}</td><td>{e(v.note)}</td>'
            f'<td>{curve}</td><td>{action}</td></tr>')


def versions_page(found, active, replies, serving, *, learning: bool, csrf: str, flash=None) -> str:
    if not learning:
        body = ('<p class="note">The learning loop is off ([learning] enabled = false): the bot serves '
                '[model] path directly and there are no versions to switch between.</p>')
        return layout("Versions", "/versions", body, csrf=csrf, flash=flash)
    rows = "".join(_version_row(v, active, serving, replies, csrf) for v in reversed(found))
    rollback = (f'<form method="post" action="/versions/rollback" class="inline">{csrf_field(csrf)}'
                '<button type="submit" data-confirm="Roll back to the previously active version?">'
                'Roll back to the previous version</button></form>')
    body = (f'<p>Serving <strong id="serving">{e(serving or active)}</strong>. {rollback}</p>'
            '<table class="versions"><thead><tr><th>Version</th><th>Kind</th><th>Lineage</th><th>Created</th>'
            '<th>Run</th><th>Replies</th><th>Metrics</th><th>Note</th><th>Loss curve</th><th></th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')
    return layout("Versions", "/versions", body, csrf=csrf, flash=flash)


def _losses(r: dict, key: str) -> str:
    before = (r.get("losses") or {}).get("before") or {}
    after = (r.get("losses") or {}).get("after") or {}
    if before.get(key) is None and after.get(key) is None:
        return "–"
    return f"{number(before.get(key))} → {number(after.get(key))}"


def _data_counts(d: dict) -> str:
    if not d or "new_dialogues" not in d:
        return "–"
    return (f"{d.get('new_dialogues', 0)} new ({d.get('train_new', 0)} trained, {d.get('held_out', 0)} held out), "
            f"{d.get('replay_old', 0)} replayed, {d.get('replay_base', 0)} base")


def _run_row(r: dict) -> str:
    decision, _, reason = (r.get("decision") or "").partition(":")
    reason = reason.strip() or (r.get("error") or "")
    return (f'<tr data-run="{e(r["id"])}"><td>#{e(r["id"])}</td><td>{e(r["trigger"])}</td>'
            f'<td>{e(when(r["started_at"]))}</td><td>{e(duration(r.get("duration_s")))}</td>'
            f'<td>{e(r["status"])}</td><td>{e(_data_counts(r.get("data") or {}))}</td>'
            f'<td>{e(_losses(r, "held_out"))}</td><td>{e(_losses(r, "base"))}</td>'
            f'<td class="decision">{e(decision or "–")}</td><td>{e(reason)}</td></tr>')


def progress_panel(running: dict | None, lines: list[str], last_result: dict | None, other: dict | None) -> str:
    if running:
        total = running["total_steps"]
        bar = (f'<progress max="{total}" value="{running["step"]}"></progress> step {running["step"]}/{total}'
               if total else '<progress></progress>')
        state = (f'<p>Run <strong>#{e(running["run_id"])}</strong> ({e(running["trigger"])}): '
                 f'<span class="stage">{e(running["stage"])}</span>, {e(duration(running["elapsed_s"]))} so far</p>'
                 f'<p class="bar">{bar}</p>')
    elif other:
        state = (f'<p>Run #{e(other.get("run_id", "?"))} is running in another process '
                 f'(pid {e(other.get("pid", "?"))}).</p>')
    else:
        state = "<p>No run in progress.</p>"
    if last_result and not running:
        state += (f'<p class="outcome">Last result: run #{e(last_result["run_id"])} '
                  f'<strong>{e(last_result["decision"] or last_result["status"])}</strong>'
                  f'{": " + e(last_result["reason"]) if last_result.get("reason") else ""}</p>')
    log_lines = "".join(f"<li>{e(line)}</li>" for line in lines[-12:])
    return f'{state}<ul class="events">{log_lines}</ul>'


def training_page(runs, running, lines, last_result, other, *, learning: bool, csrf: str, flash=None,
                  extra: str = "") -> str:
    if not learning:
        body = '<p class="note">The learning loop is off ([learning] enabled = false).</p>'
        return layout("Training", "/training", body, csrf=csrf, flash=flash)
    disabled = " disabled" if running or other else ""
    start = (f'<form method="post" action="/training/retrain">{csrf_field(csrf)}'
             f'<button type="submit" id="start-retrain"{disabled}>Start a retrain</button></form>')
    watch = f' data-run="{e(running["run_id"])}"' if running else ""
    rows = "".join(_run_row(r) for r in runs) or '<tr><td colspan="10">No runs yet.</td></tr>'
    body = (f'{start}<section id="progress" data-poll="/api/training"{watch}>'
            f'{progress_panel(running, lines, last_result, other)}</section>{extra}'
            '<h2>History</h2><table class="runs"><thead><tr><th>Run</th><th>Trigger</th><th>Started</th>'
            '<th>Took</th><th>Status</th><th>Data</th><th>Held-out loss</th><th>Base loss</th><th>Decision</th>'
            f'<th>Reason</th></tr></thead><tbody>{rows}</tbody></table>')
    head = '<noscript><meta http-equiv="refresh" content="5"></noscript>' if running else ""
    return layout("Training", "/training", body, csrf=csrf, flash=flash, head=head)


def chats_page(summary, opted_out, messages, *, csrf: str, flash=None) -> str:
    rows = "".join(f'<tr><td>{e(s["platform"])}</td><td>{e(s["type"])}</td><td>{e(s["chats"])}</td>'
                   f'<td>{e(s["opted_out"])}</td><td>{e(s["messages"])}</td></tr>' for s in summary)
    rows = rows or '<tr><td colspan="5">No chats yet.</td></tr>'
    out_rows = "".join(f'<tr><td>{e(c["platform"])}</td><td>{e(c["type"])}</td>'
                       f'<td>{e(c["title"] or c["platform_chat_id"])}</td><td>{e(c["messages"])}</td>'
                       f'<td>{e(when(c["created_at"]))}</td></tr>' for c in opted_out)
    out_rows = out_rows or '<tr><td colspan="5">None: every chat may be used for training.</td></tr>'
    body = ('<table><thead><tr><th>Platform</th><th>Chat type</th><th>Chats</th><th>Opted out</th>'
            f'<th>Messages</th></tr></thead><tbody>{rows}</tbody></table>'
            '<h2>Opted-out chats</h2><table><thead><tr><th>Platform</th><th>Type</th><th>Chat</th>'
            f'<th>Messages</th><th>First seen</th></tr></thead><tbody>{out_rows}</tbody></table>')
    if messages is None:
        body += '<p class="note">Message text is hidden ([dashboard] show_messages = false).</p>'
    else:
        msg_rows = "".join(f'<tr><td>{e(when(m["created_at"]))}</td><td>{e(m["platform"])}</td>'
                           f'<td>{e(m["title"] or m["platform_chat_id"])}</td><td>{e(m["role"])}</td>'
                           f'<td class="text">{e(m["text"])}</td></tr>' for m in messages)
        body += ('<h2>Recent messages</h2><table><thead><tr><th>When</th><th>Platform</th><th>Chat</th>'
                 f'<th>Role</th><th>Text</th></tr></thead><tbody>{msg_rows}</tbody></table>')
    return layout("Chats", "/chats", body, csrf=csrf, flash=flash)
