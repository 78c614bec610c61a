"""Atomic writes (sra_kernels.files) and every file the project writes going through them: the new contents are
renamed onto the target, so a kill mid-write leaves the old file whole (a kill during a checkpoint save is in
tests/test_pvt_cli.py)."""

import json
import stat

import pytest
import torch

from benchmarks import policy_table
from sra_kernels.autotune import Autotuner
from sra_kernels.files import atomic_open, atomic_write_text


def _assert_replaced_atomically(paths, write, old_bytes: bytes = b"old") -> None:
    """Run ``write()`` over ``paths`` holding ``old_bytes``: each must get a new file renamed onto it while the old
    one, held open, keeps its bytes (an in-place rewrite truncates it first), and no temporary file may be left."""
    handles = []
    for path in paths:
        path.write_bytes(old_bytes)
        handles.append(open(path, "rb"))
    try:
        write()
        for path, old in zip(paths, handles):
            assert old.read() == old_bytes, f"{path} was rewritten in place"
            assert path.read_bytes() != old_bytes
    finally:
        for old in handles:
            old.close()
    folders = {path.parent for path in paths}
    assert [p for folder in folders for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_write_text_replaces_the_file_and_keeps_its_permissions(tmp_path):
    path = tmp_path / "out.txt"
    _assert_replaced_atomically([path], lambda: atomic_write_text(path, "new ü\n"))
    assert path.read_text(encoding="utf-8") == "new ü\n"
    path.chmod(0o640)
    atomic_write_text(path, "newer")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "newer"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"epoch": 0}, path)
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_open(path) as file:
            file.write(b"half a checkpoint")
            raise RuntimeError("killed")
    assert torch.load(path, weights_only=True) == {"epoch": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_symlink_is_written_through(tmp_path):
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_torch_save_through_atomic_open(tmp_path):
    path = tmp_path / "model.pt"

    def save():
        with atomic_open(path) as file:
            torch.save({"w": torch.arange(3)}, file)

    _assert_replaced_atomically([path], save)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))


def test_autotune_cache_is_replaced_atomically(tmp_path):
    cache = tmp_path / "autotune.json"
    seconds = {"sdpa": 2.0, "fused_projections": 1.0}
    _assert_replaced_atomically(
        [cache], lambda: Autotuner(cache).choose((1, 2), torch.device("cpu"), tuple(seconds), seconds.get), b"{}\n")
    assert list(json.loads(cache.read_text()).values()) == ["fused_projections"]


def test_policy_table_is_replaced_atomically(tmp_path, capsys):
    out = tmp_path / "policy_table.json"
    results = tmp_path / "results"
    results.mkdir()
    _assert_replaced_atomically([out], lambda: policy_table.main([str(results), "--out", str(out)]))
    assert json.loads(out.read_text())["rows"] == []


def test_report_files_are_replaced_atomically(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from benchmarks import report

    row = dict(kind="model", case="model case", model="pvt_v2_b0", image="224x224", batch=8, precision="fp32",
               mode="infer")
    benchmarks = [{"stats": {"median": seconds}, "extra_info": dict(row, provider=provider, images_per_s=8 / seconds)}
                  for provider, seconds in (("reference", 0.2), ("sdpa", 0.1))]
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"machine_info": {}, "benchmarks": benchmarks}))
    outputs = [tmp_path / "report.md", tmp_path / "speedups.png"]
    _assert_replaced_atomically(outputs, lambda: report.main([str(run)]))
    assert outputs[1].read_bytes()[:4] == b"\x89PNG"
