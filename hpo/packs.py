"""Packed trials on Ray (`resources.pack: K`): each configuration stays its own Ray Tune trial.

The searcher, ASHA, checkpoints, retries, the store and the live table see a packed configuration as
any other trial. Only its training runs elsewhere: in a pack worker, a Ray actor that holds the
trial resources (`cpus_per_trial`, `gpus_per_trial`) and the base model once, and trains up to K
member trials together (trainers.packed). A member trial holds almost no resources (MEMBER_RESOURCES);
it joins a pack, then asks it for each epoch's report, which it hands to Tune with its checkpoint;
asking for the next one says Tune took the last. When Tune stops a member (ASHA, a budget), the
member leaves and its rows leave the pack's batches; when a pack worker dies (kill -9, a lost
node), its members fail and Tune retries each from its own last checkpoint (`search.max_retries`).
"""

from __future__ import annotations

import math
import queue
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from hpo.errors import last_line
from trainers.vocabulary import TrialResult, TrialStatus

# What a member trial holds: its pack worker holds the trial resources. A bundle must ask for something;
# a byte of memory is a resource every node has, and takes nothing a pack needs (a CPU share would:
# K members at 0.01 CPU leave a 2-CPU pack on a 2-CPU machine unplaceable).
MEMBER_RESOURCES = {"memory": 1}
IDLE_EXIT_S = 10.0  # a pack worker with no member this long ends, freeing its resources for other packs
LIVENESS_S = 5.0  # how often a pack worker checks that its members' trial processes are alive
JOIN_RETRY_S = 0.2


def concurrent_trials(spec: Any, cluster: dict[str, float]) -> int | None:
    """Ray Tune's limit on trials at once: with packing, K members for each pack that can run."""
    if spec.resources.pack == 1:
        return spec.search.max_concurrent_trials
    return packs_per_key(spec, cluster) * spec.resources.pack


class PackLost(RuntimeError):
    """The member's pack worker died (kill -9, a lost node): the trial's process is as good as lost,
    and Ray Tune restarts it from its last checkpoint (search.max_retries), in a pack again."""


def packs_per_key(spec: Any, cluster: dict[str, float]) -> int:
    """How many pack workers may run at once (of every kind together): as many as the cluster's CPUs
    (and GPUs) hold at the trial resources, or search.max_concurrent_trials / K when that is set."""
    resources, search = spec.resources, spec.search
    if search.max_concurrent_trials:
        return max(1, math.ceil(search.max_concurrent_trials / resources.pack))
    fits = [cluster.get("CPU", 1.0) / resources.cpus_per_trial]
    if resources.gpus_per_trial:
        fits.append(cluster.get("GPU", 0.0) / resources.gpus_per_trial)
    return max(1, int(min(fits)))


class PackWorker:
    """A Ray actor (threaded: members wait in `next` while the training thread runs the pack).

    A member is known by the key `join` gives it (its trial id and a count): a trial that Tune
    restarts while this pack lives joins again under a new key, and its earlier self is let go.
    """

    def __init__(self, pack_size: int):
        self.pack_size = pack_size
        self.lock = threading.Lock()
        self.members: dict[str, str] = {}  # trial id -> its member key
        self.events: dict[str, queue.Queue] = {}  # member key -> what its trial is told next
        self.handles: dict[str, Any] = {}  # member key -> its trial's actor (to see that it is alive)
        self.pings: dict[str, Any] = {}  # member key -> an unanswered liveness check (training thread only)
        self.joined = 0
        self.commands: queue.Queue = queue.Queue()
        self.closed = False
        self.pack: Any = None
        self.placement = placement()  # where the training runs: this process, not the member trial's
        threading.Thread(target=self._run, name="pack", daemon=True).start()

    # --- what member trials call --------------------------------------------------------------

    def join(self, trial_id: str, trial: Any, config: Any, baseline: Any, checkpoint: dict[str, bytes] | None) -> str | None:
        """The member's key, if there is room (None: try another pack). `trial`: the trial's actor."""
        with self.lock:
            if self.closed or (trial_id not in self.members and len(self.members) >= self.pack_size):
                return None
            earlier = self.members.get(trial_id)
            self.joined += 1
            key = f"{trial_id}#{self.joined}"  # sorts by trial id: reports go out in trial order
            self.members[trial_id] = key
            self.events[key] = queue.Queue()
            self.handles[key] = trial
        if earlier is not None:
            self._let_go(earlier)
        self.commands.put(("add", key, config, baseline, checkpoint))
        return key

    def next(self, key: str, epoch: int) -> tuple:
        """The member's next event: ("epoch", metrics, checkpoint files), ("end", TrialResult, traceback)
        or ("lost",). `epoch`: the last epoch Tune took from it (0: none yet); it trains on from there."""
        self.commands.put(("proceed", key, epoch))
        with self.lock:
            events = self.events.get(key)
        return ("lost",) if events is None else events.get()

    def size(self) -> int:
        with self.lock:
            return self.pack_size + 1 if self.closed else len(self.members)

    def leave(self, key: str) -> None:
        self._let_go(key)

    # --- the training thread ------------------------------------------------------------------

    def _run(self) -> None:
        idle_since = checked = time.monotonic()
        while True:
            try:
                training = self.pack is not None and bool(self.pack.training)
                try:
                    command = self.commands.get_nowait() if training else self.commands.get(timeout=1.0)
                except queue.Empty:
                    command = None
                if command is not None:
                    self._apply(command)
                elif training:
                    self.pack.step()
                if time.monotonic() - checked > LIVENESS_S:
                    self._drop_dead()
                    checked = time.monotonic()
                with self.lock:
                    if self.members or self.events or not self.commands.empty():
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since > IDLE_EXIT_S:
                        self.closed = True
                if self.closed:
                    break
            except Exception as exc:  # not one member's failure: every member of the pack ends with it
                self._fail_all(exc)
        import ray

        self._release()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _apply(self, command: tuple) -> None:
        kind, key, *rest = command
        if kind == "proceed":
            if self.pack is not None:
                self.pack.proceed(key, rest[0])
        elif kind == "remove":
            if self.pack is not None:
                self.pack.remove(key)
        elif kind == "add":
            self._add(key, *rest)

    def _add(self, key: str, config: Any, baseline: Any, checkpoint: dict[str, bytes] | None) -> None:
        from hpo.trial import _answers

        with self.lock:
            if key not in self.events:  # it left before it was added
                return
        folder = None
        try:
            if self.pack is None:
                from trainers.methods import METHODS, without_bitsandbytes

                if not METHODS[config.train.method].quantized:  # this actor only ever hosts packs of this one key
                    without_bitsandbytes()
                from trainers.packed import Pack

                self.pack = Pack(config, self.pack_size)
            if checkpoint is not None:
                folder = Path(tempfile.mkdtemp(prefix="pack-resume-"))
                write_files(folder, checkpoint)
            self.pack.add(
                key, config, _answers(baseline),
                lambda metrics, save: self._epoch(key, metrics, save),
                lambda result: self._end(key, result, None),
                folder,
            )  # fmt: skip
        except Exception as exc:
            self._end(key, TrialResult(TrialStatus.ERROR, 0, {}, last_line(f"{type(exc).__name__}: {exc}")), traceback.format_exc())
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def _epoch(self, key: str, metrics: Any, save: Callable[[Path], None]) -> None:
        with tempfile.TemporaryDirectory(prefix="pack-epoch-") as folder:
            save(Path(folder))
            files = read_files(Path(folder))
        self._send(key, ("epoch", {**metrics, **self.placement}, files))

    def _end(self, key: str, result: TrialResult, trace: str | None) -> None:
        """The member's training ended; its key stays until its trial has read this and left."""
        self._send(key, ("end", result, trace))
        with self.lock:
            self._vacate(key)

    def _send(self, key: str, event: tuple) -> None:
        with self.lock:
            events = self.events.get(key)
        if events is not None:
            events.put(event)

    def _let_go(self, key: str) -> None:
        """Forget a member: its rows leave the pack, and a trial still waiting on it hears that it is lost."""
        with self.lock:
            self._vacate(key)
            events = self.events.pop(key, None)
            self.handles.pop(key, None)
        if events is not None:
            events.put(("lost",))
        self.commands.put(("remove", key))

    def _vacate(self, key: str) -> None:
        """Its trial's place in the pack is free (hold the lock)."""
        self.members = {trial_id: member for trial_id, member in self.members.items() if member != key}

    def _drop_dead(self) -> None:
        """Let go of members whose trial process died (a trial Tune stopped and did not reuse, a lost
        node): a check that does not wait, each LIVENESS_S."""
        import ray

        with self.lock:
            handles = dict(self.handles)
        for key in set(self.pings) - set(handles):
            del self.pings[key]
        for key, trial in handles.items():
            ping = self.pings.get(key)
            if ping is None:  # answered once the trial's actor is free
                ping = self.pings[key] = trial.__ray_ready__.remote()
            ready, _ = ray.wait([ping], timeout=0)
            if not ready:
                continue  # busy, waiting for this pack: alive
            del self.pings[key]
            try:
                ray.get(ping)
            except ray.exceptions.RayActorError:
                self._let_go(key)

    def _fail_all(self, exc: Exception) -> None:
        error, trace = last_line(f"{type(exc).__name__}: {exc}"), traceback.format_exc()
        with self.lock:
            keys = list(self.members.values())
        for key in keys:
            self._end(key, TrialResult(TrialStatus.ERROR, 0, {}, error), trace)
        self._release()

    def _release(self) -> None:
        """Drop the pack and what it held (the next member loads a fresh one)."""
        self.pack = None
        from trainers.worker import release_memory

        release_memory()


def placement() -> dict[str, Any]:
    """This process's node, GPUs and pid, as a trial's metrics name them."""
    import os

    import ray

    return {
        "node": ray.util.get_node_ip_address(),
        "node_id": ray.get_runtime_context().get_node_id(),  # tells nodes apart where several share one IP
        "devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "worker_pid": os.getpid(),
    }


def read_files(folder: Path) -> dict[str, bytes]:
    """A checkpoint folder's files, by path relative to it (adapters and states are small)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def train_in_pack(
    config: Any, spec: Any, baseline: Any, report: Callable[[Any, Callable[[Path], None]], None], resume_from: Path | None
) -> tuple[TrialResult, str | None]:
    """A member trial's side: join a pack of its kind, hand each epoch's report to `report` (the
    trial's, which reports to Tune), and return how the training ended, with a traceback if it failed.
    Raises PackLost when the pack worker died or let it go: Tune restarts the trial from its checkpoint."""
    import ray
    from ray import tune

    from trainers.methods import pack_key

    trial_id = tune.get_context().get_trial_id()
    checkpoint = read_files(resume_from) if resume_from is not None else None
    pack, key = _join(pack_key(config), spec, trial_id, config, baseline, checkpoint)
    taken = 0  # the last epoch Tune took
    try:
        while True:
            try:
                event = ray.get(pack.next.remote(key, taken))
            except ray.exceptions.RayActorError as exc:
                raise PackLost(f"the pack worker of trial {trial_id} died: {last_line(str(exc))}") from None
            if event[0] == "lost":
                raise PackLost(f"the pack worker let trial {trial_id} go (it saw the trial's process as lost)")
            if event[0] == "end":
                return event[1], event[2]
            _, metrics, files = event
            report(metrics, lambda folder, files=files: write_files(Path(folder), files))
            taken = metrics["epoch"]
    finally:
        try:
            pack.leave.remote(key)
        except Exception:
            pass  # the pack is gone


REGISTRY = "peftsweep-packs"  # the driver's PackRegistry, by name in the sweep's Ray job
_registry: Any = None  # the driver's handle: the registry, and the packs it owns, live as long as the driver


class PackRegistry:
    """A Ray actor of the driver's that starts and owns the pack workers, so that a pack outlives the
    member that asked for it first and none outlives the sweep's driver, and that places every member:
    one join at a time, so that members arriving together spread over the packs as decided."""

    def __init__(self) -> None:
        self.packs: dict[str, list] = {}

    def join(self, key: str, count: int, size: int, options: dict[str, Any], *member: Any) -> tuple[Any, str] | None:
        """Place a member (PackWorker.join's arguments) in the pack of its kind with the fewest members,
        starting a new pack first while none is empty and fewer than `count` packs (of every kind
        together) run: a sweep's members spread over as many packs as its resources run at once
        (8 configurations at K = 8 on 2 trial slots: two packs of 4), and packs fill up to K.
        None: no room now (every pack full, or a new one still waiting for resources)."""
        import ray

        packs = self.packs.setdefault(key, [])
        asked = {pack.size.remote(): pack for pack in packs}
        answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=2.0)  # a pack waiting for resources does not answer
        ranked = []
        for ref in answered:
            try:
                ranked.append((ray.get(ref), len(ranked), asked[ref]))
            except ray.exceptions.RayActorError:  # it ended (idle, or killed)
                packs.remove(asked[ref])
        ranked.sort(key=lambda item: item[:2])
        starting = len(asked) - len(answered)
        if not starting and not (ranked and ranked[0][0] == 0) and sum(map(len, self.packs.values())) < count:
            pack = ray.remote(PackWorker).options(**options).remote(size)
            packs.append(pack)
            started, _ = ray.wait([pack.size.remote()], timeout=60.0)
            if not started:
                return None  # it waits for resources; later members find it
            ranked.insert(0, (0, -1, pack))
        for members, _, pack in ranked:
            if members >= size:
                break
            try:
                placed = ray.get(pack.join.remote(*member))
            except ray.exceptions.RayActorError:
                packs.remove(pack)
                continue
            if placed is not None:
                return pack, placed
        return None


def start_registry() -> None:
    """The driver starts the registry before the first trial (hpo.driver.make_tuner), once per Ray runtime."""
    import ray

    global _registry
    _registry = ray.remote(PackRegistry).options(name=REGISTRY, num_cpus=0, get_if_exists=True).remote()


def _join(key: str, spec: Any, trial_id: str, config: Any, baseline: Any, checkpoint: dict[str, bytes] | None) -> tuple[Any, str]:
    """The pack this member trains in, and its key there (PackRegistry.join places it); waits while there is no room."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    registry = ray.get_actor(REGISTRY)
    options = {
        "num_cpus": spec.resources.cpus_per_trial,
        "num_gpus": spec.resources.gpus_per_trial,
        "max_concurrency": 2 * spec.resources.pack + 8,
        "max_restarts": 0,
        # outside any trial's placement group (Tune's, of MEMBER_RESOURCES for a member)
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None),
    }
    count = packs_per_key(spec, ray.cluster_resources())
    me = ray.get_runtime_context().current_actor
    while True:
        placed = ray.get(registry.join.remote(key, count, spec.resources.pack, options, trial_id, me, config, baseline, checkpoint))
        if placed is not None:
            return placed
        time.sleep(JOIN_RETRY_S)
