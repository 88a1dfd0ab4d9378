import ast
import inspect
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import keras
import pytest
from components import HANG, require
from reference import README_STATS

import gradwatch

ROOT = Path(__file__).resolve().parents[1]


def test_public_api_is_pinned():
    assert sorted(gradwatch.__all__) == sorted(
        [
            "DEFAULT_STATS",
            "STATS",
            "GradWatch",
            "GradWatchMixin",
            "GradientLog",
            "Model",
            "NonfiniteOrigin",
            "Sequential",
            "Sink",
            "SinkBlock",
            "__version__",
            "read_log",
            "record_gradients",
            "trace_nonfinite",
        ]
    )
    for name in gradwatch.__all__:
        obj = getattr(gradwatch, name)
        if callable(obj):
            assert obj.__doc__ and "Example" in obj.__doc__, name


def _parameters(fn):
    """`{name: default}` of a signature, `inspect.Parameter.empty` for required ones."""
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()}


def test_record_gradients_function_takes_the_model_first_and_matches_the_method():
    assert _parameters(gradwatch.record_gradients) == {
        "model": inspect.Parameter.empty,
        "grads": inspect.Parameter.empty,
        "variables": inspect.Parameter.empty,
        "optimizer": None,
    }
    method = _parameters(gradwatch.GradWatchMixin.record_gradients)
    assert list(method) == ["self", "grads", "variables", "optimizer"]
    assert method["optimizer"] is None


def test_gradwatch_is_a_keras_callback_with_the_documented_arguments():
    assert inspect.isclass(gradwatch.GradWatch)
    assert issubclass(gradwatch.GradWatch, keras.callbacks.Callback)
    # The API tour of docs/guide.md, in its order, with `max_value_elements` from the docstring.
    assert _parameters(gradwatch.GradWatch) == {
        "variables": "*",
        "stats": ("norm", "mean", "std", "min", "max", "nonfinite"),
        "values": None,
        "every": 1,
        "histogram": False,
        "path": None,
        "flush_every": 1000,
        "max_value_elements": 1_000_000,
        "on_nonfinite": "warn",
        "max_norm": None,
        "min_norm": None,
        "on_threshold": "warn",
        "on_spike": "warn",
        "spike_window": 128,
        "spike_sigma": 6.0,
        "examples_every": None,
        "noise_scale_every": None,
        "tensorboard_dir": None,
        "sinks": None,
        "track": None,
        "per_replica": False,
        "all_workers": False,
        "verbose": "auto",
    }
    assert isinstance(inspect.getattr_static(gradwatch.GradWatch, "log"), property)
    assert isinstance(gradwatch.GradWatch().log, gradwatch.GradientLog)


def test_models_are_the_mixin_first_then_keras_and_registered_serializables():
    mixin = gradwatch.GradWatchMixin
    assert inspect.isclass(mixin) and not issubclass(mixin, keras.Model)
    assert _parameters(mixin.record_gradients) == {
        "self": inspect.Parameter.empty,
        "grads": inspect.Parameter.empty,
        "variables": inspect.Parameter.empty,
        "optimizer": None,
    }
    for cls, base in ((gradwatch.Sequential, keras.Sequential), (gradwatch.Model, keras.Model)):
        # (Keras swaps a `keras.Model` subclass's base for its Functional subclass once
        # the class is built from inputs and outputs: a subclass of `base` it stays.)
        assert cls.__bases__[0] is mixin and len(cls.__bases__) == 2, cls.__bases__
        assert issubclass(cls.__bases__[1], base), cls.__bases__
        mro = cls.__mro__
        assert mro.index(mixin) < mro.index(keras.Model)  # "mixin first"
        # docs/guide.md "Saving": registered Keras serializables, so load_model finds them.
        name = keras.saving.get_registered_name(cls)
        assert name == f"gradwatch>{cls.__name__}"
        assert keras.saving.get_registered_object(name) is cls


# The README's API tour and "Also:" line: what a GradientLog offers, by kind.
LOG_PROPERTIES = [
    "frame",
    "values_frame",
    "variables",
    "steps",
    "histograms",
    "alerts",
    "disconnected",
    "skipped_steps",
    "kept_steps",
    "origins",
    "superseded",
    "replicas",
    "stat_names",
    "shapes",
    "value_variables",
]
LOG_METHODS = {
    "gradient": ["variable", "step"],
    "stat": ["name", "replica"],
    "select": ["variables", "stats", "steps"],
    "histogram": ["variable", "step"],
    "global_norm": [],
    "by_layer": ["stat"],
    "summary": [],
    "first_nonfinite": [],
    "to_csv": ["path"],
    "to_parquet": ["path"],
    "key": ["name"],
    "diagnose": ["thresholds"],
}


def test_gradient_log_has_the_documented_properties_and_methods():
    cls = gradwatch.GradientLog
    assert inspect.isclass(cls)
    for name in LOG_PROPERTIES:
        assert isinstance(inspect.getattr_static(cls, name), property), name
    for name, params in LOG_METHODS.items():
        method = inspect.getattr_static(cls, name)
        assert inspect.isfunction(method), name
        assert list(_parameters(method)) == ["self", *params], name
    assert _parameters(cls.select) == {
        "self": inspect.Parameter.empty,
        "variables": None,
        "stats": None,
        "steps": None,
    }
    assert _parameters(cls.stat)["replica"] is None
    # `len(log)` and `log == other`; a log is mutable, so it has no hash.
    empty = cls()
    assert len(empty) == 0 and empty == cls() and cls.__hash__ is None


def test_read_log_is_a_function_of_a_path_and_an_optional_worker():
    assert inspect.isfunction(gradwatch.read_log)
    assert _parameters(gradwatch.read_log) == {"path": inspect.Parameter.empty, "worker": None}


def test_stats_are_the_documented_catalogue():
    # The README's "Stats" table, in its order, each with a one-line definition.
    assert isinstance(gradwatch.STATS, dict)
    assert list(gradwatch.STATS) == README_STATS
    for name, definition in gradwatch.STATS.items():
        assert isinstance(definition, str) and definition.strip(), name
        assert "\n" not in definition, name


def test_version_is_the_one_pyproject_reads():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"]
    source = ROOT / pyproject["tool"]["hatch"]["version"]["path"]
    found = re.findall(r'^__version__ = "([^"]+)"$', source.read_text(), flags=re.M)
    assert found == [gradwatch.__version__]
    # A release version as PEP 440 writes it (N.N.N, optionally a pre/post/dev part).
    assert re.fullmatch(
        r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", gradwatch.__version__
    )


_BLOCKED_EXTRAS = r"""
import importlib.util, sys, traceback

PACKAGE = importlib.util.find_spec("gradwatch").submodule_search_locations[0]
attempts = []

class BlockExtras:
    # Acts as if the optional extras were not installed, and notes who asked for them.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("matplotlib", "tqdm", "tensorboard", "selenium"):
            # The importer: the innermost frame outside importlib and this finder.
            frames = traceback.extract_stack()[:-1]
            importer = next(f for f in reversed(frames) if not f.filename.startswith("<"))
            if importer.filename.startswith(PACKAGE):
                attempts.append(name)
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, BlockExtras())
import numpy as np
import gradwatch, keras
model = gradwatch.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
model.compile("sgd", "mse")
watch = gradwatch.GradWatch()
model.fit(np.ones((8, 3)), np.ones((8, 2)), batch_size=4, callbacks=[watch], verbose=0)
watch.log.to_parquet(sys.argv[1])
assert gradwatch.read_log(sys.argv[1]) == watch.log
print(sorted(set(attempts)), len(watch.log))
"""


def test_core_neither_imports_nor_needs_the_optional_extras(tmp_path):
    # Keras itself imports matplotlib when it is installed; gradwatch must not ask for it
    # (or tqdm, or tensorboard), and must work without them.
    out = subprocess.run(
        [sys.executable, "-c", _BLOCKED_EXTRAS, str(tmp_path / "log.parquet")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "[] 2"


_OPTIONAL = ("matplotlib", "tqdm", "tensorboard", "selenium", "mlflow", "wandb")
_ON_DEMAND = (
    "gradwatch.plot",
    "gradwatch.cli",
    "gradwatch.report",
    "gradwatch.tensorboard",
    "gradwatch.progress",
)


def _python(code, *args):
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=HANG
    )
    assert out.returncode == 0, out.stderr
    return out


def test_import_does_not_pull_in_plotting_cli_or_tensorboard():
    # Keras itself imports matplotlib where it is installed, so compare with keras loaded.
    code = f"""
import sys
import keras, tensorflow
before = set(sys.modules)
import gradwatch
heavy = {(*_OPTIONAL, *_ON_DEMAND)!r}
new = set(sys.modules) - before
print(sorted(m for m in new if any(m == h or m.startswith(h + ".") for h in heavy)))
gradwatch.plot.flow  # the lazy attribute imports it
print("gradwatch.plot" in sys.modules)
"""
    assert _python(code).stdout.split("\n")[:2] == ["[]", "True"]


def test_missing_extras_give_an_error_naming_the_install_line(fitted, tmp_path):
    log = tmp_path / "grads.parquet"
    fitted[0].log.to_parquet(log)
    code = f"""
import importlib.abc, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {_OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, NotInstalled())
import gradwatch
try:
    gradwatch.plot
except ImportError as e:
    print(e)
from gradwatch.cli import main
log, out = sys.argv[1:]
print(main(["plot", log, "-o", out + ".png"]), main(["convert", log, out + ".csv"]))
print(main(["summary", log, "--csv"]))
from gradwatch.tensorboard import write_tensorboard
try:
    write_tensorboard(gradwatch.read_log(log), out + "_tb")
except ImportError as e:
    print(e)
"""
    run = _python(code, log, tmp_path / "out")
    lines = run.stdout.splitlines()
    assert lines[0] == (
        "gradwatch.plot needs matplotlib, which is not installed. Install it with: "
        "pip install 'gradwatch[plot]'"
    )
    # convert needs no extra: without tqdm it shows no progress bar.
    assert lines[1].startswith("Wrote ") and lines[2] == "2 0"
    assert lines[3].startswith("variable,first_norm")  # summary needs no extra
    assert lines[-1] == (
        "gradwatch.tensorboard writes event files with the tensorboard package, which is "
        "not installed. Install it with: pip install tensorboard"
    )
    err = run.stderr.splitlines()
    assert "gradwatch plot: error: gradwatch.plot needs matplotlib" in err[-1]
    assert err[-1].endswith("Install it with: pip install 'gradwatch[plot]'")
    assert (tmp_path / "out.csv").exists()


_BEFORE_LOADING = {
    "gradwatch-then-keras": "import gradwatch\nassert 'keras' not in sys.modules\nimport keras",
    "keras-then-gradwatch": "import keras\nimport gradwatch",
    # TensorFlow imports Keras while it is itself being imported.
    "gradwatch-then-tensorflow": "import gradwatch\nimport tensorflow\nimport keras",
}


@pytest.mark.parametrize("imports", _BEFORE_LOADING.values(), ids=_BEFORE_LOADING.keys())
def test_saved_model_loads_after_a_bare_import_gradwatch(tmp_path, imports):
    # `load_model` finds only registered classes; `import gradwatch` registers them
    # with Keras whether Keras is imported before or after it.
    model = gradwatch.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="net")
    model.compile("sgd", "mse")
    model.save(tmp_path / "model.keras")
    code = f"""
import sys
{imports}
model = keras.models.load_model(sys.argv[1])
print(type(model).__module__, type(model).__name__, model.name, model.count_params())
loaders = sys.modules["keras"].__loader__, sys.modules["keras"].__spec__.loader
print([type(loader).__name__ for loader in loaders])
print([type(f).__name__ for f in sys.meta_path if type(f).__module__.startswith("gradwatch")])
"""
    lines = _python(code, tmp_path / "model.keras").stdout.splitlines()
    assert lines[0] == "gradwatch.mixin Sequential net 8"
    # Keras keeps its own loader, and the finder is gone once Keras is in.
    assert lines[1] == "['SourceFileLoader', 'SourceFileLoader']"
    assert lines[2] == "[]"


_READ_ONLY = r"""
import sys
import gradwatch
from gradwatch.cli import main
from gradwatch.report import write_report
from gradwatch.tensorboard import write_tensorboard

path, out = sys.argv[1:]
log = gradwatch.read_log(path)
key, step = log.value_variables[0], int(log.steps[1])
log.frame, log.values_frame, log.histograms, log.alerts, log.stat("norm"), log.global_norm()
log.select(stats="norm", steps=slice(0, 4)), log.by_layer("norm"), log.summary()
log.gradient(key, step), log.histogram(key, step), log.first_nonfinite(), log.skipped_steps
log.origins, log.kept_steps
log.to_csv(out + ".csv")
log.to_parquet(out + ".parquet")
assert gradwatch.read_log(out + ".csv") == log == gradwatch.read_log(out + ".parquet")
gradwatch.plot.flow(log), gradwatch.plot.histogram(log, key)
write_report(log, out + ".html")
write_tensorboard(log, out + "_tb")
codes = [main(["summary", path, "--csv"]), main(["convert", path, out + "_2.csv"])]
codes += [main(["plot", path, "-o", out + ".png"]), main(["report", path, "-o", out + "_2.html"])]
codes += [main(["tensorboard", path, "--logdir", out + "_tb2"])]
heavy = ("keras", "tensorflow", "jax", "torch")
print(codes, sorted({m.split(".")[0] for m in sys.modules} & set(heavy)))
"""


def test_reading_a_log_imports_neither_keras_nor_tensorflow(fitted, tmp_path):
    # Reading, querying, writing, plotting, the report, TensorBoard and the command line:
    # none of them needs Keras or a backend.
    fitted[0].log.to_parquet(tmp_path / "grads.parquet")
    run = _python(_READ_ONLY, tmp_path / "grads.parquet", tmp_path / "out")
    assert run.stdout.splitlines()[-1] == "[0, 0, 0, 0, 0] []"


@pytest.mark.parametrize("how", ["console-script", "python-m"])
def test_the_command_line_imports_neither_keras_nor_tensorflow(fitted, tmp_path, how):
    fitted[0].log.to_parquet(tmp_path / "grads.parquet")
    command = [sys.executable, "-m", "gradwatch"]
    if how == "console-script":
        script = Path(sys.executable).with_name("gradwatch")
        require(script.exists(), f"no installed `gradwatch` console script at {script}")
        command = [str(script)]
    # Python lists every module it imports on stderr.
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    out = subprocess.run(
        [*command, "summary", str(tmp_path / "grads.parquet")],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in out.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert {"gradwatch", "pandas"} <= imported
    assert not imported & {"keras", "tensorflow", "jax", "torch"}


def _imports(package: Path) -> dict[str, set[str]]:
    """The gradwatch modules that each gradwatch module imports, at any depth in it
    (subpackages included; `gradwatch._backend` imports each backend module by name)."""
    paths = {}
    for p in package.rglob("*.py"):
        parts = p.relative_to(package.parent).with_suffix("").parts
        paths[".".join(parts).removesuffix(".__init__")] = p
    modules = set(paths)
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:  # `from gradwatch import io` imports gradwatch.io
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
                found.update(a.value for a in node.args if isinstance(a, ast.Constant))
        graph[module] = (found & modules) - {module}
    # The backend package picks its module with a computed name.
    graph["gradwatch._backend"] |= {m for m in modules if m.startswith("gradwatch._backend.")}
    graph["gradwatch._backend"] -= {"gradwatch._backend.base"}
    return graph


def test_package_modules_import_each_other_without_cycles():
    # A lazy import inside a function counts: the cycle is there whenever it runs.
    graph = _imports(Path(gradwatch.__file__).parent)
    # (`DOCTOR_STATS` is derived from the doctor's rules, on first use.)
    assert graph["gradwatch.stats"] == {
        "gradwatch._stats.specs",
        "gradwatch._stats.compute",
        "gradwatch._doctor.rules",
    }

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    cycles = {tuple(sorted((a, b))) for a in graph for b in reach(a) if a != b and a in reach(b)}
    assert cycles == set()
