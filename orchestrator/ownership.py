"""Which daemon holds which job, when several serve one queue (AWS; an embedded folder holds one).

A record names its owner and the owner's last heartbeat (`owner_seen_at`). A hold, like a claim on
a job's message, belongs to another daemon while it is younger than `claim_seconds`; older, its
daemon is taken to be dead and the job (or message) may be taken over, always by a conditional
write on the record's version, so two daemons never both take it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from .records import JobRecord, Store, claim, now


class LetGo(Exception):
    """This daemon no longer holds the job: another one took it over."""


@dataclass
class Holds:
    store: Store
    owner: str  # this daemon, as it signs its holds and claims
    claim_seconds: float
    others_alive: bool  # False: no other daemon can exist (an embedded folder), so every hold is ours to take

    def elsewhere(self, by: str | None, at: str | None) -> bool:
        """A hold or claim by another daemon that may still be alive."""
        return bool(self.others_alive and by and by != self.owner and at
                    and time.time() - datetime.fromisoformat(at).timestamp() < self.claim_seconds)

    def take(self, record: JobRecord | None) -> JobRecord | None:
        """Make an unfinished record this daemon's, with one conditional write; None when another
        live daemon holds it, or it ended meanwhile."""
        if not self.others_alive:
            return record
        if record is None or record.terminal:
            return None
        if record.owner == self.owner:
            return record

        def stamp(mine: JobRecord) -> None:
            if mine.owner:
                mine.history.append({"at": now(), "state": mine.state, "stage": mine.stage,
                                     "note": f"taken over from {mine.owner} (silent since {mine.owner_seen_at})"})
            mine.owner, mine.owner_seen_at = self.owner, now()

        return claim(self.store, record, lambda r: r.terminal or self.elsewhere(r.owner, r.owner_seen_at), stamp)

    def renew(self, record: JobRecord) -> None:
        """A `records.change` mutation: the heartbeat, unless the job is no longer ours."""
        if record.terminal or self.elsewhere(record.owner, record.owner_seen_at):
            raise LetGo(record.job_id)
        record.owner, record.owner_seen_at = self.owner, now()

    def release(self, record: JobRecord) -> None:
        """A `records.change` mutation: the hold cleared, so the next daemon takes the job at once."""
        if record.owner != self.owner:
            raise LetGo(record.job_id)
        record.owner_seen_at = None
