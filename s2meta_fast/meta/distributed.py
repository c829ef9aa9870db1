"""Data-parallel meta-training over ``torch.distributed``, launched by ``torchrun``.

Meta-training is data-parallel over scenarios: every scenario's inner loop is independent and
only the meta-parameters ω are shared. Each rank runs the batched inner loop on its share of the
meta-batch; the meta-gradients are averaged with one all-reduce of a flat buffer per meta-step,
then every rank takes the same optimizer step, so ω stays identical everywhere without ever
being broadcast. The learner is not wrapped in DistributedDataParallel: its bucket hooks assume
one backward over the same graph on every rank, while the sampled stop gives every scenario
(hence every rank) a different graph.

The share of a meta-step: with N ranks and a global meta-batch of B scenarios, each rank draws
its own B/N scenarios and their inner-loop noise from a stream of its own, derived from the
run's seed and the rank (:func:`rank_seed`, :func:`rank_rng`); rank 0's stream is the one a
single process draws from, so one process is unchanged. The meta-gradient averaged over the ranks
is the mean over the B scenarios the ranks drew together. A checkpoint holds every rank's stream
state (rank 0 gathers them), so a run resumes only on as many processes as wrote it.

Without ``torchrun`` (no ``WORLD_SIZE``/``MASTER_ADDR`` in the environment) :func:`session`
yields :data:`SINGLE` and nothing here communicates.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")
# Long enough for rank 0 to prepare data or train a baseline while the others wait for it.
TIMEOUT = datetime.timedelta(minutes=60)
T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    """Where this process stands: rank, world size, the node-local rank and the backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def active(self) -> bool:
        """More than one process: the collectives below communicate."""
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes checkpoints, logs, results and draws progress bars."""
        return self.rank == 0


SINGLE = Group()


def launched() -> bool:
    """Whether torchrun (or another env:// launcher) started this process."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def restart_count() -> int:
    """How many times torchrun restarted the workers (``--max-restarts``); 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def current() -> Group:
    """The process group this process belongs to, or :data:`SINGLE`."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 str(dist.get_backend()))


def choose_backend(device: str, backend: str = "auto") -> str:
    """NCCL for CUDA tensors, gloo for CPU ones, unless `backend` names one."""
    if backend not in BACKENDS:
        raise ConfigError(f"dist_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl" and not str(device).startswith("cuda"):
        raise ConfigError("--dist-backend nccl needs --device cuda (NCCL moves CUDA tensors only); use gloo on the CPU")
    return backend


def init_from_env(device: str = "cpu", backend: str = "auto") -> Group:
    """Joins the process group torchrun describes in the environment (``env://``).

    On CUDA each process takes the GPU of its node-local rank, so ``device="cuda"`` means that GPU.
    Returns :data:`SINGLE` when not launched by torchrun.
    """
    if not launched():
        return SINGLE
    if dist.is_initialized():
        return current()
    backend = choose_backend(device, backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available on this node")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                              f"launch at most that many processes per node (--nproc-per-node)")
        torch.cuda.set_device(local_rank)
    # env:// as init_process_group would do it, but under a per-attempt prefix: after a
    # --max-restarts restart the agent's store still holds the dead attempt's addresses, and
    # without the prefix a new rank can read its peer's old port and fail to connect
    store, rank, world_size = next(dist.rendezvous("env://", timeout=TIMEOUT))
    store = dist.PrefixStore(f"s2meta_fast/attempt{restart_count()}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=TIMEOUT)
    group = current()
    log.debug("rank %d of %d joined (%s)", group.rank, group.world_size, backend)
    return group


@contextlib.contextmanager
def session(device: str = "cpu", backend: str = "auto") -> Iterator[Group]:
    """:func:`init_from_env` for the block's duration; leaves the group it created on exit."""
    owned = launched() and not dist.is_initialized()
    group = init_from_env(device, backend)
    try:
        yield group
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _device(group: Group) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes host tensors
    return torch.device("cuda", torch.cuda.current_device()) if group.backend == "nccl" else torch.device("cpu")


# -- meta-batch sharding --------------------------------------------------------------------------
def check_divisible(meta_batch: int, group: Group) -> None:
    if meta_batch % group.world_size:
        raise ConfigError(f"meta_batch {meta_batch} is not a multiple of the {group.world_size} processes: every "
                          f"rank draws and adapts meta_batch / world_size scenarios (choose e.g. "
                          f"{group.world_size * max(1, meta_batch // group.world_size)})")


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s torch generator: `seed` on rank 0 (a single process's stream),
    else the first 64-bit word of ``SeedSequence(seed mod 2**64, spawn_key=(rank,))``.

    Spawn keys are numpy's rule for independent parallel streams; taking `seed` modulo 2**64 is
    how ``torch.Generator.manual_seed`` reads a negative seed.
    """
    if rank == 0:
        return seed
    return int(np.random.SeedSequence(seed % (1 << 64), spawn_key=(rank,)).generate_state(1, np.uint64)[0])


def rank_rng(rng: np.random.Generator, rank: int) -> np.random.Generator:
    """Rank `rank`'s numpy stream derived from `rng`'s seed: `rng` itself on rank 0, else a fresh
    Generator of the same bit generator seeded with the seed sequence `rng` was built from,
    extended by the spawn key ``(rank,)`` (the child number `rank`, counting from 0, that a fresh
    ``rng.spawn`` hands out). Depends on the seed only, not on how far `rng` has drawn."""
    if rank == 0:
        return rng
    bits = rng.bit_generator
    parent = getattr(bits, "seed_seq", None) or getattr(bits, "_seed_seq")   # numpy < 1.25: _seed_seq only
    child = np.random.SeedSequence(parent.entropy, spawn_key=tuple(parent.spawn_key) + (rank,),
                                   pool_size=parent.pool_size)
    return np.random.Generator(type(bits)(child))


def shard_indices(n: int, group: Group) -> range:
    """Round-robin: this rank's items of `n` (evaluation blocks, whose sizes vary)."""
    return range(group.rank, n, group.world_size)


# -- collectives ----------------------------------------------------------------------------------
def average_gradients(params: Sequence[torch.nn.Parameter], stats: Tensor, group: Group) -> Tensor:
    """Replaces every ``p.grad`` by its mean over the ranks and returns `stats` averaged too.

    One all-reduce of one flat buffer: the gradients, a has-gradient flag per parameter and the
    step's statistics (loss terms). A rank whose scenarios gave a parameter no gradient counts
    zeros for it; a parameter without a gradient on every rank keeps ``grad = None``.
    Non-finite values propagate through the sum, so every rank takes the same skip decision.
    """
    if not group.active:
        return stats
    like = next(iter(params))
    pieces = [p.grad.reshape(-1) if p.grad is not None else like.new_zeros(p.numel()) for p in params]
    flags = like.new_tensor([p.grad is not None for p in params], dtype=like.dtype)
    flat = torch.cat(pieces + [flags, stats.to(like.dtype)])
    device = _device(group)
    buffer = flat.to(device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    buffer = buffer.to(flat.device).div_(group.world_size)
    offset = 0
    views = []
    for p in params:
        views.append(buffer[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    present = buffer[offset:offset + len(params)]
    for p, view, flag in zip(params, views, present.tolist()):
        if flag == 0:
            p.grad = None
        elif p.grad is None:
            p.grad = view.clone()
        else:
            p.grad.copy_(view)   # in place: a captured CUDA graph keeps writing into this buffer
    return buffer[offset + len(params):].to(stats.dtype)


def barrier(group: Group) -> None:
    if group.active:
        dist.barrier()


def gather_objects(obj: Any, group: Group) -> List[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not group.active:
        return [obj]
    out: List[Any] = [None] * group.world_size
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_writer(fn: Callable[[], T], group: Group) -> T:
    """`fn()` run on rank 0 only, its result (or its exception) on every rank.

    For reads a multi-node run must not repeat per node: a checkpoint, a cached result.
    """
    if not group.active:
        return fn()
    outcome: Any = None
    if group.is_writer:
        try:
            outcome = (True, fn())
        except Exception as error:  # handed to every rank, so none waits for a result that never comes
            outcome = (False, error)
    ok, value = _broadcast(outcome)
    if not ok:
        raise value
    return value


def writer_first(fn: Callable[[], T], group: Group, others: Optional[Callable[[], T]] = None,
                 run_others: bool = True) -> Optional[T]:
    """`fn()` on rank 0, then (once it succeeded) `others()` (default `fn`) on the other ranks.

    For work whose result lands on disk: the other ranks then read rank 0's cache instead of
    racing it. With ``run_others=False`` only rank 0 runs (a write). An exception on rank 0 is
    raised on every rank.
    """
    if not group.active:
        return fn()
    result: Optional[T] = None
    error: Optional[BaseException] = None
    if group.is_writer:
        try:
            result = fn()
        except Exception as caught:
            error = caught
    error = _broadcast(error)
    if error is not None:
        raise error
    if not group.is_writer and run_others:
        result = (others or fn)()
    return result


def fingerprint(text: str | bytes) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def check_same(parts: Mapping[str, str], group: Group) -> None:
    """Raises :class:`ConfigError` on every rank unless all ranks hold the same `parts`.

    `parts` maps a name ("config", "data", ...) to a text or fingerprint; the same names must be
    given on every rank. One all-gather of 8-byte digests; only on a mismatch are the texts
    gathered, to name the differing lines.
    """
    if not group.active:
        return
    names = list(parts)
    digests = torch.tensor([int(fingerprint(f"{name}\0{parts[name]}")[:15], 16) for name in names],
                           dtype=torch.int64, device=_device(group))
    gathered = [torch.empty_like(digests) for _ in range(group.world_size)]
    dist.all_gather(gathered, digests)
    table = torch.stack(gathered).cpu()
    differ = (table != table[0]).any(0).tolist()
    if not any(differ):
        return
    texts = gather_objects({name: parts[name] for name in names}, group)
    lines = []
    for name, bad in zip(names, differ):
        if not bad:
            continue
        ranks = [r for r in range(group.world_size) if texts[r][name] != texts[0][name]]
        ours = set(str(texts[0][name]).splitlines())
        detail = [line for line in str(texts[ranks[0]][name]).splitlines() if line not in ours][:5]
        lines.append(f"{name}: rank(s) {', '.join(map(str, ranks))} differ from rank 0"
                     + (f" ({'; '.join(detail)})" if detail else ""))
    raise ConfigError("the processes of this distributed run disagree on their settings: " + " | ".join(lines)
                      + ". Launch every rank with the same command line, config file, data and package version")


__all__ = ["BACKENDS", "Group", "SINGLE", "average_gradients", "barrier", "check_divisible", "check_same",
           "choose_backend", "current", "fingerprint", "from_writer", "gather_objects", "init_from_env", "launched",
           "rank_rng", "rank_seed", "restart_count", "session", "shard_indices", "writer_first"]
