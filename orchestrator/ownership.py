"""Which daemon holds which job, when several serve one queue (AWS; an embedded folder holds one).

A record names its owner: the daemon that created or took the job. Each daemon writes one heartbeat
for all it holds (`Store.beat`, every `claim_seconds` / 3), so holding a thousand jobs costs one
write per beat, not a thousand. A hold, like a claim on a job's message, belongs to another daemon
while that daemon's heartbeat is younger than `claim_seconds` (a sender with no heartbeat, the
fallback state machine, by its claim's own stamp); older, or let go at shutdown, its daemon is taken
to be gone and the job (or message) may be taken over, always by a conditional write on the
record's version, so two daemons never both take it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from .records import Beat, JobRecord, Store, claim, now


def _age(at: str) -> float:
    return time.time() - datetime.fromisoformat(at).timestamp()


@dataclass
class Holds:
    store: Store
    owner: str  # this daemon, as it signs its holds and claims
    claim_seconds: float
    others_alive: bool  # False: no other daemon can exist (an embedded folder), so every hold is ours to take
    _beats: dict[str, tuple[float, Beat | None]] = field(default_factory=dict)  # owner → (looked at, its beat)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def elsewhere(self, by: str | None, at: str | None) -> bool:
        """A hold or claim by another daemon that may still be alive: by its heartbeat, or, for one
        that never wrote one (the fallback state machine), by the hold's own stamp."""
        if not (self.others_alive and by and by != self.owner):
            return False
        beat = self._seen(by)
        if beat is not None:
            return beat.alive and _age(beat.at) < self.claim_seconds
        return bool(at and _age(at) < self.claim_seconds)

    def _seen(self, by: str) -> Beat | None:
        """A daemon's heartbeat, read at most every `claim_seconds` / 6: takeovers judge many records at once."""
        with self._lock:
            looked, beat = self._beats.get(by, (float("-inf"), None))
        if time.monotonic() - looked > self.claim_seconds / 6:
            beat = self.store.seen(by)
            with self._lock:
                self._beats[by] = (time.monotonic(), beat)
        return beat

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

    def beat(self, alive: bool = True) -> None:
        """This daemon's heartbeat, for every job it holds (alive=False: it lets them all go at once)."""
        self.store.beat(self.owner, now(), alive)
