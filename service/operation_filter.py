"""The ListOperations filter of evolve.v1 and google.longrunning.Operations.

A small subset of AIP-160, enough for what operation lists are filtered by:
terms `field = value` joined by `AND`, on the fields

    task   a task name                      task = "cifar10"   task=cifar10
    kind   "extension" or "generalization"  kind = "generalization"
    state  QUEUED, RUNNING, SUCCEEDED,      state = RUNNING
           FAILED or CANCELLED
    done   true or false                    done = false

Values may be double-quoted strings (with `\\"` and `\\\\` escapes) or bare
words. Anything else, another field or operator, OR, NOT, parentheses, is
refused with a message that says what is supported, never silently matched.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from evolve.errors import InvalidArgumentError

MAX_FILTER_CHARS = 2048
FIELDS = ("task", "kind", "state", "done")
STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
_STATE_PREFIX = "OPERATION_STATE_"
SUPPORTED = 'terms `field = value` joined by AND, on task, kind, state and done (e.g. `task = "cifar10" AND done = false`)'

_TOKEN = re.compile(
    r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<operator>!=|<=|>=|=|<|>|:)|(?P<word>[A-Za-z0-9_.\-/]+)|(?P<other>\S))', re.DOTALL
)


@dataclasses.dataclass(frozen=True)
class OperationFilter:
    """A conjunction of `field = value` terms; no terms matches everything."""

    terms: tuple[tuple[str, Any], ...] = ()

    def matches(self, record: Any) -> bool:
        """Whether an operation record (service.jobs.OperationRecord) passes every term."""
        return all(getattr(record, field) == value for field, value in self.terms)


def quote(value: str) -> str:
    """`value` as a quoted filter string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def task_filter(task: str) -> str:
    """The filter of one task's operations."""
    return f"task = {quote(task)}"


def _tokens(text: str, field: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:  # only trailing whitespace is left
            break
        position = match.end()
        kind = match.lastgroup
        value = match.group(kind)
        if kind == "other":
            if value == '"':
                raise InvalidArgumentError(field, "a quoted string is not closed")
            raise InvalidArgumentError(field, f"unexpected {value!r}; supported: {SUPPORTED}")
        tokens.append((kind, value))
    return tokens


def _unquote(token: str) -> str:
    return re.sub(r"\\(.)", r"\1", token[1:-1], flags=re.DOTALL)


def _value(name: str, kind: str, raw: str, field: str) -> Any:
    text = _unquote(raw) if kind == "string" else raw
    if name == "done":
        if kind != "word" or text.lower() not in ("true", "false"):
            raise InvalidArgumentError(field, f"done takes true or false, got {raw}")
        return text.lower() == "true"
    if name == "state":
        state = text.upper().removeprefix(_STATE_PREFIX)
        if state not in STATES:
            raise InvalidArgumentError(field, f"state takes one of {', '.join(STATES)}, got {raw}")
        return state
    return text


def parse(text: str, field: str = "filter") -> OperationFilter:
    """The filter a ListOperations `filter` string means; INVALID_ARGUMENT
    (naming `field`) for anything outside the supported subset."""
    if len(text) > MAX_FILTER_CHARS:
        raise InvalidArgumentError(field, f"at most {MAX_FILTER_CHARS} characters, got {len(text)}")
    if "\x00" in text:
        raise InvalidArgumentError(field, "must not contain NUL characters")
    tokens = _tokens(text, field)
    terms = []
    position = 0
    while position < len(tokens):
        if terms:
            kind, value = tokens[position]
            if (kind, value) != ("word", "AND"):
                raise InvalidArgumentError(field, f"expected AND, got {value!r}; supported: {SUPPORTED}")
            position += 1
        term = tokens[position:position + 3]
        if len(term) < 3:
            raise InvalidArgumentError(field, f"incomplete term at the end; supported: {SUPPORTED}")
        (name_kind, name), (operator_kind, operator), (value_kind, value) = term
        if name_kind != "word" or name in ("OR", "NOT", "AND"):
            raise InvalidArgumentError(field, f"unexpected {name!r}; supported: {SUPPORTED}")
        if name not in FIELDS:
            raise InvalidArgumentError(field, f"unknown field {name!r}; filterable: {', '.join(FIELDS)}")
        if operator_kind != "operator" or operator != "=":
            raise InvalidArgumentError(field, f"only '=' is supported, got {operator!r} after {name}")
        if value_kind not in ("word", "string"):
            raise InvalidArgumentError(field, f"expected a value after '{name} =', got {value!r}")
        terms.append((name, _value(name, value_kind, value, field)))
        position += 3
    return OperationFilter(tuple(terms))


def list_filter(filter_text: str, task: str = "") -> OperationFilter:
    """evolve.v1's ListOperations filter: `filter`, or the deprecated `task` field."""
    if filter_text and task:
        raise InvalidArgumentError(
            "task", 'give `filter` or the deprecated `task`, not both (use filter: \'task = "<name>"\')'
        )
    if task:
        return OperationFilter((("task", task),))
    return parse(filter_text)
