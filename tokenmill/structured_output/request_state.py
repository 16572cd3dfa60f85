"""One engine request's structured-output state on the scheduler side: its grammar while it compiles."""

from __future__ import annotations

from tokenmill.structured_output.manager import PendingGrammar


class StructuredOutputRequest:
    """Held by a Request under structured outputs (n > 1: each sample has its own).

    The scheduler admits the request only once the grammar is compiled (`is_ready`); the engine polls the
    compile each step (`poll`). The matcher itself lives with the model runner (a logits processor), built
    from the same compiled grammar (the compile cache's), and rebuilt by replay after a preemption.
    """

    def __init__(self, pending: PendingGrammar) -> None:
        self.pending = pending
        self._ready = False

    @property
    def is_ready(self) -> bool:
        return self._ready

    def poll(self) -> bool:
        """Whether the grammar is compiled; raises StructuredOutputError when the compile failed or timed out."""
        if not self._ready:
            self._ready = self.pending.poll() is not None
        return self._ready
