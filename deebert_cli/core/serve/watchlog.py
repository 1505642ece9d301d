"""``deebert serve --watch-log DIR``: the watched texts kept for recalibration, bounded and atomic.

The texts go to JSON Lines files ``watch-<UTC time>-<pid>-<n>.jsonl`` holding ``{"<text column>": ...}``
(and the pair column on a pair checkpoint), the columns of the checkpoint's data, so that ``deebert
calibrate --unlabeled DIR`` reads the folder as it is (every ``.jsonl`` file; a text with newlines stays
one text, which a ``.txt`` file of one text per line would split). Each file holds at most ``lines`` texts
and at most ``files`` of them are kept: when a new one starts, the oldest go (only files named as this
module names them: a user's own ``watch-notes.jsonl`` stays).
A file is always rewritten whole to a hidden temporary sibling, then renamed over itself
(:func:`~..files.atomic_text_file`), so a reader never meets half a file. Writing happens in a thread of
its own, at most once a second, off the serving worker. Nothing is written without the flag."""
from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
from pathlib import Path

from ..errors import UserError
from ..files import atomic_text_file, check_writable

PATTERN = "watch-*.jsonl"
OWN = re.compile(r"watch-\d{8}T\d{6}-\d+-\d{6}\.jsonl")  # the names _start gives: only these are ever removed


class WatchLog:
    """``add(text)`` from any thread (a text, or a (text, text_pair) tuple); :meth:`close` writes what is left."""

    def __init__(self, folder: str, lines: int = 10_000, files: int = 10, text_column: str = "text",
                 pair_column: str | None = None, interval: float = 1.0):
        self.folder = Path(folder).expanduser()
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"--watch-log '{folder}' is a file: give a folder for the watched texts")
        check_writable(self.folder / "probe", "--watch-log")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--watch-log '{folder}' cannot be made: {e.strerror or e}") from None
        check_writable(self.folder, "--watch-log", inside=True)
        self.lines, self.files, self.interval = int(lines), int(files), float(interval)
        self.columns = (text_column, pair_column)
        self._queue: queue.Queue = queue.Queue()
        self._current: list = []  # the JSON lines of the file being filled
        self._name: str | None = None
        self._seq = 0
        self.error: str | None = None  # a write that failed (a full disk): logging stops, serving goes on
        self._thread = threading.Thread(target=self._run, name="deebert-watch-log", daemon=True)
        self._thread.start()

    def add(self, text) -> None:
        self._queue.put(text)

    def close(self, timeout: float | None = 30) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _record(self, text) -> str:
        first, pair = self.columns
        if isinstance(text, tuple):
            row = {first: text[0], pair or "text_pair": text[1]}
        else:
            row = {first: text}
        return json.dumps(row, ensure_ascii=False)

    def _run(self) -> None:
        done = False
        while not done:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = None in batch
            texts = [t for t in batch if t is not None]
            if texts and self.error is None:
                try:
                    self._write(texts)
                except (UserError, OSError) as e:
                    self.error = str(e)
            if not done and self.interval > 0:
                time.sleep(self.interval)

    def _write(self, texts: list) -> None:
        """Append ``texts``, starting new files (and removing the oldest) at the caps; each touched file
        is written whole, atomically."""
        for t in texts:
            if self._name is None or len(self._current) >= self.lines:
                if self._name is not None:
                    self._flush()
                self._start()
            self._current.append(self._record(t))
        self._flush()

    def _start(self) -> None:
        self._seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self._name = f"watch-{stamp}-{os.getpid()}-{self._seq:06d}.jsonl"
        self._current = []
        old = sorted(p for p in self.folder.glob(PATTERN) if p.is_file() and OWN.fullmatch(p.name))
        for p in old[: max(0, len(old) - (self.files - 1))]:  # room for the new one: never more than `files`
            p.unlink(missing_ok=True)

    def _flush(self) -> None:
        with atomic_text_file(str(self.folder / self._name)) as f:
            f.write("".join(line + "\n" for line in self._current))
