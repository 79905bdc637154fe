"""Submission writers: validate ids, row count and label range, then write atomically."""
from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

from imgcls import tmpfiles
from imgcls.errors import UserError
from imgcls.layouts import Dataset


def rows_for(ds: Dataset, predictions: dict[str, int]) -> list[tuple[str, int]]:
    """(id, label) rows in the layout's order: the template's order when there is one, else sorted ids."""
    test_ids = [s.id for s in ds.splits.get("test", [])]
    problems = []
    dupes = [i for i, n in Counter(test_ids).items() if n > 1]
    if dupes:
        problems.append(f"test ids occur more than once: {dupes[:5]}")
    missing = sorted(set(test_ids) - set(predictions))
    extra = sorted(set(predictions) - set(test_ids))
    if missing:
        problems.append(f"{len(missing)} test image(s) have no prediction (e.g. {missing[:3]})")
    if extra:
        problems.append(f"{len(extra)} prediction(s) are for ids that are not test files (e.g. {extra[:3]})")
    bad = {i: y for i, y in predictions.items() if not (isinstance(y, int) and 0 <= y < ds.num_classes)}
    if bad:
        problems.append(f"{len(bad)} label(s) are outside 0..{ds.num_classes - 1} (e.g. {list(bad.items())[:3]})")
    order = ds.template if ds.template is not None else sorted(test_ids)
    if ds.template is not None and (len(order) != len(test_ids) or set(order) != set(test_ids)):
        problems.append("the submission template's ids do not match the test files")
    if problems:
        raise UserError("Refusing to write a wrong submission: " + "; ".join(problems) + ".")
    return [(i, predictions[i]) for i in order]


def write(ds: Dataset, predictions: dict[str, int], path: str | Path) -> Path:
    """Validate, then write `path` atomically (temp file + rename): never a half-written CSV."""
    rows = rows_for(ds, predictions)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(ds.id_header)
    writer.writerows(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpfiles.write_text(path, buf.getvalue())
    return path
