"""``actsparse sweep FILE --workers N``: one sweep process per device, all on one store.

Each worker is an ordinary ``actsparse sweep`` process on the same file and store, started
with ``CUDA_VISIBLE_DEVICES`` set to its own GPU (on a machine without CUDA: ``N`` CPU
processes, the cores split between them). The workers share nothing but the store: each run
is claimed under the store's lock before it starts (``Store.claim``), so every run is done
and stored exactly once, whichever worker gets it; a worker that dies leaves its claim stale,
and the next claim takes the run over.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import torch

from actsparse.errors import ActsparseError


def worker_devices(workers: int) -> list[str | None]:
    """What each worker sees as ``CUDA_VISIBLE_DEVICES``: one GPU each (from the visible ones), or
    ``None`` for CPU workers when there is no CUDA device."""
    if workers < 1:
        raise ActsparseError(f"--workers must be >= 1, got {workers}")
    if not torch.cuda.is_available():
        return [None] * workers
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = (
        [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(torch.cuda.device_count())]
    )
    if workers > len(devices):
        raise ActsparseError(
            f"--workers {workers} asks for one GPU per worker, but {len(devices)} are visible; use --workers {len(devices)} or fewer"
        )
    return devices[:workers]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix} {line}")
        out.flush()
    stream.close()


def run_workers(file: str, store: str, workers: int, args: list[str] = (), out=None) -> list[int]:
    """Run ``workers`` sweep processes of ``file`` on ``store`` (``args``: more ``actsparse sweep``
    options for each, e.g. ``--tasks none``); their output is interleaved line by line, each line
    prefixed with ``[wI]``. Returns their exit codes once all have finished."""
    out = out or sys.stdout
    devices = worker_devices(workers)
    threads = max(1, (os.cpu_count() or 1) // workers)
    processes, pumps = [], []
    for index, device in enumerate(devices):
        env = dict(os.environ)
        if device is None:
            env.setdefault("OMP_NUM_THREADS", str(threads))  # CPU workers split the cores
        else:
            env["CUDA_VISIBLE_DEVICES"] = device
        command = [sys.executable, "-m", "actsparse.cli.main", "sweep", str(file), "--out", str(store), "--no-progress", *args]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        where = f"GPU {device}" if device is not None else f"CPU, {env['OMP_NUM_THREADS']} threads"
        out.write(f"[w{index}] started (pid {process.pid}, {where})\n")
        pump = threading.Thread(target=_pump, args=(process.stdout, f"[w{index}]", out), daemon=True)
        pump.start()
        processes.append(process)
        pumps.append(pump)
    try:
        codes = [process.wait() for process in processes]
    except BaseException:
        for process in processes:  # interrupted: stop the workers this call started
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait()
        raise
    for pump in pumps:
        pump.join()
    return codes
