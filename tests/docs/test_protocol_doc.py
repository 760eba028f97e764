"""docs/protocol.md has one field table per message and nested object, and each lists exactly the fields
of the reference implementation's model, with the same required/optional split (a field added, removed
or made optional in protocol/messages.py fails here until the spec says so)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from protocol.chunks import ChunkHeader
from protocol.messages import (
    BlobRef,
    ChunkRequest,
    Deployment,
    EvalReport,
    ModelInfo,
    NodeStatus,
    RoundStart,
    RunEnd,
    TrainingInfo,
    UpdateAck,
    UpdateManifest,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
# defaults when the reference implementation builds a message, but every message on the wire must carry
# them: parse_message checks schema_version before anything else, and kind selects the model
WIRE_REQUIRED = {"schema_version", "kind"}
MODELS: list[type[BaseModel]] = [
    NodeStatus,
    RoundStart,
    ModelInfo,
    TrainingInfo,
    RunEnd,
    BlobRef,
    UpdateManifest,
    EvalReport,
    UpdateAck,
    ChunkRequest,
    Deployment,
]


def field_table(name: str) -> dict[str, str]:
    """{field: required column} of the table under the heading that names `name`."""
    text = DOC.read_text()
    heading = re.search(rf"^(#### {name} \(|\*\*{name}\*\* \()", text, re.MULTILINE)
    assert heading, f"docs/protocol.md has no section for {name}"
    rows: dict[str, str] = {}
    for line in text[heading.end() :].splitlines()[1:]:
        if not line.strip() and rows:
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `"):
            rows[cells[0].strip("`")] = cells[2]
    return rows


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_each_message_table_lists_the_models_fields(model):
    rows = field_table(model.__name__)
    assert list(rows) == list(model.model_fields), f"{model.__name__}: fields differ from the code"
    for name, info in model.model_fields.items():
        documented = rows[name].split(" ")[0]
        required = info.is_required() or name in WIRE_REQUIRED
        assert documented == ("yes" if required else "no"), f"{model.__name__}.{name}: required?"


def test_the_chunk_header_fields_are_the_specs():
    text = DOC.read_text()
    listed = re.search(r"header = \{(.*?)\}", text)
    assert listed, "docs/protocol.md shows no chunk header"
    assert [f.strip().strip('"') for f in listed.group(1).split(",")] == list(ChunkHeader.model_fields)
