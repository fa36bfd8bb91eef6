"""A minimal renderer of Go's text/template: enough of it to run Ollama TEMPLATEs in tests.

Supports text, {{ pipeline }} output, trim markers {{- -}}, if / else if / else / end,
range over a list (with `$i, $x :=`), variables (`$x := v`, `$x = v`, `$`, `$.Field`),
fields (.Role, $x.Content), string/int literals, parentheses, and the functions
eq, ne, and, or, not, len, slice. Values are Python dicts, lists, strings and ints.
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+)|(?P<lp>\()|(?P<rp>\))'
                    r"|(?P<decl>:=)|(?P<assign>=)|(?P<comma>,)"
                    r"|(?P<word>\$?[A-Za-z_]*(?:\.[A-Za-z_]+)*|\.))")


def render(template: str, data: dict) -> str:
    nodes, rest = _parse(_lex(template), 0, ())
    assert rest == len(_lex(template)), "unbalanced {{ end }}"
    out: list[str] = []
    _exec(nodes, data, [{"$": data}], out, data)
    return "".join(out)


# ---------------------------------------------------------------- lexing and parsing

def _lex(template: str) -> list:
    """Text strings and ("action", source) tuples, with trim markers applied to the text."""
    items: list = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        items.append(text)
        items.append(("action", m.group(2).strip()))
        trim_next = bool(m.group(3))
        pos = m.end()
    text = template[pos:]
    items.append(text.lstrip() if trim_next else text)
    return items


def _parse(items: list, i: int, stop: tuple) -> tuple[list, int]:
    """Nodes until an action whose keyword is in `stop` (returned index points at it)."""
    nodes: list = []
    while i < len(items):
        item = items[i]
        if isinstance(item, str):
            nodes.append(("text", item))
            i += 1
            continue
        src = item[1]
        word = src.split(None, 1)[0] if src else ""
        if word in stop:
            return nodes, i
        if word in ("if", "range"):
            node, i = _parse_block(items, i, word, src[len(word):].strip())
            nodes.append(node)
        else:
            nodes.append(("expr", src))
            i += 1
    return nodes, i


def _parse_block(items: list, i: int, kind: str, head: str):
    body, i = _parse(items, i + 1, ("else", "end"))
    src = items[i][1]
    if src == "end":
        return (kind, head, body, []), i + 1
    if kind == "if" and src.startswith("else if "):  # else if: a nested if in the else branch
        nested, i = _parse_block(items, i, "if", src[len("else if "):])
        return (kind, head, body, [nested]), i
    other, i = _parse(items, i + 1, ("end",))
    return (kind, head, body, other), i + 1


# ---------------------------------------------------------------- execution

def _exec(nodes, dot, scopes, out, root) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "expr":
            value = _statement(node[1], dot, scopes)
            if value is not None:
                out.append(str(value))
        elif kind == "if":
            _, head, body, other = node
            branch = body if _truthy(_statement(head, dot, scopes)) else other
            _exec(branch, dot, scopes + [{}], out, root)
        elif kind == "range":
            _, head, body, other = node
            names, expr = [], head
            if ":=" in head:
                left, expr = head.split(":=", 1)
                names = [n.strip() for n in left.split(",")]
            items = _eval(_tokens(expr), dot, scopes)
            for index, item in enumerate(items or []):
                scope = {}
                if len(names) == 1:
                    scope[names[0]] = item
                elif len(names) == 2:
                    scope[names[0]], scope[names[1]] = index, item
                _exec(body, item, scopes + [scope], out, root)
            if not items:
                _exec(other, dot, scopes + [{}], out, root)


def _statement(src: str, dot, scopes):
    """An action: `$x := pipeline` declares, `$x = pipeline` assigns (no output), else a value."""
    tokens = _tokens(src)
    if len(tokens) > 2 and tokens[1][0] in ("decl", "assign"):
        name, value = tokens[0][1], _eval(tokens[2:], dot, scopes)
        if tokens[1][0] == "decl":
            scopes[-1][name] = value
        else:
            next(s for s in reversed(scopes) if name in s)[name] = value
        return None
    return _eval(tokens, dot, scopes)


def _tokens(src: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    src = src.strip()
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot parse {src[pos:]!r}")
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
        while pos < len(src) and src[pos].isspace():
            pos += 1
    return tokens


FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truthy(a),
    "len": len,
    "slice": lambda x, *ix: x[ix[0]:ix[1]] if len(ix) == 2 else x[ix[0]:] if ix else x,  # Go: x[i:j]
}


def _eval(tokens, dot, scopes):
    """A command: a function with arguments, or a single operand."""
    args, i = [], 0
    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "lp":
            depth, j = 1, i + 1
            while depth:
                depth += {"lp": 1, "rp": -1}.get(tokens[j][0], 0)
                j += 1
            args.append(("value", _eval(tokens[i + 1:j - 1], dot, scopes)))
            i = j
            continue
        args.append((kind, text))
        i += 1
    head_kind, head = args[0]
    if head_kind == "word" and head in ("and", "or"):
        values = [_operand(a, dot, scopes) for a in args[1:]]
        for v in values:  # Go returns the first falsy (and) / truthy (or) argument, else the last
            if _truthy(v) != (head == "and"):
                return v
        return values[-1]
    if head_kind == "word" and head in FUNCS:
        return FUNCS[head](*[_operand(a, dot, scopes) for a in args[1:]])
    assert len(args) == 1, f"not a function: {head}"
    return _operand(args[0], dot, scopes)


def _operand(arg, dot, scopes):
    kind, text = arg
    if kind == "value":
        return text
    if kind == "str":
        return text[1:-1].encode().decode("unicode_escape")
    if kind == "num":
        return int(text)
    if text in ("true", "false"):
        return text == "true"
    if text == ".":
        return dot
    if text.startswith("$"):
        name, _, path = text.partition(".")
        value = next(s[name] for s in reversed(scopes) if name in s)
    else:
        value, path = dot, text[1:]
    for field in filter(None, path.split(".")):
        value = value.get(field) if isinstance(value, dict) else getattr(value, field)
    return value


def _truthy(value) -> bool:
    return bool(value)  # Go: false, 0, nil and empty strings/lists/maps are false
