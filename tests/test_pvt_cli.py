"""``python -m pvt``: info, bench (backends and compile modes side by side, presets, the plot), train (save /
resume, a kill while saving, loss curves across backends, compiled and in bf16), a 2-process
DistributedDataParallel run, and the usage errors of bad arguments."""

import functools
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import pvt
from pvt.cli import main
from pvt.info import model_info
from sra_kernels import available_backends

ROOT = Path(__file__).resolve().parents[1]
QUICK_TRAIN = ["--img-size", "32", "32", "--subset", "64", "--batch-size", "16", "--no-progress"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_python_m_pvt_info():
    result = subprocess.run([sys.executable, "-m", "pvt", "info", "pvt_v2_b2_li", "--img-size", "64", "96"],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "parameters: 22.554 M" in out and "GFLOPs" in out
    # stage 1: 16x24 grid, N = 384, linear SRA pools to M = 49, C = 64, 1 head
    assert re.search(r"^\s+1\s+16x24\s+384\s+49\s+64\s+1\s+8", out, re.M), out


@pytest.mark.parametrize("name, gmacs", [("pvt_v2_b2", 4.0), ("pvt_small", 3.8), ("pvt_v2_b0", 0.6)])
def test_info_flops_match_published(name, gmacs):
    """The papers' 224x224 'GFLOPs' (multiply-adds) within rounding, attention matmuls included."""
    info = model_info(name)
    assert info.flops / 2e9 == pytest.approx(gmacs, abs=0.05)
    N, M, C = 56 * 56, 49, info.stages[0].C
    last = 50 if name == "pvt_small" else 49  # PVT v1's stage 4 also holds the cls token (sr 1: M = N)
    assert [(s.N, s.M) for s in info.stages] == [(3136, 49), (784, 49), (196, 49), (last, last)]
    assert info.stages[0].heads == 1 and C == (32 if name == "pvt_v2_b0" else 64)
    # the reference backend's q k^T and attn v matmuls are counted: 2 * 2*N*M*C in stage 1 alone
    assert info.flops > 4 * N * M * C


def test_bench_prints_each_backend(capsys):
    main(["bench", "pvt_v2_b0", "--batch", "2", "--img-size", "32", "32", "--steps", "1", "--warmup", "0",
          "--backends", "reference", "sdpa", "--train"])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "pvt_v2_b0 32x32 batch 2 fp32 forward+backward" in lines[0]
    assert re.match(r"\s+reference\s+none\s+[\d.]+\s+[\d.]+\s+(n/a|[\d.]+)\s+(n/a|\d+)\s+n/a\s+1.00x", lines[2]), \
        captured.out
    assert re.match(r"\s+sdpa\s+none\s+[\d.]+\s+[\d.]+", lines[3]), captured.out
    assert "[" in captured.err and "1/1" in captured.err  # the progress bar


def test_bench_grad_checkpointing(capsys, monkeypatch):
    """--train --grad-checkpointing: the benchmarked model's blocks are checkpointed, and the table says so."""
    from torch.utils import checkpoint

    from pvt import models

    calls = []
    monkeypatch.setattr(models, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint.checkpoint(*a, **k))
    main(["bench", "pvt_v2_b0", "--batch", "2", "--img-size", "32", "32", "--steps", "1", "--warmup", "0",
          "--backends", "sdpa", "--train", "--grad-checkpointing", "--no-progress"])
    assert "forward+backward (grad checkpointing)" in capsys.readouterr().out.splitlines()[0]
    blocks = sum(pvt.create_model("pvt_v2_b0").depths)
    assert calls and len(calls) % blocks == 0  # every block of each step run (timed, and profiled on CUDA)


def test_bench_compile_modes_side_by_side_and_plot(tmp_path, capsys):
    """--compile none default: each backend eager and compiled (aot_eager: traced, no code generated, quick on a
    CPU), with the compile time; --plot writes the bar chart."""
    pytest.importorskip("matplotlib")
    plot = tmp_path / "bench.png"
    main(["bench", "pvt_v2_b0", "--batch", "1", "--img-size", "32", "32", "--steps", "1", "--warmup", "0",
          "--backends", "reference", "sdpa", "--compile", "none", "default", "--compile-backend", "aot_eager",
          "--plot", str(plot), "--no-progress"])
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.out.splitlines()[2:6]]
    assert [row[:2] for row in rows] == [["reference", "none"], ["sdpa", "none"], ["reference", "default"],
                                        ["sdpa", "default"]], captured.out
    assert [row[6] != "n/a" for row in rows] == [False, False, True, True]  # compile s: compiled rows only
    assert plot.read_bytes().startswith(b"\x89PNG") and not captured.err  # no progress bar


def test_bench_reduce_overhead_is_a_cuda_row(capsys):
    main(["bench", "pvt_v2_b0", "--batch", "1", "--img-size", "32", "32", "--backends", "sdpa", "--device", "cpu",
          "--compile", "reduce-overhead"])
    assert re.search(r"sdpa\s+reduce-overhead\s+CUDA only", capsys.readouterr().out)


@pytest.mark.parametrize("extra, size, batch", [
    (["--preset", "classification"], (224, 224), 64),
    (["--preset", "segmentation"], (512, 512), 16),
    (["--preset", "segmentation-1024"], (1024, 1024), 2),
    (["--preset", "detection"], (800, 1333), 2),
    (["--preset", "segmentation", "--batch", "3", "--img-size", "256", "320"], (256, 320), 3),
    (["--batch", "5"], (224, 224), 5),
])
def test_bench_presets(extra, size, batch, monkeypatch):
    """--preset sets image size and batch; --img-size and --batch override it."""
    from pvt import bench

    calls = []
    monkeypatch.setattr(bench, "bench_model", lambda name, b, img_size, *args: calls.append((b, img_size)) or [])
    main(["bench", "pvt_v2_b0", *extra])
    assert calls == [(batch, size)]


def test_bench_times_the_auto_policy(capsys):
    main(["bench", "pvt_v2_b0", "--batch", "1", "--img-size", "32", "32", "--steps", "1", "--warmup", "0",
          "--backends", "auto", "--device", "cpu"])
    assert re.search(r"\s+auto\s+none\s+[\d.]+\s+[\d.]+", capsys.readouterr().out)


def test_bench_marks_unavailable_backend(capsys):
    if "triton" in available_backends("cpu"):
        pytest.skip("triton runs here")
    main(["bench", "pvt_v2_b0", "--batch", "1", "--img-size", "32", "32", "--steps", "1", "--warmup", "0",
          "--backends", "triton", "--device", "cpu"])
    assert re.search(r"triton\s+none\s+unavailable here", capsys.readouterr().out)


def test_train_save_and_resume(tmp_path, capsys):
    path = tmp_path / "digits.pt"
    main(["train", "pvt_v2_b0", "--epochs", "1", "--save", str(path), *QUICK_TRAIN])
    first = capsys.readouterr().out
    assert "1 process(es)" in first and re.search(r"epoch 1/1: train loss [\d.]+ acc [\d.]+ \| val loss", first)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["model_name"] == "pvt_v2_b0" and checkpoint["optimizer"]["state"]

    main(["train", "pvt_v2_b0", "--epochs", "2", "--resume", str(path), "--save", str(path), *QUICK_TRAIN])
    second = capsys.readouterr().out
    assert "epochs 2..2" in second and "epoch 2/2:" in second and "epoch 1/2:" not in second
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1
    step = checkpoint["optimizer"]["state"][0]["step"]
    assert int(step) == 2 * 4  # two epochs of 64 images in batches of 16
    model = pvt.create_model("pvt_v2_b0", num_classes=10)
    pvt.load_state_dict(model, checkpoint)  # the {"model": sd} wrapper

    with pytest.raises(ValueError, match="already holds epoch 2 of 2: nothing to train"):
        main(["train", "pvt_v2_b0", "--epochs", "2", "--resume", str(path), *QUICK_TRAIN])

    with pytest.raises(ValueError, match="holds 'pvt_v2_b0', not 'pvt_v2_b1'"):
        main(["train", "pvt_v2_b1", "--epochs", "3", "--resume", str(path), *QUICK_TRAIN])
    with pytest.raises(ValueError, match="feature backbone"):
        main(["train", "mit_b0", "--epochs", "1", *QUICK_TRAIN])


def test_train_ddp_two_processes(tmp_path):
    """torchrun --nproc_per_node=2 (gloo on CPU): rank 0 alone prints and saves."""
    path = tmp_path / "ddp.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "pvt", "train", "pvt_v2_b0", "--epochs", "1", "--save", str(path), *QUICK_TRAIN]
    env = dict(_env(), CUDA_VISIBLE_DEVICES="")  # two ranks need two GPUs with nccl: gloo on the CPU here
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on 2 process(es)" in result.stdout
    assert len(re.findall(r"epoch 1/1: train loss", result.stdout)) == 1, result.stdout
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 0
    assert int(checkpoint["optimizer"]["state"][0]["step"]) == 2  # 64 images / (2 ranks x 16)


def test_ddp_rank_without_a_gpu_is_refused(monkeypatch):
    """More ranks per node than GPUs: a clear ValueError, not CUDA's 'invalid device ordinal'."""
    from pvt import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="local rank 1 has no GPU of its own"):
        train._setup_distributed()


SAVE_HALF_THEN_HANG = textwrap.dedent("""
    import io, os, sys, time
    import torch
    from pvt.cli import main

    real_save, saves = torch.save, []

    def save_half_then_hang(obj, f, *args, **kwargs):
        # The second save writes half its bytes where train.py sends them, then waits to be killed. A path is
        # opened "wb" (truncating) just as torch.save opens one itself.
        saves.append(f)
        if len(saves) == 1:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        out = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        out.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        out.flush()
        print("HANGING IN SAVE", flush=True)
        time.sleep(600)

    torch.save = save_half_then_hang
    main(sys.argv[1:])
""")


def test_kill_during_save_keeps_the_last_checkpoint_and_resume_continues(tmp_path, capsys):
    """SIGKILL while epoch 2's checkpoint is half written: epoch 1's file is still there and loadable, and
    --resume trains epoch 2 again from it."""
    path = tmp_path / "digits.pt"
    child = subprocess.Popen([sys.executable, "-c", SAVE_HALF_THEN_HANG, "train", "pvt_v2_b0", "--epochs", "2",
                              "--save", str(path), *QUICK_TRAIN],
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(120, child.kill)
    watchdog.start()
    try:
        output = []
        for line in child.stdout:
            output.append(line)
            if line.startswith("HANGING IN SAVE"):
                child.send_signal(signal.SIGKILL)
                break
        assert child.wait() == -signal.SIGKILL, "".join(output)
    finally:
        watchdog.cancel()
        child.stdout.close()
    assert "epoch 2/2:" in "".join(output)  # killed while saving epoch 2

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 0 and int(checkpoint["optimizer"]["state"][0]["step"]) == 4
    pvt.load_state_dict(pvt.create_model("pvt_v2_b0", num_classes=10), checkpoint)

    main(["train", "pvt_v2_b0", "--epochs", "2", "--resume", str(path), "--save", str(path), *QUICK_TRAIN])
    assert "epochs 2..2" in capsys.readouterr().out
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and int(checkpoint["optimizer"]["state"][0]["step"]) == 2 * 4


@pytest.mark.parametrize("argv, message", [
    ("info pvt_v2_b0 --img-size 0 0", "argument --img-size: must be >= 1, got 0"),
    ("info pvt_v2_b0 --img-size 32 -32", "argument --img-size: must be >= 1, got -32"),
    ("info pvt_v2_b0 --num-classes -1", "argument --num-classes: must be >= 0, got -1"),
    ("train pvt_v2_b0 --img-size 16 16", "--img-size 16 16 is too small for pvt_v2_b0"),
    ("bench pvt_tiny --batch 1 --img-size 3 3", "--img-size 3 3 is too small for pvt_tiny"),
    ("train pvt_v2_b0 --batch-size 0", "argument --batch-size: must be >= 1, got 0"),
    ("bench pvt_v2_b0 --batch 0", "argument --batch: must be >= 1, got 0"),
    ("bench pvt_v2_b0 --batch 1 --steps 0", "argument --steps: must be >= 1, got 0"),
    ("train pvt_v2_b0 --epochs 0", "argument --epochs: must be >= 1, got 0"),
    ("train pvt_v2_b0 --epochs -3", "argument --epochs: must be >= 1, got -3"),
    ("train pvt_v2_b0 --epochs two", "argument --epochs: not an integer: 'two'"),
    ("train pvt_v2_b0 --subset -5", "argument --subset: must be >= 1, got -5"),
    ("bench pvt_v2_b0 --batch 1 --device bogus", "argument --device: not a torch device: 'bogus'"),
    ("bench pvt_v2_b0", "--batch or --preset is required"),
    ("bench pvt_v2_b0 --preset video", "argument --preset: invalid choice: 'video'"),
    ("bench pvt_v2_b0 --batch 1 --compile reduce-overhead --compile-backend aot_eager",
     "--compile reduce-overhead needs --compile-backend inductor, got aot_eager"),
    ("bench pvt_v2_b0 --batch 1 --grad-checkpointing", "--grad-checkpointing goes with --train"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    """argparse's exit status 2 and a message on stderr, before any work: no traceback, no silent exit 0."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv.split() + (["--no-progress"] if argv.startswith("train") else []))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert f"python -m pvt {argv.split()[0]}: error: {message}" in captured.err and not captured.out


def test_bench_refuses_a_cuda_device_that_is_not_here(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match="2"):
        main(["bench", "pvt_v2_b0", "--batch", "1", "--device", "cuda:1"])
    assert "argument --device: cuda:1: no such CUDA device here (1 visible)" in capsys.readouterr().err


def test_save_folder_is_checked_before_training(tmp_path, capsys):
    """A --save that cannot be written is a usage error before any training; a missing folder is created."""
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    for save, message in ((not_a_folder / "digits.pt", f"{not_a_folder} is a file, not a folder"),
                          (tmp_path, "it is a folder, not a file")):
        with pytest.raises(SystemExit, match="2"):
            main(["train", "pvt_v2_b0", "--save", str(save), *QUICK_TRAIN])
        captured = capsys.readouterr()
        assert f"python -m pvt train: error: --save: cannot save checkpoints to {save}: {message}" in captured.err
        assert "training" not in captured.out

    from pvt.train import prepare_save_folder

    prepare_save_folder(tmp_path / "runs" / "digits" / "model.pt")
    assert (tmp_path / "runs" / "digits").is_dir()


def test_compile_and_plot_usage_errors_need_their_dependencies(capsys, monkeypatch):
    """reduce-overhead training needs a GPU; --plot needs matplotlib: usage errors before any work."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    for argv, message in ((["train", "pvt_v2_b0", "--compile", "reduce-overhead"],
                           "--compile reduce-overhead replays CUDA graphs: it needs a GPU"),
                          (["bench", "pvt_v2_b0", "--batch", "1", "--plot", "b.png"],
                           "--plot needs matplotlib (pip install matplotlib)")):
        with pytest.raises(SystemExit, match="2"):
            main(argv)
        assert message in capsys.readouterr().err


def test_train_options_reach_the_config(monkeypatch):
    from pvt import train as train_module

    configs = []
    monkeypatch.setattr(train_module, "train", configs.append)
    main(["train", "pvt_v2_b0", "--compile", "default", "--compile-backend", "aot_eager", "--bf16", "--no-progress",
          "--grad-checkpointing"])
    assert [(c.compile, c.compile_backend, c.bf16, c.grad_checkpointing) for c in configs] == [
        ("default", "aot_eager", True, True)]


def test_train_loss_curves_agree_across_backends_compile_and_bf16(monkeypatch):
    """Same seed, two steps of a one-block, narrow pvt_v2_b0: the per-step losses on reference, sdpa and triton
    agree closely; bf16 autocast within bf16's precision. The triton run is compiled (--compile default; aot_eager
    off CUDA: AOTAutograd traces the custom ops' backward, the interpreter runs the kernels), so it checks the
    kernels and a compiled training step at once (eager triton training: tests/test_sra_triton.py)."""
    from pvt import train as train_module

    narrow = functools.partial(pvt.create_model, depths=(1, 1, 1, 1), embed_dims=(16, 32, 80, 128))
    monkeypatch.setattr(train_module, "create_model", narrow)
    quick = dict(epochs=1, batch_size=2, subset=4, val_fraction=0.001, progress=False,
                 compile_backend="inductor" if torch.cuda.is_available() else "aot_eager")
    kernels = "triton" if "triton" in available_backends() else "sdpa"

    def losses(**run):
        return train_module.train(train_module.TrainConfig("pvt_v2_b0", **quick, **run))[0]["step_losses"]

    reference = losses(backend="reference")
    assert len(reference) == 2
    for run in (dict(backend="sdpa"), dict(backend=kernels, compile="default"), dict(backend="sdpa", bf16=True)):
        tolerance = 3e-2 if run.get("bf16") else 1e-3 if torch.cuda.is_available() else 1e-4
        assert losses(**run) == pytest.approx(reference, rel=tolerance), run
