"""The harness of the multi-process tests: ranks spawned on CPU, a gloo process group each.

- :func:`spawn` runs ``fn(rank, world, port, *args)`` in ``world`` processes (a free local port for
  the rendezvous); ``torch.multiprocessing.spawn`` re-raises a worker's exception here.
- :func:`spawn_and_collect` does the same and returns what rank 0 saved to the path it was given.
- :func:`process_group` joins the group inside a worker (one thread, 30 s timeout) and leaves it.
- :func:`shard_fsdp2` applies ``fully_shard`` to every child with parameters, then to the root.
- :class:`CountCollectives` counts ``dist.all_reduce`` calls.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import tempfile
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable, *args, world: int = WORLD) -> None:
    """``fn(rank, world, port, *args)`` in ``world`` processes; waits for all of them."""
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


def spawn_and_collect(fn: Callable, *args, world: int = WORLD):
    """``fn(rank, world, port, out, *args)`` in ``world`` processes, where rank 0 ``torch.save``-s
    its results to ``out``; returns them."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        spawn(fn, out, *args, world=world)
        return torch.load(out, weights_only=True)


@contextlib.contextmanager
def process_group(rank: int, world: int, port: int) -> Iterator[None]:
    """Inside a worker: one torch thread, the gloo group joined for the block, then destroyed."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # A rank that skipped a collective would make the other wait: fail fast instead of hanging.
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30)
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard_fsdp2(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """FSDP2 as a user applies it: every child module with parameters, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.children():
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class CountCollectives:
    """Counts ``dist.all_reduce`` calls while active."""

    def __enter__(self):
        self.count = 0
        self._orig = dist.all_reduce

        def counting(*args, **kwargs):
            self.count += 1
            return self._orig(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig
