"""Who is online, read from the broker as an observer: the retained status document of every node and
the retained round announcement (`cloud-aggregator status --broker`), and the one line that says why a
connection to a broker failed (`no_broker`, shared by the commands that connect)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from protocol.broker import BrokerError
from protocol.messages import NodeStatus, RoundStart, parse_message
from protocol.mqtt import Endpoint
from protocol.topics import Topics
from reid.logs import one_line

log = logging.getLogger(__name__)

Seen = dict[str, tuple[str, str, str]]  # node -> (role, state, deployed); "round" -> ("deadline", text, "")


def no_broker(url: str, identity_dir: Path | None) -> str:
    """Why a connection may have failed, pointing at the likely cause."""
    if identity_dir is None:
        return (
            f"could not connect to {url}: nothing listens there, or it is a provisioned broker (mutual TLS), "
            "which needs mqtts://host:port and --identity-dir with a provisioned folder"
        )
    return f"could not connect to {url} with the identity in {identity_dir} (wrong host/port, or revoked)"


def observe(url: str, federation: str, identity_dir: Path | None = None, seconds: float = 1.5) -> Seen:
    """The retained status of every node and the open round's deadline, gathered for `seconds`; raises
    BrokerError (with `no_broker`'s line) when the broker cannot be reached."""
    seen: Seen = {}
    topics = Topics(federation)

    def on_message(topic: str, payload: bytes) -> None:
        msg = parse_message(payload)
        if isinstance(msg, NodeStatus):
            if topic != topics.status(msg.node):  # a node speaks for itself only (as the aggregator checks)
                log.warning("dropped a status on %s that names node %s", topic, msg.node)
                return
            state = f"failed (round {msg.round}: {msg.reason})" if msg.state == "failed" else msg.state
            seen[msg.node] = (msg.role, one_line(state), one_line(msg.deployed or ""))
        elif isinstance(msg, RoundStart):
            left = msg.deadline - time.time()
            seen["round"] = (
                "deadline",
                f"round {msg.round}, deadline in {left:.0f} s"
                if left > 0
                else f"round {msg.round}, deadline passed {-left:.0f} s ago",
                "",
            )

    handlers = {topics.status_all: on_message, topics.round: on_message}
    endpoint = Endpoint(
        url, topics, f"status-{os.getpid()}", "observer", handlers, announce=False, identity_dir=identity_dir
    )
    endpoint.start()
    try:
        if not endpoint.connected.is_set():
            raise BrokerError(no_broker(url, identity_dir))
        time.sleep(seconds)
    finally:
        endpoint.stop()
    return seen
