"""What a run shows on the terminal while it works, and what it keeps off it.

Progress: a line when each long step starts and ends (model load, evaluation, each pass, each benchmark
shape), readable in a CI log as on a terminal. Library noise (exporter step lines, deprecation
warnings, download-style bars, other libraries' log lines) goes to run.log instead of the user's
terminal, unless `--verbose`.
"""

from __future__ import annotations

import io
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from typing import Any


class RunConsole:
    """The run's own messages: to the terminal's stderr (captured when created), never to run.log's
    redirections. Silent when quiet."""

    def __init__(self, *, quiet: bool) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(file=sys.stderr, highlight=False, soft_wrap=True)

    def say(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False)

    def warn(self, message: str) -> None:
        """optitool's own warnings reach the terminal even with --quiet (library noise goes to run.log)."""
        self.console.print(f"! {message}", markup=False)

    @contextmanager
    def step(self, message: str) -> Iterator[None]:
        """'… message' when it starts, '✓ message (12.3 s)' when it ends."""
        self.say(f"… {message}")
        start = time.perf_counter()
        yield
        self.say(f"✓ {message} ({time.perf_counter() - start:.1f} s)")


class _LogStream(io.TextIOBase):
    """A text stream whose complete lines become log records."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self._pending = logger, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text.replace("\r", "\n")
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self._pending.strip():
            self.logger.info(self._pending.rstrip())
        self._pending = ""

    def isatty(self) -> bool:
        return False


def _terminal_handlers(streams: tuple[Any, ...]) -> list[logging.StreamHandler]:
    """Every logging handler (of any library) that writes to the terminal. Not logging's last-resort
    handler, which a library may attach to its logger (lm-eval does): it writes to whatever sys.stderr is
    at the time, which the redirection already covers, and its stream cannot be set."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and not isinstance(getattr(type(h), "stream", None), property)
            and getattr(h, "stream", None) in streams]


@contextmanager
def library_output_to_log(logger: logging.Logger, *, verbose: bool) -> Iterator[None]:
    """While the block runs, what libraries print, warn or log to the terminal goes to `logger`."""
    if verbose:
        yield
        return
    stream = _LogStream(logger)
    terminal = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    swapped = [(h, h.stream) for h in _terminal_handlers(terminal)]
    for handler, _ in swapped:
        handler.setStream(stream)

    def to_log(message: Any, category: type[Warning], filename: str, lineno: int, *args: Any, **kwargs: Any) -> None:
        logger.warning("%s: %s (%s:%s)", category.__name__, message, filename, lineno)

    try:
        with warnings.catch_warnings(), redirect_stdout(stream), redirect_stderr(stream):
            warnings.showwarning = to_log
            yield
    finally:
        stream.flush()
        for handler, original in swapped:
            handler.setStream(original)
        # A library imported during the block may have made a handler on the redirected stdout/stderr
        # (onnxruntime-genai's builder does): left there, its records would feed back into `logger`
        # forever. They go to the real stream they meant.
        for handler in _terminal_handlers((stream,)):
            handler.setStream(sys.stderr)
