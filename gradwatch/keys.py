"""Variable keys: unique names for trainable variables, and lookups by suffix or pattern."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import Any


def variable_keys(paths: Iterable[str]) -> list[str]:
    """Makes unique keys from variable paths, in the order given.

    Keras 3 paths are not unique: two layers explicitly named `d` both give
    `sub/d/kernel`. The first occurrence keeps its path; later duplicates get
    a `#1`, `#2`, ... suffix.

    Args:
        paths: Variable paths (`model_paths`), in `trainable_weights` order.

    Returns:
        One unique key per path.

    Example:

    >>> variable_keys(["sub/d/kernel", "sub/d/bias", "sub/d/kernel"])
    ['sub/d/kernel', 'sub/d/bias', 'sub/d/kernel#1']
    """
    seen: dict[str, int] = {}
    keys = []
    for path in paths:
        n = seen.get(path, 0)
        seen[path] = n + 1
        keys.append(path if n == 0 else f"{path}#{n}")
    return keys


def model_paths(model: Any) -> list[str]:
    """The path of each of the model's trainable variables within the model.

    A path is the model's name, the names of the layers from the model down to the
    layer that owns the variable, then the variable's name: `net/hidden/kernel`,
    `net/encoder/proj/kernel`. Keras' own `variable.path` is the name scope at
    creation, so it depends on when the model was built: a `Sequential` built in its
    first step gives `net/hidden/kernel`, the same model from `load_model` gives
    `hidden/kernel`. These paths depend on the model's structure and names alone
    (which `model.save` keeps), so they stay the same across `save`/`load_model` and
    `clone_model`, whatever the build order. A variable that no layer owns keeps its
    `variable.path`.

    Args:
        model: A Keras model (or layer).

    Returns:
        One path per variable of `model.trainable_weights`, in that order.

    Example:

    ```python
    model = keras.Sequential([keras.layers.Dense(3, name="hidden")], name="net")
    model.build((None, 4))
    model_paths(model)  # ['net/hidden/kernel', 'net/hidden/bias']
    ```
    """
    owner: dict[int, str] = {}

    def walk(layer: Any, prefix: str) -> None:
        subs = list(
            getattr(layer, "_flatten_layers", lambda **_: [])(include_self=False, recursive=False)
        )
        in_subs = {id(v) for sub in subs for v in sub.weights}
        for v in layer.weights:
            if id(v) not in in_subs:
                owner.setdefault(id(v), prefix + v.name)
        for sub in subs:
            walk(sub, f"{prefix}{sub.name}/")

    walk(model, f"{model.name}/")
    return [owner.get(id(v), v.path) for v in model.trainable_weights]


def _suffixes(key: str) -> list[str]:
    """The key and every tail of it that starts on a `/` boundary."""
    parts = key.split("/")
    return ["/".join(parts[i:]) for i in range(len(parts))]


def resolve_key(name: str, keys: Sequence[str], what: str = "variable") -> str:
    """Finds the one key that `name` names: the key itself, or an unambiguous suffix.

    Args:
        name: A full key (`sequential/dense/kernel`) or a suffix of one that
            starts on a `/` boundary (`dense/kernel`).
        keys: The available keys.
        what: What the keys are, for the error message. Defaults to `"variable"`.

    Returns:
        The matching key.

    Raises:
        KeyError: If nothing matches, or if the suffix matches several keys.

    Example:

    >>> resolve_key("dense/kernel", ["seq/dense/kernel", "seq/dense/bias"])
    'seq/dense/kernel'
    """
    if not isinstance(name, str):
        raise TypeError(
            f"A {what} is named by a string key such as 'dense/kernel'. "
            f"Received: {name!r} of type {type(name).__name__}"
        )
    if name in keys:
        return name
    matches = [k for k in keys if name in _suffixes(k)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise KeyError(
            f"No {what} is named {name!r}. A name is a full key or a suffix of one "
            f"on '/' boundaries. Available: {list(keys)}"
        )
    raise KeyError(
        f"The name {name!r} is ambiguous: it matches {matches}. "
        "Use a longer suffix or the full key."
    )


def _as_pattern_list(patterns: Any, arg: str) -> list[str | re.Pattern]:
    if isinstance(patterns, (str, re.Pattern)):
        return [patterns]
    if isinstance(patterns, Sequence) and not isinstance(patterns, bytes):
        items = list(patterns)
        if items and all(isinstance(p, (str, re.Pattern)) for p in items):
            return items
    raise TypeError(
        f"`{arg}` must be a glob string, an `re.Pattern`, or a non-empty list of "
        f"them, e.g. {arg}='dense*' or {arg}=['*kernel', re.compile('bias$')]. "
        f"Received: {arg}={patterns!r}"
    )


def check_patterns(patterns: Any, arg: str) -> tuple[str | re.Pattern, ...]:
    """Checks the type of a pattern argument, in the constructor, before keys exist.

    Args:
        patterns: A glob, an `re.Pattern`, or a list of them.
        arg: The argument's name, for the error message.

    Returns:
        The patterns as a tuple.

    Example:

    >>> check_patterns("dense*", "variables")
    ('dense*',)
    """
    return tuple(_as_pattern_list(patterns, arg))


def pattern_matches(pattern: str | re.Pattern, key: str) -> bool:
    """Whether a glob or regex matches a key.

    A glob matches when it matches the full key or any of its suffixes on `/`
    boundaries, so `dense*` matches `sequential/dense/kernel`. A regex matches
    when `pattern.search(key)` finds it.

    Example:

    >>> pattern_matches("dense*", "sequential/dense/kernel")
    True
    >>> pattern_matches("*bias", "sequential/dense/kernel")
    False
    """
    if isinstance(pattern, re.Pattern):
        return pattern.search(key) is not None
    return any(fnmatch.fnmatchcase(s, pattern) for s in _suffixes(key))


def match_patterns(patterns: Any, keys: Sequence[str], arg: str) -> list[str]:
    """The keys that any of the patterns match, in the order of `keys`.

    Args:
        patterns: A glob, an `re.Pattern`, or a list of them.
        keys: The available keys.
        arg: The argument's name, for the error message.

    Returns:
        The matched keys, in key order.

    Raises:
        ValueError: If one of the patterns matches no key; the message lists
            the available keys.

    Example:

    >>> match_patterns("*kernel", ["d1/kernel", "d1/bias", "d2/kernel"], "variables")
    ['d1/kernel', 'd2/kernel']
    """
    items = _as_pattern_list(patterns, arg)
    hit = [False] * len(keys)
    for pattern in items:
        found = False
        for i, key in enumerate(keys):
            if pattern_matches(pattern, key):
                hit[i] = found = True
        if not found:
            shown = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
            raise ValueError(
                f"The pattern {shown!r} in `{arg}` matches no variable. "
                f"Available keys: {list(keys)}. Received: {arg}={patterns!r}"
            )
    return [k for k, h in zip(keys, hit, strict=True) if h]
