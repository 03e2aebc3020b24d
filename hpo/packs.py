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
LOST_MEMBER_S = 600.0  # a member that reported and never asked for more (its process died) is dropped after this
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
    """How many pack workers a group of packable configurations may use at once: as many trials as
    the cluster's CPUs (and GPUs) hold, or search.max_concurrent_trials / K when that is set."""
    resources, search = spec.resources, spec.search
    if search.max_concurrent_trials:
        return max(1, math.ceil(search.max_concurrent_trials / resources.pack))
    fits = [cluster.get("CPU", 1.0) / resources.cpus_per_trial]
    if resources.gpus_per_trial:
        fits.append(cluster.get("GPU", 0.0) / resources.gpus_per_trial)
    return max(1, int(min(fits)))


class PackWorker:
    """A Ray actor (threaded: members wait in `next` while the training thread runs the pack)."""

    def __init__(self, pack_size: int):
        self.pack_size = pack_size
        self.lock = threading.Lock()
        self.members: set[str] = set()
        self.events: dict[str, queue.Queue] = {}
        self.asked: dict[str, float] = {}  # member -> when it last reported without asking for more
        self.commands: queue.Queue = queue.Queue()
        self.closed = False
        self.pack: Any = None
        self.placement = placement()  # where the training runs: this process, not the member trial's
        threading.Thread(target=self._run, name="pack", daemon=True).start()

    # --- what member trials call --------------------------------------------------------------

    def join(self, member_id: str, config: Any, baseline: Any, checkpoint: dict[str, bytes] | None) -> bool:
        """Take the member if there is room (False: try another pack)."""
        with self.lock:
            if self.closed or (member_id not in self.members and len(self.members) >= self.pack_size):
                return False
            self.members.add(member_id)
            self.events[member_id] = queue.Queue()
        self.commands.put(("add", member_id, config, baseline, checkpoint))
        return True

    def next(self, member_id: str) -> tuple:
        """The member's next event: ("epoch", metrics, checkpoint files) or ("end", TrialResult, traceback).
        Asking also says that Tune took the member's last epoch: it trains on."""
        self.commands.put(("proceed", member_id))
        with self.lock:
            events = self.events.get(member_id)
        if events is None:
            return ("end", TrialResult(TrialStatus.ERROR, 0, {}, "the pack lost this trial; it is retried"), None)
        return events.get()

    def size(self) -> int:
        with self.lock:
            return self.pack_size + 1 if self.closed else len(self.members)

    def leave(self, member_id: str) -> None:
        with self.lock:
            self.members.discard(member_id)
        self.commands.put(("remove", member_id))

    # --- the training thread ------------------------------------------------------------------

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            training = self.pack is not None and bool(self.pack.training)
            try:
                command = self.commands.get_nowait() if training else self.commands.get(timeout=1.0)
            except queue.Empty:
                command = None
            if command is not None:
                self._apply(command)
                continue
            if training:
                try:
                    self.pack.step()
                except Exception as exc:  # not one member's failure: every member of the pack ends with it
                    self._fail_all(exc)
                idle_since = time.monotonic()
                continue
            self._drop_lost()
            with self.lock:
                if self.members:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > IDLE_EXIT_S:
                    self.closed = True
            if self.closed:
                import ray

                self.pack = None
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return

    def _apply(self, command: tuple) -> None:
        kind, member_id, *rest = command
        if kind == "proceed":
            self.asked.pop(member_id, None)
            if self.pack is not None:
                self.pack.proceed(member_id)
        elif kind == "remove":
            self.asked.pop(member_id, None)
            if self.pack is not None:
                self.pack.remove(member_id)
            with self.lock:
                self.events.pop(member_id, None)
        elif kind == "add":
            self._add(member_id, *rest)

    def _add(self, member_id: str, config: Any, baseline: Any, checkpoint: dict[str, bytes] | None) -> None:
        from hpo.trial import _answers

        with self.lock:
            if member_id not in self.members:  # it left before it was added
                return
        folder = None
        try:
            if self.pack is None:
                from trainers.packed import Pack

                self.pack = Pack(config, self.pack_size)
            if self.pack.members.get(member_id) is not None:  # a retried trial replaces its earlier self
                self.pack.remove(member_id)
            if checkpoint is not None:
                folder = Path(tempfile.mkdtemp(prefix="pack-resume-"))
                write_files(folder, checkpoint)
            self.pack.add(
                member_id, config, _answers(baseline),
                lambda metrics, save: self._epoch(member_id, metrics, save),
                lambda result: self._end(member_id, result, None),
                folder,
            )  # fmt: skip
        except Exception as exc:
            self._end(member_id, TrialResult(TrialStatus.ERROR, 0, {}, last_line(f"{type(exc).__name__}: {exc}")), traceback.format_exc())
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def _epoch(self, member_id: str, metrics: Any, save: Callable[[Path], None]) -> None:
        with tempfile.TemporaryDirectory(prefix="pack-epoch-") as folder:
            save(Path(folder))
            files = read_files(Path(folder))
        self.asked[member_id] = time.monotonic()
        self._send(member_id, ("epoch", {**metrics, **self.placement}, files))

    def _end(self, member_id: str, result: TrialResult, trace: str | None) -> None:
        self._send(member_id, ("end", result, trace))
        with self.lock:
            self.members.discard(member_id)

    def _send(self, member_id: str, event: tuple) -> None:
        with self.lock:
            events = self.events.get(member_id)
        if events is not None:
            events.put(event)

    def _fail_all(self, exc: Exception) -> None:
        error, trace = last_line(f"{type(exc).__name__}: {exc}"), traceback.format_exc()
        for member_id in list(self.pack.members):
            self.pack.remove(member_id)
            self._end(member_id, TrialResult(TrialStatus.ERROR, 0, {}, error), trace)
        self.pack = None  # the next member loads a fresh one

    def _drop_lost(self) -> None:
        now = time.monotonic()
        for member_id, since in list(self.asked.items()):
            if now - since > LOST_MEMBER_S:
                self.leave(member_id)


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
    trial's, which reports to Tune), and return how the training ended, with a traceback if it failed."""
    import ray
    from ray import tune

    from trainers.methods import pack_key

    member_id = tune.get_context().get_trial_id()
    checkpoint = read_files(resume_from) if resume_from is not None else None
    pack = _join(pack_key(config), spec, member_id, config, baseline, checkpoint)
    try:
        while True:
            try:
                event = ray.get(pack.next.remote(member_id))
            except ray.exceptions.RayActorError as exc:
                raise PackLost(f"the pack worker of trial {member_id} died: {last_line(str(exc))}") from None
            if event[0] == "end":
                return event[1], event[2]
            _, metrics, files = event
            report(metrics, lambda folder, files=files: write_files(Path(folder), files))
    finally:
        try:
            pack.leave.remote(member_id)
        except Exception:
            pass  # the pack is gone


REGISTRY = "peftsweep-packs"  # the driver's PackRegistry, by name in the sweep's Ray job
_registry: Any = None  # the driver's handle: the registry, and the packs it owns, live as long as the driver


class PackRegistry:
    """A Ray actor of the driver's that starts and owns the pack workers, so that a pack outlives the
    member that asked for it first, and none outlives the sweep's driver."""

    def __init__(self) -> None:
        self.packs: dict[str, list] = {}

    def packs_for(self, key: str) -> list:
        return list(self.packs.get(key, []))

    def grow(self, key: str, count: int, pack_size: int, options: dict[str, Any]) -> None:
        """One more pack of this kind, unless it has `count` already."""
        import ray

        packs = self.packs.setdefault(key, [])
        if len(packs) < count:
            packs.append(ray.remote(PackWorker).options(**options).remote(pack_size))

    def drop(self, key: str, dead: str) -> None:
        """Forget a pack that ended (idle, or killed)."""
        self.packs[key] = [p for p in self.packs.get(key, []) if p._actor_id.hex() != dead]


def start_registry() -> None:
    """The driver starts the registry before the first trial (hpo.driver.make_tuner), once per Ray runtime."""
    import ray

    global _registry
    _registry = ray.remote(PackRegistry).options(name=REGISTRY, num_cpus=0, get_if_exists=True).remote()


def _join(key: str, spec: Any, member_id: str, config: Any, baseline: Any, checkpoint: dict[str, bytes] | None) -> Any:
    """Join the pack of this kind with the fewest members (up to K), starting a new one first while
    fewer than packs_per_key run: a sweep's members spread over as many packs as its resources run
    at once (8 configurations at K = 8 on 2 trial slots: two packs of 4), and packs fill up to K."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    registry = ray.get_actor(REGISTRY)
    options = {
        "num_cpus": spec.resources.cpus_per_trial,
        "num_gpus": spec.resources.gpus_per_trial,
        "max_concurrency": 2 * spec.resources.pack + 4,
        "max_restarts": 0,
        # outside any trial's placement group (Tune's, of MEMBER_RESOURCES for a member)
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None),
    }
    count, size = packs_per_key(spec, ray.cluster_resources()), spec.resources.pack
    while True:
        packs = ray.get(registry.packs_for.remote(key))
        sizes = {pack.size.remote(): pack for pack in packs}
        answered, _ = ray.wait(list(sizes), num_returns=len(sizes), timeout=5.0)  # a pack waiting for resources does not answer
        ranked = []
        for ref in answered:
            try:
                ranked.append((ray.get(ref), len(ranked), sizes[ref]))
            except ray.exceptions.RayActorError:  # it ended (idle, or killed)
                ray.get(registry.drop.remote(key, sizes[ref]._actor_id.hex()))
        ranked.sort(key=lambda item: item[:2])
        if len(packs) < count and len(answered) == len(packs) and not (ranked and ranked[0][0] == 0):
            ray.get(registry.grow.remote(key, count, size, options))  # no empty pack, and room for another
            continue
        for members, _, pack in ranked:
            if members >= size:
                break
            try:
                if ray.get(pack.join.remote(member_id, config, baseline, checkpoint)):
                    return pack
            except ray.exceptions.RayActorError:
                ray.get(registry.drop.remote(key, pack._actor_id.hex()))
        time.sleep(JOIN_RETRY_S)
