"""How a lost peer (dead, SIGSTOPped or hung rank) shows up on the ranks that are still alive.

A collective with such a peer fails after the group's timeout (gloo: "Timed out waiting ...",
or "Connection closed by peer" when it died); a rank that waits on rank 0 through the store
raises `PeerLostError`. Once a peer is lost no further collective can succeed, so such errors are
never exchanged with `agreed` (that would wait out a second timeout): the rank reports and exits.
"""
from __future__ import annotations

import torch.distributed as dist


class PeerLostError(RuntimeError):
    """A peer rank stopped answering (dead, SIGSTOPped, hung): this rank cannot go on."""


_LOST_PEER_TEXT = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
                   "Broken pipe", "NCCL communicator was aborted", "Watchdog caught collective operation timeout")


def is_peer_lost(err: BaseException) -> bool:
    if isinstance(err, PeerLostError):
        return True
    return isinstance(err, RuntimeError) and (isinstance(err, dist.DistError)
                                              or any(t in str(err) for t in _LOST_PEER_TEXT))
