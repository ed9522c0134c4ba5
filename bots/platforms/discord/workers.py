"""Discord with several workers on one PostgreSQL database.

Discord sends every event of a shard to each session connected to it, and a worker's
catch-up after a reconnect reads history another worker may be answering. So with a shared
database each message is claimed there first (the `update_claims` table Telegram's webhook
uses, keyed by the message's snowflake): exactly one worker answers it. `[discord]
shard_ids` splits the shards between workers so each sees only its share; the claim keeps a
misconfigured overlap, or catch-up racing the gateway, from answering twice.
"""
from __future__ import annotations

import logging

from storage.cluster import CLAIM_MINE, CLAIM_TAKEN_OVER

log = logging.getLogger(__name__)

PLATFORM = "discord"


class SharedClaims:
    def __init__(self, cluster) -> None:
        self.cluster = cluster      # bots.cluster.Presence

    async def take(self, message_id: int) -> bool:
        """True: this worker answers the message. When the database cannot say, answer it
        (at least once rather than never; storing the message retries on its own)."""
        try:
            state = await self.cluster.store.claim(PLATFORM, str(message_id), self.cluster.id,
                                                   stale_after=self.cluster.stale_after_s)
        except Exception as exc:
            log.warning("discord: could not claim message %s in the database (%s); answering it here",
                        message_id, type(exc).__name__)
            return True
        if state == CLAIM_TAKEN_OVER:   # its worker died mid-answer: an unconfirmed reply is failed first
            log.warning("discord message %s: its worker died before finishing it; answering it here", message_id)
            try:
                await self.cluster.store.fail_pending_replies(PLATFORM, None, str(message_id))
            except Exception as exc:
                log.warning("discord: could not fail message %s's unconfirmed reply (%s)", message_id,
                            type(exc).__name__)
        return state in (CLAIM_MINE, CLAIM_TAKEN_OVER)

    async def done(self, message_id: int) -> None:
        try:
            await self.cluster.done(PLATFORM, str(message_id))
        except Exception:
            log.warning("discord: could not mark message %s done", message_id)
