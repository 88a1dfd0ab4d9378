"""The figure the charts return: matplotlib's own, which a notebook shows as an image."""

from __future__ import annotations

import io

from matplotlib.figure import Figure as MatplotlibFigure


class Figure(MatplotlibFigure):
    """A `matplotlib.figure.Figure` that Jupyter displays as a PNG image.

    A figure made without `pyplot` shows in a notebook as `<Figure size ...>`
    unless the user first runs `%matplotlib inline`. This one renders itself
    (`_repr_png_`), so a chart as a cell's last line is drawn with no magic.
    Where the inline backend is active, IPython's own printer for figures is
    used instead, once. Everything else is matplotlib's `Figure`.

    Example:

    ```python
    fig = gradwatch.plot.norms(log)  # the last line of a cell: the chart
    fig.savefig("norms.png")         # as any matplotlib figure
    ```
    """

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png")
        return buffer.getvalue()
