"""The README keeps up with the code: every command, option and setting is documented."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from iop_fhir.cli import main
from iop_fhir.config import DEFAULTS

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
