"""Input margins: how far each model's real prompt counts run above our tiktoken estimate.

Providers tokenize differently (Claude and Gemini count 10-30 % more than ``o200k_base`` for the
same text; images and tools differ more), so a reservation sized on the estimate alone is low for
them, and every request in flight can overshoot a quota by that difference. The margin multiplies
the prompt estimate when reserving. It is configured per model glob (``input_margins``) or
learned from settles: each exact usage gives ``actual / estimate`` for its (format, model), and
the margin follows the high end of what was seen (a rise is taken at once, a fall only slowly).
Learned margins are shared through one hash in the store (``<prefix>:{@margins}``), merged at
most every ``interval`` seconds per process, off the request's critical path (after a settle).

Sans-IO: :meth:`InputMargins.sync_call` returns the call to make, :meth:`apply` takes its reply.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from quota_middleware.base._scripts import ScriptCall, hash_pairs
from quota_middleware.limits import model_matches

__all__ = ["MAX_MARGIN", "InputMargins"]

#: the most a margin can grow to: an upstream that reports absurd prompt counts cannot make
#: reservations grow without end (its usage is not believed past the plausibility bound anyway)
MAX_MARGIN = 2.0
#: how much of the gap to a lower observation a margin gives up per observation
_DECAY = 1 / 64
#: margins are kept as integers in permille in the store
_SCALE = 1000
_MAX_MODELS = 512
#: a rise of this many permille is shared at once
_PROMPT_PUSH = 10


class InputMargins:
    """Per (format, model) margins on the prompt estimate; thread-safe."""

    def __init__(
        self,
        configured: Mapping[str, float],
        *,
        key: str,
        learn: bool = True,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key = key
        self.learn = learn
        self.interval = interval
        self._configured = tuple(configured.items())
        self._clock = clock
        self._lock = threading.Lock()
        self._learned: dict[str, int] = {}  # field -> permille
        self._dirty: set[str] = set()
        self._next_sync = 0.0

    @staticmethod
    def field(fmt: str, model: str | None) -> str:
        return f"{fmt}|{model or '-'}"

    def factor(self, fmt: str, model: str | None) -> float:
        """The margin to multiply the prompt estimate by (>= 1)."""
        for pattern, value in self._configured:
            if model_matches((pattern,), model):
                return value
        if not self.learn:
            return 1.0
        permille = self._learned.get(self.field(fmt, model))
        return 1.0 if permille is None else permille / _SCALE

    def known(self, fmt: str, model: str | None) -> bool:
        """Whether this model's margin is configured or was learned (here or from the store)."""
        if not self.learn or any(model_matches((p,), model) for p, _ in self._configured):
            return True
        return self.field(fmt, model) in self._learned

    def observe(self, fmt: str, model: str | None, estimate: int, actual: int) -> None:
        """One exact settle: the provider counted ``actual`` prompt tokens for ``estimate``."""
        if not self.learn or estimate <= 0 or actual <= 0:
            return
        if self._configured and any(model_matches((p,), model) for p, _ in self._configured):
            return
        ratio = min(max(actual / estimate, 1.0), MAX_MARGIN)
        seen = round(ratio * _SCALE)
        name = self.field(fmt, model)
        with self._lock:
            old = self._learned.get(name)
            if old is None:
                if len(self._learned) >= _MAX_MODELS:
                    return  # model names are client-chosen: stay bounded
                new = seen
            elif seen >= old:
                new = seen
            else:
                new = old - max(1, round((old - seen) * _DECAY)) if old - seen > 1 else old
            if new != old:
                self._learned[name] = new
                self._dirty.add(name)
                if old is None or new - old >= _PROMPT_PUSH:
                    # a new or risen margin is what other workers lack: share it at the next
                    # settle rather than an interval later
                    self._next_sync = 0.0

    def sync_call(self) -> ScriptCall | None:
        """The merge with the store's margins, when one is due (at most every ``interval``)."""
        if not self.learn:
            return None
        now = self._clock()
        if now < self._next_sync:
            return None
        with self._lock:
            if now < self._next_sync:
                return None
            self._next_sync = now + self.interval
            pairs: list[str | int] = []
            for name in sorted(self._dirty):
                pairs += [name, self._learned[name]]
            self._dirty.clear()
        return ScriptCall("margins", (self.key,), (len(pairs) // 2, *pairs))

    def unsent(self, call: ScriptCall) -> None:
        """The sync ``call`` could not be made: what it carried goes with the next one."""
        with self._lock:
            self._dirty.update(str(a) for a in call.args[1::2])

    def apply(self, reply: object) -> None:
        """Take the store's margins (every process's merged view): a higher one is adopted."""
        stored = hash_pairs(reply if isinstance(reply, list | tuple) else [])
        with self._lock:
            for name, permille in stored.items():
                if not _SCALE <= permille <= MAX_MARGIN * _SCALE:
                    continue
                old = self._learned.get(name)
                if old is None and len(self._learned) >= _MAX_MODELS:
                    continue
                if old is None or permille > old:
                    self._learned[name] = permille

    def snapshot(self) -> dict[str, float]:
        """The learned margins, by ``format|model``."""
        with self._lock:
            return {name: v / _SCALE for name, v in self._learned.items()}
