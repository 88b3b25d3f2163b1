"""The one module that owns Ray.

A stage runs as one or more `ActorGroup`s: N actors, each one torch.distributed rank of the
group's own process group, hosting the stage's per-rank worker object (a `...Worker` class) built
after the process group is up. The driver calls the worker's methods on every rank and gets
their results back; if an actor raises or dies, the driver gets a `GroupError` naming the
group, the rank and the cause, and the group is shut down, never left hanging.

    start_ray(cfg.ray)
    group = ActorGroup("policy", cfg.ray)
    group.setup(SFTWorker, cfg)               # builds a SFTWorker on every rank
    metrics = group.call("train_step")        # list, one entry per rank
    group.shutdown()
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import traceback
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional, Sequence

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from align import errors
from align.config import RayConfig
from align.waits import announce_wait

log = logging.getLogger("align.engine")

# Environment every actor inherits from the driver (when set there).
_FORWARDED_ENV = ("ALIGN_CACHE", "ALIGN_FAULT", "HF_HOME", "HF_DATASETS_CACHE", "TORCH_EXTENSIONS_DIR", "WANDB_MODE",
                  "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "PYTHONHASHSEED")


class GroupError(RuntimeError):
    """An actor of a group raised or died. `.group`, `.rank` and `.cause` say which and why.

    The first line reads `group '<name>' rank <r> failed: <Type>: <message>`; the remote
    traceback follows. `.user_error` is the user's mistake (a `UserError`, e.g. a data error
    only an actor could see) when that is what the actor raised: the command line then prints
    it as one line and exits 2. Pickles with every field (it may cross Ray itself).
    """

    def __init__(self, group: str, rank: int, cause: str, details: str = "", user_error=None):
        self.group, self.rank, self.cause, self.details, self.user_error = group, rank, cause, details, user_error
        super().__init__(f"group '{group}' rank {rank} failed: {cause}" + (f"\n{details}" if details else ""))

    def __reduce__(self):
        return (type(self), (self.group, self.rank, self.cause, self.details, self.user_error))


def start_ray(cfg: RayConfig) -> None:
    """Joins the cluster at `ray.address` / RAY_ADDRESS, or starts a local Ray."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address and address != "local":
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_worker_niceness", str(cfg.worker_niceness))  # read when the raylet starts
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        object_store_memory=cfg.object_store_memory,
        log_to_driver=True,
        configure_logging=False,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RankActor:
    """The Ray actor of one rank: hosts the stage's per-rank worker object and runs its methods."""

    def __init__(self, group: str, rank: int, world_size: int, threads: int, env: Dict[str, str]):
        # torch.distributed deprecation notices from inside DeepSpeed would repeat every step.
        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ.update(env)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                          OMP_NUM_THREADS=str(threads))
        import torch  # lazy: torch (here and in deepspeed_engine) loads after this rank's environment is set

        # Each rank gets its share of the cores; oversubscription makes steps 3-7x slower.
        torch.set_num_threads(threads)
        self.group, self.rank, self.worker, self.threads = group, rank, None, threads

    def address(self) -> tuple:
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str, master_port: int, backend: str, factory: Callable, args, kwargs) -> str:
        from align.engine.deepspeed_engine import init_distributed  # lazy: torch, see __init__

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        init_distributed(backend)
        self.worker = factory(*args, **kwargs)
        return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()

    def call(self, method: str, args, kwargs, threads: Optional[int] = None) -> Any:
        """`worker.method(*args, **kwargs)`, on `threads` torch threads when given (see running_alone)."""
        # Never more threads than this machine has cores (a Ray node may declare more CPUs).
        threads = min(threads, len(os.sched_getaffinity(0))) if threads else None
        if not threads or threads == self.threads:
            return getattr(self.worker, method)(*args, **kwargs)
        import torch

        torch.set_num_threads(threads)
        try:
            return getattr(self.worker, method)(*args, **kwargs)
        finally:
            torch.set_num_threads(self.threads)

    def teardown(self) -> None:
        from align.engine.deepspeed_engine import teardown  # lazy: torch, see __init__

        close = getattr(self.worker, "close", None)
        if callable(close):
            close()
        self.worker = None
        teardown()


class ActorGroup:
    """N actors forming one process group (policy, value, reference, reward, or a whole stage)."""

    def __init__(self, name: str, cfg: RayConfig, num_actors: Optional[int] = None,
                 pg: Optional[PlacementGroup] = None, bundle_offset: int = 0, share: float = 1.0):
        self.name = name
        self.world_size = num_actors or cfg.num_actors
        gpus = cfg.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        self.backend = cfg.backend if cfg.backend != "auto" else ("nccl" if gpus > 0 else "gloo")
        bundle = {"CPU": cfg.cpus_per_actor, **({"GPU": gpus} if gpus else {})}
        # A shared placement group is how groups are colocated on the same devices: each
        # colocated group then asks for a `share` of every bundle (e.g. 0.5 for two groups).
        self._own_pg = pg is None
        self.pg = pg or placement_group([bundle] * self.world_size, strategy=cfg.placement_strategy)
        with announce_wait(f"Ray to place group '{name}': {self.world_size} actors of {bundle} "
                           f"(cluster has {ray.cluster_resources()}; gives up after 120 s)"):
            placed, give_up = False, time.monotonic() + 120
            while not placed and time.monotonic() < give_up:  # in slices, for Ctrl-C
                placed = self.pg.wait(timeout_seconds=1)
        if not placed:
            remove_placement_group(self.pg)
            raise GroupError(name, -1, f"Ray could not place {self.world_size} actors of {bundle} "
                                       f"(cluster has {ray.cluster_resources()})")
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        threads = max(1, int(cfg.cpus_per_actor))
        self.threads, self.elastic = threads, cfg.elastic_threads and not gpus
        self._call_threads: Optional[List[int]] = None  # per rank, inside running_alone
        remote = ray.remote(RankActor)
        self.actors = [
            remote.options(
                num_cpus=cfg.cpus_per_actor * share,
                num_gpus=gpus * share,
                name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=bundle_offset + r),
            ).remote(name, r, self.world_size, threads, env)
            for r in range(self.world_size)
        ]
        self.nodes: List[str] = []  # each rank's node IP (the same for nodes sharing a machine)
        self.node_ids: List[str] = []  # each rank's Ray node id

    # -- running ------------------------------------------------------------------------------

    def setup(self, factory: Callable, *args, **kwargs) -> None:
        """Starts the process group and builds `factory(*args, **kwargs)` on every rank."""
        with announce_wait(f"the actors of group '{self.name}' to start"):
            addr, port = self._get([self.actors[0].address.remote()])[0]
        refs = [a.setup.remote(addr, port, self.backend, factory, args, kwargs) for a in self.actors]
        self.nodes, self.node_ids = (list(x) for x in zip(*self._get(refs)))

    def call_async(self, method: str, *args, per_rank: Optional[Sequence[tuple]] = None, **kwargs) -> List[Any]:
        """Starts `worker.method` on every rank; `per_rank[r]` gives rank r its own positional args."""
        threads = self._call_threads or [None] * self.world_size
        return [
            a.call.remote(method, per_rank[r] if per_rank is not None else args, kwargs, threads[r])
            for r, a in enumerate(self.actors)
        ]

    def call(self, method: str, *args, per_rank: Optional[Sequence[tuple]] = None, **kwargs) -> List[Any]:
        return self._get(self.call_async(method, *args, per_rank=per_rank, **kwargs))

    def get(self, refs: List[Any]) -> List[Any]:
        return self._get(refs)

    def scatter(self, method: str, items: Sequence[Any], **kwargs) -> tuple:
        """Starts `worker.method(share, **kwargs)` on every rank, rank r getting the r-th contiguous
        share of `items`; returns what `gather` needs. Shares are equally long (short ones padded
        with items[0]) so that under ZeRO-3 every rank runs the same number of forwards."""
        parts, counts = split_even(items, self.world_size)
        return self.call_async(method, per_rank=[(p,) for p in parts], **kwargs), counts

    def gather(self, scattered: tuple) -> List[Any]:
        """A `scatter`'s results, one per item in the items' order (a rank returns one per row of
        its share); the padding's results are dropped."""
        refs, counts = scattered
        return [x for part, n in zip(self._get(refs), counts) for x in part[:n]]

    def _get(self, refs: List[Any], timeout: Optional[float] = None) -> List[Any]:
        """Results in rank order; a failure of any rank raises (within FAILURE_GRACE_S)."""
        pending = list(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            # Waits in slices: ray.wait blocks in C and Ctrl-C is handled only when it returns.
            wait = _POLL_S if deadline is None else max(0.0, min(_POLL_S, deadline - time.monotonic()))
            ready, pending = ray.wait(pending, num_returns=1, timeout=wait)
            if not ready:
                if deadline is None or time.monotonic() < deadline:
                    continue
                self.kill()
                raise GroupError(self.name, -1, f"no answer within {timeout} s")
            err = _error_of(ready[0])
            if err is not None:
                failures = [(refs.index(ready[0]), err)]
                if _failure_kind(err) > 0:
                    failures += _more_failures(refs, pending, FAILURE_GRACE_S)
                # The root cause, not its echo: a rank that dies makes its peers' collectives
                # fail with "Connection reset by peer" at about the same moment.
                rank, err = min(failures, key=lambda f: _failure_kind(f[1]))
                cause, details = _describe_failure(err)
                self.kill()
                raise GroupError(self.name, rank, cause, details, _user_error(err)) from None
        return ray.get(list(refs))

    # -- shutting down ------------------------------------------------------------------------

    def shutdown(self, timeout: float = 30.0) -> None:
        """Tears the process group down on every rank, then ends the actors."""
        if not self.actors:
            return
        if errors.INTERRUPTED:  # Ctrl-C: a polite teardown would wait behind the running step
            self.kill()
            return
        try:
            ray.get([a.teardown.remote() for a in self.actors], timeout=timeout)
        except Exception as err:  # noqa: BLE001 - shutting down anyway
            log.warning("group %s: teardown failed (%s); killing its actors", self.name, err)
        self.kill()

    def kill(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.actors = []
        if self._own_pg:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass


_POLL_S = 0.5  # how often a wait for actors lets the driver handle Ctrl-C
# After a rank fails, how long to wait for the other ranks' failures before choosing the cause.
FAILURE_GRACE_S = 2.0
_COMMUNICATION_ERRORS = ("gloo", "nccl", "connection reset", "connection closed", "broken pipe", "timed out")


def _error_of(ref) -> Optional[Exception]:
    try:
        ray.get(ref)
    except Exception as err:  # noqa: BLE001 - any actor failure is reported the same way
        return err
    return None


def _failure_kind(err: Exception) -> int:
    """0: the actor died; 1: the worker raised; 2: a collective failed because a peer did."""
    if isinstance(err, RayActorError):
        return 0
    cause = _describe_failure(err)[0].lower()
    return 2 if any(marker in cause for marker in _COMMUNICATION_ERRORS) else 1


def _more_failures(refs: List[Any], pending: List[Any], grace: float) -> List[tuple]:
    """(rank, error) of the ranks among `pending` that fail within `grace` seconds."""
    found, deadline = [], time.monotonic() + grace
    while pending and time.monotonic() < deadline:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        for ref in ready:
            err = _error_of(ref)
            if err is not None:
                found.append((refs.index(ref), err))
    return found


def _user_error(err: Exception):
    """The UserError an actor raised (Ray hands it back as RayTaskError.cause), or None."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, errors.UserError) else None


def _describe_failure(err: Exception) -> tuple:
    """A one-line cause and the remote traceback of an actor failure."""
    if isinstance(err, RayTaskError):
        cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else None
        if cause is not None:
            return f"{type(cause).__name__}: {cause}", str(err)
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        return lines[-1] if lines else repr(err), str(err)
    if isinstance(err, (ActorDiedError, RayActorError)):
        return f"actor died ({str(err).strip().splitlines()[0]})", str(err)
    return f"{type(err).__name__}: {err}", "".join(traceback.format_exception(err))


def create_placement_group(num_bundles: int, cfg: RayConfig, gpus: float = 0.0) -> PlacementGroup:
    """A placement group that several groups share (colocation): pass it as `pg=`."""
    bundle = {"CPU": cfg.cpus_per_actor, **({"GPU": gpus} if gpus else {})}
    pg = placement_group([bundle] * num_bundles, strategy=cfg.placement_strategy)
    pg.wait(timeout_seconds=120)
    return pg


def remove_shared_placement_group(pg: PlacementGroup) -> None:
    """Frees a placement group from `create_placement_group` once its groups are shut down."""
    try:
        remove_placement_group(pg)
    except Exception:  # noqa: BLE001 - already removed
        pass


def split_even(items: Sequence[Any], n: int) -> tuple:
    """n contiguous chunks of equal length (short ones padded with items[0]) and each chunk's
    count of real items: how `ActorGroup.scatter` splits rows across a group's ranks."""
    size = math.ceil(len(items) / n)
    parts = [list(items[r * size:(r + 1) * size]) for r in range(n)]
    return [p + [items[0]] * (size - len(p)) for p in parts], [len(p) for p in parts]


def _node_cpus() -> Dict[str, float]:
    return {n["NodeID"]: n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")}


@contextmanager
def running_alone(groups: Sequence["ActorGroup"]):
    """While the block runs, the calls on `groups` are the only work of a stage: each CPU rank
    uses its node's cores divided among the ranks of `groups` on that node (never fewer threads
    than its own share). PPO's policy generates on 1 of 2 cores otherwise, while the reference,
    reward and value actors wait. Groups with `ray.elastic_threads` off, or on GPUs, keep theirs."""
    elastic = [g for g in groups if g.elastic and g.node_ids]
    if not elastic:
        yield
        return
    cpus = _node_cpus()
    busy: Dict[str, int] = {}
    for g in elastic:
        for node in g.node_ids:
            busy[node] = busy.get(node, 0) + 1
    for g in elastic:
        g._call_threads = [max(g.threads, int(cpus.get(node, 0) // busy[node])) for node in g.node_ids]
    try:
        yield
    finally:
        for g in elastic:
            g._call_threads = None
