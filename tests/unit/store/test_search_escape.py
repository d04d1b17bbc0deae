"""Search-value escaping (``store.search_index.escape_value``, ``token_value``): whatever a value
holds, the search parser reads back exactly it, a comma inside it never an OR, a pipe never a system."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from iop_fhir.store.search_index import criterion, escape_value, token_value

# Any text but lone surrogates, separators and backslashes very much included.
TEXT = st.text(st.sampled_from("ab,|$\\ é") | st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


@given(st.lists(TEXT, min_size=1, max_size=4))
def test_escaped_values_joined_by_commas_are_read_as_exactly_these_alternatives(values: list[str]) -> None:
    parsed = criterion("MedicationRequest", "code", ",".join(escape_value(v) for v in values))
    assert parsed.values == tuple(values)


@given(TEXT, TEXT)
def test_a_token_reads_back_as_its_system_and_code(system: str, code: str) -> None:
    assert criterion("Patient", "identifier", token_value(system, code)).values == (system, code)


def test_an_escaped_backslash_before_a_separator_leaves_the_separator_standing() -> None:
    assert criterion("Patient", "identifier", "a\\\\|b").values == ("a\\", "b")
    assert criterion("MedicationRequest", "code", "a\\\\,b").values == ("a\\", "b")
    assert criterion("MedicationRequest", "code", "a\\,b").values == ("a,b",)
