"""The `gradwatch` command line: summary, doctor, plot, convert, report, tensorboard and serve.

Errors go to stderr with exit code 2 and a message that says what was received
and how to fix it; `gradwatch COMMAND --help` describes each command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from gradwatch._ui.paths import writable_file

TYPE_CHECKING = False  # `typing` is left out at run time, so that `--help` starts at once
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

_KINDS = ("flow", "norms", "heatmap", "histogram")
_LOG_HELP = "a gradwatch log: a .csv or .parquet file, or a directory streamed by GradWatch(path=)"


class _Exit(Exception):
    """Raised instead of `SystemExit`, so that `main` returns the code."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class _UsageError(Exception):
    """A problem with the arguments, found after parsing."""


class _Parser(argparse.ArgumentParser):
    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if message:
            self._print_message(message, sys.stderr)
        raise _Exit(status)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `gradwatch` command line and returns its exit code.

    Args:
        argv: The arguments, without the program name. Defaults to `None`
            (`sys.argv[1:]`).

    Returns:
        0 on success, 2 on an error (the message is on stderr); `doctor` returns 1
        when a finding is an error.

    Example:

    ```python
    from gradwatch.cli import main

    main(["summary", "grads.parquet"])
    main(["plot", "grads.parquet", "--kind", "flow", "-o", "flow.png"])
    ```
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        return args.run(args)
    except _Exit as e:
        return e.code
    except BrokenPipeError:
        # The reader went away (`gradwatch summary LOG | head`): stop quietly, as `cat` does.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (_UsageError, ImportError, OSError, ValueError, KeyError, TypeError) as e:
        # User errors: a message, no traceback. KeyError's str() adds quotes; take its text.
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        command = getattr(args, "command", None) if "args" in locals() else None
        prog = f"gradwatch {command}" if command else "gradwatch"
        print(f"{prog}: error: {text}", file=sys.stderr)
        return 2


def _parser() -> _Parser:
    from gradwatch import __version__

    parser = _Parser(
        prog="gradwatch",
        description="Look at gradwatch logs: summary tables, charts, HTML reports, "
        "TensorBoard export, format conversion and a live page.",
        epilog="Run 'gradwatch COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (
        _add_summary,
        _add_doctor,
        _add_plot,
        _add_convert,
        _add_report,
        _add_tensorboard,
        _add_serve,
    ):
        add(sub)
    return parser


def _command(sub: Any, name: str, run: Any, help: str, description: str) -> argparse.ArgumentParser:
    """A command's parser: its help, its `LOG` argument, and the function that runs it."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("log", metavar="LOG", help=_LOG_HELP)
    p.set_defaults(run=run)
    return p


def _add_summary(sub: Any) -> None:
    p = _command(
        sub,
        "summary",
        _summary,
        help="per-variable table of gradient norms and non-finite steps",
        description="Print one row per variable: first, last, median and max gradient norm, "
        "the number of NaN/Inf elements, and the first step that had one.",
    )
    p.add_argument("--csv", action="store_true", help="print CSV instead of a text table")
    p.add_argument(
        "--sort",
        metavar="COLUMN",
        help="order the rows by this column, largest first (e.g. max_norm); variables "
        "without a value go last (default: model order)",
    )
    p.add_argument(
        "--ascending", action="store_true", help="with --sort: smallest first (vanishing norms)"
    )


def _add_doctor(sub: Any) -> None:
    p = _command(
        sub,
        "doctor",
        _doctor,
        help="what looks wrong in the run, where, and what to try",
        description="Run the diagnosis rules (docs/diagnose.md) over the log and print the "
        "findings, most severe first. Exit status: 1 when a finding is an error, 0 "
        "otherwise, 2 for bad input; usable as a gate in CI.",
    )
    p.add_argument("--json", action="store_true", help="print the findings as a JSON array")
    p.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="change a rule's threshold, e.g. --threshold exploding_norm=1e5 (repeatable)",
    )


def _add_plot(sub: Any) -> None:
    p = _command(
        sub,
        "plot",
        _plot,
        help="draw a chart into an image file",
        description="Draw one chart of the log into an image file (png, svg, pdf, ...). "
        "Non-finite steps are marked in red.",
    )
    p.add_argument(
        "--kind",
        choices=_KINDS,
        default="flow",
        help="flow: norm per variable in model order; norms: norm over steps; heatmap: "
        "a stat by step and variable; histogram: one variable's gradient histograms "
        "(default: flow)",
    )
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="image file to write")
    p.add_argument("--step", type=int, help="flow: also draw this recorded step")
    p.add_argument(
        "--variables", nargs="+", metavar="PATTERN", help="norms: globs of the variables to draw"
    )
    p.add_argument("--stat", help="heatmap: the stat to show (default: norm)")
    p.add_argument("--variable", metavar="KEY", help="histogram: the variable (required)")
    p.add_argument("--steps", type=int, nargs="+", metavar="STEP", help="histogram: the steps")
    p.add_argument("--dpi", type=int, default=100, help="image resolution (default: 100)")


def _add_convert(sub: Any) -> None:
    p = _command(
        sub,
        "convert",
        _convert,
        help="write the log as CSV or Parquet",
        description="Read a log (CSV, Parquet or a streamed directory) and write it as one "
        "file; the format follows OUTPUT's extension.",
    )
    p.add_argument("output", metavar="OUTPUT", help="a .csv or .parquet file to write")


def _add_report(sub: Any) -> None:
    p = _command(
        sub,
        "report",
        _report,
        help="write a self-contained HTML report",
        description="Write one HTML file with the charts embedded, the summary table and the "
        "alerts. It loads nothing from the network and opens offline.",
    )
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the .html file")
    p.add_argument("--title", help="the page title (default: gradwatch report: LOG)")


def _add_tensorboard(sub: Any) -> None:
    p = _command(
        sub,
        "tensorboard",
        _tensorboard,
        help="write TensorBoard summaries",
        description="Write the gradient norms (scalars) and histograms as TensorBoard "
        "summaries at the log's step numbers. View them with: tensorboard --logdir DIR",
    )
    p.add_argument("--logdir", required=True, metavar="DIR", help="TensorBoard log directory")


_DEFAULT_PORT = 6007  # gradwatch._ui.live_server.DEFAULT_PORT, here for a fast --help


def _add_serve(sub: Any) -> None:
    p = _command(
        sub,
        "serve",
        _serve,
        help="a live page of a log, also while GradWatch(path=) streams it",
        description="Serve a page that follows the log: the last recorded step, the "
        "doctor's verdict and findings, the loss and learning rate, the global and "
        "per-layer gradient norms, a layers-by-steps heatmap and the alerts. It reads only "
        "what is new every second, and needs no network (plotly.js is served by the "
        "command). Stop it with Ctrl-C.",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)"
    )
    p.add_argument(
        "--port",
        type=int,
        default=_DEFAULT_PORT,
        help=f"the port to listen on (default: {_DEFAULT_PORT}; 0: any free port)",
    )


# ------------------------------------------------------------------ commands
def _summary(args: argparse.Namespace) -> int:
    if args.ascending and args.sort is None:
        raise _UsageError("`--ascending` orders the rows of `--sort COLUMN`; pass --sort too.")
    log = _read(args.log)
    table = log.summary()
    if args.sort is not None:
        table = _sorted(table, args.sort, ascending=args.ascending)
    if args.csv:
        table.to_csv(sys.stdout, float_format="%.9g")
        return 0
    steps = log.steps
    span = f"steps {steps[0]}..{steps[-1]}" if len(steps) else "no steps"
    print(f"{args.log}: {len(steps)} recorded steps ({span}), {len(log.variables)} variables")
    print(_text_table(table))
    first = log.first_nonfinite()
    if first is not None:
        print(f"First non-finite step: {first[0]} ({', '.join(first[1])})")
    if len(log.alerts):
        counts = log.alerts["kind"].value_counts()
        print("Alerts: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    print(f"{_count_line(log.diagnose())} Details: gradwatch doctor {args.log}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from gradwatch._ui.long_runs import text_lines as long_run_lines
    from gradwatch.findings import findings_json, findings_text

    thresholds = {}
    for item in args.threshold:
        name, sep, value = item.partition("=")
        try:
            thresholds[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise _UsageError(
                f"`--threshold` takes NAME=VALUE with a number, e.g. --threshold "
                f"exploding_norm=1e5. Received: --threshold {item}"
            )
    log = _read(args.log)
    findings = log.diagnose(**thresholds)
    if args.json:
        print(findings_json(findings))
    else:
        print(f"{args.log}: {len(log)} recorded steps, {len(log.variables)} variables")
        print(findings_text(findings))
        print(_count_line(findings))
        for line in long_run_lines(log):  # spikes, replayed examples, noise scale
            print(line)
    return 1 if (findings["severity"] == "error").any() else 0


def _plot(args: argparse.Namespace) -> int:
    output = _output(args.output, _image_formats(), "-o")
    only = {
        "step": "flow",
        "variables": "norms",
        "stat": "heatmap",
        "variable": "histogram",
        "steps": "histogram",
    }
    for option, kind in only.items():
        if getattr(args, option) is not None and args.kind != kind:
            raise _UsageError(
                f"`--{option}` applies to --kind {kind}. Received: --kind {args.kind} "
                f"--{option} {_show(getattr(args, option))}"
            )
    if args.kind == "histogram" and args.variable is None:
        raise _UsageError(
            "--kind histogram needs `--variable KEY`, the variable whose histograms to draw."
        )
    from gradwatch import plot

    log = _read(args.log)
    if args.kind == "flow":
        fig = plot.flow(log, step=args.step)
    elif args.kind == "norms":
        fig = plot.norms(log, variables=args.variables or "*")
    elif args.kind == "heatmap":
        fig = plot.heatmap(log, stat=args.stat or "norm")
    else:
        fig = plot.histogram(log, args.variable, steps=args.steps)
    fig.savefig(output, dpi=args.dpi)
    print(f"Wrote {output}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    output = _output(args.output, {".csv": "CSV", ".parquet": "Parquet", ".pq": "Parquet"}, "")
    from gradwatch.progress import progress_bar

    with progress_bar(2, "convert", unit="stage") as bar:
        bar.set_postfix_str("reading")
        log = _read(args.log)
        bar.update()
        bar.set_postfix_str("writing")
        if output.suffix.lower() == ".csv":
            log.to_csv(output)
        else:
            log.to_parquet(output)
        bar.update()
    print(f"Wrote {output} ({len(log)} recorded steps)")
    return 0


def _report(args: argparse.Namespace) -> int:
    output = _output(args.output, {".html": "HTML", ".htm": "HTML"}, "-o")
    from gradwatch.report import write_report

    log = _read(args.log)
    title = args.title or f"gradwatch report: {Path(args.log).name}"
    write_report(log, output, title=title, progress=True)
    print(f"Wrote {output}")
    return 0


def _tensorboard(args: argparse.Namespace) -> int:
    from gradwatch.tensorboard import write_tensorboard

    log = _read(args.log)
    logdir = write_tensorboard(log, args.logdir, progress=True)
    print(f"Wrote {len(log)} steps to {logdir}; view them with: tensorboard --logdir {logdir}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    path = Path(args.log)
    if not path.exists():
        raise FileNotFoundError(
            f"No gradwatch log at '{path}': the path does not exist. Pass a log file, or "
            "the directory given to GradWatch(path=...) (it exists once training starts)."
        )
    if not 0 <= args.port <= 65535:
        raise _UsageError(f"`--port` must be 0..65535. Received: --port {args.port}")
    from gradwatch._ui.live_server import serve

    serve(path, args.host, args.port)
    return 0


# ------------------------------------------------------------------- helpers
def _read(path: str) -> Any:
    from gradwatch.io import read_log

    try:
        return read_log(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e} Pass the path of a log written by `GradientLog.to_csv`/`to_parquet`, or the "
            "directory given to GradWatch(path=...)."
        ) from e


def _sorted(table: Any, column: str, ascending: bool) -> Any:
    if column not in table.columns:
        raise _UsageError(
            f"`--sort` takes a column of the summary: {', '.join(table.columns)}. "
            f"Received: --sort {column}"
        )
    # Stable, so that equal values keep model order; missing values go last either way.
    return table.sort_values(column, ascending=ascending, kind="stable", na_position="last")


def _text_table(table: Any) -> str:
    """The summary as text: every real number in one format (`1.234e-05`), whole
    numbers (counts, steps) as integers, and `-` where there is no value."""
    import pandas as pd

    def real(value: Any) -> str:
        return "-" if pd.isna(value) else f"{value:.3e}"

    def whole(value: Any) -> str:
        return "-" if pd.isna(value) else str(int(value))

    kinds = {"f": real, "i": whole, "u": whole, "b": whole}
    text = pd.DataFrame(index=table.index)
    for column in table.columns:
        # Formatted here, not by `to_string(formatters=)`, which prints `<NA>` itself.
        show = kinds.get(table[column].dtype.kind, str)
        text[column] = [show(value) for value in table[column]]
    return text.to_string()


def _output(path: str, formats: dict[str, str], option: str) -> Path:
    """Checks an output path's extension and directory before any work is done."""
    out = Path(path)
    name = f"{option} " if option else ""
    if out.suffix.lower() not in formats:
        raise _UsageError(
            f"Cannot tell the output format of '{path}' from its extension. Use one of "
            f"{', '.join(sorted(formats))}. Received: {name}{path}"
        )
    return writable_file(out, "the output")


def _image_formats() -> dict[str, str]:
    from gradwatch import plot  # ImportError naming the extra when matplotlib is missing

    formats = plot.Figure().canvas.get_supported_filetypes()
    return {f".{ext}": name for ext, name in formats.items()}


def _count_line(findings: Any) -> str:
    from gradwatch.findings import count_line

    return count_line(findings)


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


if __name__ == "__main__":
    sys.exit(main())
