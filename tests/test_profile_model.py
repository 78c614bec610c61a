"""``python -m benchmarks.profile_model``: the per-module split of a training step (CPU time on CPU)."""

import json

import pytest
import torch

import pvt
from benchmarks.profile_model import CATEGORIES, main, profile_backend, tag_modules

TINY = ["--img-size", "64", "--batch", "2", "--steps", "1"]


def test_outermost_modules_are_tagged():
    model = pvt.create_model("pvt_v2_b0")
    # per block: attention, Mlp, norm1, norm2; per stage: patch embedding, stage norm (inner LayerNorms are not)
    handles = tag_modules(model)
    assert len(handles) == 2 * (4 * sum(model.depths) + 2 * 4)
    for handle in handles:
        handle.remove()


def test_split_of_pvt_v2_b0(tmp_path):
    out, out_json = tmp_path / "split.txt", tmp_path / "split.json"
    main([str(out), "--model", "pvt_v2_b0", *TINY, "--json", str(out_json)])
    text = out.read_text()
    assert "| category | fwd ms | bwd ms | total ms | % of step |" in text and "attention share:" in text
    assert "decode head" not in text
    [result] = json.loads(out_json.read_text())
    assert result["model"] == "pvt_v2_b0" and result["backend"] == "auto" and result["steps"] == 1
    rows = result["categories"]
    assert set(rows) == set(CATEGORIES)
    for category in ("attention", "mlp", "norm", "patch_embed"):
        assert rows[category]["fwd_ms"] > 0 and rows[category]["bwd_ms"] > 0, category
    assert rows["optimizer"]["total_ms"] > 0 and rows["decode_head"]["total_ms"] == 0
    assert sum(row["total_ms"] for row in rows.values()) == pytest.approx(result["total_ms_per_step"])
    assert sum(row["share"] for row in rows.values()) == pytest.approx(1.0)
    assert result["attention_share"] == rows["attention"]["share"]


def test_split_of_segformer_has_the_decode_head():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = pvt.create_model("segformer_b0").to(device).train()
    result = profile_backend(model, torch.randn(2, 3, 64, 64, device=device), "sdpa", steps=1)
    head = result["categories"]["decode_head"]
    assert head["fwd_ms"] > 0 and head["bwd_ms"] > 0
    assert result["categories"]["attention"]["bwd_ms"] > 0
