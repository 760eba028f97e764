"""docs/operations.md lists every key of cloud.toml and edge.toml with its default and meaning, exactly
as the config models define them (a new or changed key fails here until the docs say it)."""

from __future__ import annotations

from pathlib import Path

from cloud.config import ServeConfig
from edge.agent import AgentConfig
from reid.config import keys_table

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
TABLES = {"cloud.toml (`cloud-aggregator serve`)": ServeConfig, "edge.toml (`edge-agent start`)": AgentConfig}


def expected_section() -> str:
    parts = []
    for title, model in TABLES.items():
        rows = "\n".join(keys_table(model))
        parts.append(f"#### {title}\n\n| key | default | meaning |\n| --- | --- | --- |\n{rows}\n")
    return "\n".join(parts)


def test_operations_md_lists_every_config_key():
    section = expected_section()
    if section not in DOC.read_text():
        out = Path("config-keys.md")
        out.write_text(section)
        raise AssertionError(
            f"docs/operations.md is out of step with the config models: paste {out.resolve()}"
        )
