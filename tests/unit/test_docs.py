"""The docs keep up with the code: every command, option and setting in the README; every route
and search parameter in docs/api.md."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from iop_fhir.cli import main
from iop_fhir.config import DEFAULTS
from iop_fhir.server import create_app
from iop_fhir.store.search_index import COMMON, PARAMETERS, SearchParam

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        found.append((f"{prefix}{name}", command))
        if isinstance(command, click.Group):
            found += _commands(command, f"{prefix}{name} ")
    return found


@pytest.mark.parametrize(("name", "command"), _commands(main), ids=lambda v: v if isinstance(v, str) else "")
def test_command_and_its_options_are_in_the_readme(name: str, command: click.Command) -> None:
    assert f"iop-fhir {name}" in README, f"README does not document `iop-fhir {name}`"
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            longest = max(param.opts, key=len)
            assert longest in README, f"README does not document {longest} of `iop-fhir {name}`"


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_setting_is_in_the_readme(key: str) -> None:
    assert f"IOP_FHIR_{key}" in README, f"README does not document the setting IOP_FHIR_{key}"


# --- docs/api.md keeps up with the HTTP API ---------------------------------------------------------

API_DOC = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text(encoding="utf-8")
TABLE_START = "<!-- search parameters: generated from store.search_index.PARAMETERS (tests/unit/test_docs.py) -->"
TABLE_END = "<!-- end of search parameters -->"


def search_parameter_table() -> str:
    """The search parameter table of docs/api.md, as the store's table defines the parameters."""
    rows = ["| type | parameter | kind | reads |", "|---|---|---|---|"]
    own = {"_id": "`id`", "_lastUpdated": "`meta.lastUpdated`"}  # parameters on the resource's own columns

    def row(resource_type: str, p: SearchParam) -> str:
        reads = " or ".join(f"`{path}`" for path in p.paths) or own[p.name]
        targets = f" ({', '.join(p.targets)} only)" if p.targets else ""
        return f"| {resource_type} | `{p.name}` | {p.type} | {reads}{targets} |"

    rows += [row("*every type*", p) for p in COMMON]
    rows += [row(resource_type, p) for resource_type, params in PARAMETERS.items() for p in params]
    return "\n".join(rows)


def test_api_doc_lists_every_search_parameter() -> None:
    assert TABLE_START in API_DOC and TABLE_END in API_DOC, "docs/api.md lost the markers around its search parameter table"
    documented = API_DOC.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    expected = search_parameter_table()
    assert documented == expected, f"docs/api.md's search parameters are out of step with the store; put this between the markers:\n{expected}"


def _route(path: str) -> str:
    """A path with its variable parts blanked (``/fhir/<resource_type>/<id>`` and ``/fhir/{type}/{id}`` alike)."""
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", path)


def test_api_doc_names_every_route(tmp_path) -> None:
    """Every /fhir and /iop route and the public probes are documented (/admin: the README)."""
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'doc.sqlite'}", "AUTH": "off"})
    documented = {_route(m) for m in re.findall(r"`(?:GET |POST |PUT |PATCH |DELETE )?(/[^`\s?]*)", API_DOC)}
    routes = {_route(rule.rule.rstrip("/") or "/") for rule in app.url_map.iter_rules() if not rule.rule.startswith(("/static", "/admin"))}
    missing = sorted(r for r in routes if r not in documented)
    assert not missing, f"docs/api.md does not document {missing}"
