"""Typed settings: dataclass defaults, then a YAML file, then `key=value` overrides.

Settings are grouped in sections (data, aug, model, optim, run). Every field name is unique
across sections, so users write the bare key (`lr=0.1`) or the dotted one (`optim.lr=0.1`),
and YAML files may be flat or nested. Unknown keys and values of the wrong type are errors
that say what to fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from imgcls import recipes  # torch-free, like this module
from imgcls.errors import UserError


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 64  # px, side of the square image the model trains on (at the end of progressive resizing)
    cache_size: int = 0  # px, side of the decoded cache; 0 = the larger of image_size and eval_size
    eval_size: int = 0  # px the model is scored and predicts at; 0 = image_size (FixRes: larger than image_size)
    eval_crop: float = 0.875  # the evaluation view: the centre crop of this fraction of the cache's side, resized to
    #                           eval_size (1 = the whole image); training crops zoom in, this zooms the test view
    #                           alike: +3.2 points on food-10 at 5 epochs (3 seeds), +2.8 on tiny-imagenet/20
    prog_scale: float = 1.0  # progressive resizing: the first epochs train at this fraction of image_size; 1 = off
    prog_end: float = 0.75  # ... growing to image_size by this fraction of the run, full size after it
    resize: str = "center_crop"  # how a photo becomes square in the cache: center_crop (short side, centre) | squash
    val_fraction: float = 0.0  # >0: re-split train:val with this held-out fraction (stratified)
    split_seed: int = -1  # seed of the held-out split and of subset=; -1 = seed (imgcls tune fixes it for a study)
    holdout: str = "val"  # val | none: none trains on every labelled image (train + val), keeping the last weights
    subset: float = 0.0  # 0 = all; a fraction in (0, 1) of each class, or an integer N >= 1 = N images per class,
    #                      of train and of val each (stratified, seeded); the test split stays whole
    strict: bool = False  # true: an unreadable training image is an error instead of a skip
    cache_dir: str = ""  # "" = $IMGCLS_CACHE or ~/.cache/imgcls
    decode_workers: int = 0  # processes decoding the cache; 0 = all cores


def eval_size(data: DataConfig) -> int:
    """px the model is scored and predicts at."""
    return data.eval_size or data.image_size


def cache_size(data: DataConfig) -> int:
    """px of the decoded cache: what eval and the crops for training draw from."""
    return data.cache_size or max(data.image_size, eval_size(data))


@dataclass(frozen=True)
class AugConfig:
    aug: str = "auto"  # preset: auto (by epochs: recipes.aug_for) | short | light | medium | medium-mix | strong | custom (the keys below as set)
    crop_scale: tuple[float, float] = (0.35, 1.0)  # random-resized-crop area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random-resized-crop aspect range
    hflip: float = 0.5  # probability of a horizontal flip
    rotate: float = 0.0  # degrees, uniform in [-rotate, rotate]
    translate: float = 0.0  # fraction of the side, uniform shift with reflect padding
    brightness: float = 0.0  # colour jitter strengths, as in torchvision ColorJitter
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale: float = 0.0  # probability of converting to greyscale
    policy: str = "none"  # none | randaugment | trivialaugment
    policy_ops: int = 2  # RandAugment: ops per image
    policy_magnitude: int = 9  # RandAugment: magnitude 0..30
    erasing: float = 0.0  # probability of random erasing (cutout) per image
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) for mixup; 0 = off
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) for cutmix; 0 = off
    mix_prob: float = 1.0  # probability that a batch (or sample) is mixed
    mix_mode: str = "batch"  # batch | sample: one lambda per batch or per sample
    mix_off_epochs: int = 0  # switch mixing off for the last N epochs


@dataclass(frozen=True)
class ModelConfig:
    model: str = "auto"  # a registered name (`imgcls models`), timm:<name>, or auto (by image_size: recipes.model_for)
    width: int = 0  # channels of the first stage of a built-in model; 0 = the model's default
    dropout: float = 0.0  # before the classifier
    init: str = ""  # path to initial weights (.safetensors); recorded with its sha256
    pretrained: str = "off"  # off | forbid (forbid also refuses init=)
    mean_std: str = "auto"  # input normalization: imagenet | model (a timm model's pretrained_cfg) | auto (model with init=)


DEFAULT_OPTIMIZER = "muon"


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = DEFAULT_OPTIMIZER  # muon | lamb | sgd (Nesterov) | adamw | ranger (Lookahead + RAdam): recipes.OPTIMIZERS
    lr: float = 0.0  # peak learning rate per 512 images of global batch (scaled linearly); 0 = the optimizer's default
    weight_decay: float = recipes.OPTIMIZERS[DEFAULT_OPTIMIZER].weight_decay  # unset: the optimizer's default
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "flat_cos"  # flat_cos | cosine | linear | onecycle, after warmup_epochs of linear warmup
    warmup_epochs: float = 1.0  # at most a fifth of the run
    decay_start: float = 0.72  # flat_cos: the fraction of the run at the peak before the cosine decay starts
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of the peak
    label_smoothing: float = 0.1
    focal_gamma: float = 0.0  # >0: focal loss (works with soft targets)
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimizer step
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    ema: float = "auto"  # EMA decay per optimizer step (e.g. 0.999); 0 = off; auto = averaging the last 10% of the steps
    #   (the decay warms up as (1 + n) / (10 + n): no decay averages more than about the last ninth of the steps so far)
    lr_backbone: float = 1.0  # fine-tuning: lr of every parameter but the classifier's, as a multiple of lr
    freeze_epochs: int = 0  # fine-tuning: train the classifier alone for the first N epochs


@dataclass(frozen=True)
class RunConfig:
    epochs: int = 10  # or auto: as many as fit in time_limit= (planned after a short calibration)
    batch_size: int = 32  # global batch, independent of the number of ranks (small: more steps on small data); unset: by image_size (recipes.batch_for)
    eval_batch_size: int = 512
    seed: int = 0
    seeds: tuple[int, ...] = ()  # repeats: train once per seed and summarize
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto | bf16 | fp16 | off (auto: by device, see hardware.auto_amp; fp16 uses a GradScaler)
    channels_last: str = "auto"  # auto | true | false (auto: on with amp, and on the CPU)
    threads: int = "auto"  # torch's CPU threads: auto (on the CPU, the count that trains fastest now: process.ThreadTuner) | N
    compile: bool = False  # torch.compile the model
    deterministic: bool = False
    data_on_device: str = "auto"  # auto | true | false: keep the whole cache on the GPU
    time_limit: str = ""  # e.g. 11h30m: stop cleanly before this wall time
    checkpoint_minutes: float = 0.0  # also checkpoint mid-epoch this often; 0 = epoch ends only
    resume: str = ""  # run directory to continue from
    tensorboard: bool = False
    sync_bn: bool = False
    progress: bool = True  # progress bars


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return {s.name: _plain(dataclasses.asdict(getattr(self, s.name))) for s in dataclasses.fields(self)}


SECTIONS = [f.name for f in dataclasses.fields(Config)]


def _plain(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@functools.cache
def key_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """bare key -> (section, field)."""
    index = {}
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(section.default_factory)
        for f in dataclasses.fields(section.default_factory):
            assert f.name not in index, f"duplicate config key {f.name}"
            index[f.name] = (section.name, f, hints[f.name])
    return index


def parse_duration(text: str) -> float:
    """'11h30m', '90m', '45s', '2h' or plain seconds -> seconds."""
    text = str(text).strip()
    if not text:
        return 0.0
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not m or not any(m.groups()):
        raise UserError(f"time_limit={text!r} is not a duration: write it like 11h30m, 90m or 45s.")
    h, mi, s = (int(g or 0) for g in m.groups())
    return h * 3600 + mi * 60 + s


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a YAML value or a command-line string into the field's type, or say what is wrong."""
    def bad(expected: str):
        return UserError(f"{key}={value!r} has the wrong type: expected {expected}.")

    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        items = value
        if isinstance(value, str):
            items = [v for v in re.split(r"[,\s]+", value.strip("()[] ")) if v]
        if isinstance(items, (int, float)):
            items = [items]
        if not isinstance(items, (list, tuple)):
            raise bad("a list like 1,2,3")
        elem = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, v, elem) for v in items)
        if len(items) != len(args):
            raise bad(f"{len(args)} comma-separated numbers")
        return tuple(_coerce(key, v, a) for v, a in zip(items, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise bad("true or false")
    if hint is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise bad("an integer")
    if hint is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    if hint is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise bad("a string")
        return str(value)
    raise TypeError(f"unsupported config type {hint} for {key}")


CHOICES = {
    "resize": ("squash", "center_crop"),
    "holdout": ("val", "none"),
    "policy": ("none", "randaugment", "trivialaugment"),
    "mix_mode": ("batch", "sample"),
    "pretrained": ("off", "forbid"),
    "mean_std": ("auto", "imagenet", "model"),
    "optimizer": tuple(recipes.OPTIMIZERS),
    "schedule": ("cosine", "flat_cos", "linear", "onecycle"),
    "aug": ("custom", "auto", *recipes.AUG_PRESETS),
    "device": ("auto", "cpu", "cuda"),
    "amp": ("auto", "bf16", "fp16", "off"),
    "channels_last": ("auto", "true", "false"),
    "data_on_device": ("auto", "true", "false"),
}


AUTO = {"epochs", "ema", "threads"}  # number keys that also take the word auto


def _set(values: dict[str, dict[str, Any]], given: set[str], key: str, value: Any, index) -> None:
    """Check one key=value and put it into values[section][key]; `given` records the bare key."""
    bare = key.split(".", 1)[1] if "." in key else key
    if "." in key and key.split(".", 1)[0] not in SECTIONS:
        raise UserError(f"Unknown config section in {key!r}: sections are {', '.join(SECTIONS)}.")
    if bare not in index:
        close = difflib.get_close_matches(bare, index, n=3, cutoff=0.7) or [k for k in index if k.startswith(bare[:3])]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"Unknown config key {key!r}.{hint} Run `imgcls train --help-config` for all keys.")
    section, f, hint_type = index[bare]
    if "." in key and key.split(".", 1)[0] != section:
        raise UserError(f"{bare} belongs to section {section!r}, not {key.split('.', 1)[0]!r}.")
    value = "auto" if bare in AUTO and str(value).strip().lower() == "auto" else _coerce(bare, value, hint_type)
    if bare in CHOICES and value not in CHOICES[bare]:
        raise UserError(f"{bare}={value!r} is not one of {', '.join(CHOICES[bare])}.")
    values[section][bare] = value
    given.add(bare)


def coerce_key(key: str, value: Any) -> Any:
    """A value for the bare `key`, turned into its type and checked against its choices (UserError if wrong)."""
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    _set(values, set(), key, value, key_index())
    return values[key_index()[key][0]][key]


def _layer(values: dict[str, dict[str, Any]], given: set[str], layer: dict[str, Any], index) -> None:
    """A flat or section-nested mapping of settings into `values`."""
    for key, value in layer.items():
        if key in SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                _set(values, given, f"{key}.{k}", v, index)
        else:
            _set(values, given, key, value, index)


def with_values(cfg: Config, **values: Any) -> Config:
    """A new Config with these bare keys changed (values already of the right type): settings are never
    edited in place, so a settled config stays what was saved."""
    index = key_index()
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        sections.setdefault(index[key][0], {})[key] = value
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **changed)
                                       for name, changed in sections.items()})


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"Override {item!r} is not of the form key=value (e.g. epochs=30).")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A settings file: a path, or the name of a preset shipped in the package (imgcls/presets)."""
    from imgcls import presets

    found = presets.find(path)
    if found is None:
        raise UserError(f"Config file {path} does not exist, and it is not the name of a preset "
                        f"({', '.join(presets.names())}; `imgcls presets` says what each is for).")
    path = found
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"Config file {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"Config file {path} must hold a mapping of key: value, not {type(values).__name__}.")
    return values


class Resolved(NamedTuple):
    cfg: Config
    given: frozenset[str]  # the bare keys set by the defaults, the file or the overrides: recipes never change them


def resolve_given(*, defaults: dict[str, Any] | None = None, file: str | Path | None = None,
                  overrides: list[str] | dict[str, Any] = ()) -> Resolved:
    """Defaults (e.g. per dataset layout) <- YAML file <- key=value overrides, then the recipe's values for
    every `auto` and unset key (recipes.filled); returns the Config and the keys that were given."""
    index = key_index()
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    given: set[str] = set()
    if defaults:
        _layer(values, given, defaults, index)
    if file:
        try:
            _layer(values, given, load_yaml(file), index)
        except UserError as e:
            raise UserError(f"In {file}: {e}") from None
    if overrides:
        _layer(values, given, overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)), index)
    cfg = Config(**{f.name: f.default_factory(**values[f.name]) for f in dataclasses.fields(Config)})
    cfg = with_values(cfg, **recipes.filled(cfg, given))
    validate(cfg)
    return Resolved(cfg, frozenset(given))


def resolve(*, defaults: dict[str, Any] | None = None, file: str | Path | None = None,
            overrides: list[str] | dict[str, Any] = ()) -> Config:
    """resolve_given(...).cfg: the settings alone."""
    return resolve_given(defaults=defaults, file=file, overrides=overrides).cfg


# Per-layout defaults, under the user's YAML and key=value overrides. An imagefolder can hold anything, so
# it takes the measured size of the layout its images are like (layout_defaults).
LAYOUT_DEFAULTS = {
    "food-11": {"image_size": 128},
    "tiny-imagenet": {"image_size": 64},
}


def layout_defaults(root: Path, *, size_given: bool = False) -> dict[str, Any]:
    """The defaults for the dataset at `root`: its layout's, and for an imagefolder food-11's 128 px when its
    training photos' median short side is 128 px or more (not upscaled), else tiny-imagenet's 64 px (no
    headers read when the user's image_size wins anyway)."""
    from imgcls import layouts

    layout = layouts.detect(root)
    if layout in LAYOUT_DEFAULTS:
        return LAYOUT_DEFAULTS[layout]
    if size_given:
        return {}
    side = layouts.median_short_side(root / "train")  # a few headers, not a listing of the whole dataset
    return {"image_size": 128 if side and side >= 128 else 64}


def for_data(data: str | Path | None, file: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
             defaults: dict[str, Any] | None = None) -> Resolved:
    """Settings for a dataset: `defaults` (else layout_defaults', e.g. 128 px for food-11) <- the YAML file
    (a path or a preset's name) <- `overrides` (key -> value, as key=value on the command line)."""
    if defaults is None and data and Path(data).expanduser().is_dir():
        given_size = any(key.split(".")[-1] == "image_size" for key in overrides or {})
        defaults = layout_defaults(Path(data).expanduser(), size_given=given_size)
    return resolve_given(defaults=defaults or {}, file=file, overrides=dict(overrides or {}))


def with_epochs(cfg: Config, epochs: int, given: frozenset[str]) -> Config:
    """The settings of a run of `epochs` epochs: with aug=auto (or a preset), the preset for that length
    fills the aug keys not in `given` (epochs=auto settles here, once its plan is known)."""
    return with_values(cfg, epochs=epochs, **recipes.aug_values(cfg.aug.aug, epochs, given))


def validate(cfg: Config) -> None:
    checks = [
        (cfg.data.image_size >= 8, f"image_size must be at least 8 px, got {cfg.data.image_size}."),
        (cfg.run.epochs == "auto" or cfg.run.epochs >= 1, f"epochs must be at least 1 (or auto), got {cfg.run.epochs}."),
        (cfg.run.epochs != "auto" or cfg.run.time_limit,
         "epochs=auto plans the schedule to fit time_limit=: give one too (e.g. time_limit=11h30m), or set epochs=N."),
        (cfg.run.batch_size >= 1, f"batch_size must be at least 1, got {cfg.run.batch_size}."),
        (cfg.run.threads == "auto" or cfg.run.threads >= 1, f"threads must be auto or at least 1, got {cfg.run.threads}."),
        (cfg.optim.lr > 0, f"lr must be positive, got {cfg.optim.lr}."),
        (0 < cfg.data.eval_crop <= 1, f"eval_crop is the evaluation view's fraction of the side, in (0, 1], got {cfg.data.eval_crop}."),
        (0 <= cfg.data.val_fraction < 1, f"val_fraction must be in [0, 1), got {cfg.data.val_fraction}."),
        (cfg.data.subset >= 0 and (cfg.data.subset < 1 or float(cfg.data.subset).is_integer()),
         f"subset is a fraction in (0, 1) of each class or a whole number of images per class, got "
         f"{cfg.data.subset}; e.g. subset=0.1 or subset=20 (0 = every image)."),
        (cfg.optim.lr_backbone >= 0, f"lr_backbone is a multiple of lr (0 freezes the backbone), got {cfg.optim.lr_backbone}."),
        (cfg.optim.freeze_epochs >= 0, f"freeze_epochs must be 0 or more, got {cfg.optim.freeze_epochs}."),
        (cfg.optim.accum_steps >= 1, f"accum_steps must be at least 1, got {cfg.optim.accum_steps}."),
        (cfg.optim.ema == "auto" or 0 <= cfg.optim.ema < 1, f"ema is a decay in [0, 1) or auto, got {cfg.optim.ema}."),
        (0 <= cfg.optim.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {cfg.optim.label_smoothing}."),
        (0 < cfg.aug.crop_scale[0] <= cfg.aug.crop_scale[1] <= 1,
         f"crop_scale must be two fractions lo,hi with 0 < lo <= hi <= 1, got {cfg.aug.crop_scale}."),
        (not (cfg.model.pretrained == "forbid" and cfg.model.init),
         f"pretrained=forbid refuses initial weights, but init={cfg.model.init!r} was given. "
         "Remove init= or set pretrained=off."),
        (cfg.run.batch_size % cfg.optim.accum_steps == 0,
         f"batch_size={cfg.run.batch_size} must be divisible by accum_steps={cfg.optim.accum_steps}."),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    parse_duration(cfg.run.time_limit)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe() -> str:
    """One line per key: section.key = default  # comment (for --help-config)."""
    lines = []
    for section in dataclasses.fields(Config):
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(section.default_factory):
            lines.append(f"  {f.name} = {getattr(section.default_factory(), f.name)!r}")
    return "\n".join(lines)
