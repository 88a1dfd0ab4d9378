"""How the read side writes names and numbers in a sentence: the doctor's evidence, the
report's verdict, the end-of-`fit` summary and a log's notebook view."""

from __future__ import annotations

from collections.abc import Sequence


def name_list(names: Sequence[str], most: int) -> str:
    """The first `most` names, comma-separated, then how many are left out.

    Example:

    >>> name_list(["a", "b", "c", "d"], most=2)
    'a, b and 2 more'
    >>> name_list(["a", "b"], most=2)
    'a, b'
    """
    shown = ", ".join(names[:most])
    more = len(names) - most
    return f"{shown} and {more} more" if more > 0 else shown


def short_number(value: float) -> str:
    """A number to three significant digits, as the doctor and the report write them.

    Example:

    >>> short_number(0.000123456), short_number(2.0), short_number(1.5e7)
    ('0.000123', '2', '1.5e+07')
    """
    return f"{value:.3g}"
