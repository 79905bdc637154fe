"""The Python API (issue 14): `import imgcls` stays light, every API function returns the figures it
wrote to disk, mistakes raise imgcls.UserError with the CLI's message, and the package has no import
cycle and no module that would shadow an API function."""
from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import imgcls
from conftest import FAST
from imgcls import cli, config

SETTINGS = config.parse_overrides(FAST)  # the same keys as key=value, as keyword arguments
PACKAGE = Path(imgcls.__file__).parent


def test_import_imgcls_does_not_import_torch():
    code = "import sys, imgcls; imgcls.UserError; imgcls.__version__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def imports_of(path: Path) -> set[str]:
    """The imgcls modules a file imports anywhere in it (function-level imports too)."""
    modules = {f"imgcls.{p.relative_to(PACKAGE).with_suffix('').as_posix().replace('/', '.')}".removesuffix(".__init__")
               for p in PACKAGE.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imgcls"):
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
            if node.module in modules and node.module != "imgcls":
                found.add(node.module)
    return found


def test_no_import_cycle_and_no_module_named_like_an_api_function():
    graph = {}
    for p in PACKAGE.rglob("*.py"):
        name = f"imgcls.{p.relative_to(PACKAGE).with_suffix('').as_posix().replace('/', '.')}".removesuffix(".__init__")
        graph[name] = imports_of(p) - {name}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                pytest.fail(f"import cycle: {' -> '.join(path + [node, nxt])}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    # `from imgcls import train` must never find a module where the API function is meant.
    assert not {f"imgcls.{name}" for name in imgcls._EXPORTS} & set(graph)


def test_every_api_function_returns_the_figures_it_wrote(food11_tiny, tmp_path):
    found = imgcls.inspect(food11_tiny, decode_workers=1, progress=False)
    assert (found.layout, found.counts, found.ok) == ("food-11", {"train": 24, "val": 9, "test": 5}, True)

    grid = imgcls.preview(food11_tiny, tmp_path / "preview", views=3, images=2, **SETTINGS)
    assert grid == tmp_path / "preview" / "grid.png" and grid.is_file()

    result = imgcls.train(food11_tiny, tmp_path / "run", verbose=False, **{**SETTINGS, "epochs": 3})
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.best_val_acc == max(m["val_acc"] for m in metrics)
    assert result.final_val_acc == metrics[-1]["val_acc"] and result.epochs_done == len(metrics) == 3
    assert metrics[result.best_epoch - 1]["val_acc"] == result.best_val_acc
    assert result.submission == tmp_path / "run" / "submission.csv" and result.stopped == "done"
    assert result.report.path == tmp_path / "run" / "report.html" and result.report.path.is_file()
    assert imgcls.report(tmp_path / "run") == tmp_path / "run" / "report.html"

    predicted = imgcls.predict(tmp_path / "run", food11_tiny, tmp_path / "sub.csv", tta=2, device="cpu", progress=False)
    with open(tmp_path / "sub.csv") as f:
        assert predicted.rows == len(list(csv.reader(f))) - 1 == 5
    assert predicted.heldout["images"] == 9 and predicted.probs.is_file()

    repeats = imgcls.train(food11_tiny, tmp_path / "rep", verbose=False, seeds=(1, 2), **SETTINGS)
    summary = json.loads((tmp_path / "rep" / "seeds.json").read_text())
    assert repeats.final_val_acc == summary["final_val_acc"] and repeats.seeds == [1, 2] and not repeats.failed

    folds = imgcls.cv(food11_tiny, tmp_path / "cv", folds=2, verbose=False, **SETTINGS)
    saved = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert (folds.oof_acc, folds.fold_acc, folds.per_fold) == (saved["oof_acc"], saved["fold_acc"], saved["per_fold"])
    assert folds.submission == tmp_path / "cv" / "submission.csv" and folds.report.path.is_file()


def test_user_errors_raise_with_the_message_the_cli_prints(food11_tiny, tmp_path, capsys):
    with pytest.raises(imgcls.UserError) as raised:
        imgcls.train(food11_tiny, tmp_path / "r", verbose=False, **{**SETTINGS, "epochs": 0})
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "r"), *FAST, "epochs=0"]) == 1
    assert capsys.readouterr().err.strip() == f"imgcls train: error: {raised.value}"
    with pytest.raises(imgcls.UserError, match="Unknown config key 'epoch'"):
        imgcls.train(food11_tiny, tmp_path / "r", epoch=3)


def test_verbose_false_prints_nothing(food11_tiny, tmp_path, capsys):
    imgcls.train(food11_tiny, tmp_path / "run", verbose=False, **SETTINGS)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_quickstart_notebook_runs_top_to_bottom(tmp_path):
    """examples/quickstart.ipynb, executed as a user would (inspect, preview, train, report inline,
    predict with TTA, a seeds ensemble), so it cannot rot."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(PACKAGE.parent / "examples" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 3  # the preview grid, the curves, the confusion matrix
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "best val_acc" in text and "ensemble:" in text and (tmp_path / "quickstart" / "submission_ensemble.csv").is_file()
