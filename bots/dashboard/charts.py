"""The last day's traffic and reply latency as one PNG (matplotlib's Agg canvas, no pyplot,
like engine/training/plot.py, so it is safe in a worker thread)."""
from __future__ import annotations

import io
import time

BUCKET_S = 1800  # half an hour


def _buckets(since: float, now: float) -> list[float]:
    start = since - since % BUCKET_S
    return [start + i * BUCKET_S for i in range(int((now - start) // BUCKET_S) + 1)]


def traffic_png(counts: list[tuple[float, str, int]], replies: list[tuple[float, float]], *,
                since: float, now: float | None = None) -> bytes:
    """Messages and replies per half hour (top) and reply latency p50 / p95 (bottom)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from engine.types import percentile

    now = now or time.time()
    edges = _buckets(since, now)
    index = lambda t: min(len(edges) - 1, max(0, int((t - edges[0]) // BUCKET_S)))  # noqa: E731
    users, bots = [0] * len(edges), [0] * len(edges)
    latencies: list[list[float]] = [[] for _ in edges]
    for when, role, n in counts:
        (users if role == "user" else bots)[index(when)] += n
    for when, latency in replies:
        latencies[index(when)].append(latency)
    hours = [(t - now) / 3600 for t in edges]

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    width = BUCKET_S / 3600 * 0.4
    top.bar([h - width / 2 for h in hours], users, width=width, label="messages", color="tab:blue", align="edge")
    top.bar([h + width / 2 for h in hours], bots, width=width, label="replies", color="tab:orange", align="edge")
    top.set_ylabel("per half hour")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    p50 = [percentile(v, 0.5) for v in latencies]
    p95 = [percentile(v, 0.95) for v in latencies]
    points = [(h, a, b) for h, a, b in zip(hours, p50, p95) if a is not None]
    if points:
        bottom.plot([p[0] + BUCKET_S / 7200 for p in points], [p[1] for p in points], marker="o", label="p50")
        bottom.plot([p[0] + BUCKET_S / 7200 for p in points], [p[2] for p in points], marker="o", label="p95")
        bottom.legend(loc="upper left")
    else:
        bottom.text(0.5, 0.5, "no replies in the last day", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_ylabel("reply latency (s)")
    bottom.set_xlabel("hours from now")
    bottom.set_xlim(hours[0], 0.5)
    bottom.grid(alpha=0.3)
    fig.suptitle("The last 24 hours")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()
