"""Progress of a long command on stderr (data goes to stdout): a spinner on a terminal, lines elsewhere."""

from __future__ import annotations

import time

from rich.console import Console
from rich.status import Status
from rich.text import Text


class Reporter:
    """Progress on stderr. On a terminal, one live spinner line (rich) shows the current phase; otherwise
    (logs, CI, scripts) a line per phase change and a heartbeat line while a phase lasts."""

    def __init__(self, console: Console | None = None, heartbeat: float = 15.0) -> None:
        self.console = console or Console(stderr=True, highlight=False)
        self.heartbeat = heartbeat
        self._phase = ""
        self._last = 0.0
        self._spinner: Status | None = None

    def say(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def phase(self, phase: str, detail: str = "") -> None:
        text = f"[{phase}] {detail}".rstrip()
        if self.console.is_terminal:
            label = Text(text)  # not markup: "[loading model]" is text, not a style
            if self._spinner is None:
                self._spinner = self.console.status(label, spinner="dots")
                self._spinner.start()
            else:
                self._spinner.update(label)
            return
        now = time.monotonic()
        if phase != self._phase or now - self._last >= self.heartbeat:
            self.say(text)
            self._phase, self._last = phase, now

    def done(self) -> None:
        if self._spinner is not None:
            self._spinner.stop()
            self._spinner = None

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done()  # never leave a spinner drawing over the summary or an error
