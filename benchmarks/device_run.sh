#!/usr/bin/env bash
# What the device tool's `run` calls (issue 34): set up imgcls on a bare GPU machine from what travels
# with the tree, run benchmarks/gpu_check.py and one full --config tiny-imagenet training with
# epochs=auto time_limit= on a carried tiny-imagenet-100 subset, and print a short table last. On a
# lent device, two calls (--skip train, then --skip gpu_check: BENCHMARKS.md says why).
#
#   bash benchmarks/device_run.sh [--data .devdata/tiny-imagenet-100-first60.tar.gz] [--wheels .whl]
#       [--device cuda|cpu] [--time-limit 120] [--gpu-check-timeout 240] [--gpu-check-args ARGS]
#       [--skip gpu_check] [--skip train] [--work DIR] [-- key=value ...]
#
# Paths are relative to the repository root. --data: a tiny-imagenet folder or a .tar.gz of one
#   (benchmarks/subset_tiny.py cuts it; its SUBSET.txt says what it holds). --wheels: kornia + kornia_rs
#   wheels for the machine's Python, installed with pip --no-index --target only when `import kornia`
#   fails (the H200 image has no kornia), and timm's wheel when the installed timm has no nmuon
#   optimizer (the recipe's Muon; timm 1.0.22 and later).
# --time-limit: the training's time_limit= in seconds (imgcls plans the epochs to end with a submission
#   inside it). --gpu-check-timeout: seconds before gpu_check.py is stopped (its lines so far stay in the
#   log); --gpu-check-args: its arguments (default "--models resnet18d --epochs 2": the recipe's model at
#   64 and 128 px, then every path; not yet timed on a GPU; "--quick" with --device cpu).
# Arguments after -- go to `imgcls train` too (the CPU test passes a tiny model).
# Every step runs even after one fails; the exit status is 1 if any failed. Everything printed goes to
# $OUT/log.txt and the table to $OUT/summary.txt, beside the run's submission.csv, metrics.jsonl,
# plan.json, config.yaml and report.html: 7 files, within what the device tool brings back (8).
# $OUT defaults to runs/device-run. The working files (run folder, image cache) go to --work
# (default: a temporary folder, removed at the end). $PYTHON (default python3) runs everything; $COMMIT
# names the commit in the table where the copy has no .git folder.
set -u -o pipefail
export PYTHONUNBUFFERED=1

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
DATA=.devdata/tiny-imagenet-100-first60.tar.gz
WHEELS=.whl
DEVICE=cuda
TIME_LIMIT=120
GC_TIMEOUT=240
GC_ARGS=
SKIP=" "
WORK=
TRAIN_ARGS=()
while [ $# -gt 0 ]; do
    case $1 in
        --data) DATA=$2; shift ;;
        --wheels) WHEELS=$2; shift ;;
        --device) DEVICE=$2; shift ;;
        --time-limit) TIME_LIMIT=$2; shift ;;
        --gpu-check-timeout) GC_TIMEOUT=$2; shift ;;
        --gpu-check-args) GC_ARGS=$2; shift ;;
        --skip) SKIP+="$2 "; shift ;;
        --work) WORK=$2; shift ;;
        --) shift; TRAIN_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
        *) echo "device_run.sh: unknown argument $1 (--help lists them)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$GC_ARGS" ]; then
    if [ "$DEVICE" = cpu ]; then GC_ARGS=--quick; else GC_ARGS="--models resnet18d --epochs 2"; fi
fi
OUT=${OUT:-$REPO/runs/device-run}
mkdir -p "$OUT"
if [ -z "$WORK" ]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/imgcls-device-run.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
: >"$WORK/steps.tsv"
export IMGCLS_CACHE=${IMGCLS_CACHE:-$WORK/cache}  # the image caches stay in --work
DATA_DIR=

# step NAME: run the function NAME in this shell (its exports stay), time it, record status and ms.
step() {
    local name=$1 t0 rc
    if [[ $SKIP == *" $name "* ]]; then
        printf '%s\tSKIP\t0\n' "$name" >>"$WORK/steps.tsv"
        return
    fi
    echo; echo "=== $name  $(date '+%H:%M:%S') ==="
    t0=$(date +%s%N)
    "$name"
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" >>"$WORK/steps.tsv"
    [ $rc -eq 0 ] || echo "=== $name FAILED (exit $rc) ==="
}

setup() {
    local need=() wheels=() carried=() site= how_wheels="none needed" name wheel how_imgcls
    # kornia, and timm with nmuon (imgcls's default optimizer, timm 1.0.22 and later; an older timm gets the
    # carried one): one interpreter start asks both.
    read -r -a need < <("$PY" - 2>/dev/null <<'PY'
need = []
try:
    import kornia  # noqa: F401
except Exception:  # not installed, or broken: the carried wheel
    need += ["kornia", "kornia_rs"]
try:
    import timm.optim
    if "nmuon" not in timm.optim.list_optimizers():
        need.append("timm")
except Exception:  # not installed, or broken: the carried wheel
    need.append("timm")
print(" ".join(need))
PY
)
    if [ ${#need[@]} -gt 0 ]; then
        for name in "${need[@]}"; do
            wheel=$(ls "$WHEELS/$name"-[0-9]*.whl 2>/dev/null | head -1)
            [ -n "$wheel" ] || { echo "$name is needed and $WHEELS holds no $name-*.whl"; return 1; }
            wheels+=("$wheel")
            carried+=("$(basename "$wheel" | cut -d- -f1,2)")
        done
        site=$WORK/site
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --root-user-action=ignore \
            --upgrade --target "$site" "${wheels[@]}" || return 1
        how_wheels="carried: ${carried[*]}"
    fi
    # gpu_check.py runs `git rev-parse` for its header and would stop at a missing git binary: a stand-in
    # that fails makes it print "commit ?" as it does without a .git folder.
    if ! command -v git >/dev/null; then
        mkdir -p "$WORK/bin" && printf '#!/bin/sh\nexit 1\n' >"$WORK/bin/git" && chmod +x "$WORK/bin/git"
        export PATH="$WORK/bin:$PATH"
    fi
    # The tree's imgcls first, whatever else is installed; then the carried wheels.
    export PYTHONPATH="$REPO${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
    if "$PY" -m pip show imgcls >/dev/null 2>&1; then
        how_imgcls="PYTHONPATH (an imgcls is installed)"
    elif "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --root-user-action=ignore -e "$REPO"; then
        how_imgcls="pip install -e ."
    else
        how_imgcls="PYTHONPATH (pip install -e . failed)"
    fi
    "$PY" - "$REPO" "$how_wheels" "$how_imgcls" "$WORK/setup.detail" <<'EOF'
import sys
from pathlib import Path

import imgcls
import kornia
import timm

repo, how_wheels, how_imgcls, detail = sys.argv[1:]
assert Path(imgcls.__file__).resolve().is_relative_to(Path(repo).resolve()), f"imgcls is {imgcls.__file__}, not this tree's"
line = f"kornia {kornia.__version__}, timm {timm.__version__} ({how_wheels}); imgcls {imgcls.__version__} from the tree: {how_imgcls}"
print(line)
Path(detail).write_text(line + "\n")
EOF
}

environment() {
    command -v nvidia-smi >/dev/null && nvidia-smi
    echo "host: $(uname -srm), $(getconf _NPROCESSORS_ONLN) CPUs, $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}') memory"
    local commit
    if commit=$(git -C "$REPO" log -1 --format='%h' 2>/dev/null); then
        [ -z "$(git -C "$REPO" status --porcelain --untracked-files=no)" ] || commit+=" (with uncommitted changes)"
    else
        commit="${COMMIT:-?} (no .git in this copy)"
    fi
    echo "commit: $commit"
    "$PY" - "$DEVICE" "$commit" "$WORK/environment.detail" <<'EOF'
import platform
import sys
from pathlib import Path

import numpy
import timm
import torch
import torchvision

device, commit, detail = sys.argv[1:]
print(f"Python {platform.python_version()} ({sys.executable}); torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}), torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"numpy {numpy.__version__}")
gpu = "no GPU"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    gpu = f"{p.name} (compute capability {p.major}.{p.minor}, {p.total_memory / 2 ** 30:.0f} GiB)"
    print(f"GPU: {gpu}, {torch.cuda.device_count()} visible; kernels for {' '.join(torch.cuda.get_arch_list())}")
Path(detail).write_text(f"{gpu}, torch {torch.__version__}, Python {platform.python_version()}, device={device}, "
                        f"commit {commit}\n")
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("--device cuda: torch sees no GPU")
EOF
}

data() {
    if [ -f "$DATA" ]; then
        mkdir -p "$WORK/data" && tar -xzf "$DATA" -C "$WORK/data" || return 1
        DATA_DIR=$(find "$WORK/data" -mindepth 1 -maxdepth 1 -type d | head -1)
    else
        DATA_DIR=$DATA
    fi
    if [ -f "$DATA_DIR/SUBSET.txt" ]; then cat "$DATA_DIR/SUBSET.txt"; fi
    "$PY" - "$DATA_DIR" "$WORK/data.detail" <<'EOF'
import sys
from pathlib import Path

from imgcls import layouts

ds = layouts.read(sys.argv[1])
ds.check()
print(ds.describe())
Path(sys.argv[2]).write_text(ds.describe().split(": ", 1)[1] + "\n")  # without the folder
EOF
}

gpu_check() {
    # shellcheck disable=SC2086  # GC_ARGS is a list of arguments
    timeout -k 20 "$GC_TIMEOUT" "$PY" benchmarks/gpu_check.py --device "$DEVICE" --data "$DATA_DIR" \
        --out "$WORK/gpu_check" $GC_ARGS 2>&1 | tee "$WORK/gpu_check.txt"
}

train() {
    local rc run=$WORK/run
    # time_limit= is imgcls's own hard stop; the timeout only catches a hang past it.
    timeout -k 30 $((TIME_LIMIT + 90)) "$PY" -m imgcls train "$DATA_DIR" --out "$run" \
        --config tiny-imagenet epochs=auto "time_limit=${TIME_LIMIT}s" "device=$DEVICE" progress=false \
        "${TRAIN_ARGS[@]}" 2>&1 | tee "$WORK/train.txt"
    rc=$?
    for f in submission.csv metrics.jsonl plan.json config.yaml report.html; do
        # the device tool brings back files of at most 16 MiB
        if [ -f "$run/$f" ] && [ "$(stat -c %s "$run/$f")" -lt 16000000 ]; then cp "$run/$f" "$OUT/"; fi
    done
    [ $rc -eq 0 ] || return $rc
    # The submission must match the template: the same ids in the same order, every label a class index.
    "$PY" - "$DATA_DIR" "$run/submission.csv" <<'EOF'
import csv
import sys
from pathlib import Path

data, sub = Path(sys.argv[1]), Path(sys.argv[2])
if not sub.is_file():
    sys.exit(f"no submission at {sub}")
classes = len((data / "wnids.txt").read_text().split())
template = list(csv.reader(open(data / "submission_sample.csv", encoding="utf-8-sig")))
rows = list(csv.reader(open(sub, encoding="utf-8-sig")))
problems = [f"header {rows[0]}, template {template[0]}"] if rows[0] != template[0] else []
if [r[0] for r in rows[1:]] != [r[0] for r in template[1:]]:
    problems.append(f"its {len(rows) - 1} ids are not the template's {len(template) - 1} in their order")
labels = [int(r[1]) for r in rows[1:]]
if not all(0 <= k < classes for k in labels):
    problems.append(f"labels outside 0..{classes - 1}")
if problems:
    sys.exit(f"{sub}: " + "; ".join(problems))
print(f"submission ok: {len(labels)} rows as the template, {len(set(labels))} distinct labels of {classes} classes")
EOF
}

summary() {
    "$PY" - "$WORK" "$DATA_DIR" <<'EOF'
import json
import re
import sys
from pathlib import Path

work, data = Path(sys.argv[1]), Path(sys.argv[2] or ".")


def text(name):
    p = work / name
    return p.read_text(errors="replace") if p.is_file() else ""


def gpu_check(out):
    ok, fail, skip = (len(re.findall(rf"^  {w}", out, re.M)) for w in ("ok    ", "FAIL  ", "skip  "))
    end = re.search(r"^(all ok|FAILED): .*$", out, re.M)
    return f"paths {ok} ok, {fail} FAIL, {skip} skip; " + (end.group(0) if end else "no final line (stopped)")


def train(out):
    rows = [json.loads(line) for line in text("run/metrics.jsonl").splitlines() if line.strip()]
    val = [r for r in rows if r.get("val_acc") is not None]
    parts = []
    if val:
        best = max(val, key=lambda r: r["val_acc"])
        parts.append(f"best val_acc {best['val_acc']:.4f} at epoch {best.get('epoch', '?')}")
    plan = json.loads(text("run/plan.json") or "{}")
    parts.append(f"{len(rows)} of {plan.get('epochs', '?')} planned epochs")
    wall = re.search(r"^best val_acc .*, (\d+)s$", out, re.M)
    if wall:
        parts.append(f"wall {wall.group(1)}s")
    sub = work / "run" / "submission.csv"
    parts.append(f"submission {len(sub.read_text().splitlines()) - 1} rows" if sub.is_file() else "NO submission")
    return ", ".join(parts)


details = {"gpu_check": gpu_check, "train": train}
subset = (data / "SUBSET.txt").read_text().strip() if (data / "SUBSET.txt").is_file() else text("data.detail").strip()
lines = [f"device_run: {text('environment.detail').strip() or '?'}", f"data: {subset or '?'}",
         f"{'step':<12} {'status':<8} {'seconds':>8}  detail"]
failed = []
for row in text("steps.tsv").splitlines():
    name, rc, ms = row.split("\t")
    status = "SKIP" if rc == "SKIP" else "PASS" if rc == "0" else "TIMEOUT" if rc in ("124", "137") else f"FAIL({rc})"
    if status not in ("PASS", "SKIP"):
        failed.append(name)
    if status == "SKIP":
        detail = ""
    elif name in details:
        detail = details[name](text(f"{name}.txt"))
    else:
        detail = text(f"{name}.detail").strip()
    lines.append(f"{name:<12} {status:<8} {int(ms) / 1000:8.1f}  {detail}")
table = text("gpu_check.txt").splitlines()
start = next((i for i, line in enumerate(table) if line.startswith("model ") and "img/s" in line), None)
if start is not None:  # gpu_check's table: one row per model and size, up to the blank line before "paths:"
    rows = table[start:]
    rows = rows[:next((k for k, line in enumerate(rows) if not line.strip()), len(rows))]
    lines += ["gpu_check figures (the recipe on the data above):"] + ["  " + line for line in rows]
lines.append(f"result: {'FAIL: ' + ', '.join(failed) if failed else 'PASS'}")
print("\n".join(lines))
sys.exit(1 if failed else 0)
EOF
}

main() {
    echo "device_run.sh: device=$DEVICE data=$DATA time_limit=${TIME_LIMIT}s; gpu_check $GC_ARGS," \
         "timeout ${GC_TIMEOUT}s; OUT=$OUT WORK=$WORK"
    step setup
    step environment
    step data
    if [ -d "$DATA_DIR" ]; then
        step gpu_check
        step train
    else
        printf 'gpu_check\t1\t0\ntrain\t1\t0\n' >>"$WORK/steps.tsv"
    fi
    echo; echo "=== summary ==="
    summary | tee "$OUT/summary.txt"
}

main 2>&1 | tee "$OUT/log.txt"
