"""The docstrings are the contract of every public name, and the docs site renders them: each public name has a
numpy-style docstring (Parameters naming every parameter, Returns for functions) and an API page that
documents it; the README stays a short front door that keeps CI's test-command block. Reads files only: no
mkdocs needed."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

import rlhf_fast
import rlhf_fast.ppo

ROOT = Path(__file__).resolve().parent.parent
API_PAGES = ROOT / "docs" / "api"
README = ROOT / "README.md"
README_MAX_BYTES = 15_000
PPO_NAMES = ("PPOConfig", "train")


def _public() -> list[tuple[str, object]]:
    names = [(f"rlhf_fast.{n}", getattr(rlhf_fast, n)) for n in rlhf_fast.__all__ if n != "backend"]
    return names + [(f"rlhf_fast.ppo.{n}", getattr(rlhf_fast.ppo, n)) for n in PPO_NAMES]


def _section(doc: str, title: str) -> str | None:
    """The body of the numpy section `title` (the lines under its dashed underline, up to the next section)."""
    lines = doc.splitlines()
    for i in range(len(lines) - 1):
        if lines[i].strip() == title and re.fullmatch(r"-{3,}", lines[i + 1].strip()):
            body = []
            for j in range(i + 2, len(lines)):
                if j + 1 < len(lines) and lines[j].strip() and re.fullmatch(r"-{3,}", lines[j + 1].strip()):
                    break
                body.append(lines[j])
            return "\n".join(body)
    return None


def _documented_parameters(section: str) -> set[str]:
    """Names of the entries of a Parameters section: unindented `name : type` or `a, b : type` lines."""
    names: set[str] = set()
    for line in section.splitlines():
        if line.strip() and not line[:1].isspace():
            head = line.split(" : ")[0]
            names.update(part.strip().lstrip("*") for part in head.split(","))
    return names


def _parameters(obj) -> list[str]:
    """The parameters a caller passes (self, *args and **kwargs left out); [] for a class whose __init__ is not
    its own (an exception taking the message)."""
    if inspect.isclass(obj) and not any(
        "__init__" in vars(k) for k in obj.__mro__[:-1] if k.__module__.startswith("rlhf_fast")
    ):
        return []
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in inspect.signature(obj).parameters.values() if p.kind not in skip and p.name != "self"]


def docstring_problems(obj) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc.startswith(obj.__name__ + "("):
        doc = ""  # the signature dataclasses writes when a class has no docstring of its own
    if not doc.strip():
        return ["no docstring"]
    problems = []
    wanted = _parameters(obj)
    if wanted:
        section = _section(doc, "Parameters")
        if section is None:
            problems.append("no numpy 'Parameters' section")
        else:
            missing = [name for name in wanted if name not in _documented_parameters(section)]
            if missing:
                problems.append(f"'Parameters' does not document {missing}")
    if inspect.isfunction(obj) and _section(doc, "Returns") is None:
        problems.append("no numpy 'Returns' section")
    return problems


def _directives() -> list[tuple[Path, str, str]]:
    """(page, dotted path, options text) of every `::: path` directive of docs/api/*.md."""
    found = []
    for page in sorted(API_PAGES.glob("*.md")):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            match = re.match(r":::\s+(\S+)\s*$", line)
            if match:
                options = []
                for following in lines[i + 1 :]:
                    if following.strip() and not following[:1].isspace():
                        break
                    options.append(following)
                found.append((page, match.group(1), "\n".join(options)))
    return found


def _resolve(path: str):
    """The object a dotted path names, modules first (rlhf_fast.logprobs is a module and a function)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute, None)
            if obj is None:
                return None
        return obj
    return None


def _module_members(options: str) -> list[str] | None | bool:
    """What a module directive renders: None for every public member, False for none, else the listed ones."""
    if re.search(r"^\s*members:\s*false\s*$", options, re.M):
        return False
    block = re.search(r"^\s*members:\s*\n((?:\s+-\s+\S+\s*\n?)+)", options, re.M)
    if block:
        return re.findall(r"-\s+(\S+)", block.group(1))
    inline = re.search(r"^\s*members:\s*\[([^\]]*)\]", options, re.M)
    if inline:
        return [name.strip() for name in inline.group(1).split(",") if name.strip()]
    return None


def documented_on_api_pages(name: str, obj, directives) -> bool:
    short = name.rsplit(".", 1)[1]
    for _, path, options in directives:
        target = _resolve(path)
        if target is obj:
            return True
        if inspect.ismodule(target) and getattr(target, short, None) is obj:
            members = _module_members(options)
            if members is None or (members is not False and short in members):
                return True
    return False


@pytest.mark.parametrize("name, obj", _public(), ids=[n for n, _ in _public()])
def test_public_name_has_a_numpy_docstring(name, obj):
    assert docstring_problems(obj) == [], f"{name}: {docstring_problems(obj)}"


@pytest.mark.parametrize("name, obj", _public(), ids=[n for n, _ in _public()])
def test_public_name_is_on_an_api_page(name, obj):
    assert documented_on_api_pages(name, obj, _directives()), (
        f"{name} appears in no `::: ...` directive of docs/api/*.md (nor as a member of a documented module)"
    )


def test_every_api_directive_names_something():
    for page, path, _ in _directives():
        assert _resolve(path) is not None, f"{page.relative_to(ROOT)}: `::: {path}` names nothing importable"


def test_the_checks_catch_what_they_are_for():
    def bare(x, y=1):
        return x

    def prose(x, y=1):
        """Adds things; x and y are numbers."""
        return x

    def half(x, y=1):
        """Adds.

        Parameters
        ----------
        x : int
            A number.

        Returns
        -------
        int
            The sum.
        """
        return x

    assert docstring_problems(bare) == ["no docstring"]
    assert docstring_problems(prose) == ["no numpy 'Parameters' section", "no numpy 'Returns' section"]
    assert docstring_problems(half) == ["'Parameters' does not document ['y']"]
    assert not documented_on_api_pages("rlhf_fast.bare", bare, _directives())
    assert documented_on_api_pages("rlhf_fast.gae", rlhf_fast.gae, [(API_PAGES, "rlhf_fast.advantages", "")])
    assert not documented_on_api_pages(
        "rlhf_fast.gae", rlhf_fast.gae, [(API_PAGES, "rlhf_fast.advantages", "    options:\n      members: false")]
    )
    assert not documented_on_api_pages(
        "rlhf_fast.gae",
        rlhf_fast.gae,
        [(API_PAGES, "rlhf_fast.advantages", "    options:\n      members:\n        - gae_packed")],
    )


def test_ppo_config_documents_every_field():
    section = _section(inspect.getdoc(rlhf_fast.ppo.PPOConfig), "Parameters") or ""
    fields = [f.name for f in dataclasses.fields(rlhf_fast.ppo.PPOConfig)]
    assert [f for f in fields if f not in _documented_parameters(section)] == []


def test_readme_is_a_short_front_door_with_the_test_command():
    data = README.read_bytes()
    assert len(data) <= README_MAX_BYTES, f"README.md is {len(data)} bytes, more than {README_MAX_BYTES}"
    text = data.decode()
    block = re.search(r"<!-- test-command -->\n```bash\n(.+?)\n```\n<!-- /test-command -->", text, re.S)
    assert block, "README.md lost its <!-- test-command --> block (CI extracts the test command from it)"
    assert "pytest" in block.group(1)
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), f"README.md links to {link}, which does not exist"
