"""Parse untrusted uploads (every format, and documents sent as JSON) in a child process under a memory and a
time budget.

A parser's memory grows with what a file describes, not with its size: millions of nested tags are
gigabytes of tree, a few KB of PDF can inflate to gigabytes. Its time can grow faster than its size: one
super-linear pattern on a long line is minutes of CPU. Parsed inside the API process, one such upload
would take the service down (or hold the interpreter's lock) for every tenant. Each parse runs in a process
forked from a small server process (multiprocessing's forkserver, which has the parsers imported already: a
fork costs milliseconds, and never copies the API's model or threads), with its address space capped
(RLIMIT_AS) and a deadline.
What exceeds the budget is refused with a 413 that names the setting; the API is untouched.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from app.errors import AppError, BadInput, TooLarge, UnsupportedMedia

_ERRORS: dict[str, type[AppError]] = {e.__name__: e for e in (BadInput, TooLarge, UnsupportedMedia)}
_PRELOAD = ["app.ingest.load", "bs4", "pypdfium2", "pypdf", "docx", "pptx", "openpyxl"]
_context: Any = None
_context_lock = threading.Lock()


@dataclass(frozen=True)
class Budget:
    """What one parse may use: memory beyond the parser's own start (MiB), and wall time (s)."""

    memory_mb: int
    seconds: float


# Parses at once per process: each may use its whole memory budget.
_slots = threading.BoundedSemaphore(2)


def _forkserver() -> Any:
    global _context
    with _context_lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(_PRELOAD)
            _context = context
        return _context


def warm() -> None:
    """Start the fork server now (about 0.3 s), so that the first upload does not wait for it."""
    from multiprocessing import forkserver

    _forkserver()
    forkserver.ensure_running()


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...], memory: int) -> None:
    """In the child: cap the address space, parse, send back the result or what went wrong."""
    limit = _vm_size() + memory
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        message: tuple[str, Any, Any, Any] = ("ok", fn(*args), None, None)
    except AppError as exc:
        message = ("refused", type(exc).__name__, exc.message, exc.detail)
    except MemoryError:
        message = ("memory", None, None, None)
    except RecursionError:
        message = ("refused", "BadInput", "is nested too deeply to parse", None)
    except Exception as exc:  # a parser's own failure on a hostile file: the file is at fault
        message = ("refused", "BadInput", f"cannot be parsed: {type(exc).__name__}: {str(exc)[:300]}", None)
    try:
        conn.send(message)
    except MemoryError:
        conn.send(("memory", None, None, None))
    finally:
        conn.close()
        # At once: tearing down a huge parse tree object by object would cost more than building it.
        os._exit(0)


def run(fn: Callable[..., Any], args: tuple[Any, ...], budget: Budget, what: str) -> Any:
    """fn(*args) in a child process within the budget; its result, or the AppError it raised, or a 413."""
    context = _forkserver()
    over_memory = TooLarge(f"{what} needs more memory to parse than the {budget.memory_mb} MiB budget "
                           f"(PGSAGE_PARSE_MEMORY_MB)")
    with _slots:
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_child, args=(send, fn, args, budget.memory_mb << 20), daemon=True)
        child.start()
        send.close()
        try:
            if not receive.poll(budget.seconds):
                raise TooLarge(f"{what} takes longer to parse than the {budget.seconds:g} s budget "
                               f"(PGSAGE_PARSE_SECONDS)")
            try:
                kind, value, message, detail = receive.recv()
            except EOFError:  # the child died without a word: killed for its memory, or crashed
                raise over_memory from None
        finally:
            if child.is_alive():
                child.kill()
            child.join(10)
            receive.close()
    if kind == "ok":
        return value
    if kind == "memory":
        raise over_memory
    if not message.startswith(what):
        message = f"{what} {message}"
    raise _ERRORS.get(value, BadInput)(message, detail=detail)
