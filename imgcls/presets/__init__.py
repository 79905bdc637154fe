"""The presets shipped inside the package: `--config food11` (or `tiny-imagenet`, and their `-light` /
`-strong` variants) names one of the YAML files in this folder, so a wheel installed on Kaggle has
them; a path to a YAML file works as well. Each file's first two lines say what it is for and the
measured figure behind it (`# for: ...`, `# measured: ...`); `imgcls presets` lists them."""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    purpose: str  # what it is for
    measured: str  # the figure behind it


def folder() -> Path:
    return Path(str(resources.files(__name__)))


def names() -> list[str]:
    return sorted(p.stem for p in folder().glob("*.yaml"))


def _header(path: Path, key: str) -> str:
    for line in path.read_text().splitlines():
        if line.startswith(f"# {key}:"):
            return line.split(":", 1)[1].strip()
    return ""


def listing() -> list[Preset]:
    return [Preset(n, folder() / f"{n}.yaml", _header(folder() / f"{n}.yaml", "for"),
                   _header(folder() / f"{n}.yaml", "measured")) for n in names()]


def find(config: str | Path) -> Path | None:
    """The YAML file `--config` means: a packaged preset by name (`food11`, `food11.yaml`), else the path
    itself; None when it is neither a preset nor an existing file."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    name = str(config).removesuffix(".yaml")
    return folder() / f"{name}.yaml" if name in names() else None
