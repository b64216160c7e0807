"""Progress of long runs on stderr, one reporter for every command.

In a terminal: rich's live display (spinner, description, a count only when the total is known,
elapsed time), erased when done. Anywhere else (CI logs, pipes): plain lines with the elapsed time,
`[1:05] optimizing: quantize-int8`, one per milestone (a pass starting, a search candidate), frequent
updates at most every UPDATE_S, and a heartbeat after HEARTBEAT_S of silence, so a long run never
looks hung. Results go to stdout; this writes to stderr only.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

#: Plain mode: at most this long without a line while work runs.
HEARTBEAT_S = 20.0
#: Plain mode: frequent updates (timed runs, training steps) are printed at most this often.
UPDATE_S = 10.0

_active: list[Reporter] = []  # open reporters, innermost last: passes report into the run's reporter


class _Count(ProgressColumn):
    """'completed/total' when the total is known, nothing otherwise (never '4/None')."""

    def render(self, task) -> Text:
        return Text("" if task.total is None else f"{int(task.completed)}/{int(task.total)}")


class Reporter:
    """Progress of one piece of work; `step` marks milestones, `update` reports frequent progress."""

    def __init__(self, label: str, console: Console, *, total: int | None = None) -> None:
        self.label, self.console = label, console
        self.start = time.monotonic()
        self.text, self.completed, self.total = "", 0, total
        self._lock = threading.Lock()
        self._last_line = self.start  # nothing is printed at the start: errors found first stay one line
        self._live = None
        self._stop = threading.Event()
        if console.is_terminal:
            from rich.progress import Progress

            self._live = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _Count(),
                                  TimeElapsedColumn(), console=console, transient=True)
            self._task = self._live.add_task(escape(label), total=total)
            self._live.start()
        else:
            self._beat = threading.Thread(target=self._heartbeat, name="onnxcompress-progress", daemon=True)
            self._beat.start()

    def step(self, text: str) -> None:
        """A milestone: always shown (a plain line, or the live description)."""
        self._set(text, None, None, force=True)

    def update(self, text: str | None = None, *, completed: int | None = None, total: int | None = None) -> None:
        """Frequent progress: shown live, or as a plain line at most every UPDATE_S."""
        self._set(text, completed, total, force=False)

    def close(self, *, done: bool = False) -> None:
        """Stop; `done`: the work finished, which plain mode says with the total time."""
        self._stop.set()
        if self._live is not None:
            self._live.stop()
        elif done:
            with self._lock:
                self._line(f"{self.label}: done")

    # ------------------------------------------------------------------ internals

    def _set(self, text: str | None, completed: int | None, total: int | None, *, force: bool) -> None:
        with self._lock:
            if text is not None:
                self.text = text
            if completed is not None:
                self.completed = completed
            if total is not None:
                self.total = total
            if self._live is not None:
                self._live.update(self._task, description=escape(self._description()), completed=self.completed,
                                  total=self.total)
            elif force or time.monotonic() - self._last_line >= UPDATE_S:
                self._line(self._description())

    def _description(self) -> str:
        count = f" ({self.completed}/{self.total})" if self.total else ""
        return f"{self.label}: {self.text}{count}" if self.text else f"{self.label}{count}"

    def _line(self, text: str) -> None:
        now = time.monotonic()
        self._last_line = now
        self.console.print(f"[{elapsed(now - self.start)}] {text}", markup=False, highlight=False, soft_wrap=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.01, self._last_line + HEARTBEAT_S - time.monotonic())):
            with self._lock:
                if time.monotonic() - self._last_line >= HEARTBEAT_S:
                    self._line(f"{self._description()}: still working")


def elapsed(seconds: float) -> str:
    """'0:07', '17:03', '1:02:03'."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@contextlib.contextmanager
def progress(label: str, console: Console | None = None, *, total: int | None = None) -> Iterator[Reporter]:
    """A reporter for the work inside the block; nested work (a pass) finds it with `current()`."""
    reporter = Reporter(label, console or Console(stderr=True), total=total)
    _active.append(reporter)
    try:
        yield reporter
    except BaseException:
        _active.remove(reporter)
        reporter.close()
        raise
    _active.remove(reporter)
    reporter.close(done=True)


def current() -> Reporter | None:
    """The innermost open reporter, if a command opened one."""
    return _active[-1] if _active else None
