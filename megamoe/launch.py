"""torchrun with a clean stop on a signal: ``python -m megamoe.launch [torchrun flags] SCRIPT [flags]``.

torchrun alone does not stop a training run cleanly. SIGUSR1 (Slurm's warning before the time limit)
is not among the signals it handles, so it kills torchrun and leaves the workers training as orphans.
SIGTERM and SIGINT start torchrun's own shutdown: it forwards the signal, SIGKILLs any worker still
running after ``--shutdown-timeout`` (30 s, less than a large save takes) and exits 1 with a traceback.

This launcher is torchrun (``torch.distributed.run``, the same flags) with SIGTERM, SIGUSR1 and SIGINT
taken out of torchrun's hands. Each is relayed to the workers, the processes torchrun started, with
SIGINT sent as SIGTERM (pretrain_openmoe.py stops on SIGTERM and SIGUSR1, while Ctrl-C in a worker
would be a KeyboardInterrupt). The workers finish their step, save and exit 0, torchrun sees every
worker succeed, and the launcher exits 0. No grace period runs out while they save.

- A worker is sent a signal only once it catches that signal (``SigCgt`` in ``/proc/PID/status``).
  While a worker is still starting up, before the training loop installs its handlers, the default
  action would kill it without a save, so the signal is held and relayed as soon as the handler is in
  place. The run then trains one step, saves and exits 0. Sending the signal again while it is held
  delivers it anyway, which stops a worker that never installs a handler (not pretrain_openmoe.py).
- A signal that arrives before any worker exists (torchrun still in rendezvous, waiting for other
  nodes) stops the launcher at once with exit code 128 + the signal number: nothing to save.
- SIGHUP and SIGQUIT stay with torchrun (forwarded, then SIGKILL after ``--shutdown-timeout``), and
  so does any signal added with torchrun's ``--signals-to-handle`` (e.g. SIGUSR2).
- SIGKILL cannot be relayed: a launcher killed that way leaves its workers running.
- Linux only: the workers and their handlers are found in /proc.

Failures are one line: the failed ranks and their exit codes (each worker prints its own error above
it), exit code 1, instead of torchrun's traceback and report.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

RELAYED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
POLL_SECONDS = 0.5  # how often a held signal is retried


def child_pids(parent: int) -> list[int]:
    """Processes whose parent is ``parent`` (torchrun's workers), from /proc. Not every kernel has
    /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN), so every process's stat is read."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == parent:
            pids.append(int(entry))
    return sorted(pids)


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (the SigCgt mask)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


class SignalRelay:
    """Relays SIGTERM, SIGUSR1 and SIGINT (as SIGTERM) to this process's children, each once it
    catches the signal, from a thread. The signals reach the thread through the wakeup fd, which the
    C-level handler writes at once: a Python handler would run only when torchrun's main thread is
    back in the interpreter, not while it blocks in C++ (a rendezvous waiting for other nodes)."""

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._thread = threading.Thread(target=self._relay, name="megamoe-signal-relay", daemon=True)
        self._read, self._write = socket.socketpair()

    def install(self) -> None:
        """Call from the main thread, before torchrun starts any worker."""
        self._write.setblocking(False)
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        for sig in RELAYED:
            signal.signal(sig, lambda *_: None)  # caught (not the default action); the thread acts
        self._thread.start()

    def _relay(self) -> None:
        wanted: signal.Signals | None = None
        delivered: set[int] = set()
        force = False
        while True:
            self._read.settimeout(POLL_SECONDS if wanted else None)  # retry held signals
            try:
                received = [signal.Signals(b) for b in self._read.recv(64) if b in RELAYED]
            except TimeoutError:
                received = []
            for got in received:
                workers = child_pids(os.getpid())
                if not workers:
                    # Before any worker exists (rendezvous) there is nothing to save or orphan: stop
                    # at once, as the signal's default action would.
                    self._log(f"launcher: {got.name} before any worker started; nothing to save")
                    os._exit(128 + got)
                sig = signal.SIGTERM if got == signal.SIGINT else got
                force = wanted is not None and any(p not in delivered for p in workers)  # sent again
                wanted, delivered = sig, set()
                self._log(f"launcher: {got.name}{f' as {sig.name}' if sig != got else ''} -> the workers "
                          f"{workers}: they finish the step, save and exit"
                          + (" (sent again while held: delivered now)" if force else ""))
            if wanted is None:
                continue
            for pid in child_pids(os.getpid()):
                if pid in delivered or not (force or catches(pid, wanted)):
                    continue  # still starting up: held until it catches the signal
                try:
                    os.kill(pid, wanted)
                except ProcessLookupError:
                    pass
                delivered.add(pid)


@contextlib.contextmanager
def _relay_handlers_kept() -> Iterator[None]:
    """Inside this block, ``signal.signal`` leaves the relayed signals' handlers alone. torchrun installs
    its own for SIGTERM and SIGINT when it starts the workers (a fixed list in torch releases before
    ``--signals-to-handle``, added in 2025), and they would replace the relay's. Only torchrun runs in
    this process, so refusing the replacement here works with every torch version."""
    install = signal.signal

    def keep_relayed(sig: int, handler: Any) -> Any:
        return signal.getsignal(sig) if sig in RELAYED else install(sig, handler)

    signal.signal = keep_relayed
    try:
        yield
    finally:
        signal.signal = install


def _failure_line(failures: dict) -> str:
    """One line for torchrun's ChildFailedError: which ranks failed and how."""
    parts = []
    for rank, failure in sorted(failures.items()):
        code = failure.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
            else f"exit code {code}"
        parts.append(f"rank {rank} (pid {failure.pid}) {how}")
    return f"error: workers failed: {', '.join(parts)}; their own messages are above"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from torch.distributed import DistError
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(argv)
    SignalRelay().install()
    try:
        with _relay_handlers_kept():
            torchrun.run(args)
    except ChildFailedError as e:
        print(_failure_line(e.failures), file=sys.stderr, flush=True)
        return 1
    except SignalException as e:
        print(f"launcher: stopped by {e.sigval.name} (left to torchrun: the workers were stopped without "
              "a save)", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except DistError as e:  # e.g. --master-port taken: torchrun's own setup failed, no worker ran
        print(f"error: torchrun: {str(e).strip().splitlines()[0]}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
