"""The Ollama Modelfile: its structure as Ollama parses it, and TEMPLATEs that render like the Jinja ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from go_template import render

from donkeytune.use import ollama

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = json.loads((FIXTURES / "chat_templates.json").read_text(encoding="utf-8"))["templates"]

SYSTEM = "You are DonkeyTune's helper.\nAnswer in one sentence."
CONVERSATION = [
    {"role": "user", "content": "What is a donkey?"},
    {"role": "assistant", "content": "A domesticated member of the horse family."},
    {"role": "user", "content": "How long do they live?"},
]
EXPECTED_FAMILY = {"qwen2.5": "chatml", "llama3": "llama3", "llama3.2": "llama3.1",
                   "gemma3": "gemma", "phi3": "phi3", "mistral": "mistral", "smollm2": "chatml"}


def jinja_prompt(template: str, messages: list[dict], bos: str = "", eos: str = "") -> str:
    """The prompt as transformers renders it (same sandboxed jinja2 settings), without BOS."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=bos, eos_token=eos,
                                            raise_exception=raise_exception)
    return text.removeprefix(bos) if bos else text  # the runtime's tokenizer adds BOS, not the template


def ollama_prompt(go_template: str, messages: list[dict]) -> str:
    """What Ollama renders: .System is the system messages joined, .Messages holds every message."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return render(go_template, {"System": system, "Messages": [
        {"Role": m["role"], "Content": m["content"]} for m in messages]})


@pytest.fixture(scope="module")
def templates(smollm2_dir) -> dict[str, dict]:
    out = dict(OFFICIAL)
    out["smollm2"] = {"chat_template": (smollm2_dir / "chat_template.jinja").read_text(encoding="utf-8"),
                      "bos_token": "", "eos_token": "<|im_end|>"}
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED_FAMILY))
@pytest.mark.parametrize("with_system", [True, False], ids=["system", "no-system"])
def test_template_renders_like_the_jinja_template(templates, name, with_system):
    spec = templates[name]
    assert ollama.detect_family(spec["chat_template"]) == EXPECTED_FAMILY[name]
    family = ollama.family_for(spec["chat_template"])
    messages = ([{"role": "system", "content": SYSTEM}] if with_system else []) + CONVERSATION
    expected = jinja_prompt(spec["chat_template"], messages, spec["bos_token"], spec["eos_token"])
    assert ollama_prompt(family.template, messages) == expected
    # the generation prompt ends the text: no stop string may appear after the last turn starts
    assert "How long do they live?" in expected


def test_default_system_prompt_of_chatml_templates(templates):
    assert ollama._chatml_default_system(templates["qwen2.5"]["chat_template"]) == (
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    assert ollama._chatml_default_system(templates["smollm2"]["chat_template"]).startswith(
        "You are a helpful AI assistant named SmolLM")
    chatml = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
    assert ollama._chatml_default_system(chatml) is None
    assert ollama.family_for(chatml).template == ollama.FAMILIES["chatml"].template


def test_family_from_architecture_when_there_is_no_template():
    assert ollama.detect_family(None, "qwen2") == "chatml"
    assert ollama.detect_family(None, "gemma3") == "gemma"
    assert ollama.detect_family(None, "llama") is None  # Llama-3, Mistral, SmolLM2: only the template tells
    assert ollama.detect_family("{{ messages }}", "phi3") == "phi3"


# ---------------------------------------------------------------- the Modelfile as Ollama reads it

def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """A port of Ollama's parser/parser.go ParseFile: (command, value) pairs, in order."""
    def unquote(s):  # no escapes: only the quotes at both ends are removed
        if s.startswith('"""'):
            return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
        if s.startswith('"'):
            return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
        return s, True

    commands, state, buf, name = [], "nil", "", ""
    for ch in text:
        if state == "nil":
            if ch == "#":
                state = "comment"
            elif ch not in " \t\r\n":
                state, buf = "name", ch
            continue
        if state == "comment":
            state = "nil" if ch in "\r\n" else "comment"
            continue
        if state in ("name", "param"):
            if ch in " \t":
                if state == "name" and buf.lower() == "parameter":
                    state, buf = "param", ""
                else:
                    name = {"from": "model"}.get(buf.lower(), buf.lower()) if state == "name" else buf
                    state, buf = "value", ""
            else:
                assert ch.isalnum() or ch == "_", f"invalid command near {buf + ch!r}"
                buf += ch
            continue
        if ch in " \t\r\n":  # a value ends at a newline once its quotes are closed
            value, ok = unquote(buf.strip())
            if not ok or ch in " \t":
                buf += ch
                continue
            commands.append((name, value))
            state, buf = "nil", ""
        elif ch.isprintable():  # Go's strconv.IsPrint: other characters are dropped
            buf += ch
    if state == "value":
        value, ok = unquote(buf.strip())
        assert ok, f"unterminated value: {buf!r}"
        commands.append((name, value))
    return commands


def test_modelfile_structure(tmp_path):
    gguf_file = tmp_path / "m-finetuned-Q4_K_M.gguf"
    gguf_file.write_bytes(b"")
    system = 'Say "hi" like """this""" \nand {{ .Prompt }} stays text; a trailing quote"'
    out = ollama.write_modelfile(gguf_file, OFFICIAL["llama3"]["chat_template"], system)
    assert out == tmp_path / "Modelfile"
    commands = parse_modelfile(out.read_text(encoding="utf-8"))
    names = [c for c, _ in commands]
    assert names == ["model", "template", "stop", "stop", "stop", "system"]
    values = dict(commands[:2])
    assert values["model"] == "./m-finetuned-Q4_K_M.gguf"
    assert values["template"] == ollama.FAMILIES["llama3"].template
    assert [v for c, v in commands if c == "stop"] == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    # the system prompt survives, except that a triple quote cannot: a space splits it
    assert commands[-1][1] == system.replace('"""', '"" "')


def test_modelfile_without_system_prompt_or_known_family(tmp_path):
    gguf_file = tmp_path / "x.gguf"
    out = ollama.write_modelfile(gguf_file, "{{ messages }}", None)
    assert parse_modelfile(out.read_text()) == [("model", "./x.gguf")]


def test_modelfile_from_an_hf_folder_and_a_gguf(tiny_model, tmp_path):
    from donkeytune import gguf

    folder = tiny_model("llama")  # SmolLM2's tokenizer and ChatML template
    gguf_file = gguf.export(folder, tmp_path / "tiny-f16.gguf", "f16")
    from_folder = ollama.write_modelfile(gguf_file, folder, "Be brief.").read_text()
    from_gguf = ollama.write_modelfile(gguf_file, None, "Be brief.").read_text()
    assert from_folder == from_gguf
    assert "<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in from_gguf
    assert ollama.create_command(Path("output/gguf/Modelfile"), "tiny-finetuned") == (
        "ollama create tiny-finetuned -f output/gguf/Modelfile")
