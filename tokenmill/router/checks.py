"""Escalation checks: run on the cheap tier's complete answer; the first that fails names the reason.

Each check looks at every choice of the response (chat or completion) and fails if any choice fails.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from tokenmill.router.config import CheckConfig, resolve_callable


@dataclass
class CheckFailure:
    check: str
    # What was observed (the answer, the mean logprob, the finish reason, the validation error).
    observed: Any

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "observed": self.observed}


def choice_text(choice: dict[str, Any]) -> str:
    message = choice.get("message")
    if isinstance(message, dict):
        return message.get("content") or ""
    return choice.get("text") or ""


def choice_logprobs(choice: dict[str, Any]) -> list[float]:
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return []
    if isinstance(logprobs.get("content"), list):  # chat
        return [float(t["logprob"]) for t in logprobs["content"] if t.get("logprob") is not None]
    return [float(x) for x in logprobs.get("token_logprobs") or [] if x is not None]  # completions


def needs_logprobs(checks: tuple[CheckConfig, ...]) -> bool:
    return any(c.check == "min_mean_logprob" for c in checks)


def _schema_of(check: CheckConfig, request: dict[str, Any]) -> dict | None:
    if check.schema is not None:
        return check.schema
    fmt = request.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema") or {}
        return spec.get("schema") if isinstance(spec, dict) else None
    return None


def _run_one(check: CheckConfig, request: dict[str, Any], response: dict[str, Any]) -> CheckFailure | None:
    choices = response.get("choices") or []
    if check.check == "python":
        fn = resolve_callable(check.callable or "")
        result = fn(request, response)
        passed, observed = result if isinstance(result, tuple) else (bool(result), None)
        return None if passed else CheckFailure("python", observed if observed is not None else check.callable)
    for choice in choices:
        text = choice_text(choice)
        if check.check == "choice":
            if text.strip() not in check.values:
                return CheckFailure("choice", text)
        elif check.check == "regex":
            if re.fullmatch(check.pattern or "", text) is None:
                return CheckFailure("regex", text)
        elif check.check == "not_truncated":
            if choice.get("finish_reason") == "length":
                return CheckFailure("not_truncated", "length")
        elif check.check == "min_mean_logprob":
            logprobs = choice_logprobs(choice)
            mean = sum(logprobs) / len(logprobs) if logprobs else -math.inf
            if mean < (check.value if check.value is not None else -math.inf):
                return CheckFailure("min_mean_logprob", mean if logprobs else None)
        elif check.check == "json_schema":
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                return CheckFailure("json_schema", f"not JSON: {e}")
            schema = _schema_of(check, request)
            if schema is not None:
                import jsonschema

                error = jsonschema.exceptions.best_match(
                    jsonschema.validators.validator_for(schema)(schema).iter_errors(value))
                if error is not None:
                    return CheckFailure("json_schema", error.message)
    return None


def run_checks(checks: tuple[CheckConfig, ...], request: dict[str, Any],
               response: dict[str, Any]) -> CheckFailure | None:
    """The first failing check, or None when the answer passes them all."""
    for check in checks:
        failure = _run_one(check, request, response)
        if failure is not None:
            return failure
    return None
