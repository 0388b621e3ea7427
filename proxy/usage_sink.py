"""Where usage lines go: a file or stdout (`-`), written whole, off the event loop, bounded.

Lines are queued in memory and written by a background task in batches, in a
worker thread, so the event loop never waits on the disk. Guarantees:

- **Every line arrives whole**, whatever the sink and the number of workers:
  a line is under 4 KiB (`UsageRecord.line` caps caller-chosen fields), and
  each `write()` carries only whole lines and at most `PIPE_BUF` (4096)
  bytes, which POSIX makes atomic on a pipe; a regular file is opened with
  `O_APPEND`, each write landing whole at its end.
- **No half line on disk**: a short write to a full disk (or a file over its
  size limit) is cut back to the last whole line (`ftruncate`), and the rest
  stays queued.
- **Bounded**: at most `max_queued` lines wait (a stalled or broken sink);
  past that, new lines are dropped, counted (`on_drop`, the
  `byok_usage_lines_dropped_total` metric) and logged at ERROR.
- **A broken sink is noticed and healed**: a write error, or the file's path
  no longer naming the open file (directory removed, file moved by log
  rotation), marks the sink unwritable (`writable`, shown by `/readyz` and
  the `byok_usage_log_writable` metric); each flush retries, reopening the
  path, and what was queued meanwhile is written then.
- **Rotation**: SIGHUP makes the sink reopen its path at once (`reopen`; `serve`
  forwards SIGHUP to every worker): lines written after it go to the file now at
  the path, the ones before stay in the moved file, none is cut between the two
  (files are switched between whole writes). A moved file is also noticed at the
  next flush without a SIGHUP (above).
- A crash (SIGKILL) loses what was queued: with a healthy sink, the lines of
  requests that ended in the last `FLUSH_SECONDS` (or the last `FLUSH_LINES`,
  if sooner); while the sink is unwritable, everything queued since.
  `close()` (graceful shutdown) writes everything the sink takes within
  `CLOSE_SECONDS`.
- Several workers truncating after a short write on one full disk could cut
  a line another worker appended in between; the window is one write.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from proxy.usage import UsageRecord

log = logging.getLogger("byok.usage")

FLUSH_SECONDS = 0.2
FLUSH_LINES = 512
MAX_QUEUED = 200_000  # lines (~100 MB at most); a full queue drops, counts and logs
_ATOMIC = 4096  # PIPE_BUF on Linux: the largest write a pipe never interleaves
_DROP_LOG_SECONDS = 10.0
CLOSE_SECONDS = 10.0  # longest wait at shutdown for the last lines to be written


class UsageLog:
    """Batched, non-blocking, bounded writer of usage lines to a file or stdout (`-`)."""

    def __init__(
        self,
        target: str,
        *,
        max_queued: int = MAX_QUEUED,
        on_drop: Callable[[int], None] | None = None,
        on_health: Callable[[bool], None] | None = None,
    ) -> None:
        self.target = target
        self.max_queued = max_queued
        self.writable = True
        self.problem: str | None = None  # why the sink is unwritable, in words
        self.dropped = 0
        self._on_drop = on_drop
        self._on_health = on_health
        self._lines: deque[bytes] = deque()
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._reopen = False  # asked by SIGHUP: reopen the path at the next flush
        self._hangup_handler = False  # this sink answers SIGHUP in this process
        self._io = threading.Lock()  # one writer thread at a time
        self._last_drop_log = 0.0

    async def start(self) -> None:
        if self.target == "-":
            self._fd = sys.stdout.fileno()
        else:
            self._open()
        self._listen_for_hangup()
        self._task = asyncio.create_task(self._run(), name="usage-log")

    def _listen_for_hangup(self) -> None:
        """SIGHUP reopens the file (log rotation) and no longer ends the process.

        Only the main thread's event loop can take signals: a sink started in another
        thread (an app served in a test's thread) does not listen."""
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reopen)
        except (RuntimeError, ValueError):
            return
        self._hangup_handler = True

    def reopen(self) -> None:
        """Close the file and open its path again, now (after a log rotation moved it)."""
        self._reopen = True
        self._wake.set()

    # --- the event loop's side ----------------------------------------------------

    def write(self, record: UsageRecord) -> None:
        """Queue a record's line (never blocks; drops and counts when the queue is full)."""
        if len(self._lines) >= self.max_queued:
            self._drop(1)
            return
        self._lines.append(record.line())
        if len(self._lines) >= FLUSH_LINES:
            self._wake.set()

    def _drop(self, count: int) -> None:
        self.dropped += count
        if self._on_drop is not None:
            self._on_drop(count)
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_SECONDS:
            self._last_drop_log = now
            log.error(
                "USAGE LINES DROPPED: the usage log %s is not keeping up (%s); %d line(s) "
                "dropped so far, %d queued",
                self.target,
                self.problem or "slow sink",
                self.dropped,
                len(self._lines),
            )

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), FLUSH_SECONDS)
            except TimeoutError:
                pass
            self._wake.clear()
            if self._closing:
                return  # close() writes what is left
            if self._lines or self._reopen:
                await asyncio.to_thread(self._flush)

    async def close(self) -> None:
        """Write every queued line (if the sink takes them), then close the file."""
        # A flag, not task.cancel(): on Python 3.11 wait_for() can swallow a cancellation.
        self._closing = True
        self._wake.set()
        if self._hangup_handler:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            # Ignored, not the default (which ends the process): a log rotation during a
            # graceful shutdown must not lose the lines still to be written.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            self._hangup_handler = False
        if self._task is not None:
            await self._task
        if self._lines:
            try:  # a stalled stdout reader must not hold up shutdown for ever
                await asyncio.wait_for(asyncio.to_thread(self._flush), CLOSE_SECONDS)
            except TimeoutError:
                pass
        if self._lines:
            log.error("usage log %s: %d line(s) not written at shutdown", self.target, len(self))
        if self._fd is not None and self.target != "-":
            os.close(self._fd)
        self._fd = None

    def __len__(self) -> int:
        return len(self._lines)

    # --- the writer thread's side -------------------------------------------------

    def _flush(self) -> None:
        """Write queued lines until the queue is empty or the sink fails."""
        with self._io:
            reopen, self._reopen = self._reopen, False
            if self.target != "-" and (reopen or not self._same_file()):
                self._open()
            if self._fd is None:
                return
            try:
                self._write_queued()
            except OSError as exc:
                self._unhealthy(f"write failed: {os.strerror(exc.errno or errno.EIO)}")
                return
            self._healthy()

    def _write_queued(self) -> None:
        assert self._fd is not None
        lines = self._lines
        while lines:
            # Whole lines, at most _ATOMIC bytes (a line is always shorter than that).
            chunk, count = [lines[0]], 1
            size = len(lines[0])
            while count < len(lines) and size + len(lines[count]) <= _ATOMIC:
                size += len(lines[count])
                chunk.append(lines[count])
                count += 1
            data = b"".join(chunk)
            written = os.write(self._fd, data)
            if written < len(data):
                self._cut_back(data, written)
                whole = data.count(b"\n", 0, written)
                for _ in range(whole):
                    lines.popleft()
                raise OSError(errno.ENOSPC, "short write")
            for _ in range(count):
                lines.popleft()

    def _cut_back(self, data: bytes, written: int) -> None:
        """After a short write, remove the partial line it left at the end of the file."""
        assert self._fd is not None
        partial = written - (data.rfind(b"\n", 0, written) + 1)
        if partial and stat.S_ISREG(os.fstat(self._fd).st_mode):  # stdout redirected too
            end = os.lseek(self._fd, 0, os.SEEK_END)
            os.ftruncate(self._fd, end - partial)

    def _same_file(self) -> bool:
        """Whether the path still names the open file (not removed, not rotated away)."""
        if self._fd is None:
            return False
        try:
            st = os.stat(self.target)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def _open(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            self._unhealthy(f"cannot open: {os.strerror(exc.errno or errno.EIO)}")
            return
        st = os.fstat(fd)
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)

    def _unhealthy(self, problem: str) -> None:
        if self.writable or problem != self.problem:
            log.error(
                "usage log %s is unwritable (%s); %d line(s) queued, retrying every %.1fs",
                self.target,
                problem,
                len(self._lines),
                FLUSH_SECONDS,
            )
        self.writable, self.problem = False, problem
        if self._on_health is not None:
            self._on_health(False)

    def _healthy(self) -> None:
        if not self.writable:
            log.warning("usage log %s is writable again", self.target)
        self.writable, self.problem = True, None
        if self._on_health is not None:
            self._on_health(True)
