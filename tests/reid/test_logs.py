"""Log lines: one record is one line, whatever text a peer put into it, and a flood of one line is a count."""

from __future__ import annotations

import io
import logging
import sys

from reid import logs
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


def test_a_flood_of_one_line_costs_a_count_and_a_huge_text_is_cut(monkeypatch):
    """A peer that makes the same warning 1,000 times (an invalid message replayed) gets REPEATS_SHOWN
    lines; another kind of line, or another site's, still shows; after the window the next line says how
    many were held back. A 5 MB text (a tensor name) is cut to MAX_LINE_CHARS."""
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    configure_logging("INFO")
    log = logging.getLogger("flood")
    with log_context(site="evil"):
        for _ in range(1000):
            log.warning("dropped evaluation report from %s: %s", "evil", "bad")
    with log_context(site="honest"):
        log.warning("dropped evaluation report from %s: %s", "honest", "bad")
    log.info("round %d closed", 3)
    log.warning("update rejected: %s", "x" * 5_000_000)
    lines = out.getvalue().splitlines()
    assert len(lines) == logs.REPEATS_SHOWN + 3
    assert "[site=honest" in lines[-3] and lines[-2].endswith("round 3 closed")
    assert len(lines[-1]) < logs.MAX_LINE_CHARS + 200 and lines[-1].endswith("more characters)")
    clock[0] += logs.REPEAT_WINDOW_S + 1
    with log_context(site="evil"):
        log.warning("dropped evaluation report from %s: %s", "evil", "bad")
    last = out.getvalue().splitlines()[-1]
    assert last.endswith(f"bad ({1000 - logs.REPEATS_SHOWN} more like this held back)")


def test_the_http_servers_own_lines_are_ours(monkeypatch):
    """A malformed HTTP request to a site's feature service (or the dashboard) was logged by uvicorn in
    its own format, without site or round; it is one of our lines now, with the site that started it.
    A port in use is one line naming the address (uvicorn printed its own error first)."""
    import socket

    from fastapi import FastAPI

    from reid.http_server import BackgroundServer

    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    configure_logging("INFO")
    with log_context(site="site01"):
        server = BackgroundServer(FastAPI())
        url = server.start()
    port = int(url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"GARBAGE \x00 HTTP/9\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.1 400")
        try:
            BackgroundServer(FastAPI(), port=port).start()
            raise AssertionError("a second server on a port in use")
        except OSError as err:
            assert str(err) == f"cannot serve on 127.0.0.1:{port}: Address already in use"
    finally:
        server.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "[site=site01 round=-] uvicorn.error: Invalid HTTP request" in lines[0], lines
