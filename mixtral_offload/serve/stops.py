"""Stop strings found on the decoded text as it streams, across token boundaries."""
from __future__ import annotations


class StopMatcher:
    """Passes streamed text through until a stop string completes; it is cut with all that follows.

    Text that could be the start of a stop string is held back until the next piece settles it, so
    no part of a stop string is ever released.
    """

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = [stop for stop in stops if stop]
        self.pending = ""    # received, not yet released: a tail that may begin a stop string
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add a piece of text; return what can be released now (everything before a stop string)."""
        self.pending += piece
        found = [(index + len(stop), index) for stop in self.stops if (index := self.pending.find(stop)) >= 0]
        if found:  # the stop string completed first (the longer one when two end together), as if char by char
            released, self.pending, self.stopped = self.pending[:min(found)[1]], "", True
            return released
        hold = max((length for stop in self.stops for length in range(1, min(len(stop), len(self.pending) + 1))
                    if self.pending.endswith(stop[:length])), default=0)  # a prefix longer than pending cannot end it
        cut = len(self.pending) - hold
        released, self.pending = self.pending[:cut], self.pending[cut:]
        return released

    def flush(self) -> str:
        """The held-back text, at the end of generation (it began a stop string that never completed)."""
        released, self.pending = self.pending, ""
        return released
