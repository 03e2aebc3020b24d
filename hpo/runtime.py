"""The driver's process: Ray started or attached, signals turned into a graceful stop, a watchdog
for a driver killed outright, and the versions recorded with every sweep."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hpo.errors import SweepError

ADDRESS_TIMEOUT_S = 10  # seconds a Ray head node gets to accept a connection

VERSIONED_PACKAGES = ("peftsweep", "torch", "transformers", "peft", "ray", "optuna", "pydantic")


def check_address(address: str | None) -> None:
    """Refuse Ray Client (ray://), where Tune runs on the head node away from this driver's store,
    and an address that does not answer (Ray itself would wait minutes for it)."""
    if not address:
        return
    if address.startswith("ray://"):
        raise SweepError(
            f"--address {address}: Ray Client addresses are not supported (Ray Tune would run on the head node, "
            "where this machine's results store cannot be written); run peftsweep on the head node with "
            "--address auto, see docs/CLUSTER.md"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # 'auto', 'local': Ray finds the cluster itself, and says so quickly when there is none
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as exc:
        raise SweepError(
            f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); check the head node's "
            "address and port (ray start --head prints it) or RAY_ADDRESS"
        ) from None


_stopping: list[threading.Thread] = []  # local Ray runtimes shutting down (stop_ray_later)


def stop_ray_later() -> None:
    """Shut the local Ray runtime down in a thread of its own (a fraction of a second of stopping
    processes), so that the caller goes on meanwhile: the CLI writes the report. The process waits for
    it before it exits (a non-daemon thread), and so does the next init_ray."""
    thread = threading.Thread(target=_stop_ray, name="peftsweep-ray-shutdown")
    thread.start()
    _stopping.append(thread)


def _stop_ray() -> None:
    """ray.shutdown, less a second: the autoscaler's monitor is killed first, as Ray kills it anyway.

    ray.shutdown stops the GCS before the monitor, and the monitor answers SIGTERM by reporting its
    "failure" to that GCS, which no longer answers; after a second ray.shutdown sends SIGKILL. A local
    Ray has nothing to autoscale. (A private API of ray's head node, tested with the installed ray.)
    """
    import ray

    try:
        node = ray._private.worker._global_node
        if node is not None and node.head:
            node.kill_monitor(check_alive=False)
    finally:
        ray.shutdown()


def ray_stopped() -> None:
    """Wait until every stop_ray_later has finished."""
    while _stopping:
        _stopping.pop().join()


def init_ray(address: str | None) -> None:
    import ray

    ray_stopped()  # a previous sweep's runtime, in this process, is gone first

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ray says at every local start that it enabled token authentication, its default: not news to our users.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A local Ray starts one worker process per CPU as the driver connects, for tasks. A sweep's
    # trials are actors, which Ray Tune starts with a runtime environment of their own, so they never
    # take those: they sat idle, 0.3-0.5 CPU-seconds each.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # A reused worker waits this long for a stopped trial's thread to end before its next trial
    # (Ray Tune's default, 2 s, errors that next trial when a loaded machine is slower). Workers of
    # a local Ray inherit it; on a cluster, set it on the nodes.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    # Tune's default result loggers (JSON, CSV, TensorBoard) duplicate the store, and tensorboardX
    # prints "NaN or Inf found in input tensor." for a failed trial's worst values.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune logs a trial's lost process or error with Ray's whole traceback; the progress lines say it
    # in one (hpo.progress), the store keeps the error, and Tune its error file in the trial's folder.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    try:
        with _local_start() if not address else contextlib.nullcontext():
            ray.init(
                address=address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
                configure_logging=True,
            )
    except ConnectionError as exc:
        raise SweepError(f"Ray cluster at {address} does not answer ({exc}); check --address / RAY_ADDRESS") from None
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    logging.getLogger("ray.tune.execution.experiment_state").addFilter(_state_copy_in_one_line)


@contextlib.contextmanager
def _local_start() -> Any:
    """A local ray.init without its log monitor, and without waiting a second for its raylet.

    The log monitor forwards the workers' output to the driver, which a sweep declines
    (log_to_driver=False); started beside the raylet, it often delayed ray.init by a second. And
    ray.init asks the GCS for its new node through a call that waits in steps of a second until the
    raylet has registered; the raylet is looked for here every RAYLET_POLL_S first. Private APIs of
    ray's head node, tested with the installed ray; measured in docs/BENCHMARKS.md, section 1.
    """
    from ray._private import services
    from ray._private.node import Node

    start, get_node = Node.start_log_monitor, services.get_node

    def get_node_once_registered(gcs_address: str, node_id: str) -> dict:
        _wait_for_raylet(gcs_address, node_id)
        return get_node(gcs_address, node_id)

    Node.start_log_monitor, services.get_node = (lambda self: None), get_node_once_registered
    try:
        yield
    finally:
        Node.start_log_monitor, services.get_node = start, get_node


RAYLET_POLL_S = 0.02
RAYLET_WAIT_S = 5  # then Ray's own call waits as before (up to 30 s), and says what went wrong


def _wait_for_raylet(gcs_address: str, node_id: str) -> None:
    """Return once the GCS lists node `node_id` as alive, or after RAYLET_WAIT_S; a question the GCS
    cannot answer ends the wait early (Ray's own call then waits, or fails, as it would have)."""
    from ray._raylet import GcsClient, NodeID
    from ray.core.generated.gcs_pb2 import GcsNodeInfo
    from ray.core.generated.gcs_service_pb2 import GetAllNodeInfoRequest

    try:
        client = GcsClient(address=gcs_address)
        selector = GetAllNodeInfoRequest.NodeSelector(node_id=NodeID.from_hex(node_id).binary())
        deadline = time.monotonic() + RAYLET_WAIT_S
        while time.monotonic() < deadline:
            if client.get_all_node_info(timeout=5, node_selectors=[selector], state_filter=GcsNodeInfo.GcsNodeState.ALIVE):
                return
            time.sleep(RAYLET_POLL_S)
    except Exception:
        return


def _state_copy_in_one_line(record: logging.LogRecord) -> bool:
    """Ray Tune logs a failed copy of its experiment state to `storage` with a traceback. It is not
    fatal: Tune tries again at its next save, if any (the copy can race a file Tune is replacing at
    that moment: "Failed to open local file ...-tmp-basic-variant-state-..."). One line, then."""
    if record.exc_info and record.getMessage().startswith("Saving experiment state"):
        from trainers.data import first_line

        exc = record.exc_info[1]
        record.msg = f"{record.getMessage()}{type(exc).__name__}: {first_line(exc)} (not fatal: Ray Tune tries again at its next save, if any)"
        record.args, record.exc_info, record.exc_text = None, None, None
    return True


def skip_callback_census() -> None:
    """Ray Tune counts a run's callbacks by class for its usage statistics (ray.air._internal.usage.
    tag_callbacks), importing its MLflow, W&B, Comet and Aim integrations to compare against, and
    with them mlflow and wandb wherever they are installed: about 2 s before a sweep's first trial
    here, for a tag. The count is skipped; peftsweep's trackers import their package when a sweep
    asks for it (tests/test_sweep_e2e.py checks that the smoke sweep's driver, which tracks to W&B
    where it is installed, imports no mlflow)."""
    from ray.air._internal import usage

    usage.tag_callbacks = lambda callbacks: False


def resources() -> str:
    import ray

    res = ray.cluster_resources()
    return f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"


class Signals:
    """SIGINT and SIGTERM stop a sweep so that it can be resumed: while Ray Tune runs the trials, they
    ask Tune for its own graceful stop (it saves the experiment state, then returns), and the sweep
    is recorded `interrupted`; before and after, they interrupt at once. A second signal stops at once.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._tuning = False

    def __enter__(self) -> "Signals":
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune's would hide a Ctrl-C from us (the sweep looked completed)
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        self.install()
        return self

    def install(self) -> None:
        for signum in self._previous:
            signal.signal(signum, self._handle)

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @contextlib.contextmanager
    def tuning(self):
        self._tuning = True
        try:
            yield
        finally:
            self._tuning = False

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.received is None
        self.received = self.received or signum
        # Tune stops gracefully on SIGUSR1 (its handler is installed once fit() has started).
        if first and self._tuning and signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        raise KeyboardInterrupt


def start_reaper() -> None:
    """A watchdog process that ends this driver's local Ray processes if the driver dies without
    shutting Ray down (kill -9): Ray's agents otherwise outlive it for minutes (hpo/reaper.py)."""
    subprocess.Popen(
        [sys.executable, "-m", "hpo.reaper", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives the driver, and a Ctrl-C at the terminal
        cwd=Path(__file__).resolve().parent.parent,  # finds hpo from any working directory
    )


def versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
