"""The command line every benchmark ends in: parse the flags, run, print
the table, then the one JSON line (with --json, or always)."""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence


def run_main(
    parse_args: Callable[[Sequence[str] | None], Any],
    run: Callable[[Any], dict],
    print_table: Callable[[dict], None],
    argv: Sequence[str] | None = None,
    *,
    always_json: bool = False,
) -> int:
    args = parse_args(argv)
    results = run(args)
    print_table(results)
    if always_json or getattr(args, "json", False):
        print(json.dumps(results, sort_keys=True))
    return 0
