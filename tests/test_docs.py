"""The project's docs hold together: every relative link in README.md and docs/ resolves (file, and heading
for an anchor, with GitHub's slugs), none points outside the repository, the README opens with the two
commands CI runs, and docs/api.md's API table is the one the request schemas generate."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest
from pydantic import Field

from server.api import api_table, schemas
from server.api.api_table import (ENDPOINTS, REFUSED_UNKNOWN, REFUSED_UNLESS, SUPPORTED, current_block,
                                  field_status, render, replace_block)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
API_DOC = ROOT / "docs" / "api.md"
FIRST_COMMANDS = ["./scripts/demo.sh", "./scripts/test.sh"]  # CI runs them as the README shows them

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto: ...


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where a `[..](..)` is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: inline markup dropped (its text kept), lower case, punctuation other
    than `-` and `_` removed, each space a hyphen."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(FENCE.sub("", path.read_text())):
        slug = github_slug(title)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(_prose(path.read_text())) if not EXTERNAL.match(target)]


def _doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize(
    ("heading", "slug"),
    [("Talk to it", "talk-to-it"), ("Quantized bases (`--quant`)", "quantized-bases---quant"),
     ("llama.cpp, the CPU peer", "llamacpp-the-cpu-peer"), ("Settings, restarts, limits and keys",
                                                             "settings-restarts-limits-and-keys"),
     ("Quantized base checkpoints (`--format int8` / `int4`)", "quantized-base-checkpoints---format-int8--int4"),
     ("`POST /v1/chat/completions`", "post-v1chatcompletions"), ("max_tokens **now**", "max_tokens-now")])
def test_github_slugs(heading, slug):
    assert github_slug(heading) == slug


def test_the_docs_exist():
    names = {p.name for p in DOCS}
    assert {"architecture.md", "serving.md", "training.md", "exports.md", "benchmarks.md", "observability.md",
            "loadtest.md", "api.md"} <= names


@pytest.mark.parametrize("doc", [README, *DOCS], ids=_doc_id)
def test_every_relative_link_resolves(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {_doc_id(dest)}")
    assert not broken, f"{_doc_id(doc)}: " + "; ".join(broken)


REPO_DIRS = ("adapters/", "server/", "training/", "tests/", "loadtest/", "benchmarks/", "scripts/", "examples/",
             "docs/")
PATH_SEPARATORS = re.compile(r"[\s=`'\"(),;]+")


def named_paths(path: Path) -> list[str]:
    """The repository paths a doc names in prose or commands (`server/engine/backend.py`,
    `./loadtest/run.sh`), read from the repository root; placeholders (`<...>`, `*`, `{...}`) and link
    anchors are left to the link check."""
    text = path.read_text()
    if api_table.START_MARK in text:
        text = replace_block(text, "")  # the generated table is checked on its own
    found = []
    for token in PATH_SEPARATORS.split(text):
        token = token.rstrip(".:").removeprefix("./")
        if token.startswith(REPO_DIRS) and not any(c in token for c in "<*{[#"):
            found.append(token)
    return found


@pytest.mark.parametrize("doc", [README, *DOCS], ids=_doc_id)
def test_every_repository_path_a_doc_names_exists(doc):
    missing = sorted({p for p in named_paths(doc) if not (ROOT / p).exists()})
    assert not missing, f"{_doc_id(doc)} names paths that do not exist: {missing}"


def test_the_readme_links_every_doc():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    assert {p.resolve() for p in DOCS} <= linked


@pytest.mark.parametrize("doc", [README, *DOCS], ids=_doc_id)
def test_no_doc_points_outside_the_repository(doc):
    text = doc.read_text()
    assert "../shared" not in text and "shared/DESIGN" not in text and "shared/ASSETS" not in text


def test_the_readme_opens_with_the_two_commands_ci_runs():
    first_block = FENCE.search(README.read_text())
    assert first_block is not None
    lines = [line.strip() for line in first_block.group(0).splitlines()[1:-1] if line.strip()]
    assert lines[:2] == FIRST_COMMANDS
    for command in FIRST_COMMANDS:
        script = ROOT / command
        assert script.is_file() and script.stat().st_mode & 0o111, f"{command} is missing or not executable"


def test_the_api_table_is_the_one_the_schemas_generate():
    assert current_block(API_DOC.read_text()) == render(), (
        "docs/api.md's API table is stale: run .venv/bin/python -m server.api.api_table --write docs/api.md")


def test_replace_block_keeps_what_lies_outside_the_markers():
    text = f"before\n{api_table.START_MARK}\nold\n{api_table.END_MARK}\nafter\n"
    assert replace_block(text, "NEW") == "before\nNEW\nafter\n"
    with pytest.raises(ValueError):
        replace_block("no markers", "NEW")


class _Toy(schemas.StrictBody):
    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus")
    echo: bool | None = schemas._not_implemented(False)


def test_a_fields_status_is_read_from_the_schema():
    schema = _Toy.model_json_schema()
    assert field_status("model", schema) == f"{SUPPORTED}: string (1+ chars); required"
    assert field_status("temperature", schema) == f"{SUPPORTED}: number >= 0.0 and <= 2.0; default `1.0`"
    assert field_status("top_p", schema) == f"{SUPPORTED}: number > 0.0 and <= 1.0; default `1.0`; nucleus"
    assert field_status("echo", schema) == f"{REFUSED_UNLESS} `null` or `false`"
    assert field_status("min_p", schema) == REFUSED_UNKNOWN


def test_every_field_a_schema_declares_has_a_row():
    table = render()
    for endpoint in ENDPOINTS:
        model = api_table.request_model(endpoint)
        for name in (model.model_fields if model is not None else ()):
            assert f"| `{name}` |" in table, f"{endpoint.path}: {name} has no row"


def test_every_json_route_is_in_the_table():
    """A route whose body is a request schema (not the admin routes) must be one of ENDPOINTS, under the
    class name the table looks up; else a new route, or a renamed class, would leave the table behind."""
    import server.api as api_package

    tabled = {endpoint.path: api_table.request_model(endpoint) for endpoint in ENDPOINTS}
    for module in pkgutil.iter_modules(api_package.__path__):
        if not module.name.startswith("routes_"):
            continue
        for route in importlib.import_module(f"server.api.{module.name}").router.routes:
            body = getattr(getattr(route, "body_field", None), "field_info", None)
            body_type = getattr(body, "annotation", None)
            if isinstance(body_type, type) and issubclass(body_type, schemas.StrictBody):
                assert route.path in tabled, f"{route.path} is not in server/api/api_table.py's ENDPOINTS"
                assert tabled[route.path] is body_type, (
                    f"{route.path} takes {body_type.__name__}; add that name to its Endpoint in api_table.py")
