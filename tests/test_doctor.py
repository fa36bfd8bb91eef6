"""`donkeytune doctor` and `donkeytune models`: what this machine has and what fits."""

from __future__ import annotations

import re

from donkeytune import doctor, models
from donkeytune.models import table
from donkeytune.cli import main


def test_doctor_reports_every_line(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for key in ("python", "packages", "device", "memory", "disk", "llama.cpp", "built-in model",
                "largest model"):
        assert re.search(rf"^{re.escape(key)}\s+\S", out, re.M), key
    assert "torch " in out and "transformers " in out
    assert re.search(r"^memory\s+[\d.]+ GB available of [\d.]+ GB", out, re.M)
    assert "smollm2-135m installed" in out  # the built-in model ships in a test dependency
    dev, desc = doctor.compute_device()
    assert dev in ("cpu", "cuda", "mps") and desc.split(":")[0] in ("CPU", "CUDA", "Apple MPS (bf16)")


def test_largest_model_that_fits():
    assert table.largest_fitting(1.6).alias == "smollm2-135m"
    assert table.largest_fitting(7.0).alias == "llama-3.2-1b"
    # with room for every model: the largest of the table (rnj-1, 8.3B, since the seed's list joined it)
    assert table.largest_fitting(1000).alias == max(models.KNOWN_MODELS, key=lambda m: m.params_b).alias == "rnj-1"
    assert table.largest_fitting(0.5) is None


def test_models_table_has_memory_and_fits_here(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    for col in ("params", "layers", "context", "train mem", "fits here"):
        assert col in header
    row = next(line for line in out.splitlines() if line.startswith("smollm2-135m"))
    assert re.search(r"0\.135B\s+30\s+8192\s+0\.3 GB\s+~1\.5 GB\s+(yes|no)", row)
