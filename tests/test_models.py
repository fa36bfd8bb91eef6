"""Model references: local folders, GGUF import, aliases, hub ids (offline), clear refusals."""

from __future__ import annotations

import json
import shutil

import pytest

from donkeytune import models
from donkeytune.cli import main
from donkeytune.errors import ModelError


def test_local_folder(tiny_model):
    assert models.resolve(str(tiny_model("llama"))) == tiny_model("llama")


def test_builtin_alias_is_the_packaged_smollm2(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and cfg["vocab_size"] == 49152
    assert (smollm2_dir / "model.safetensors").is_file()
    assert models.resolve("smollm2-135m") == smollm2_dir  # cached: imported once
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == smollm2_dir


def test_gguf_file_is_imported(smollm2_dir):
    gguf = models._packaged_gguf(models.find_known("smollm2-135m"))
    assert models.resolve(str(gguf)) == smollm2_dir


def test_no_safetensors(tiny_model, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"no \*.safetensors weights \(found: pytorch_model.bin\)"):
        models.resolve(str(d))


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelError, match="not a Hugging Face model folder"):
        models.resolve(str(tmp_path))


def test_remote_code_is_refused_unless_trusted(tiny_model, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="needs remote code"):
        models.resolve(str(d))
    assert models.resolve(str(d), trust_remote_code=True) == d


def test_unknown_reference(capsys, tmp_path):
    facts = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "facts")
    assert main(["train", "--model", "not a model", "--data-dir", facts,
                 "--output-dir", str(tmp_path)]) == 2
    assert "model 'not a model' not found" in capsys.readouterr().err


def test_unknown_reference_message():
    with pytest.raises(ModelError, match="not found"):
        models.resolve("./no-such-folder-here")


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    # offline: HF_HUB_OFFLINE=1 is set by conftest, so the real download code runs without network
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="not in the local cache and the Hub cannot be reached"):
        models.resolve("SomeOrg/some-model")


def test_hf_token_from_dotenv(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    assert models.hf_token() is None
    (tmp_path / ".env").write_text("OTHER=1\nexport HF_TOKEN='hf_secret'\n")
    assert models.hf_token() == "hf_secret"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert models.hf_token() == "hf_env"


def test_models_command_lists_the_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for alias in ("smollm2-135m", "gemma-3-270m-it", "qwen2.5-0.5b", "qwen2.5-coder-1.5b",
                  "smollm3-3b", "llama-3.2-1b"):
        assert alias in out
    # the seed's list, under the seed's public repo ids, with its per-model settings
    for repo in ("unsloth/gemma-3-270m-it", "Menlo/Lucy-128k", "Menlo/Jan-nano", "Menlo/Jan-nano-128k",
                 "EssentialAI/rnj-1-instruct", "unsloth/SmolLM3-3B-128K", "unsloth/Qwen2.5-0.5B-Instruct",
                 "unsloth/Qwen2.5-1.5B-Instruct", "unsloth/Qwen2.5-Coder-1.5B-Instruct",
                 "Qwen/Qwen2.5-Coder-0.5B-Instruct"):
        assert repo in out
    assert models.find_known("unsloth/SmolLM3-3B-128K").seed == dict(batch_size=2, num_layers=4,
                                                                       rank=8, lr=1e-5)
    assert models.find_known("google/gemma-3-270m-it").repo == "unsloth/gemma-3-270m-it"
    # each says how it exports (rnj-1 had no architecture, so its row said "?")
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    for m in models.KNOWN_MODELS:
        assert m.arch.endswith("ForCausalLM"), m.alias
        assert " ? " not in rows[m.alias], rows[m.alias]


def test_pickle_weights_need_allow_pickle(tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="--allow-pickle"):
        models.resolve(str(d))
    assert models.resolve(str(d), allow_pickle=True) == d
