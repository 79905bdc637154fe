"""imgcls: train image classifiers from scratch on small datasets and write correct submissions.

The Python API (imgcls/api.py), imported on first use so that `import imgcls` stays light (no torch):

    import imgcls
    found = imgcls.inspect("food-11")                       # layout, counts, unreadable files, errors
    result = imgcls.train("food-11", "runs/food", epochs=5)  # -> TrainResult (run_dir, best_val_acc, ...)
    imgcls.predict(["runs/food"], "food-11", "sub.csv", tta=8)
"""

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "train": "imgcls.api", "cv": "imgcls.api", "predict": "imgcls.api", "report": "imgcls.api",
    "preview": "imgcls.api", "inspect": "imgcls.api", "demo": "imgcls.api", "InspectResult": "imgcls.api",
    "check": "imgcls.api", "CheckResult": "imgcls.checking", "tune": "imgcls.api", "TuneResult": "imgcls.tuning",
    "UserError": "imgcls.errors", "TrainResult": "imgcls.training", "CvResult": "imgcls.crossval",
    "RepeatsResult": "imgcls.repeats", "PredictResult": "imgcls.ensemble",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """PEP 562: the API is imported when first used. (No submodule shares a public name, so importing
    imgcls.training and the like never shadows imgcls.train.)"""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'imgcls' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
