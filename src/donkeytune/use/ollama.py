"""An Ollama Modelfile next to the GGUF: FROM, the chat template in Go-template syntax, stops, SYSTEM.

Ollama renders prompts with its own Go template, not with the GGUF's Jinja template, and a
wrong template is the classic "garbage in Ollama" complaint. So each family we support gets
a TEMPLATE that renders the same text as the model's Jinja template (tests check this), and
the family is detected from the Jinja template itself, or from the architecture.
Ollama passes the system prompt both as .System and as the first of .Messages: our templates
place .System themselves and skip system messages in the loop. The runtime adds BOS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..files import MODELFILE, read_json
from ..progress import warn



@dataclass(frozen=True)
class Family:
    template: str
    stops: tuple[str, ...]


def _turns(user: str, assistant: str) -> str:
    """The loop over .Messages: user and assistant turns (system goes through .System)."""
    return ('{{ range .Messages }}{{ if eq .Role "user" }}' + user
            + '{{ else if eq .Role "assistant" }}' + assistant + "{{ end }}{{ end }}")


LLAMA3_TURNS = _turns("<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>",
                      "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Content }}<|eot_id|>")
LLAMA3_STOPS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

FAMILIES = {
    # ChatML (Qwen2/2.5/3, SmolLM2/3): the default system prompt of the template, if any,
    # is filled in by chatml_family().
    "chatml": Family(
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        + _turns("<|im_start|>user\n{{ .Content }}<|im_end|>\n",
                 "<|im_start|>assistant\n{{ .Content }}<|im_end|>\n")
        + "<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>")),
    "llama3": Family(
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        + LLAMA3_TURNS + "<|start_header_id|>assistant<|end_header_id|>\n\n",
        LLAMA3_STOPS),
    # Llama 3.1/3.2/3.3 always open with a system block that carries the dates; without a
    # clock, their Jinja template uses this fixed date too.
    "llama3.1": Family(
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n{{ if .System }}{{ .System }}{{ end }}<|eot_id|>"
        + LLAMA3_TURNS + "<|start_header_id|>assistant<|end_header_id|>\n\n",
        LLAMA3_STOPS),
    # Gemma has no system role: the system prompt opens the first user turn.
    "gemma": Family(
        "{{ $system := .System }}"
        + _turns('<start_of_turn>user\n{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
                 "{{ .Content }}<end_of_turn>\n",
                 "<start_of_turn>model\n{{ .Content }}<end_of_turn>\n")
        + "<start_of_turn>model\n",
        ("<start_of_turn>", "<end_of_turn>")),
    "phi3": Family(
        "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
        + _turns("<|user|>\n{{ .Content }}<|end|>\n", "<|assistant|>\n{{ .Content }}<|end|>\n")
        + "<|assistant|>\n",
        ("<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>")),
    # Mistral-Instruct v0.3: the system prompt goes into the last user turn; no generation header.
    "mistral": Family(
        '{{ range $i, $_ := .Messages }}{{ if eq .Role "user" }}[INST] '
        "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}"
        '{{ .Content }}[/INST]{{ else if eq .Role "assistant" }} {{ .Content }}</s>{{ end }}{{ end }}',
        ("[INST]", "[/INST]", "</s>")),
}

# general.architecture -> family, when a GGUF carries no chat template
ARCH_FAMILIES = {"qwen2": "chatml", "qwen3": "chatml", "smollm3": "chatml", "gemma3": "gemma",
                 "gemma2": "gemma", "gemma": "gemma", "phi3": "phi3"}


def detect_family(template: str | None, arch: str | None = None) -> str | None:
    """The family of a Jinja chat template (markers it must contain), else of the architecture."""
    if template:
        if "<|im_start|>" in template:
            return "chatml"
        if "<|start_header_id|>" in template:
            return "llama3.1" if "Cutting Knowledge Date" in template else "llama3"
        if "<start_of_turn>" in template:
            return "gemma"
        if "<|user|>" in template and "<|end|>" in template:
            return "phi3"
        if "[INST]" in template:
            return "mistral"
    return ARCH_FAMILIES.get(arch or "")


def family_for(template: str | None, arch: str | None = None) -> Family | None:
    name = detect_family(template, arch)
    if name is None:
        return None
    family = FAMILIES[name]
    default = _chatml_default_system(template) if name == "chatml" and template else None
    if default:  # e.g. Qwen2.5 and SmolLM2 fill in their own system prompt when none is given
        family = Family(family.template.replace(
            "{{ end }}", f"{{{{ else }}}}<|im_start|>system\n{default}<|im_end|>\n{{{{ end }}}}", 1),
            family.stops)
    return family


def _chatml_default_system(template: str) -> str | None:
    m = re.search(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}<>\\]+?)<\|im_end\|>", template)
    return m.group(1) if m else None


# ---------------------------------------------------------------- reading the template

def template_of(source: Path | str | None, gguf_path: Path) -> tuple[str | None, str | None]:
    """(Jinja chat template, architecture) from an HF folder, a template string or the GGUF."""
    is_template = isinstance(source, str) and ("{" in source or "\n" in source)
    if source is not None and not is_template:
        from ..gguf.vocab import chat_template  # noqa: PLC0415 - the exporter's own reading

        folder = Path(source)
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        template = chat_template(folder, tok_cfg)
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        archs = _read_json(folder / "config.json").get("architectures") or []
        arch = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                "Gemma3ForCausalLM": "gemma3", "Phi3ForCausalLM": "phi3",
                "SmolLM3ForCausalLM": "smollm3"}.get(archs[0] if archs else "")
        return template, arch
    if is_template:
        return source, None
    return gguf_metadata(gguf_path)


def gguf_metadata(path: Path) -> tuple[str | None, str | None]:
    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(str(path))

    def text(key: str) -> str | None:
        field = reader.fields.get(key)
        return bytes(field.parts[field.data[0]]).decode("utf-8") if field else None

    return text("tokenizer.chat_template"), text("general.architecture")


def _read_json(path: Path) -> dict:
    return read_json(path, missing={})


# ---------------------------------------------------------------- writing the Modelfile

def quote(text: str) -> str:
    """A Modelfile value in triple quotes. Ollama's parser has no escapes, ends the value at a
    newline after a triple quote and drops unprintable characters: split triple quotes with a space."""
    text = text.replace("\r\n", "\n")
    if '"""' in text:
        warn('the system prompt contains """, which a Modelfile cannot hold: written as "" "')
        while '"""' in text:
            text = text.replace('"""', '"" "')
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, family: Family | None, system_prompt: str | None) -> str:
    lines = [f"FROM ./{gguf_name}"]
    if family is not None:
        lines.append(f"TEMPLATE {quote(family.template)}")
        lines += [f'PARAMETER stop "{stop}"' for stop in family.stops]
    if system_prompt:
        lines.append(f"SYSTEM {quote(system_prompt)}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, hf_dir_or_template: Path | str | None = None,
                    system_prompt: str | None = None) -> Path:
    """Write `Modelfile` next to `gguf_path`; the chat template comes from the HF folder or the
    string given, else from the GGUF. Without a known family, Ollama's own detection is left to work."""
    gguf_path = Path(gguf_path)
    template, arch = template_of(hf_dir_or_template, gguf_path)
    family = family_for(template, arch)
    if family is None:
        warn(f"no Ollama TEMPLATE written: unknown chat template family (architecture {arch}); "
             "Ollama will guess it from the GGUF")
    out = gguf_path.parent / MODELFILE
    out.write_text(modelfile_text(gguf_path.name, family, system_prompt), encoding="utf-8")
    return out


def create_command(modelfile: Path, name: str) -> str:
    return f"ollama create {name} -f {modelfile}"
