"""`bkd predict`: a trained student rebuilt from its weights file alone classifies new inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.data import load_split
from tests.helpers import TINY, run_bkd

pytestmark = pytest.mark.slow


def test_predict_matches_evaluation_from_weights_alone(tiny_project: Path, tmp_path: Path):
    cfg = load_config(tiny_project / "params.yaml", [a for a in TINY if a != "--set"])
    test = load_split(cfg.data, "test")
    raw = test.load_raw(range(len(test)))
    np.save(tmp_path / "test.npy", raw[:, 0])  # (N, H, W) uint8: the channel is added for a 1-channel student
    weights = tmp_path / "elsewhere.safetensors"  # no config, no run folder beside it
    weights.write_bytes((tiny_project / "runs/students/mixed/student.safetensors").read_bytes())
    out = run_bkd(["predict", str(weights), str(tmp_path / "test.npy"), "--json"], tiny_project)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == len(test)
    predicted = np.array([r["class"] for r in rows])
    top1 = json.loads((tiny_project / "metrics/student-mixed.json").read_text())["top1"]
    assert (predicted == test.labels.numpy()).mean() == pytest.approx(top1)

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(raw[i, 0]).save(folder / f"digit{i}.png")
    out = run_bkd(["predict", str(tiny_project / "runs/students/mixed"), str(folder)], tiny_project)
    lines = [line.split("\t") for line in out.stdout.splitlines()]
    assert [name for name, _, _ in lines] == [f"digit{i}.png" for i in range(5)]
    assert [int(c) for _, c, _ in lines] == predicted[:5].tolist()


def test_predict_refuses_wrong_inputs_in_one_line(tiny_project: Path, tmp_path: Path):
    np.save(tmp_path / "float.npy", np.zeros((2, 1, 28, 28), np.float32))
    np.save(tmp_path / "shape.npy", np.zeros((2, 3, 32, 32), np.uint8))
    (tmp_path / "fake.png").write_bytes(b"not a png")
    run = str(tiny_project / "runs/students/mixed")
    np.save(tmp_path / "empty.npy", np.zeros((0, 28, 28), np.uint8))
    np.save(tmp_path / "empty4.npy", np.zeros((0, 1, 28, 28), np.uint8))
    Image.new("1", (15000, 15000)).save(tmp_path / "bomb.png")  # 27 kB on disk, 225 M pixels decoded
    for inputs, fragment in (("float.npy", "uint8"), ("shape.npy", "shape"), ("fake.png", "not a readable image"),
                             ("empty.npy", "holds no images"), ("empty4.npy", "holds no images"),
                             ("bomb.png", "decompression bomb")):
        proc = run_bkd(["predict", run, str(tmp_path / inputs)], tiny_project, check=False)
        assert proc.returncode == 2 and fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_bkd(["predict", str(tmp_path), str(tmp_path / "float.npy")], tiny_project, check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr

