"""Data-parallel training through torchrun (issue 8), on 2 CPU processes over gloo.

The runs use tests/ddp_main.py (`python -m imgcls` plus a model without BatchNorm): without
sync_bn, which needs CUDA, each rank normalizes over its own half of the batch, so a BatchNorm
model on 2 ranks is a different function from the same model on one process. Augmentation is off
(hflip=0, crop 1,1 at aspect 1,1) because each rank draws its own augmentation: with it on, the
2-rank batch would be augmented differently from the 1-process batch. deterministic=true and
amp=off: bf16 autocast (the default on CPUs with AMX, or AMD ones with AVX512_BF16) rounds a 4-image and an 8-image
batch differently, 1e-4 apart in the loss.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import colour_food11
from imgcls import checkpoint, distributed
from imgcls.errors import UserError

ENTRY = str(Path(__file__).with_name("ddp_main.py"))
RUN = ["model=nobn", "width=8", "image_size=16", "batch_size=8", "device=cpu", "progress=false", "decode_workers=1",
       "deterministic=true", "amp=off", "hflip=0", "crop_scale=1,1", "crop_ratio=1,1", "lr=5", "seed=3",
       "optimizer=lamb"]  # lr=5 is LAMB's; Muon's bf16 Newton-Schulz turns allreduce rounding into 1e-4 differences
EXACT = ("epoch", "lr", "train_images")  # train_images: 3 global batches of 8 per epoch, 4 + 4 on 2 ranks
CLOSE = ("train_loss", "train_acc", "val_loss", "val_acc")


def train(data: Path, out: Path, cache: Path, *extra: str, ranks: int = 1) -> str:
    """`imgcls train` on one process, or under torchrun on `ranks` CPU processes; returns its output."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)] if ranks > 1 else [sys.executable]
    proc = subprocess.run([*launch, ENTRY, "train", str(data), "--out", str(out), *RUN, *extra],
                          env={**os.environ, "IMGCLS_CACHE": str(cache)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def assert_same_training(a: Path, b: Path) -> None:
    ma, mb = metrics(a), metrics(b)
    assert len(ma) == len(mb)
    for x, y in zip(ma, mb):
        assert {k: x[k] for k in EXACT} == {k: y[k] for k in EXACT}
        assert {k: y[k] for k in CLOSE} == pytest.approx({k: x[k] for k in CLOSE}, rel=1e-5, abs=1e-6)
    for name in ("best.safetensors", "last.safetensors"):
        assert max_weight_difference(a / name, b / name) < 1e-5, name
    assert (a / "submission.csv").read_text() == (b / "submission.csv").read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 2-epoch training (6 steps of a global batch of 8) on 1 process and on 2."""
    base = tmp_path_factory.mktemp("ddp")
    data = make_food11(base / "data")
    cache = base / "cache"
    single = base / "single"
    out1 = train(data, single, cache, "epochs=2")
    double = base / "double"
    out2 = train(data, double, cache, "epochs=2", ranks=2)
    return {"data": data, "cache": cache, "single": single, "double": double, "out1": out1, "out2": out2}


def make_food11(root: Path) -> Path:
    """3 classes x 8 training + 3 validation images (20 px, one mean colour per class), 5 test images."""
    return colour_food11(root, spread=60, ext="png")


def test_two_processes_train_what_one_process_trains(runs):
    single, double = runs["single"], runs["double"]
    assert_same_training(single, double)
    assert [m["train_images"] for m in metrics(double)] == [24, 24]  # each rank took its half, not the batch
    assert metrics(double)[-1]["train_loss"] < metrics(double)[0]["train_loss"]  # it learned something
    # Rank 0 alone printed and wrote: one line per epoch, one run directory, no stray temp files.
    assert runs["out2"].count("epoch   1 ") == 1 and runs["out2"].count("submission: ") == 1
    assert not [p for p in double.iterdir() if p.name.startswith(".")]
    assert json.loads((double / "manifest.json").read_text())["processes"] == 2
    assert "processes" not in json.loads((single / "manifest.json").read_text())
    state = checkpoint.load_state(double / "state.pt")
    assert len(state["rank_rngs"]) == 2  # each rank's own augmentation and dropout streams
    assert not torch.equal(state["rank_rngs"][0]["aug_gen"], state["rank_rngs"][1]["aug_gen"])
    assert "rank_rngs" not in checkpoint.load_state(single / "state.pt")


def test_resume_across_a_change_in_the_number_of_processes(runs, tmp_path):
    """Continue the 2-process run on 1 process and the 1-process run on 2, one more epoch each."""
    onto_one, onto_two = tmp_path / "onto_one", tmp_path / "onto_two"
    train(runs["data"], onto_one, runs["cache"], f"resume={runs['double']}", "epochs=3")
    train(runs["data"], onto_two, runs["cache"], f"resume={runs['single']}", "epochs=3", ranks=2)
    assert_same_training(onto_one, onto_two)
    # Both continued (epochs 1-2 are the source's lines, copied) rather than starting again.
    assert metrics(onto_one)[:2] == metrics(runs["double"]) and metrics(onto_two)[:2] == metrics(runs["single"])
    assert [m["epoch"] for m in metrics(onto_one)] == [1, 2, 3]
    assert checkpoint.load_state(onto_two / "state.pt")["epoch"] == 3


def test_fp16_with_its_grad_scaler_under_two_processes(runs, tmp_path):
    """Each process has its own GradScaler; DDP averages the gradients before the scaler looks at them,
    so all skip the same steps. With gradient accumulation (no_sync on all but the last micro-batch)."""
    out = tmp_path / "fp16"
    train(runs["data"], out, runs["cache"], "epochs=2", "amp=fp16", "accum_steps=2", ranks=2)
    rows = metrics(out)
    assert [m["train_images"] for m in rows] == [24, 24]
    assert all(m["skipped_steps"] <= 3 and 0 < m["train_loss"] < 10 for m in rows)
    assert checkpoint.load_state(out / "state.pt")["scaler"]["scale"] == rows[-1]["loss_scale"]
    resumed = tmp_path / "onto_one"  # and on one process, from the 2-process fp16 state
    train(runs["data"], resumed, runs["cache"], f"resume={out}", "epochs=3", "amp=fp16")  # RUN has amp=off
    assert [m["epoch"] for m in metrics(resumed)] == [1, 2, 3] and "skipped_steps" in metrics(resumed)[-1]


def test_global_batch_must_split_evenly_over_the_processes():
    distributed.check_batch(8, 2, 1)
    distributed.check_batch(7, 1, 1)  # one process: anything goes
    with pytest.raises(UserError, match=r"batch_size=7 .* multiple of 2, e.g. batch_size=6"):
        distributed.check_batch(7, 2, 1)
    with pytest.raises(UserError, match=r"accum_steps=2: use a multiple of 4"):
        distributed.check_batch(10, 2, 2)


def test_sync_bn_on_the_cpu_says_it_needs_gpus():
    with pytest.raises(UserError, match="sync_bn=true needs GPUs"):
        distributed.wrap(torch.nn.BatchNorm2d(3), distributed.Ranks(0, 2), torch.device("cpu"), sync_bn=True)


def test_one_process_has_no_process_group_and_its_own_streams(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ranks = distributed.init(torch.device("cpu"))
    assert ranks == distributed.Ranks() and ranks.is_main and not ranks.active and not dist.is_initialized()
    assert ranks.agree("done", False) == ("done", False) and ranks.sum([1.5, 2]) == [1.5, 2]
    batch = torch.arange(8)
    assert distributed.shard(batch, ranks) is batch
    assert torch.equal(distributed.shard(batch, distributed.Ranks(1, 2)), torch.arange(4, 8))
    assert distributed.rank_seed(5, 0) == 5  # rank 0 draws exactly what one process draws
    assert len({distributed.rank_seed(5, r) for r in range(4)} | {distributed.rank_seed(6, r) for r in range(4)}) == 8


def _agree_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    ranks = distributed.Ranks(rank, 2, rank)
    # A signal that reached rank 1 only, and a checkpoint clock that ran out on rank 0 only.
    stop = ranks.agree("interrupted" if rank == 1 else "done", rank == 0)
    limit = ranks.agree("time_limit" if rank == 0 else "done", False)
    result = {"stop": stop, "limit": limit, "sum": ranks.sum([rank + 0.5, 1]), "gather": ranks.gather(rank * 10)}
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_ranks_agree_on_stopping_at_the_same_step(tmp_path):
    """One stop decision for all ranks: otherwise a rank that stopped alone leaves the others waiting
    in the next all-reduce forever."""
    mp.spawn(_agree_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"{rank}.json").read_text())
        assert r["stop"] == ["interrupted", True]
        assert r["limit"] == ["time_limit", False]
        assert r["sum"] == [2.0, 2.0] and r["gather"] == [0, 10]


@pytest.mark.parametrize("world, teardown", [("2", False), ("1", True)])
def test_a_torchrun_rank_skips_the_interpreter_teardown(world, teardown):
    """gloo can abort in the teardown after a finished training (torchrun then reports a failure): a rank
    ends in os._exit with its exit code, its output flushed; a single process exits as usual."""
    script = ("import atexit, sys; atexit.register(print, 'teardown'); from imgcls import cli; "
              "print('started'); sys.exit(cli.main(['inspect', 'no-such-folder']))")
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "WORLD_SIZE": world},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "started" in proc.stdout and "no-such-folder" in proc.stderr
    assert ("teardown" in proc.stdout) == teardown
