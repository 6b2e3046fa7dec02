"""docs/lake.md documents every column of every lake table, with the Arrow type the writer uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from consumers.lake import SCHEMAS

DOC = Path(__file__).resolve().parent.parent / "docs" / "lake.md"


def documented(table: str) -> dict[str, str]:
    """column -> type cell of the table's section in docs/lake.md."""
    text = DOC.read_text()
    section = re.search(rf"^### {table} .*?(?=^### |^## )", text, flags=re.S | re.M)
    assert section, f"docs/lake.md has no section for {table}"
    rows = re.findall(r"^\| ([a-z_]+) \| ([^|]+) \|", section.group(0), flags=re.M)
    return {name: kind.strip() for name, kind in rows if name != "column"}


@pytest.mark.parametrize("table", sorted(SCHEMAS))
def test_the_schema_doc_lists_exactly_the_columns_the_writer_writes(table: str) -> None:
    assert list(documented(table)) == SCHEMAS[table].names


@pytest.mark.parametrize("table", sorted(SCHEMAS))
def test_the_schema_doc_names_each_columns_arrow_type(table: str) -> None:
    doc = documented(table)
    for field in SCHEMAS[table]:
        arrow = str(field.type)
        short = {"double": "float64", "float": "float32", "large_string": "string"}.get(arrow, arrow)
        kind = doc[field.name]
        assert kind.split(" ")[0].split("(")[0] in (arrow, short) or arrow.startswith(
            kind.split(" ")[0].split("<")[0]
        ), (
            field.name,
            arrow,
            kind,
        )
