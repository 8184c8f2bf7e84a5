"""The processes of a run: the process group, signals, and how a process ends.

    rank, local_rank, world_size, device = setup_distributed(cfg.train.dist_timeout_s)
    stop = GracefulStop(); stop.install()      # SIGTERM / Ctrl-C: finish the step, save, exit EXIT_INTERRUPTED
    ...
    end_distributed(world_size)

Work split over ranks (evaluation): each rank takes its share of `balanced_shares(sizes, world_size)`, a phase
ends with `first_error` on every rank (an error anywhere ends it everywhere), and `gather_to_first` brings every
rank's result to rank 0.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (global over all nodes; LOCAL_RANK picks the GPU of a node); without
them the run is one process. NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import ctypes
import datetime
import os
import shlex
import signal
import sys
import threading
import time
from typing import Any, NoReturn, Optional, Sequence

import torch
import torch.distributed as dist

# Exit statuses of train.py beyond 0 (done) and 1 (a bad config, data or checkpoint refused at start-up).
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: a signal stopped the run after a checkpoint; re-running the command continues it
EXIT_DATA_ERROR = 65  # EX_DATAERR: a frame could not be read mid-run; the last complete step was saved


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest `value` over all ranks: what every rank can do (the value itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor(value, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor)


def all_reduce(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class GracefulStop:
    """SIGTERM / SIGINT: finish the current optimizer step, save, exit with EXIT_INTERRUPTED.

    The handler only sets a flag; the loop all-reduces it with the per-step finite check (no extra sync), so
    every rank stops after the same step. A repeat within `same_request_s` is the same request: torchrun
    forwards the signal it gets to its workers, so a Ctrl-C in a terminal reaches each rank twice at once.
    A later second signal aborts at once, without a checkpoint.
    """

    def __init__(self, same_request_s: float = 2.0):
        self.signum: Optional[int] = None
        self.first_at = 0.0
        self.same_request_s = same_request_s
        self.previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; a caller in another thread keeps its own
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self.first_at = signum, now
            # os.write, not print: a handler may interrupt a print of the main thread.
            os.write(2, f"\n{name}: finishing this optimizer step, then saving a checkpoint "
                        f"(send it again to abort without one)\n".encode())
        elif now - self.first_at > self.same_request_s:
            os.write(2, f"\n{name} again: aborting without a checkpoint\n".encode())
            os._exit(128 + signum)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: Ctrl-C reaches the whole process group, workers included; the main process
    decides when to stop, and its workers keep serving the step in flight until then."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def die_with_launcher() -> None:
    """Ask Linux to send this process SIGTERM when its parent (the torchrun launcher) dies: a worker whose
    launcher was killed then saves and exits instead of running or waiting on without it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux; the process-group timeout still ends a rank whose peers died
    if os.getppid() == 1:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def setup_distributed(timeout_s: int, cpu_offload: bool = False) -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device). torchrun sets RANK/WORLD_SIZE; NCCL on GPU, gloo on CPU.

    A collective that waits longer than `timeout_s` (train.dist_timeout_s) fails and ends the rank: a rank
    whose peers died must not wait for them for hours. With `cpu_offload` (train.fsdp_cpu_offload) the sharded
    gradients live in CPU memory and their norm, the GradScaler's inf check and the checkpoint gather CPU
    tensors, which NCCL cannot carry: a gloo backend serves CPU tensors beside NCCL."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 0, 1, device
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    die_with_launcher()
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("cuda:nccl,cpu:gloo" if cpu_offload else "nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return rank, local_rank, world_size, device


def balanced_shares(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """The indices of `sizes` each rank takes: the largest item first, each to the rank with the smallest total
    so far (ties: the lower index first, the lowest rank). Each share is in ascending index order; a rank may get
    none when there are fewer items than ranks. The result depends only on `sizes` and `world_size`."""
    totals = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (totals[r], r))
        shares[rank].append(index)
        totals[rank] += sizes[index]
    return [sorted(share) for share in shares]


def first_error(error: Optional[str], world_size: int) -> Optional[str]:
    """End a phase on every rank together: each rank passes its error message (None where the phase went well)
    and gets the same answer, None when no rank failed, else the lowest failing rank's message (prefixed with
    its rank unless every rank failed alike). A rank that failed alone thus stops all of them here, instead of
    leaving the others waiting in a later collective until the timeout."""
    if world_size == 1:
        return error
    errors: list[Optional[str]] = [None] * world_size
    dist.all_gather_object(errors, error)
    failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
    if not failed:
        return None
    rank, message = failed[0]
    return message if len(failed) == world_size and len(set(errors)) == 1 else f"rank {rank}: {message}"


def gather_to_first(value: Any, world_size: int) -> Optional[list]:
    """Every rank's picklable `value`, in rank order, on rank 0; None on the other ranks. (Under NCCL the
    objects travel through the current CUDA device, which setup_distributed sets.)"""
    if world_size == 1:
        return [value]
    gathered = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def end_distributed(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a torchrun worker without interpreter finalization, after flushing its output.

    gloo's worker threads let go of a finished collective's tensors only after waking the caller. If the
    interpreter is already finalizing when such a thread drops the last reference to a tensor that Python
    created, the thread needs the GIL, is ended inside a C++ destructor, and the process aborts ("terminate
    called without an active exception", SIGABRT) although everything succeeded. Skipping finalization leaves
    no such window; the run's files are closed by then.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resume_command() -> str:
    """The command line that re-runs (and so resumes) this run; under torchrun, the launcher's own flags and
    environment (run_2gpu.sh's, say) are not visible here and must be given again as before."""
    args = " ".join(shlex.quote(a) for a in sys.argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        return (f"torchrun [your launcher flags] --nproc_per_node={int(os.environ.get('LOCAL_WORLD_SIZE', world_size))} "
                f"{args} (or the script that launched it)")
    return f"python {args}"
