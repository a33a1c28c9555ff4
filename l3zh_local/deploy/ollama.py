"""Ollama: the Modelfile derived from a chat family, a reader for Modelfiles, and `ollama create`.

The Modelfile's TEMPLATE is the family's Go template (see templates/family.py for why it renders exactly what the
Jinja template renders), every stop is a `PARAMETER stop`, and SYSTEM carries the family's default system prompt,
which Ollama prepends as a message when a conversation starts without one (as the Jinja template does).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, ToolchainError
from ..templates import ChatFamily

INT_PARAMETERS = {"num_ctx", "repeat_last_n", "seed", "num_predict", "top_k", "num_keep", "num_gpu", "num_thread"}
FLOAT_PARAMETERS = {"repeat_penalty", "temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"}
STRING_LIST_PARAMETERS = {"stop"}
COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message",
            "requires"}


def _quote(value: str) -> str:
    """Quote a Modelfile value: triple quotes keep newlines and inner quotes exactly."""
    if '"""' in value:
        raise InputError('a Modelfile value cannot contain """; change the template or system prompt')
    if value.endswith('"'):
        # `""""` at the end would still parse, but keep the closing unambiguous.
        raise InputError('a Modelfile value cannot end with a double quote; change the template or system prompt')
    return f'"""{value}"""'


def _number(value: float) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def modelfile_text(gguf_name: str, family: ChatFamily, num_ctx: int) -> str:
    """The Modelfile for the GGUF `gguf_name` (a path relative to the Modelfile's folder)."""
    lines = [
        f"# Ollama Modelfile written by l3zh-local. Chat family: {family.name} ({family.description}).",
        "# Use: ollama create NAME -f THIS_FILE   (run it in this folder; FROM is relative to it)",
        f"FROM ./{gguf_name}" if " " not in gguf_name else f'FROM "./{gguf_name}"',
    ]
    template = family.ollama_template()
    if template is None:
        lines.append("# No TEMPLATE: this custom family gave no Go template; Ollama will guess from the GGUF's Jinja.")
    else:
        lines.append(f"TEMPLATE {_quote(template)}")
    if family.default_system is not None:
        lines.append(f"SYSTEM {_quote(family.default_system)}")
    for stop in family.stop_tokens:
        if '"' in stop or "\n" in stop:
            raise InputError(f"stop string {stop!r} cannot be written as an Ollama PARAMETER")
        lines.append(f'PARAMETER stop "{stop}"')
    s = family.sampling
    lines += [
        f"PARAMETER temperature {_number(s.temperature)}",
        f"PARAMETER top_p {_number(s.top_p)}",
        f"PARAMETER repeat_penalty {_number(s.repeat_penalty)}",
        f"PARAMETER num_predict {s.max_tokens}",
        f"PARAMETER num_ctx {int(num_ctx)}",
    ]
    return "\n".join(lines) + "\n"


# ----- reading a Modelfile (Ollama's grammar: COMMAND value, values quoted with " or """) -----

def _unquote(value: str) -> tuple[str, bool]:
    if value.startswith('"""'):
        if len(value) >= 6 and value.endswith('"""'):
            return value[3:-3], True
        return "", False
    if value.startswith('"'):
        if len(value) >= 2 and value.endswith('"'):
            return value[1:-1], True
        return "", False
    return value, True


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs of a Modelfile, parsed with Ollama's rules: a value ends at a line break where it is
    complete (unquoted, or its quotes closed); PARAMETER gives (name, value). InputError when malformed."""
    commands: list[tuple[str, str]] = []
    i, line, n = 0, 1, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            line += ch == "\n"
            i += 1
            continue
        if ch == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        start = i
        while i < n and text[i].isascii() and text[i].isalpha():
            i += 1
        name = text[start:i].lower()
        if name not in COMMANDS or i >= n or text[i] not in " \t":
            raise InputError(f"Modelfile line {line}: expected a command ({', '.join(sorted(COMMANDS))})")
        if name == "parameter":
            i += 1
            start = i
            while i < n and (text[i].isascii() and (text[i].isalnum() or text[i] == "_")):
                i += 1
            name = text[start:i]
            if not name or i >= n or text[i] not in " \t":
                raise InputError(f"Modelfile line {line}: PARAMETER needs a name and a value")
        i += 1
        start = i
        value = None
        # As in Ollama, a value ends only at a line break (or the end) where it is complete: spaces never end it.
        while i <= n:
            if i == n or text[i] in "\r\n":
                candidate, complete = _unquote(text[start:i].strip(" \t\r\n"))
                if complete:
                    value = candidate
                    break
                if i == n:
                    break
            i += 1
        if value is None:
            raise InputError(f"Modelfile line {line}: unterminated value for {name.upper()}")
        line += text[start:i].count("\n")
        commands.append((name, value))
    if not any(name == "from" for name, _ in commands):
        raise InputError("Modelfile has no FROM line")
    return commands


@dataclass(frozen=True)
class Modelfile:
    """A parsed Modelfile with typed parameters."""

    from_: str
    template: str | None
    system: str | None
    parameters: dict  # name -> int | float | list[str] | str


def read_modelfile(text: str) -> Modelfile:
    """Parse and type-check a Modelfile (ints and floats where Ollama wants them, stop repeatable)."""
    from_ = template = system = None
    params: dict = {}
    for name, value in parse_modelfile(text):
        if name == "from":
            from_ = value
        elif name == "template":
            template = value
        elif name == "system":
            system = value
        elif name in COMMANDS:
            continue
        elif name in STRING_LIST_PARAMETERS:
            params.setdefault(name, []).append(value)
        elif name in INT_PARAMETERS:
            try:
                params[name] = int(value)
            except ValueError:
                raise InputError(f"Modelfile PARAMETER {name} must be an integer, not {value!r}") from None
        elif name in FLOAT_PARAMETERS:
            try:
                params[name] = float(value)
            except ValueError:
                raise InputError(f"Modelfile PARAMETER {name} must be a number, not {value!r}") from None
        else:
            params[name] = value
    assert from_ is not None  # parse_modelfile refuses a Modelfile without FROM
    return Modelfile(from_=from_, template=template, system=system, parameters=params)


# ----- ollama create -----

@dataclass(frozen=True)
class OllamaCreateResult:
    ran: bool  # False: neither the ollama CLI nor its Python client is here; `command` is what to run
    command: str
    output: str = ""


def ollama_create(name: str, modelfile: Path) -> OllamaCreateResult:
    """Register the model with Ollama: `ollama create NAME -f MODELFILE` through the CLI, else through the `ollama`
    Python client, else return the exact command for the user to run."""
    modelfile = Path(modelfile).resolve()
    if not modelfile.is_file():
        raise InputError(f"no Modelfile at {modelfile}: run export first or pass the Modelfile path")
    command = ["ollama", "create", name, "-f", modelfile.name]
    shown = f"cd {shlex.quote(str(modelfile.parent))} && {shlex.join(command)}"
    exe = shutil.which("ollama")
    if exe:
        proc = subprocess.run([exe, *command[1:]], cwd=modelfile.parent, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ToolchainError(f"ollama create failed: {tail[0]} (command: {shown})")
        return OllamaCreateResult(True, shown, proc.stdout + proc.stderr)
    try:
        import ollama  # the optional Python client
    except ImportError:
        return OllamaCreateResult(False, shown)
    return _create_with_client(ollama, name, modelfile, shown)


def _create_with_client(client_module, name: str, modelfile: Path, shown: str) -> OllamaCreateResult:
    """Same as the CLI through the Python client: upload the GGUF as a blob, then create from the parsed fields."""
    parsed = read_modelfile(modelfile.read_text(encoding="utf-8"))
    gguf = (modelfile.parent / parsed.from_).resolve()
    if not gguf.is_file():
        raise InputError(f"the Modelfile's FROM {parsed.from_} is not a file next to it")
    try:
        client = client_module.Client()
        digest = client.create_blob(gguf)
        client.create(
            model=name, files={gguf.name: digest}, template=parsed.template, system=parsed.system,
            parameters=parsed.parameters,
        )
    except Exception as exc:  # the client raises its own types, or connection errors when the server is down
        raise ToolchainError(f"ollama create through the Python client failed: {exc} (or run: {shown})") from None
    return OllamaCreateResult(True, shown, "created with the ollama Python client")
