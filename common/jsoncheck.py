"""Checks on JSON text that msgspec does not make: where nesting gets too deep, duplicate keys.

msgspec decodes with C recursion bounded by Python's recursion limit and raises
RecursionError past it; it keeps the last of duplicated keys. The decoders catch the
first and call `deep_path` (only then) to name where it happened; they call
`duplicate_key` to refuse the second. Both functions take bytes that msgspec has read
or tried to read, and raise nothing but ValueError on text that is not JSON.
"""

from __future__ import annotations

import json
import re

import msgspec

# One token of JSON text for the scan: a whole string (so brackets inside it are skipped),
# or one structural character. Numbers, true, false and null are skipped between tokens.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]', re.S)
DEEP_SCAN_TOKENS = 200_000   # bounds the scan's cost on a refused body (about 50 ms)


def deep_path(text: bytes, depth: int, keep: int) -> str | None:
    """Return the path (`events[0].x`) of the value where nesting first passes `depth`.

    The path is cut to its first `keep` steps, so it names the field that holds the deep
    value rather than the deep value itself. Returns None when no such value is found in
    the first DEEP_SCAN_TOKENS tokens.
    """
    stack: list[list] = []   # per open container: [is_object, key or index, expecting_key]
    for count, match in enumerate(_TOKEN.finditer(text)):
        if count >= DEEP_SCAN_TOKENS:
            return None
        token = match.group()
        top = stack[-1] if stack else None
        if token in (b"{", b"["):
            if len(stack) >= depth:
                return _format(stack[:keep]) or None
            stack.append([token == b"{", None if token == b"{" else 0, token == b"{"])
        elif token in (b"}", b"]"):
            if stack:
                stack.pop()
        elif token == b",":
            if top is not None:
                if top[0]:
                    top[2] = True
                else:
                    top[1] += 1
        elif token == b":":
            if top is not None:
                top[2] = False
        elif top is not None and top[0] and top[2]:
            top[1] = _key(token)
    return None


def duplicate_key(text: bytes) -> str | None:
    """Return the path of the first key that appears twice in one object (`events[0].sku`), or None.

    Exact, at every level. Raises ValueError when `text` is not JSON.
    """
    if _no_duplicates(text):
        return None
    try:
        tree = json.loads(text, object_pairs_hook=_Pairs, parse_int=_skip, parse_float=_skip,
                          parse_constant=_skip)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
    return _find_duplicate(tree, [])


def _no_duplicates(text: bytes) -> bool:
    """A cheap proof that no object in `text` has a key twice; False means "look closer".

    Outside strings a colon only ever follows a key. Decoding keeps one pair per key, and
    re-encoding writes every kept string as it was read when the text has no backslash
    (no escapes to rewrite), so the re-encoding has fewer colons than the text exactly
    when a pair was dropped. One msgspec decode and encode: several times cheaper than
    json with a pairs hook.
    """
    if b"\\" in text:
        return False
    try:
        again = _encoder.encode(msgspec.json.decode(text))
    except (msgspec.MsgspecError, RecursionError, ValueError, OverflowError):
        return False
    return text.count(b":") == again.count(b":")


_encoder = msgspec.json.Encoder()


class _Pairs(list):
    """An object as the list of its (key, value) pairs, duplicates kept."""


def _skip(_text: str) -> None:
    return None


def _find_duplicate(node, path: list) -> str | None:
    stack = [(node, path)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _Pairs):
            seen: set[str] = set()
            for key, _ in node:
                if key in seen:
                    return _format([*path, [True, key]])
                seen.add(key)
            stack.extend((value, [*path, [True, key]]) for key, value in reversed(node))
        elif isinstance(node, list):
            stack.extend((value, [*path, [False, i]]) for i, value in reversed(list(enumerate(node))))
    return None


def _key(token: bytes) -> str:
    try:
        return json.loads(token)
    except ValueError:
        return token[1:-1].decode("utf-8", "replace")


def _format(steps) -> str:
    out = ""
    for step in steps:
        is_object, name = step[0], step[1]
        if is_object:
            if name is None:
                break
            out += f".{name}" if out else str(name)
        else:
            out += f"[{name}]"
    return out
