"""Where the tasks run: the Dask client of a run (an in-process cluster by default, a scheduler
given by address, or none with ``scheduler="sync"``), the device check, and closing it all."""

from __future__ import annotations

import os

from ..engine import limit_arenas


def _check_device(device: str | None, client=None) -> None:
    """A device this machine (or, with a client, every worker) cannot use fails here, as one line,
    before anything is written: `--device cuda` without CUDA was an AssertionError deep in torch."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {device}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if kind not in ("cpu", "cuda", "mps", "xpu"):  # `meta` passed and failed once the output existed
        raise ValueError(f"--device {device}: cannot compute real values (use cpu, cuda, cuda:1, mps)")
    if client is None:
        why = _device_problem(device)
    else:
        found = client.run(_device_problem, device)
        why = next((f"worker {w}: {v}" for w, v in found.items() if v), None)
    if why:
        raise ValueError(f"--device {device}: not usable here ({why})")


def _device_problem(device: str) -> str | None:
    """None when a tensor can be made on ``device`` in this process, else why not (one line)."""
    import torch

    try:
        torch.zeros(1, device=device)
    except Exception as exc:  # AssertionError without CUDA, RuntimeError for a missing index, ...
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


def _open_cluster(client, workers: int | None, scheduler: str | None):
    """(client, things to close). No flag: one in-process worker with a task thread per core.

    Threads, not processes: the network, the codecs and numpy release the GIL, so threads keep both
    cores busy, while a process cluster spawns interpreters that import torch again and receive the
    models by pickle before the first task. Measured on 2 cores (96x256x256 x2, ensemble 8, random
    default model, ``python benchmarks/whole_command.py``): see benchmarks/README.md."""
    if client is not None:
        return client, []
    if scheduler == "sync":
        return None, []
    from distributed import Client, LocalCluster

    if scheduler:
        c = Client(scheduler)
        return c, [c]
    n = workers or _usable_cores()
    limit_arenas(n)
    quiet = _QuietWorkerLog()
    # no dashboard; the scheduler's HTTP server (health routes) still starts, and without an address it
    # takes port 8787: with another Dask cluster or svision-big run on the machine it printed a 3-line
    # "Port 8787 is already in use" warning. A free port on the loopback interface instead.
    cluster = LocalCluster(
        n_workers=1,
        threads_per_worker=n,
        processes=False,
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )
    c = Client(cluster)
    return c, [c, cluster, _TorchThreads(), quiet]


class _QuietWorkerLog:
    """While the in-process cluster lives, two kinds of its worker's records are dropped, because the
    run reports the same event in one line: "Compute Failed" (8-10 lines: key, state, task,
    exception, traceback; the exception reaches the run) and, after Ctrl-C or SIGTERM, "Async
    instruction ... ended with CancelledError" (one per running task; the run says "interrupted").
    Other worker records still print; a remote cluster's workers log in their own processes."""

    LOGGERS = ("distributed.worker", "distributed.worker.state_machine")

    def __init__(self) -> None:
        import logging

        self.loggers = [logging.getLogger(n) for n in self.LOGGERS]
        for lg in self.loggers:
            lg.addFilter(self)

    @staticmethod
    def filter(record) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Compute Failed") or "ended with CancelledError" in msg)

    def close(self) -> None:
        for lg in self.loggers:
            lg.removeFilter(self)


def _usable_cores() -> int:
    """The cores this process may run on (a container's or a job's share, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _TorchThreads:
    """The caller's torch thread count, given back when the in-process cluster closes (its worker's
    tasks run one torch thread each)."""

    def __init__(self) -> None:
        import torch

        self.n = torch.get_num_threads()

    def close(self) -> None:
        import torch

        torch.set_num_threads(self.n)


def _default_device() -> str:
    """What workers pick without ``device`` (execute._device), as seen from the client."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _close(owned: list, held) -> None:
    """Close the clusters this run opened, then release the lock, also when Ctrl-C or SIGTERM lands
    during the shutdown (it left the lock in a complete output)."""
    try:
        for o in owned:
            try:
                o.close()
            except Exception:  # noqa: BLE001 - a cluster whose scheduler is gone cannot be closed cleanly
                pass
    finally:
        if held is not None:
            held.release()
