"""Canary rollout: a candidate that passed the offline gate first serves a share of chats,
and is promoted only if people like it no less than the active model.

* Assignment (`in_canary`): a chat is in the canary when a hash of (candidate version,
  chats.id) falls below `[learning] canary_share`: sticky for the whole canary, different
  for each candidate, and never a chat that opted out (/optout: checked on every reply).
* Serving (`Router`): the candidate is loaded into a second local engine next to the
  active one; the Router implements ReplyEngine and sends each reply to one of them by
  the `route` its caller passes (the chats.id ChatService replies in, as vLLM takes a
  `lora_request` per request). Everything else (stats, the
  version, swaps by promotion and rollback) is the active engine's.
* Judging (`Canary.check`, every CHECK_EVERY_S): implicit signals are derived first; then
  the candidate's positive rate and the active model's on the same period (replies since
  the canary began; both sides only from opted-in chats), counted by people (one vote per
  person per reply, established accounts only, no rater or chat weighing too much:
  canary_stats.py), go through the one-sided non-inferiority test once each side has
  `canary_min_replies` rated replies and `canary_min_raters` raters.
  Not worse: promoted (the pointer moves, the active engine loads it). Worse, or too few
  rated replies when `canary_hours` are over, or the active version changed meanwhile:
  retired (the version is deleted). Either way the run's row gets the final decision and
  the admins are told why, with the numbers.
* The state survives a restart (canary.json in the registry): the candidate is reloaded.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from bots.chat.events import Outgoing
from bots.durations import duration
from bots.learning.decide import Decision
from bots.learning.notify import Notifiers, configured_targets
from bots.learning.promote import PromotionRefused
from bots.learning import canary_stats
from bots.learning.stats import wilson
from engine.registry import RegistryError, write_json_atomic
from engine.serving.protocol import EngineBusy, EngineStopped, EngineWrapper, ReplyStream
from storage.feedback import summarize
from storage.votes import votes

log = logging.getLogger(__name__)

STATE_FILE = "canary.json"
CHECK_EVERY_S = 60.0


def in_canary(chat_id: int, version: str, share: float) -> bool:
    """Sticky per chat and candidate: sha256("version:chat") as a number in [0, 1) < share."""
    digest = hashlib.sha256(f"{version}:{chat_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass
class Candidate:
    version: str
    engine: object        # a started local Engine serving the candidate
    share: float


class Router(EngineWrapper):
    """A ReplyEngine over the active engine and, during a canary, the candidate's engine."""

    def __init__(self, active, chats):
        self.active = active
        self.chats = chats
        self.candidate: Candidate | None = None
        self.routed = 0       # replies the candidate wrote

    @property
    def inner(self):
        return self.active

    async def serves_candidate(self, chat_id: int | None) -> bool:
        c = self.candidate
        if c is None or chat_id is None or not in_canary(chat_id, c.version, c.share):
            return False
        return await self.chats.consent(chat_id)   # opted out: never an experiment

    async def _pick(self, route):
        """The engine for the chat `route` names (None: the active one)."""
        c = self.candidate
        if c is not None and await self.serves_candidate(route):
            return c.engine
        return self.active

    async def reply(self, turns, overrides: dict | None = None, *, system: str = "", route=None):
        engine = await self._pick(route)
        if engine is not self.active:
            try:
                reply = await engine.reply(turns, overrides, system=system, route=route)
                self.routed += 1
                return reply
            except (EngineBusy, EngineStopped):
                pass  # the canary just ended, or its queue is full: the active model answers
        return await self.active.reply(turns, overrides, system=system, route=route)

    def stream(self, turns, overrides: dict | None = None, *, system: str = "", route=None) -> ReplyStream:
        """The chosen engine's stream, passed through (routing is decided when reading starts)."""
        async def produce(stream: ReplyStream):
            engine = await self._pick(route)
            inner = engine.stream(turns, overrides, system=system, route=route)
            async for delta in inner:
                stream.push(delta)
            if engine is not self.active:
                self.routed += 1
            return inner.reply

        return ReplyStream(produce)



@dataclass
class CanaryServing:
    """What the app hands the learning loop to serve a canary: the Router, the feedback
    recorder and `make_engine(loaded)`; all None for `mynah retrain`, which only installs."""
    router: Router | None = None
    recorder: object = None
    make_engine: Callable | None = None


@dataclass
class CanaryState:
    candidate: str
    active: str
    share: float
    started_at: float
    run_id: int
    notify_to: list = field(default_factory=list)


@dataclass
class Counts:
    k_c: int
    n_c: int
    k_a: int
    n_a: int
    replies_c: int
    replies_a: int


async def _always() -> bool:
    return True


async def _nothing() -> None:
    return None


class Canary:
    """Starts, watches and ends the canary of one bot. `make_engine(loaded)` builds a local
    engine like the active one (the app passes bots.app.build_engine); without a router
    (`mynah retrain`) it only installs the candidate: the running bot serves and judges it."""

    def __init__(self, config, registry, store, promoter, versions, notifiers: Notifiers,
                 router: Router | None = None, recorder=None, make_engine=None):
        self.config = config
        self.lc = config.learning
        self.registry = registry
        self.store = store      # storage.store.Store
        self.promoter = promoter
        self.versions = versions       # bots.learning.versions.Versions (the SQLite mirror)
        self.notifiers = notifiers
        self.router = router
        self.recorder = recorder       # bots.feedback.FeedbackRecorder
        self.make_engine = make_engine
        self.state: CanaryState | None = None
        self.last: tuple[float, str] | None = None   # (when, what the last canary ended with)
        self.check_every_s = CHECK_EVERY_S
        # With several workers only one judges at a time (bots/cluster.py sets these to a lease).
        self.may_judge = _always
        self.judged = _nothing
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.lc.canary_share > 0

    @property
    def _path(self):
        return self.registry.root / STATE_FILE

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Resume a canary a restart interrupted, then check every check_every_s."""
        async with self._lock:
            await self._resume()
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="mynah-canary")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._unserve()

    async def _watch(self) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the feedback / canary check failed")
            await asyncio.sleep(self.check_every_s)

    async def _resume(self) -> None:
        """Caller holds the lock (or nothing else runs yet)."""
        try:
            raw = json.loads(await asyncio.to_thread(self._path.read_text, encoding="utf-8"))
            state = CanaryState(**raw)
            version = await asyncio.to_thread(self.registry.get, state.candidate)
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, RegistryError) as exc:
            log.warning("ignoring %s: %s", self._path, exc)
            await asyncio.to_thread(self._path.unlink, missing_ok=True)
            return
        try:
            loaded = await asyncio.to_thread(self.promoter.load, version.model_path, version.name)
        except Exception as exc:
            self.state = state
            await self._end(False, f"the candidate no longer loads after a restart ({exc})")
            return
        self.state = state
        self._serve(version.name, loaded, state.share)
        log.info("canary resumed: %s serves %.0f%% of chats", state.candidate, 100 * state.share)

    def _serve(self, version: str, loaded, share: float) -> None:
        if self.router is None:   # `mynah retrain`: the running bot picks the canary up (check -> _resume)
            return
        engine = self.make_engine(loaded)
        engine.start()
        self.router.candidate = Candidate(version, engine, share)

    async def _unserve(self) -> None:
        if self.router is None:
            return
        c, self.router.candidate = self.router.candidate, None
        if c is not None:
            await c.engine.stop()

    async def _save(self) -> None:
        if self.state is None:
            await asyncio.to_thread(self._path.unlink, missing_ok=True)
        else:
            await asyncio.to_thread(write_json_atomic, self._path, asdict(self.state))

    # ---- begin: called by the learning loop instead of promoting -----------------------------
    async def begin(self, run, active, through: int, metrics: dict, candidate_path, result) -> None:
        """Install the candidate (not active), serve it to canary_share of chats; fills `result`."""
        async with self._lock:
            if self.state is not None:
                result.decision = Decision.REJECTED
                result.reason = (f"the canary of {self.state.candidate} is still being judged; this candidate "
                                 "was dropped (retrain again when it has ended)")
                return
            try:
                loaded = await asyncio.to_thread(self.promoter.load, str(candidate_path), "candidate")
            except Exception as exc:
                result.decision, result.reason = Decision.REJECTED, f"the candidate failed to load: {exc}"
                return
            if await asyncio.to_thread(self.registry.active_name) != active.name:
                result.decision = Decision.REJECTED
                result.reason = "the active version changed during the run (a rollback?); the candidate was dropped"
                return
            version = await asyncio.to_thread(
                self.registry.add_fine_tuned, candidate_path, parent=active.name, run_id=run.run_id,
                trained_through=through, metrics=metrics, activate=False,
                note=f"run #{run.run_id} ({run.trigger}), canary")
            loaded.version = version.name
            share = self.lc.canary_share
            self._serve(version.name, loaded, share)
            self.state = CanaryState(version.name, active.name, share, time.time(), run.run_id,
                                     [list(t) for t in run.notify_to])
            await self._save()
        await self.store.runs.record_model_version(version.name, version.model_path, version.created_at,
                                                      version.metrics, version.note)
        result.decision = Decision.CANARY
        result.reason = (f"passed the offline gate ({result.reason}); {version.name} now serves {share:.0%} of "
                         f"chats as a canary and is promoted only if people like it no less than "
                         f"{active.name} (decided within {self.lc.canary_hours:g} h)")
        result.data["candidate"] = version.name

    # ---- judging ----------------------------------------------------------------------------
    async def counts(self) -> Counts:
        """Rated replies and positive ones, candidate vs active, since the canary began."""
        st = self.state
        scores = await self.recorder.store.scores(since=st.started_at, versions=[st.candidate, st.active])
        table = summarize(scores)
        c, a = table.get(st.candidate), table.get(st.active)
        return Counts(c.positive if c else 0, c.evaluated if c else 0, a.positive if a else 0,
                      a.evaluated if a else 0, c.replies if c else 0, a.replies if a else 0)

    async def people(self) -> tuple[canary_stats.Tally, canary_stats.Arm, canary_stats.Arm]:
        """The ballots (one per person per reply, established accounts only) and each side by raters."""
        st = self.state
        rows = await votes(self.store.db, since=st.started_at, versions=[st.candidate, st.active])
        age = self.lc.min_account_age_hours * 3600
        tally = canary_stats.ballots(rows, established_before=st.started_at - age if age > 0 else None)
        return tally, canary_stats.arm(tally.ballots, st.candidate), canary_stats.arm(tally.ballots, st.active)

    async def check(self, now: float | None = None) -> str | None:
        """Derive implicit signals; end the canary when it is due. Returns "promoted" /
        "retired" when it ended now, else None."""
        await self.recorder.derive(now)
        async with self._lock:
            await self._follow()
            st = self.state
            if st is None or not await self.may_judge():
                return None
            try:
                return await self._judge(st, now)
            finally:
                await self.judged()

    async def _follow(self) -> None:
        """Serve what canary.json says: a canary begun by `mynah retrain` or by another worker's
        learner is picked up; one another worker ended (promoted or retired) is let go here
        without ending it a second time. Caller holds the lock."""
        if self.state is not None:
            try:
                raw = json.loads(await asyncio.to_thread(self._path.read_text, encoding="utf-8"))
            except (OSError, ValueError):
                raw = None
            if not isinstance(raw, dict) or raw.get("candidate") != self.state.candidate:
                log.info("the canary of %s was ended by another worker; no longer serving it", self.state.candidate)
                self.state = None
                await self._unserve()
        if self.state is None:
            await self._resume()

    async def _judge(self, st: CanaryState, now: float | None) -> str | None:
        """End the canary if it is due (caller holds the lock and, with several workers, the judge's lease)."""
        now = time.time() if now is None else now
        active = await asyncio.to_thread(self.registry.active_name)
        if active != st.active:
            return await self._end(False, f"the active version changed to {active} during the canary")
        _, c, a = await self.people()
        need, raters = self.lc.canary_min_replies, self.lc.canary_min_raters
        if min(c.replies, a.replies) < need or min(c.raters, a.raters) < raters:
            if now - st.started_at < self.lc.canary_hours * 3600:
                return None    # extended: too few people have spoken yet
            return await self._end(False, f"too few rated replies or raters after {self.lc.canary_hours:g} h: "
                                          f"{c.replies} replies by {c.raters} raters for {st.candidate}, "
                                          f"{a.replies} by {a.raters} for {st.active}; the test needs {need} "
                                          f"replies and {raters} established raters on each side")
        test = canary_stats.rater_test(c, a, margin=self.lc.canary_margin, alpha=self.lc.canary_alpha)
        why = ("not worse" if test.not_worse else "worse, or not shown to be no worse") + f": {test.text()}"
        return await self._end(test.not_worse, why)

    async def _end(self, promote: bool, why: str) -> str:
        """Caller holds the lock. Promote or retire the candidate; record and tell."""
        st = self.state
        await self._unserve()
        took = duration(time.time() - st.started_at)
        if promote:
            try:     # loaded into the active engine, then the pointer, then the swap
                await self.promoter.activate(st.candidate, f"canary passed (run #{st.run_id})")
            except (PromotionRefused, RegistryError) as exc:
                promote, why = False, f"{why}; but it could not be activated: {exc}"
        if promote:
            text = f"Canary of {st.candidate} ended after {took}: promoted, now serving it. Feedback: {why}."
            decision = f"promoted {st.candidate} after its canary: {why}"
        else:
            with contextlib.suppress(RegistryError, OSError):
                await asyncio.to_thread(self.registry.remove, st.candidate)
            text = f"Canary of {st.candidate} ended after {took}: retired, still serving {st.active}. Why: {why}."
            decision = f"rejected after its canary: {why}"
        self.state = None
        await self._save()
        self.last = (time.time(), text)
        log.info("%s", text)
        with contextlib.suppress(Exception):
            await self.store.runs.update_training_run(st.run_id, decision=decision)
            await self.versions.sync()
        targets = [tuple(t) for t in st.notify_to] or configured_targets(self.lc.notify)
        if targets:
            await self.notifiers.notify(targets, Outgoing(text))
        return "promoted" if promote else "retired"

    async def retire(self, why: str) -> str | None:
        async with self._lock:
            return None if self.state is None else await self._end(False, why)

    # ---- what /status and the dashboard show --------------------------------------------------
    async def summary(self) -> dict | None:
        """The running canary and its numbers, or None."""
        st = self.state
        if st is None:
            return None
        n = await self.counts()
        tally, c, a = await self.people()
        return {"candidate": st.candidate, "active": st.active, "share": st.share, "started_at": st.started_at,
                "ends_by": st.started_at + self.lc.canary_hours * 3600, "min_replies": self.lc.canary_min_replies,
                "min_raters": self.lc.canary_min_raters, "raters_candidate": c.raters, "raters_active": a.raters,
                "rate_candidate": c.rate, "rate_active": a.rate,
                "largest_rater_share": max(c.largest_rater_share, a.largest_rater_share),
                "left_out": dict(tally.left_out),
                "replies_candidate": n.replies_c, "replies_active": n.replies_a,
                "rated_candidate": n.n_c, "positive_candidate": n.k_c, "rated_active": n.n_a, "positive_active": n.k_a,
                "ci_candidate": wilson(n.k_c, n.n_c), "ci_active": wilson(n.k_a, n.n_a)}

    async def status_lines(self) -> list[str]:
        s = await self.summary()
        lines = []
        if s is not None:
            left = max(0.0, s["ends_by"] - time.time())
            lines.append(f"Canary: {s['candidate']} serves {s['share']:.0%} of chats, running "
                         f"{duration(time.time() - s['started_at'])} (judged at {s['min_replies']} rated replies "
                         f"and {s['min_raters']} raters each, at the latest in {duration(left)})")
            lines.append(f"  raters: {s['raters_candidate']} on the candidate, {s['raters_active']} on the active "
                         f"model; the largest rater carries {s['largest_rater_share']:.0%} of a side")
            for side in ("candidate", "active"):
                k, n = s[f"positive_{side}"], s[f"rated_{side}"]
                lo, hi = s[f"ci_{side}"]
                rate = f"{k / n:.0%} positive (95% CI {lo:.0%}–{hi:.0%})" if n else "no rated replies yet"
                lines.append(f"  {side} {s[side]}: {s[f'replies_{side}']} replies, {n} rated, {rate}")
        elif self.enabled:
            lines.append(f"Canary: none running (a passing candidate serves {self.lc.canary_share:.0%} of chats "
                         "first)")
        if self.last is not None:
            lines.append(f"Last canary: {self.last[1]}")
        return lines
