"""The fenced blocks of README.md and docs/*.md, their `<!-- cmd: ... -->` markers, the commands in them,
and the Makefile recipes they are checked against (tests/test_docs.py).

Marker kinds (the HTML comment on the line before the fence, invisible on GitHub):
  make T [T2 ...]          every command of the block is in the recipe of T (or its prerequisites);
                           a line `make X` needs only the target X
  tests/test_x.py::name    that test runs these commands (or reads the block itself)
  doc-test [slow]          tests/test_docs.py runs the block (demo_out/ and /tmp/ moved to a test folder;
                           demo_out/nuscenes = the tables of the Makefile's synth line); slow: in the slow set
  sketch — reason          a python fragment with names from elsewhere: its import lines run
  real-data — reason       needs what no test has (nuScenes trainval, CogVideoX weights, GPUs, a cluster)
  manual — reason          runs on this machine but is too heavy for a test (the reason says what covers it)
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
NEEDS_MARKER = SHELL_LANGS | {"python"}
PROJECT_PACKAGES = {"pipeline", "captions", "model", "train", "tools", "bench"}
MARKER = re.compile(r"^<!--\s*cmd:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    file: Path
    line: int            # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None   # the marker's text, None without one

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str:
        return (self.marker or "").split()[0] if self.marker else ""


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            j += 1
        prev = lines[i - 1].strip() if i > 0 else ""
        mk = MARKER.match(prev)
        out.append(Block(path, i + 1, m.group(2), "\n".join(s[len(m.group(1)):] for s in lines[i + 1:j]),
                         mk.group(1) if mk else None))
        i = j + 1
    return out


def all_blocks() -> list[Block]:
    return [b for f in doc_files() for b in blocks(f)]


# --- commands -------------------------------------------------------------------------------------------

def logical_lines(text: str) -> list[str]:
    """Lines joined over `\\` continuations and open quotes; comments and blanks dropped."""
    out, cur = [], ""
    for raw in text.split("\n"):
        cur = f"{cur} {raw.strip()}" if cur else raw.strip()
        if cur.endswith("\\"):
            cur = cur[:-1].rstrip()
            continue
        try:
            shlex.split(cur, comments=True)
        except ValueError:      # an open quote: the string goes on on the next line
            cur += "\n"
            continue
        if shlex.split(cur, comments=True):
            out.append(cur)
        cur = ""
    return out


def commands(text: str, variables: dict[str, str] | None = None) -> list[list[str]]:
    """Each simple command of a shell block as tokens, with the block's own `NAME=value` lines expanded."""
    env = dict(variables or {})
    out = []
    for line in logical_lines(text):
        for name, value in env.items():
            line = re.sub(rf"\$(?:{name}\b|\{{{name}\}})", value.replace("\\", r"\\"), line)
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split, lex.commenters = True, "#"
        cmd: list[str] = []
        for tok in list(lex) + [";"]:
            if tok and set(tok) <= set(";&|"):
                if len(cmd) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", cmd[0]):
                    k, v = cmd[0].split("=", 1)
                    env[k] = v                     # OUT=demo_out, T="torchrun ...": used by later lines
                elif cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
    return out


def scripts() -> dict[str, str]:
    """Console script -> module of its main (pyproject.toml)."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {k: v.split(":")[0] for k, v in table.items()}


@dataclass
class Call:
    module: str          # the project module whose main() runs
    args: list[str]      # what that main gets
    shown: str           # the command as written, for messages


def main_module(module: str) -> str:
    """A package run with -m names the module of its main in __main__.py (pipeline.synth -> pipeline.synth.cli)."""
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        src = Path(spec.submodule_search_locations[0], "__main__.py").read_text()
        m = re.search(r"from ([\w.]+) import main", src)
        return m.group(1) if m else module
    return module


def _python_call(tokens: list[str], shown: str) -> Call | None:
    """tokens after the interpreter (or torchrun): [-m MOD | path.py] args."""
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in ("-m", "--module") and i + 1 < len(tokens):
            mod = tokens[i + 1]
            if mod.split(".")[0] not in PROJECT_PACKAGES:
                return None
            return Call(main_module(mod), tokens[i + 2:], shown)
        if t.endswith(".py") and not t.startswith("-"):
            if t.split("/")[0] not in PROJECT_PACKAGES:
                return None
            return Call(t[:-3].replace("/", "."), tokens[i + 1:], shown)
        i += 1
    return None


def resolve(cmd: list[str]) -> Call | None:
    """The project entry point a command runs, or None for other programs (ray, pip, make, vllm, export ...)."""
    shown = " ".join(cmd)
    while cmd and re.fullmatch(r"[A-Za-z_]\w*=.*", cmd[0]) or cmd and cmd[0] in ("do", "then", "time"):
        cmd = cmd[1:]                           # FOO=1 cmd, loop bodies
    if not cmd:
        return None
    if "--" in cmd and cmd[0] == "ray":         # ray job submit ... -- python pipeline/build.py ...
        return resolve(cmd[cmd.index("--") + 1:])
    prog = cmd[0]
    if prog in scripts():
        return Call(scripts()[prog], cmd[1:], shown)
    if re.fullmatch(r"(.*/)?python3?|\$\(PY\)", prog) or prog == "torchrun":
        return _python_call(cmd[1:], shown)
    return None


def inline_commands(path: Path) -> list[list[str]]:
    """The `code spans` of a doc's prose that are commands of this project (fenced blocks left out)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    out = []
    for m in re.finditer(r"`([^`\n]+)`", text):
        try:
            toks = shlex.split(m.group(1))
        except ValueError:
            continue
        if toks and resolve(toks) is not None:
            out.append(toks)
    return out


def flag_of(token: str) -> str | None:
    return token.split("=", 1)[0] if re.match(r"^--[A-Za-z]", token) else None


def pairs(args: list[str]) -> tuple[list[str], dict[str, str | None]]:
    """(positionals, {flag: value or None}); a flag takes the next token unless that is a flag."""
    pos, flags, i = [], {}, 0
    while i < len(args):
        t = args[i]
        f = flag_of(t)
        if f is None:
            pos.append(t)
        elif "=" in t:
            flags[f] = t.split("=", 1)[1]
        elif i + 1 < len(args) and not args[i + 1].startswith("-"):
            flags[f] = args[i + 1]
            i += 1
        else:
            flags[f] = None
        i += 1
    return pos, flags


# --- argparse -------------------------------------------------------------------------------------------

class _Captured(BaseException):
    """Raised from parse_known_args to hand the parser out of main() (BaseException: cli.entry lets it by)."""

    def __init__(self, parser):
        self.parser = parser


def parser_of(module: str):
    """The argparse parser a module's main() builds, caught at its first parse (nothing after it runs)."""
    import argparse
    import inspect
    import sys
    if module.startswith("bench.") and str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))      # bench scripts import their _common as run from bench/
    main = importlib.import_module(module).main
    orig = argparse.ArgumentParser.parse_known_args

    def grab(self, *a, **k):
        raise _Captured(self)
    argparse.ArgumentParser.parse_known_args = grab
    try:
        main([]) if inspect.signature(main).parameters else main()
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_known_args = orig
    raise AssertionError(f"{module}.main([]) never parsed its arguments")


def unknown_flags(call: Call) -> tuple[str, list[str]]:
    """(the parser's prog, the flags of the call that parser (or its subcommand) does not define)."""
    import argparse
    p = parser_of(call.module)
    named = False
    for t in call.args:                          # descend into subcommands named before the flags
        if t.startswith("-"):
            break
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and t in subs[0].choices:
            p, named = subs[0].choices[t], True
    known = set(p._option_string_actions)
    if not named:                                # `mdv2-caption --config` in prose: a flag of any subcommand
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                known |= {o for s in a.choices.values() for o in s._option_string_actions}
    return p.prog, sorted({f for t in call.args if (f := flag_of(t)) and f not in known})


# --- Makefile -------------------------------------------------------------------------------------------

def makefile() -> tuple[dict[str, str], dict[str, tuple[list[str], list[str]]]]:
    """(variables, {target: (prerequisites, recipe lines joined over continuations)})."""
    variables, targets, cur = {}, {}, None
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    for line in text.split("\n"):
        if line.startswith("\t") and cur:
            targets[cur][1].append(line.strip().lstrip("@"))
            continue
        m = re.match(r"^([A-Za-z_]\w*)\s*[?:]?=\s*(.*)$", line)
        if m:
            variables[m.group(1)] = m.group(2).strip()
            cur = None
            continue
        m = re.match(r"^([\w.$()/-]+)\s*:(?!=)\s*(.*)$", line)
        cur = None
        if m and not m.group(1).startswith("."):
            cur = m.group(1)
            targets[cur] = (m.group(2).split(), [])
    return variables, targets


def expand(s: str, variables: dict[str, str]) -> str:
    for _ in range(10):
        new = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), s)
        if new == s:
            break
        s = new
    return s


def recipe(target: str) -> list[str]:
    """The recipe lines of a target and of its prerequisites (transitively), variables expanded,
    except $(PY), which stays the interpreter resolve() knows."""
    variables, targets = makefile()
    variables = {k: v for k, v in variables.items() if k != "PY"}
    out, seen, todo = [], set(), [target]
    while todo:
        t = todo.pop()
        if t in seen or t not in targets:
            continue
        seen.add(t)
        prereqs, lines = targets[t]
        out += [expand(s, variables) for s in lines]
        todo += prereqs
    return out


def python_imports(text: str) -> str:
    """The import statements of a python fragment, as code."""
    tree = ast.parse(text)
    return "\n".join(ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))


def test_names(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
