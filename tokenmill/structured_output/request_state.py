"""One engine request's structured-output state: its grammar while it compiles, then its matcher."""

from __future__ import annotations

from tokenmill.structured_output.backend import GrammarMatcher
from tokenmill.structured_output.manager import PendingGrammar


class StructuredOutputRequest:
    """Held by a Request under structured outputs (one per sequence: n > 1 gives each sample its own).

    The scheduler admits the request only once `matcher` is set; the engine polls the compile each step
    (`poll`). After each sampled token the matcher accepts it; recompute after preemption replays the output.
    """

    def __init__(self, pending: PendingGrammar) -> None:
        self.pending = pending
        # None until the grammar is compiled.
        self.matcher: GrammarMatcher | None = None

    @property
    def is_ready(self) -> bool:
        return self.matcher is not None

    def poll(self) -> bool:
        """Whether the matcher is ready; raises StructuredOutputError when the compile failed or timed out."""
        if self.matcher is None:
            compiled = self.pending.poll()
            if compiled is None:
                return False
            self.matcher = compiled.matcher()
        return True

    def replay(self, output_token_ids: list[int]) -> None:
        """Rebuild the matcher's state from scratch: reset, then accept the output so far (recompute)."""
        if self.matcher is None:
            return
        self.matcher.reset()
        for token_id in output_token_ids:
            if not self.matcher.accept_token(token_id):
                raise RuntimeError(f"the grammar matcher refused output token {token_id} while replaying")
