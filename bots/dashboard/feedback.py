"""The Training page's feedback part: a running canary and its numbers, and the
per-version feedback table (the same rows `mynah feedback` prints)."""
from __future__ import annotations

import time

from bots.dashboard.pages import e
from bots.durations import duration
from bots.feedback import rate_text, table_rows
from storage.feedback import Feedback, summarize

DAY_S = 86400


async def canary_summary(app) -> dict | None:
    canary = getattr(app.learning, "canary", None) if app.learning is not None else None
    return None if canary is None else await canary.summary()


def canary_html(s: dict | None, last: tuple[float, str] | None) -> str:
    if s is None:
        body = "<p>No canary running.</p>"
    else:
        rows = ""
        for side in ("candidate", "active"):
            k, n = s[f"positive_{side}"], s[f"rated_{side}"]
            lo, hi = s[f"ci_{side}"]
            rate = f"{k / n:.0%} ({lo:.0%}–{hi:.0%})" if n else "–"
            rows += (f"<tr><td>{e(side)}</td><td>{e(s[side])}</td><td>{s[f'replies_{side}']}</td><td>{n}</td>"
                     f"<td>{k}</td><td>{e(rate)}</td></tr>")
        left = max(0.0, s["ends_by"] - time.time())
        body = (f'<p id="canary">Canary <strong>{e(s["candidate"])}</strong> serves {s["share"]:.0%} of chats, '
                f'running {e(duration(time.time() - s["started_at"]))}; judged at {s["min_replies"]} rated replies '
                f'each, at the latest in {e(duration(left))}.</p>'
                '<table class="canary"><thead><tr><th>Side</th><th>Version</th><th>Replies</th><th>Rated</th>'
                f'<th>Positive</th><th>Positive rate (95% CI)</th></tr></thead><tbody>{rows}</tbody></table>')
    if last is not None:
        body += f'<p class="outcome">Last canary: {e(last[1])}</p>'
    return f"<h2>Canary</h2>{body}"


def table_html(rows: list[dict]) -> str:
    cells = "".join(
        f"<tr><td>{e(r['version'])}</td><td>{r['replies']}</td><td>{r['rated']}</td><td>{e(rate_text(r, 'positive'))}</td>"
        f"<td>{e(rate_text(r, 'negative'))}</td><td>{r['reactions']}</td><td>{e(rate_text(r, 'continuation'))}</td></tr>"
        for r in rows) or '<tr><td colspan="7">No rated replies yet.</td></tr>'
    return ("<h2>Feedback by version (last 30 days)</h2><table class=\"feedback\"><thead><tr><th>Version</th>"
            "<th>Replies</th><th>Rated</th><th>Positive (95% CI)</th><th>Negative (95% CI)</th><th>Reactions</th>"
            f"<th>Continued (95% CI)</th></tr></thead><tbody>{cells}</tbody></table>")


async def feedback_section(app) -> str:
    """Both parts as HTML (the learning loop's canary only when it is on)."""
    scores = await Feedback(app.db).scores(since=time.time() - 30 * DAY_S)
    canary = getattr(app.learning, "canary", None) if app.learning is not None else None
    head = canary_html(await canary.summary(), canary.last) if canary is not None else ""
    return head + table_html(table_rows(summarize(scores)))
