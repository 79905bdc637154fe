"""Precision and device rules (issue 17): amp=auto by GPU capability, the refusal of a GPU this torch
build has no kernels for, compile=true's fallback where Triton cannot run (all with faked device
queries, on the CPU), and fp16 + GradScaler training on the CPU: overflowing steps skipped and counted,
divergence told apart from them, and a SIGKILLed fp16 run resumed bit for bit."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST
from imgcls import api, checkpoint, cli, config, hardware, trainer
from imgcls.errors import UserError
from test_resume import colours, kill_and_resume, run_reference  # noqa: F401 - colours: the fixture

# torch.cuda.get_arch_list() of a CUDA 12.6 wheel (still sm_50..sm_90) and of a cu128 one without Pascal.
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
T4, P100, GTX1080, A100, H100 = ("Tesla T4", (7, 5)), ("Tesla P100-PCIE-16GB", (6, 0)), \
    ("NVIDIA GeForce GTX 1080", (6, 1)), ("NVIDIA A100-SXM4-40GB", (8, 0)), ("NVIDIA H100 80GB HBM3", (9, 0))


def fake_gpus(monkeypatch, *gpus: tuple[str, tuple[int, int]], arch: list[str] = CU126) -> None:
    """Make this CPU-only test machine answer torch's device queries as if it had `gpus` and a CUDA
    build with kernels for `arch` (no CUDA call is made: hardware.resolve only asks these)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: gpus[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: gpus[i][1])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch))
    if torch.version.cuda is None:  # a CPU-only torch build (a CUDA one keeps its own: torchvision checks it)
        monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def run_config(*overrides: str) -> config.RunConfig:
    return config.resolve(overrides=list(overrides)).run


@pytest.mark.parametrize("gpu, amp", [
    (P100, torch.float16),  # GP100: fp16 at 2x fp32
    (GTX1080, None),  # sm_61: fp16 at 1/64 of fp32
    (("Jetson TX2", (6, 2)), torch.float16),
    (("Tesla V100-SXM2-16GB", (7, 0)), torch.float16),
    (T4, torch.float16),  # fp16 tensor cores, no bf16
    (A100, torch.bfloat16),
    (("NVIDIA L4", (8, 9)), torch.bfloat16),
    (H100, torch.bfloat16),
])
def test_amp_auto_by_gpu_capability(monkeypatch, gpu, amp):
    fake_gpus(monkeypatch, gpu)
    hw = hardware.resolve(run_config())
    assert hw.device == torch.device("cuda") and hw.amp == amp
    assert hw.channels_last == (amp is not None)  # NHWC for the tensor cores; fp32 on a GTX 1080 keeps NCHW
    assert hw.grad_scaler().is_enabled() == (amp == torch.float16)
    assert hw.notes == ()


def test_amp_auto_on_the_cpu_follows_its_bf16_instructions(monkeypatch):
    assert hardware.resolve(run_config("device=cpu")).amp == (torch.bfloat16 if hardware.native_bf16() else None)
    amx, avx512_bf16 = {"amx_bf16": True, "avx512_bf16": True}, {"avx512_bf16": True}
    for caps, vendor, amp in ((amx, "GenuineIntel", torch.bfloat16), (avx512_bf16, "AuthenticAMD", torch.bfloat16),
                              (avx512_bf16, "GenuineIntel", None),  # slower than fp32 there: BENCHMARKS.md
                              ({"avx2": True}, "AuthenticAMD", None), ({"avx2": True}, "GenuineIntel", None)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps, raising=False)
        monkeypatch.setattr(hardware, "cpu_vendor", lambda vendor=vendor: vendor)
        hw = hardware.resolve(run_config("device=cpu"))
        assert hw.amp == amp and hw.channels_last and not hw.grad_scaler().is_enabled(), (caps, vendor)
        forced = hardware.resolve(run_config("device=cpu", "amp=bf16"))
        assert forced.amp == torch.bfloat16  # asked for: given, with a line where auto would not pick it
        assert forced.notes == (() if amp else ("amp=bf16 on this CPU: bf16 needs AMX, or AVX512_BF16 on an AMD CPU, "
                                                "to beat fp32 (BENCHMARKS.md); amp=auto (fp32 here) is likely faster.",))


def test_the_cpu_vendor_without_a_proc_cpuinfo_comes_from_platform(monkeypatch):
    import builtins
    import platform

    def no_proc(path, *args, **kwargs):
        raise FileNotFoundError(path)

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(platform, "processor", lambda: "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel")
    assert hardware.cpu_vendor() == "GenuineIntel"  # what Windows says
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert hardware.cpu_vendor() == ""


def test_amp_given_explicitly(monkeypatch):
    hw = hardware.resolve(run_config("device=cpu", "amp=fp16"))
    assert hw.amp == torch.float16 and hw.grad_scaler().is_enabled()
    auto = "bf16" if hardware.native_bf16() else "fp32"
    assert hw.notes == (f"amp=fp16 on this CPU: CPUs have no fast fp16 arithmetic; amp=auto ({auto} here) is likely "
                        "faster.",)
    assert hardware.resolve(run_config("device=cpu", "amp=off")).amp is None
    fake_gpus(monkeypatch, T4)
    hw = hardware.resolve(run_config("amp=bf16"))
    assert hw.amp == torch.bfloat16
    assert hw.notes == ("amp=bf16 on Tesla T4 (compute capability 7.5, sm_75): bf16 is native from compute "
                        "capability 8.0, so here it is emulated and slow; amp=auto picks fp16 on this GPU.",)
    with pytest.raises(UserError, match="amp='fp8' is not one of auto, bf16, fp16, off"):
        run_config("amp=fp8")


@pytest.mark.parametrize("capability, arch, runs", [
    ((6, 0), CU128, False), ((6, 0), CU126, True), ((6, 1), CU126, True),  # sm_60 cubins run on 6.1
    ((7, 5), CU128, True), ((8, 9), ["sm_80"], True), ((9, 0), ["sm_80", "sm_86"], False),
    ((12, 0), ["sm_90", "compute_90"], True),  # PTX: compiled by the driver for a later GPU
    ((9, 0), ["sm_90a"], True), ((10, 0), ["sm_90a"], False), ((8, 6), ["sm_100f"], False),
])
def test_which_kernels_run_on_which_gpu(capability, arch, runs):
    assert hardware.runs_here(capability, arch) is runs


def test_a_gpu_without_kernels_in_this_torch_is_refused_with_the_fixes(monkeypatch):
    fake_gpus(monkeypatch, P100, arch=CU128)
    with pytest.raises(UserError) as e:
        hardware.resolve(run_config())
    message = str(e.value)
    assert message.startswith("This PyTorch cannot run on Tesla P100-PCIE-16GB (compute capability 6.0, sm_60): "
                              f"torch {torch.__version__} has kernels for {', '.join(CU128)} only")
    assert "no kernel image is available" in message and "\n" not in message
    assert "GPU T4 x2" in message and "device=cpu" in message
    assert "--index-url https://download.pytorch.org/whl/cu126" in message
    fake_gpus(monkeypatch, ("NVIDIA RTX PRO 6000", (12, 0)), arch=CU126)  # newer than the build
    with pytest.raises(UserError, match=r"sm_120 \(a newer torch release or nightly"):
        hardware.resolve(run_config())
    monkeypatch.setattr(torch.version, "cuda", None)  # ROCm: torch's own checks apply
    assert hardware.resolve(run_config()).device.type == "cuda"


def test_the_refusal_comes_before_anything_is_decoded(monkeypatch, food11_tiny, tmp_path, capsys):
    fake_gpus(monkeypatch, P100, arch=CU128)
    cache_dir, run = tmp_path / "cache", tmp_path / "run"
    argv = [*(a for a in FAST if not a.startswith("device=")), f"cache_dir={cache_dir}"]
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *argv]) == 1
    err = capsys.readouterr().err
    assert "This PyTorch cannot run on Tesla P100-PCIE-16GB" in err and "Traceback" not in err
    assert not cache_dir.exists() and not run.exists()
    assert cli.main(["cv", str(food11_tiny), "--folds", "2", "--out", str(tmp_path / "cv"), *argv]) == 1
    assert "This PyTorch cannot run on Tesla P100-PCIE-16GB" in capsys.readouterr().err
    assert not cache_dir.exists()
    # device=cpu, the fix the message names, trains.
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *argv, "device=cpu", "epochs=1"]) == 0


def test_under_torchrun_each_process_checks_its_own_gpu(monkeypatch):
    fake_gpus(monkeypatch, T4, P100, arch=CU128)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert hardware.resolve(run_config()).device == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="cannot run on Tesla P100-PCIE-16GB"):
        hardware.resolve(run_config())
    monkeypatch.setenv("LOCAL_RANK", "2")  # more processes than GPUs: distributed.init says so
    assert hardware.resolve(run_config()).device == torch.device("cuda", 2)


def test_compile_falls_back_to_eager_where_triton_cannot_run(monkeypatch):
    fake_gpus(monkeypatch, P100)
    cfg = config.resolve(overrides=["compile=true"])
    hw = hardware.resolve(cfg.run)
    assert not hw.compile and hw.amp == torch.float16
    note = ("compile=true: torch.compile's GPU backend (Triton) needs compute capability 7.0 or newer and "
            "Tesla P100-PCIE-16GB has 6.0, so the model runs eager (uncompiled).")
    assert hw.notes == (note,)
    logged = []
    api._hardware(cfg, logged.append)  # what imgcls.train and imgcls.cv log before decoding
    assert logged == [note]
    fake_gpus(monkeypatch, T4)
    assert hardware.resolve(cfg.run).compile and hardware.resolve(cfg.run).notes == ()
    assert not hardware.resolve(run_config()).compile


# --- fp16 + GradScaler, on the CPU ---------------------------------------------------------------

def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_scale_follows_the_skips(rows: list[dict]) -> None:
    """The scale starts at torch's 2^16 and halves at each skipped step (no growth: that takes 2000 steps)."""
    skipped = [m["skipped_steps"] for m in rows]
    assert [m["loss_scale"] for m in rows] == [65536.0 / 2 ** sum(skipped[:i + 1]) for i in range(len(rows))]


def test_fp16_with_a_grad_scaler_trains_on_the_cpu(food11_tiny, tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *FAST, "amp=fp16", "epochs=3"]) == 0
    rows = metrics(run)
    assert_scale_follows_the_skips(rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["val_acc"] > 1 / 3
    scaler = checkpoint.load_state(run / "state.pt")["scaler"]
    assert scaler["scale"] == rows[-1]["loss_scale"] and scaler["growth_interval"] == 2000
    off = tmp_path / "off"
    assert cli.main(["train", str(food11_tiny), "--out", str(off), *FAST, "amp=off", "epochs=1"]) == 0
    assert "skipped_steps" not in metrics(off)[0] and checkpoint.load_state(off / "state.pt")["scaler"] == {}


# The overflow counts below are exact: they need steps whose gradients fit fp16 at the scaler's first
# scale, as SGD's do on these images (with LAMB one more step overflowed on its own here).
SGD = ["optimizer=sgd", "schedule=cosine"]


def overflow_on(monkeypatch, steps: set[int], where: str) -> None:
    """Make the loss (where="loss") or only the gradients (where="gradient") of these 1-based steps inf."""
    calls = []
    train_loss = trainer.loss_fn

    def overflowing(logits, targets, **kw):
        calls.append(1)
        loss = train_loss(logits, targets, **kw)
        if len(calls) not in steps:
            return loss
        if where == "loss":
            return loss * float("inf")
        loss.register_hook(lambda grad: grad * float("inf"))  # the loss stays finite, its gradients do not
        return loss
    monkeypatch.setattr(trainer, "loss_fn", overflowing)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_an_fp16_overflow_skips_that_step_counts_it_and_the_run_goes_on(food11_tiny, tmp_path, monkeypatch, where):
    overflow_on(monkeypatch, {2}, where)  # epoch 1 of 3 steps, step 2
    run = tmp_path / "run"
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *FAST, *SGD, "amp=fp16"]) == 0
    rows = metrics(run)
    assert [(m["skipped_steps"], m["loss_scale"]) for m in rows] == [(1, 32768.0), (0, 32768.0)]
    assert all(m["train_loss"] > 0 for m in rows)  # finite: the overflowing micro-batch is left out of the mean
    weights = load_file(run / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_fp16_steps_that_always_overflow_are_divergence(food11_tiny, tmp_path, capsys, monkeypatch):
    overflow_on(monkeypatch, set(range(1, 1000)), "gradient")
    run = tmp_path / "run"
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *FAST, "amp=fp16", "epochs=8"]) == 1
    err = capsys.readouterr().err
    # 2^16 halved by 18 skips is 0.25: checked after step 3 of epoch 6, the first check below 1.
    assert ("Training diverged: 3 of the 3 fp16 steps of epoch 6 overflowed and the loss scale fell to 0.25" in err
            and "Lower lr=" in err)
    state = checkpoint.load_state(run / "state.pt")
    assert (state["epoch"], state["step"], state["scaler"]["scale"]) == (5, 0, 2.0)  # the last epoch end


def test_a_state_from_before_the_scaler_resumes(food11_tiny, tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *FAST, *SGD, "amp=fp16", "epochs=1"]) == 0
    state = checkpoint.load_state(run / "state.pt")
    del state["scaler"]
    for key in ("finite", "skipped"):
        del state["partial"][key]
    checkpoint.save_state(state, run / "state.pt")
    assert cli.main(["train", str(food11_tiny), "--out", str(run), f"resume={run}", "epochs=2", *SGD]) == 0
    assert [m["epoch"] for m in metrics(run)] == [1, 2]
    assert checkpoint.load_state(run / "state.pt")["scaler"]["_growth_tracker"] == 3  # a fresh scaler, 3 steps


def test_sigkill_at_random_points_then_fp16_resume_is_bit_identical(colours, tmp_path_factory, tmp_path):
    reference = run_reference(colours, tmp_path_factory, "amp=fp16")
    rows = metrics(reference["run"])
    assert_scale_follows_the_skips(rows)  # this data overflows fp16 once, in epoch 3: resumed exactly too
    for out in kill_and_resume(colours, reference, tmp_path):  # compares the scaler states as well
        assert checkpoint.load_state(out / "state.pt")["scaler"]["scale"] == rows[-1]["loss_scale"]
