"""Process-level settings shared by training and restoration: device choice, the allocator, and
SIGTERM/SIGHUP ending a command as Ctrl-C does."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Iterator

from medvae.errors import MedvaeError

_DEVICE_CHOICES = "use auto, cpu, cuda or cuda:N"


def device_problem(name: Any) -> str | None:
    """What is wrong with a device name, in one line, or None when medvae can use it somewhere.

    Only the name is checked, not this machine's hardware, so a config written for a GPU machine
    can be checked anywhere (:func:`pick_device` checks the hardware).

    Examples
    --------
    >>> device_problem("cuda:1") is None
    True
    >>> device_problem("foo")
    "unknown device 'foo' (use auto, cpu, cuda or cuda:N)"
    """
    import torch

    if name in (None, "auto"):
        return None
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        return f"unknown device {name!r} ({_DEVICE_CHOICES})"
    if dev.type not in ("cpu", "cuda"):  # mps, xpu...: not tested with medvae's kernels
        return f"device {name!r} is not supported ({_DEVICE_CHOICES})"
    return None


#: the most torch CPU threads a run may ask for: 100000 segfaulted (restore) or ran out of memory (train)
MAX_THREADS = 1024


def env_int(name: str, default: int | None, *, hint: str) -> int:
    """An integer environment variable of a launcher (torchrun, Slurm), or ``default`` when unset;
    a value that is no integer is a one-line :class:`MedvaeError` ending with ``hint`` (what to do).

    >>> env_int("MEDVAE_NO_SUCH_VARIABLE", 3, hint="unset it")
    3
    """
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value or "")
    except ValueError:
        raise MedvaeError(f"environment variable {name}={value!r} is not an integer (set by torchrun or "
                          f"Slurm; {hint})") from None


def pick_device(name: Any = "auto", local_rank: int = 0):
    """``auto``/None → the local rank's CUDA device when present, else the CPU.

    Raises :class:`MedvaeError` for a name :func:`device_problem` refuses, or a CUDA device this
    machine does not have.
    """
    import torch

    if name in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    problem = device_problem(name)
    if problem:
        raise MedvaeError(problem)
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MedvaeError(f"device {name!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MedvaeError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


_allocator_tuned = False


def tune_allocator() -> None:
    """Keep glibc from handing big tensor buffers back to the OS at every step.

    The runtime equivalent of ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``: on this 2-core
    machine it made conv training up to 3.8x and inference 2.3x faster (field notes; our own
    figures are in docs/benchmarks.md). It changes the whole process's malloc settings, for good:
    freed memory stays in the process for reuse instead of going back to the OS. Idempotent: the
    CLI, training and :func:`medvae.restore.restore_volume` call it; only the first call acts.
    ``MEDVAE_TUNE_MALLOC=0`` in the environment keeps glibc's defaults (a long-lived process that
    must give memory back; a benchmark of the defaults).
    """
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    if not sys.platform.startswith("linux") or os.environ.get("MEDVAE_TUNE_MALLOC") == "0":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 2**30)
    except Exception:  # not glibc: only slower
        pass


PRECISIONS = ("auto", "fp32", "bf16")


def inference_dtype(precision: str, device: Any):
    """The autocast dtype of inference, or None for fp32.

    ``auto``: bf16 on a CPU with native bf16 instructions (AVX512-BF16 or AMX, as oneDNN reports them),
    where it halves the time of a restore (docs/benchmarks.md) and moves the restored values by far
    less than the noise (the image and the known pixels stay fp32); fp32 elsewhere, including CUDA.
    ``bf16`` forces it, ``fp32`` turns it off.

    >>> import torch
    >>> inference_dtype("fp32", torch.device("cpu")) is None
    True
    """
    import torch

    if precision not in PRECISIONS:
        raise MedvaeError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if getattr(device, "type", str(device)) != "cpu":
        return None
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else None


#: the signals that end a command: Ctrl-C, SIGTERM (Slurm pre-emption, ``kill``) and SIGHUP where there is one
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (Slurm pre-emption, ``kill``, torchrun's shutdown, a closed terminal), raised
    where the program is, as Ctrl-C's ``KeyboardInterrupt`` is, so that the same clean-up runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_terminated(signum: int, _frame) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM and SIGHUP raise :class:`Terminated` (main thread only, and only where
    they still have the default handler, which would end the process without any clean-up); the old
    handlers are back after it."""
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
                old[sig] = signal.signal(sig, _raise_terminated)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_recorded(*signums: int | None, second_acts: bool = False
                     ) -> Iterator[tuple[list[int], dict[int, Any]]]:
    """Inside the block the given signals (``None`` and ignored ones skipped) are only recorded; yields
    ``(caught, old)``: the signals that came, in order, and the handlers put back when the block ends.
    ``second_acts``: a second signal (after one was recorded) goes to the handler that was there before,
    for a block that may wait on a network: a hung server would otherwise hold every Ctrl-C.
    Main thread only (elsewhere nothing is recorded: ``old`` stays empty)."""
    caught: list[int] = []
    old: dict[int, Any] = {}

    def record(signum: int, frame) -> None:
        if second_acts and caught:
            for sig, handler in old.items():  # the block is over: what was there acts from now on
                signal.signal(sig, handler)
            before = old[signum]
            if callable(before):
                before(signum, frame)
            elif before == signal.SIG_DFL:
                signal.raise_signal(signum)
            return
        caught.append(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in signums:
            if sig is not None and signal.getsignal(sig) not in (signal.SIG_IGN, None):
                old[sig] = signal.signal(sig, record)
    try:
        yield caught, old
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class LateSignal(Terminated):
    """SIGINT, SIGTERM or SIGHUP that came after a command's outputs were complete (held back by
    :func:`hold_after_commit`): the outputs stay, and the command reports it done, not interrupted
    (it exited 130/143 with its outputs in place, and a rerun was refused as "already exists")."""


def hold_signals_to_exit() -> None:
    """For a process whose work is over (the ``medvae`` command once it has its exit status). Shutting
    down torch and MLflow takes seconds, where SIGTERM killed the process outright (exit -15, no message)
    after it had said its outputs were complete, and a scheduler recorded the job as failed: SIGTERM and
    SIGHUP are ignored from now on, at the OS level (the interpreter puts its own handlers back to the
    default as it finalizes; an ignored signal stays ignored), and a job that hangs there still ends at
    the scheduler's SIGKILL. A first Ctrl-C is ignored while Python still runs handlers, a second acts;
    in the interpreter's last moments (under a second, once it has put the default handlers back) a Ctrl-C
    still ends the process with status 130, its outputs already complete. Ignoring it at the OS level
    too would leave a hung shutdown to Ctrl-\\ or SIGKILL. Main thread only."""
    def second_acts(signum: int, _frame) -> None:
        signal.signal(signum, signal.SIG_DFL)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) is not None:
                signal.signal(sig, signal.SIG_IGN)
        if signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None):
            signal.signal(signal.SIGINT, second_acts)


_COMMIT_ENDS = threading.local()  # set by commit_ends_the_command(): hold_after_commit() acts only then


@contextlib.contextmanager
def commit_ends_the_command() -> Iterator[None]:
    """Mark a command (the CLI's ``restore``, ``corrupt``, ``evaluate``) whose work ends when its outputs
    are committed: inside, :func:`hold_after_commit` holds the signals that come after the commit, to
    the end of this block, which then raises :class:`LateSignal` for the first that came. Anywhere else
    (the Python API, a demo or batch that commits many times) it does nothing, and a signal acts as it
    always does (a caller's own handler included)."""
    state = _COMMIT_ENDS
    state.on, state.caught = True, []
    try:
        with contextlib.ExitStack() as state.hold:  # hold_after_commit's recording ends with the command
            yield
    finally:
        state.on, state.hold = False, None
    if state.caught:
        raise LateSignal(state.caught[0])


def hold_after_commit() -> None:
    """Inside :func:`commit_ends_the_command`: hold SIGINT, SIGTERM and SIGHUP back from now (the outputs
    are committed, or only a quick final step from it) to the command's end (its output locks released,
    its last line said), where :class:`LateSignal` is raised for the first that came: a signal in between
    exited 143 with the outputs in place, and a rerun was refused them as "already exists". Call it as
    the last step of the block whose end commits the outputs (:func:`medvae.io.atomic.all_or_none`).
    Else, or off the main thread, it does nothing."""
    state = _COMMIT_ENDS
    if getattr(state, "on", False):
        state.on = False  # once per command: the first commit starts the hold
        caught, _ = state.hold.enter_context(  # a second signal acts: the rest may wait on a store
            signals_recorded(*STOP_SIGNALS, second_acts=True))
        state.caught = caught
