"""Ray's messages that a user of ``deebert predict-dataset`` cannot act on, kept off the terminal; every
other warning and error passes. Each is silenced where Ray emits it, as narrowly as Ray allows:

* the token-auth warning of a new local instance ("Token authentication is enabled for this Ray cluster.
  Set RAY_AUTH_MODE=disabled to opt out"): a filter on the logger of Ray's token setup drops that record
  only; token auth stays on, and the warning that a cluster runs *without* it still shows. (Setting
  RAY_AUTH_MODE=token would silence it too, but only before ray is imported: after, Ray 2.60 starts a
  cluster that asks for a token it never wrote.)
* Ray Data's INFO lines (``ray.data`` at WARNING while this lasts), its warning "The Ray cluster currently
  does not have any available CPUs. The Dataset job will hang" (false here: the reads reserve no CPU so
  that the actors may hold every CPU), and the tracebacks it logs for a failure about the input (a
  UserError raised by a reader or the predictor), which the command reports in one line: a filter on
  Ray Data's console handlers. Its log file in the Ray session folder keeps every record.
* the core worker's (C++) line "Actor ... has constructor arguments in the object store and max_restarts
  > 0" (ray-project/ray#53727): Ray Data hands every actor its map function through the object store,
  and the predictor actors are restartable, so it comes with every actor. It is written straight to file
  descriptor 2, which no logging config reaches, and RAY_BACKEND_LOG_LEVEL would hide every C++ error of
  every Ray process (their log files too): :class:`quiet_stderr` drops that line only.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading

from .readers import about_input

TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"
CPU_WARNING = "Warning: The Ray cluster currently does not have any available CPUs"
NOISE_LINES = (re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the "
                          rb"object store and max_restarts > 0"),)


def _not_token_notice(record: logging.LogRecord) -> bool:
    return record.funcName != "_warn_token_auth_enabled"


def _not_ray_data_noise(record: logging.LogRecord) -> bool:
    if record.getMessage().startswith(CPU_WARNING):
        return False
    # Ray Data logs a failure inside the handler that re-raises it: the exception is the record's or the
    # one being handled
    exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
    return exc is None or not about_input(exc)


class quiet_ray:
    """Context manager: the logging filters above, and ``ray.data`` at WARNING; undone on exit."""

    def __enter__(self):
        self.token = logging.getLogger(TOKEN_LOGGER)
        self.token.addFilter(_not_token_notice)
        self.data = logging.getLogger("ray.data")
        self.level = self.data.level
        self.data.setLevel(logging.WARNING)
        # Ray Data's loggers do not propagate: its own handlers print; the file handler keeps everything
        self.handlers = [h for h in self.data.handlers if not isinstance(h, logging.FileHandler)
                         and "File" not in type(h).__name__]
        for h in self.handlers:
            h.addFilter(_not_ray_data_noise)
        return self

    def __exit__(self, *exc):
        self.token.removeFilter(_not_token_notice)
        self.data.setLevel(self.level)
        for h in self.handlers:
            h.removeFilter(_not_ray_data_noise)
        return False


class quiet_stderr:
    """Context manager: file descriptor 2 goes through a pipe whose reader thread passes every line on to
    the real stderr except those matching :data:`NOISE_LINES`. Hand-written: wurlitzer, the library for
    C-level output, captures it but does not filter it, so it would need these lines as well."""

    def __enter__(self):
        self.saved = None
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no stderr to filter
            return self
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self.saved = saved
        self.thread = threading.Thread(target=_pump, args=(r, saved), name="deebert-stderr", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            return False
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.saved, 2)  # the pipe's last write end closes: the thread drains it and ends
        self.thread.join(timeout=5)
        if not self.thread.is_alive():  # else a child process still holds the pipe: keep forwarding
            os.close(self.saved)
        return False


def _pump(r: int, out: int) -> None:
    with os.fdopen(r, "rb") as src:
        for line in src:
            if any(p.search(line) for p in NOISE_LINES):
                continue
            view = memoryview(line)
            while view:
                view = view[os.write(out, view):]
