"""One host copy of offloaded weights per node, shared by the node's ranks.

With `offload.dit=block` every rank used to pin its own host copy of the DiT blocks: 8 ranks of a
14B model held 8 x 26 GiB. Here the local ranks map one POSIX shared-memory file instead
(`/dev/shm`, MAP_SHARED via `torch.UntypedStorage.from_file`): local rank 0 fills it, the others
wait on a barrier and read the same pages. On CUDA each process registers the mapping with
cudaHostRegister, so the host->device copies stay pinned and asynchronous.

The file is unlinked as soon as every rank has mapped it, so a crash leaves nothing in /dev/shm;
the pages go back to the system when the last rank exits. If /dev/shm is too small (containers
often mount 64 MiB), every rank falls back to its own buffer with one warning.

    arena = NodeSharedHost.create("dit-blocks", nbytes)     # collective: every rank calls it
    flat = arena.tensor                                    # uint8 [nbytes], the same pages on every local rank
                                                           # (None when not shared: allocate your own)
    if arena.writer: ...fill flat...
    arena.ready()                                          # collective: the others may read now
"""
from __future__ import annotations

import os
import secrets
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from .transport import unregister_host

# Where the shared file lives: a tmpfs. LIGHTX2V_SP_SHM_DIR picks another directory (any local file
# system works: the mapping is MAP_SHARED and the file is unlinked at once) where /dev/shm is small.
SHM_DIR = os.environ.get("LIGHTX2V_SP_SHM_DIR", "/dev/shm")


def local_layout() -> tuple[int, int]:
    """(local rank, local world size) from torchrun's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _broadcast_token() -> str:
    """A random name chosen by global rank 0, known to every rank (one small collective)."""
    token = [secrets.token_hex(6)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # [1 str] on rank 0 -> broadcast_object_list -> the same [1 str] on every rank
        dist.broadcast_object_list(token, src=0)
    return token[0]


def _shm_free_bytes() -> int:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


class NodeSharedHost:
    """A host byte buffer that all local ranks of the job map; `shared` False (one local rank, or
    /dev/shm too small): no buffer (`tensor` None), the caller allocates its own as before."""

    def __init__(self, tensor: Optional[torch.Tensor], writer: bool, shared: bool, pin: bool) -> None:
        self.tensor = tensor
        self.writer = writer
        self.shared = shared
        self._registered: Optional[int] = None
        if pin:
            self._pin()

    @classmethod
    def create(cls, name: str, nbytes: int, pin: bool = False) -> "NodeSharedHost":
        """Collective over the job's ranks. `pin`: register the pages with CUDA in this process."""
        local_rank, local_world = local_layout()
        nbytes = max(int(nbytes), 1)
        if local_world == 1:
            return cls(None, True, False, False)
        token = _broadcast_token()
        node = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", 0)))
        path = os.path.join(SHM_DIR, f"lightx2v_sp-{token}-{name}-node{node}")
        # every rank decides the same way (same node, same /dev/shm); the writer's view decides
        ok = [_shm_free_bytes() >= nbytes if local_rank == 0 else True]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flags: list = [None] * dist.get_world_size()
            # 1 bool per rank -> all_gather_object -> [world] bools on every rank: all nodes decide alike
            dist.all_gather_object(flags, ok[0])
            ok = [all(flags)]
        if not ok[0]:
            warnings.warn(f"{SHM_DIR} has {_shm_free_bytes() / 2**30:.2f} GiB free, fewer than the "
                          f"{nbytes / 2**30:.2f} GiB of {name}: every local rank keeps its own host copy "
                          f"({local_world} copies on this node); enlarge {SHM_DIR} (docker --shm-size) or set "
                          "LIGHTX2V_SP_SHM_DIR to a larger local directory to share one",
                          RuntimeWarning, stacklevel=2)
            return cls(None, True, False, False)
        if local_rank == 0:
            with open(path, "wb") as f:
                f.truncate(nbytes)
        _barrier()  # the file exists with its size before anyone maps it
        storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)
        tensor = torch.empty(0, dtype=torch.uint8).set_(storage)
        _barrier()  # everyone has mapped it: the name is no longer needed
        if local_rank == 0:
            os.unlink(path)
        return cls(tensor, local_rank == 0, True, pin)

    def ready(self) -> None:
        """Collective: after the writer filled the buffer, every rank may read it."""
        if self.shared:
            _barrier()

    def _pin(self) -> None:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(self.tensor.data_ptr(), self.tensor.numel(), 0)
        if int(err) != 0:
            warnings.warn(f"cudaHostRegister refused the shared host buffer (error {int(err)}): copies from it "
                          "run at pageable speed", RuntimeWarning, stacklevel=3)
            return
        self._registered = self.tensor.data_ptr()

    def __del__(self) -> None:
        if self._registered is not None:
            unregister_host(self._registered)
            self._registered = None
