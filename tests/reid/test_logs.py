"""Log lines: one record is one line, whatever text a peer put into it."""

from __future__ import annotations

import io
import logging
import sys

from reid.logs import configure_logging, log_context


def test_a_peers_text_cannot_forge_a_log_line(monkeypatch):
    """A site's failure reason with newlines and terminal escapes (it forged WARNING lines about another
    site) is escaped into its own line; a traceback still prints on its lines after it."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    configure_logging("INFO")
    log = logging.getLogger("forge")
    reason = "disk full\n2026-12-03 10:00:00,000 WARNING [site=b round=3] cloud.server: b revoked\r\x1b[2K"
    with log_context(site="a", round=3):
        log.warning("site cannot take part in this round: %s", reason)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("with a traceback")
    lines = out.getvalue().splitlines()
    assert len(lines[0]) > 100 and "[site=a round=3]" in lines[0] and "b revoked" in lines[0]
    assert "\\n2026-12-03" in lines[0] and "\\r\\x1b[2K" in lines[0]
    assert "[site=b" not in "".join(lines[1:])
    assert lines[1].endswith("with a traceback") and lines[2].startswith("Traceback")
    assert lines[-1] == "RuntimeError: boom"
