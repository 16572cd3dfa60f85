"""Structured outputs: constrain generation to a JSON schema, a regex, a choice of strings or a grammar.

params.py     StructuredOutputsParams (what the user asks for), validated
manager.py    StructuredOutputManager: compile off the engine's step, cache by specification, timeouts
backend.py    the backend interface, CompiledGrammar, GrammarMatcher (one sequence's matcher)
(the LogitsProcessor contract that matchers implement is tokenmill/sample/logits_processor.py)
bitmask.py    token bitmasks for a batch: allocate, fill, apply to the logits
"""

from tokenmill.sample.logits_processor import LogitsProcessor
from tokenmill.structured_output.backend import CompiledGrammar, GrammarMatcher, GrammarMatcherError
from tokenmill.structured_output.bitmask import (
    TokenBitmaskBuffer,
    allocate_token_bitmask,
    apply_token_bitmask_,
    fill_token_bitmask,
)
from tokenmill.structured_output.manager import PendingGrammar, StructuredOutputManager
from tokenmill.structured_output.params import (
    BACKENDS,
    StructuredOutputCompileTimeout,
    StructuredOutputError,
    StructuredOutputsParams,
)

__all__ = [
    "BACKENDS",
    "CompiledGrammar",
    "GrammarMatcher",
    "GrammarMatcherError",
    "LogitsProcessor",
    "PendingGrammar",
    "StructuredOutputCompileTimeout",
    "StructuredOutputError",
    "StructuredOutputManager",
    "StructuredOutputsParams",
    "TokenBitmaskBuffer",
    "allocate_token_bitmask",
    "apply_token_bitmask_",
    "fill_token_bitmask",
]
