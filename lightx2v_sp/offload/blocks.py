"""DiT block offload: block weights in pinned host memory, two device buffers, prefetch.

Installed as forward hooks on a `ModuleList` of identically structured blocks (Wan's
`model.blocks`); the model code does not change, and sequence parallelism or CFG-parallel
are invisible here (the hooks see whole blocks, whatever the activations are).

Schedule, for blocks called in order 0..N-1 (and again for the next forward):
  pre-hook(i):  wait for block i's copy (slot s) -> bind block i to slot s
                -> issue the copy of block i+1 into slot 1-s, after the event recorded when the
                   compute that last used slot 1-s (block i-1) finished
  forward(i):   runs on the compute stream while block i+1 streams in on the copy stream
  post-hook(i): record "slot s free" -> bind block i back to its host copy
After block N-1 the next forward's block 0 is prefetched (`wraparound`), so its copy hides
behind the model's head, the sampler step and the next forward's embeddings.
Blocks called out of order are loaded on demand, so the result is always right.

Inference only: the device buffers are overwritten while autograd could still hold them.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from .layout import TensorLayout, check_disjoint, check_same_structure
from .shared_host import NodeSharedHost
from .transport import CudaTransport, Transport, warn_no_effect


class BlockOffload:
    """Handle of an installed block offload; `remove()` restores the resident blocks."""

    active = True

    def __init__(self, blocks: nn.ModuleList, transport: Transport, wraparound: bool = True,
                 share_host: bool = False, weights_loaded: bool = True) -> None:
        if len(blocks) == 0:
            raise ValueError("enable_block_offload got an empty ModuleList; there is nothing to offload")
        self.blocks = blocks
        self.transport = transport
        self.wraparound = wraparound
        self.layouts = [TensorLayout(b) for b in blocks]
        check_same_structure(self.layouts, "enable_block_offload")
        check_disjoint(self.layouts, "enable_block_offload")
        self.block_nbytes = self.layouts[0].nbytes

        # One host allocation per block, packed and its original storage freed before the next is
        # allocated: host memory peaks at one copy of the blocks plus one block, not two copies.
        # `share_host`: one node-wide shared buffer instead (shared_host.py), packed by local rank 0.
        # `weights_loaded` False: this rank never read its block weights (the loader skipped them,
        # untouched pages cost no memory), local rank 0's copy supplies them.
        self._arena = None
        if share_host:
            self._arena = NodeSharedHost.create("dit-blocks", self.block_nbytes * len(blocks),
                                                pin=isinstance(transport, CudaTransport))
            _check_can_share(self._arena, weights_loaded)
            mine = _fingerprint(self.layouts[0].tensors) if weights_loaded else None
        self._host_flat = []
        self._host_views = []
        for i, layout in enumerate(self.layouts):
            if self._arena is not None and self._arena.shared:
                flat = self._arena.tensor[i * self.block_nbytes:(i + 1) * self.block_nbytes]
            else:
                flat = transport.host_empty(self.block_nbytes)
            self._host_flat.append(flat)
            views = layout.views(flat)
            if self._arena is None or self._arena.writer:
                layout.pack(views)
            layout.bind(views)  # frees the original (device or mmap-backed) storage
            self._host_views.append(views)
        if self._arena is not None:
            self._arena.ready()
            _check_same_weights(mine, _fingerprint(self._host_views[0]))

        self._dev_flat: list[Optional[torch.Tensor]] = [None, None]
        self._dev_views: list[Optional[list[torch.Tensor]]] = [None, None]
        self._reset_slots()
        self.num_copies = 0
        self.bytes_copied = 0

        self._handles = []
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(functools.partial(self._pre, i)))
            self._handles.append(
                block.register_forward_hook(functools.partial(self._post, i), always_call=True))

    # -- slot bookkeeping ------------------------------------------------------------------
    def _reset_slots(self) -> None:
        self._slot_block: list[Optional[int]] = [None, None]  # block held (or arriving) per slot
        self._copy_done: list = [None, None]   # event: copy into the slot finished
        self._slot_free: list = [None, None]   # event: last compute reading the slot finished
        self._last_slot: Optional[int] = None  # slot of the block that computed last
        self._computing: Optional[tuple[int, int]] = None

    def _ensure_buffers(self) -> None:
        if self._dev_flat[0] is not None:
            return
        with torch.inference_mode(False):  # buffers get bound to Parameters outside inference mode too
            for s in range(2):
                self._dev_flat[s] = self.transport.device_empty(self.block_nbytes)
                self._dev_views[s] = self.layouts[0].views(self._dev_flat[s])

    def _issue(self, block: int, slot: int) -> None:
        self._copy_done[slot] = self.transport.copy_async(
            self._dev_flat[slot], self._host_flat[block], after=self._slot_free[slot])
        self._slot_block[slot] = block
        self.num_copies += 1
        self.bytes_copied += self.block_nbytes

    def _next(self, i: int) -> Optional[int]:
        if i + 1 < len(self.blocks):
            return i + 1
        return 0 if self.wraparound else None

    # -- hooks -----------------------------------------------------------------------------
    def _pre(self, i: int, module: nn.Module, args) -> None:
        assert self._computing is None, f"block {i} called while block {self._computing[0]} runs"
        self._ensure_buffers()
        if i in self._slot_block:
            slot = self._slot_block.index(i)
        else:  # not prefetched (first call, or blocks called out of order): load now
            slot = 0 if self._last_slot is None else 1 - self._last_slot
            self._issue(i, slot)
        self.transport.wait(self._copy_done[slot])
        self.layouts[i].bind(self._dev_views[slot])
        self._computing = (i, slot)
        nxt = self._next(i)
        if nxt is not None and nxt not in self._slot_block:
            self._issue(nxt, 1 - slot)

    def _post(self, i: int, module: nn.Module, args, output) -> None:
        if self._computing is None or self._computing[0] != i:
            return  # the pre-hook failed before binding; nothing to undo
        slot = self._computing[1]
        self._slot_free[slot] = self.transport.record()
        self.layouts[i].bind(self._host_views[i])
        self._last_slot = slot
        self._computing = None

    # -- lifetime --------------------------------------------------------------------------
    def _drain(self) -> None:
        """Order the compute stream after every copy in flight, so freeing buffers is safe."""
        for event in self._copy_done:
            if event is not None:
                self.transport.wait(event)

    def release_buffers(self) -> None:
        """Free the two device buffers (e.g. before VAE decode); the next forward re-allocates."""
        self._drain()
        self._dev_flat = [None, None]
        self._dev_views = [None, None]
        self._reset_slots()

    def close(self) -> None:
        """The blocks have run for the last time: uninstall the hooks, free the device buffers and the
        (pinned) host copy. The hooks hold this handle and the handle holds the blocks, so without this
        the host copy (26-52 GiB for Wan 14B / A14B) outlives `del model` until a garbage collection.
        The blocks' tensors are left empty: calling them afterwards fails instead of reading freed memory.
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.release_buffers()
        for layout in self.layouts:
            layout.bind([torch.empty(0, dtype=t.dtype, device=t.device) for t in layout.tensors])
        for flat in self._host_flat if self._arena is None or not self._arena.shared else ():
            self.transport.host_free(flat)
        self._host_flat, self._host_views, self._arena = [], [], None
        self.active = False

    def remove(self, restore: bool = True) -> None:
        """Uninstall the hooks; with `restore`, tensors go back to the devices they came from."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.release_buffers()
        if restore:
            with torch.no_grad():
                for layout, views in zip(self.layouts, self._host_views):
                    layout.bind([v.to(dev) if dev.type != "cpu" else v
                                 for v, dev in zip(views, layout.devices)])
        self.active = False

    def stats(self) -> dict:
        return {"block_copies": self.num_copies, "bytes_h2d": self.bytes_copied,
                "block_bytes": self.block_nbytes, "num_blocks": len(self.blocks)}


def _fingerprint(tensors) -> list[float]:
    """A cheap checksum of a block's weights, to compare ranks' copies: float64 sums, on the CPU (the
    same order of additions wherever the tensor lives), of at most 65536 evenly strided values each."""
    with torch.no_grad():
        out = []
        for t in tensors:
            flat = t.detach().reshape(-1)
            out.append(float(flat[::max(1, flat.numel() // 65536)].cpu().double().sum()))
        return out


def _all_flags(flag: bool) -> list[bool]:
    import torch.distributed as dist

    flags = [flag]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, flag)  # one bool per rank -> every rank's list
    return flags


def _check_can_share(arena: NodeSharedHost, weights_loaded: bool) -> None:
    """Collective: a rank that skipped reading its blocks needs a shared copy that another rank fills."""
    flags = _all_flags(not weights_loaded and (not arena.shared or arena.writer))
    if any(flags):
        raise ValueError(f"rank(s) {[r for r, f in enumerate(flags) if f]} skipped reading their DiT blocks to "
                         "share a host copy that no other rank fills (/dev/shm too small, see the warning, or "
                         "the rank is its node's local rank 0); set offload.share_host=false")


def _check_same_weights(mine: Optional[list[float]], shared: list[float]) -> None:
    """Collective: every rank fails if any rank's own block 0 differs from the shared copy."""
    flags = _all_flags(mine is not None and mine != shared)
    if any(flags):
        ranks = [r for r, f in enumerate(flags) if f]
        raise ValueError(f"offload.share_host: the DiT weights of rank(s) {ranks} differ from their node's "
                         "local rank 0; ranks of one node can only share identical weights "
                         "(set offload.share_host=false to keep one host copy per rank)")


class InactiveBlockOffload:
    """What `enable_block_offload` returns where offload cannot work: the same handle, doing nothing."""

    active = False

    def release_buffers(self) -> None:
        pass

    def close(self) -> None:
        pass

    def remove(self, restore: bool = True) -> None:
        pass

    def stats(self) -> dict:
        return {}


def enable_block_offload(blocks: nn.ModuleList, device: torch.device | str,
                         transport: Optional[Transport] = None, wraparound: bool = True,
                         share_host: bool = False, weights_loaded: bool = True):
    """Keep `blocks`' weights in pinned host memory and stream them to `device` block by block.

    Outputs are bit-identical to running the blocks resident on `device`. Install after any
    `parallelize_*` step that replaces modules inside the blocks. Without CUDA (and without an
    explicit `transport`) this warns once and returns an inactive handle: blocks stay put.
    """
    device = torch.device(device)
    if transport is None:
        if device.type != "cuda" or not torch.cuda.is_available():
            warn_no_effect("offload.dit=block", device)
            return InactiveBlockOffload()
        transport = CudaTransport(device)
    return BlockOffload(blocks, transport, wraparound=wraparound, share_host=share_host,
                        weights_loaded=weights_loaded)


def move_except(module: nn.Module, exclude: nn.Module, device: torch.device | str) -> None:
    """Move every parameter and buffer of `module` to `device`, except those under `exclude`."""
    skip = {id(m) for m in exclude.modules()}
    device = torch.device(device)
    with torch.no_grad():
        for sub in module.modules():
            if id(sub) in skip:
                continue
            for t in list(sub.parameters(recurse=False)) + list(sub.buffers(recurse=False)):
                if t.device != device:
                    t.data = t.data.to(device)


def offload_dit_blocks(model: nn.Module, device: torch.device | str, blocks_attr: str = "blocks",
                       transport: Optional[Transport] = None, wraparound: bool = True,
                       share_host: bool = False, weights_loaded: bool = True):
    """`offload.dit: block` for a whole DiT: blocks stream from host, everything else on `device`.

    `share_host`: the local ranks of the job keep one host copy between them (collective)."""
    blocks = getattr(model, blocks_attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"offload.dit=block needs model.{blocks_attr} to be an nn.ModuleList, got "
                         f"{type(blocks).__name__}; the DiT cannot be offloaded block by block")
    handle = enable_block_offload(blocks, device, transport=transport, wraparound=wraparound,
                                  share_host=share_host, weights_loaded=weights_loaded)
    if handle.active:
        move_except(model, blocks, handle.transport.device)
    else:
        model.to(device)
    return handle
