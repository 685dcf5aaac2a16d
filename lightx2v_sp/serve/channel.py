"""Rank 0 hands jobs to the other ranks through the job's key-value store, not a collective.

Between jobs the ranks may wait for hours; a collective would time out after `comm.timeout_s`.
So rank 0 posts each job (a small pickle: its id and config) under a numbered key of the c10d
store and the others poll for it, as rank0_stage.py does for rank 0's decode. Every rank bumps its
own heartbeat counter once a second from a thread; a waiting rank gives up when rank 0's counter
stops moving for `comm.timeout_s` (rank 0 stopped, dead or hung), and rank 0 between jobs checks
everyone else's the same way, so a server with a lost rank stops instead of taking jobs it cannot
run. Inside a job the collectives' own timeout does that. A rank told to stop (SIGTERM) sets its
`leaving` key; rank 0 sees it and stops the server as if it had been told itself.
"""
from __future__ import annotations

import contextlib
import pickle
import threading
import time
from typing import Optional

import torch.distributed as dist

from lightx2v_sp.distributed.peer_lost import PeerLostError
from lightx2v_sp.pipeline.rank0_stage import heartbeat_interval

POLL_S = 0.05   # how often a waiting rank looks for the next job
STOP = "stop"


class Channel:
    def __init__(self, world: int, rank: int, timeout_s: float):
        self.world, self.rank, self.timeout_s = world, rank, timeout_s
        self._next = 0
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (last beat count, when it last moved)
        self._stop = threading.Event()
        self.store = None
        if world == 1:
            return
        self.store = dist.PrefixStore("lightx2v_sp/serve/", dist.distributed_c10d._get_default_store())
        self._beat = threading.Thread(target=self._beats, name="lightx2v_sp-serve-heartbeat", daemon=True)
        self._beat.start()

    def _beats(self) -> None:
        interval = heartbeat_interval(self.timeout_s)
        while not self._stop.wait(interval):
            try:
                self.store.add(f"beat/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store went away: the others notice our silence
                return

    def _stalled(self, rank: int) -> Optional[float]:
        """Seconds rank `rank`'s heartbeat has not moved when that is over the timeout, else None."""
        beats, now = self.store.add(f"beat/{rank}", 0), time.monotonic()
        last, since = self._seen.get(rank, (-1, now))
        if beats != last:
            self._seen[rank] = (beats, now)
            return None
        return now - since if now - since > self.timeout_s else None

    def post(self, message) -> None:
        """Rank 0: the next message (a job, or STOP) for every other rank."""
        if self.store is None:
            return
        self.store.set(f"msg/{self._next}", pickle.dumps(message))
        if self._next >= 2:  # everyone has read it: the job after it started with a collective
            with contextlib.suppress(Exception):
                self.store.delete_key(f"msg/{self._next - 2}")
        self._next += 1

    def check_peers(self) -> Optional[str]:
        """Rank 0 between jobs: why a rank is leaving (it was told to stop), or None; PeerLostError when
        a rank's heartbeat stopped."""
        if self.store is None:
            return None
        for r in range(1, self.world):
            if self.store.check([f"leaving/{r}"]):
                return f"rank {r} received {self.store.get(f'leaving/{r}').decode()}"
            silent = self._stalled(r)
            if silent is not None:
                raise PeerLostError(f"rank {r} sent no heartbeat for {silent:.0f}s (comm.timeout_s="
                                    f"{self.timeout_s:g}): it is stopped, hung or dead")

    def receive(self, leaving: Optional[str] = None):
        """Ranks > 0: the next message from rank 0 (blocks). `leaving()` returns a reason once this rank
        should go (it is posted once for rank 0 to see; the rank still waits for STOP)."""
        posted = False
        while True:
            try:
                if self.store.check([f"msg/{self._next}"]):
                    message = pickle.loads(self.store.get(f"msg/{self._next}"))
                    self._next += 1
                    return message
                reason = leaving() if leaving is not None else None
                if reason and not posted:
                    self.store.set(f"leaving/{self.rank}", reason)
                    posted = True
                silent = self._stalled(0)
            except Exception as e:  # noqa: BLE001 - a store that went away with rank 0
                raise PeerLostError(f"lost contact with rank 0 while waiting for a job ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}); rank 0 is dead") from None
            if silent is not None:
                raise PeerLostError(f"rank 0 sent no heartbeat for {silent:.0f}s while this rank waited for a "
                                    f"job (comm.timeout_s={self.timeout_s:g}): it is stopped, hung or dead")
            time.sleep(POLL_S)

    def close(self) -> None:
        self._stop.set()
