"""plotly.js, the chart library of the HTML report's interactive charts and of
`gradwatch serve`'s live page.

It is read from the `plotly` package's own copy (`plotly/package_data/plotly.min.js`), so
that a page carries it inline or the server serves it: nothing is loaded from a CDN, and a
page opens with no network access. Only the file is read; plotly's Python API is never
imported.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

INSTALL_HINT = "pip install 'gradwatch[plot]' (or 'gradwatch[cli]')"


@cache
def plotly_js() -> str:
    """The text of `plotly.min.js` (about 4.6 MB), read once per process.

    Raises:
        ImportError: If the `plotly` package is not installed, naming the extra to install.
    """
    # Found without importing the package (`find_spec` of a top-level package runs none
    # of its code): only the file is read.
    spec = importlib.util.find_spec("plotly")
    try:
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("No module named 'plotly'")
        asset = Path(spec.submodule_search_locations[0]) / "package_data" / "plotly.min.js"
        return asset.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ImportError(
            f"The interactive charts need plotly.js, from the `plotly` package ({e}). "
            f"Install it with: {INSTALL_HINT}"
        ) from e


def plotly_version() -> str:
    """The version of plotly.js, from the file's banner (`* plotly.js v4.1.1`)."""
    head = plotly_js()[:200]
    marker = "plotly.js v"
    start = head.find(marker)
    if start < 0:
        return "unknown"
    start += len(marker)
    end = start
    while end < len(head) and (head[end].isdigit() or head[end] == "."):
        end += 1
    return head[start:end]
