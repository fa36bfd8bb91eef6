"""Issue 20: no pickle in a run folder, one train run per output folder, no output over its input."""

from __future__ import annotations

import shutil

from donkeytune.cli import main


def test_quantize_onto_its_own_input_is_refused(tmp_path, capsys):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + bytes(range(200)))
    before = src.read_bytes()
    (tmp_path / "link.gguf").symlink_to(src)
    for out in (src, tmp_path / "." / "m.gguf", tmp_path / "link.gguf"):
        assert main(["quantize", str(src), str(out), "--type", "Q8_0"]) == 2
        assert "would destroy the input" in capsys.readouterr().err
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.gguf", "m.gguf"]


def test_export_over_a_file_of_its_input_folder_is_refused(tiny_model, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_model("llama"), hf)
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    for name in ("model.safetensors", "config.json"):
        assert main(["export", str(hf), str(hf / name)]) == 2
        err = capsys.readouterr().err
        assert "would destroy the input" in err and name in err
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
