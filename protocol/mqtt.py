"""An MQTT endpoint done right for this protocol (paho-mqtt 2, MQTT 3.1.1 features only).

* a retained status document and a last will (``offline``) on ``status/<node>``;
* subscriptions made in ``on_connect`` (they survive reconnects), automatic reconnect with back-off;
* the network thread only queues incoming messages (`protocol.inbox`: a flood of one topic cannot bury
  the others); handlers run on one worker thread, and an exception in a handler is logged in one line
  and never stops the endpoint;
* a retained message on a topic that is never retained (anything but status, round and deploy) is
  dropped; the aggregator also clears it, so a restarted node never receives it again;
* with signing, the keyring file is re-read when it changes (a revoked identity is refused at once),
  and `signer` tells a handler who signed the message it is handling;
* blobs go out as 1 MB chunks with a bounded in-flight window, never as one huge message.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import AfterValidator

from protocol.broker import parse_url
from protocol.chunks import DEFAULT_CHUNK_BYTES, split_blob
from protocol.inbox import Inbox
from protocol.messages import NodeStatus, encode_message
from protocol.signing import Keyring, SignatureError, Signer
from protocol.topics import Topics

log = logging.getLogger(__name__)
Handler = Callable[[str, bytes], None]


IDENTITY_FILES = ("ca.crt", "client.crt", "client.key")


def check_identity_dir(path: Path) -> Path:
    """`path` when it holds a provisioned identity (`cloud-aggregator provision`), else ValueError saying
    what is missing: at start, not as a connection that fails for no stated reason."""
    if not path.is_dir():
        raise ValueError(f"identity folder not found: {path}")
    missing = [name for name in IDENTITY_FILES if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{path} is not a provisioned identity folder: no {', '.join(missing)}")
    return path


IdentityDir = Annotated[Path, AfterValidator(check_identity_dir)]


class Endpoint:
    """One node's connection to the broker."""

    def __init__(
        self,
        url: str,
        topics: Topics,
        node: str,
        role: str,
        handlers: dict[str, Handler] | None = None,
        keepalive: int = 60,
        announce: bool = True,
        identity_dir: Path | None = None,
    ) -> None:
        """`announce=False`: an observer (tools) that publishes no status and registers no will.

        `identity_dir`: a provisioned identity (``ca.crt``, ``client.crt``, ``client.key``) for mutual TLS
        with an ``mqtts://`` broker; without it, ``mqtts://`` checks the server against the system CAs.
        With an identity that has ``keys.json``, every JSON message it receives must carry a valid
        signature of an identity allowed on that topic (protocol.signing); anything else is dropped with
        one log line. With ``signing.key`` too, every JSON message this endpoint publishes is signed.
        """
        self.topics = topics
        self.node = node
        self.role = role
        self.handlers = dict(handlers or {})
        self.host, self.port, tls = parse_url(url)
        if identity_dir is not None:
            check_identity_dir(identity_dir)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{role}-{node}-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        if tls and identity_dir is not None:
            self.client.tls_set(
                ca_certs=str(identity_dir / "ca.crt"),
                certfile=str(identity_dir / "client.crt"),
                keyfile=str(identity_dir / "client.key"),
            )
        elif tls:
            self.client.tls_set()
        self.client.max_inflight_messages_set(20)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.announce = announce
        self.deployed: str | None = None  # reported in the status document
        self.signer: Signer | None = None
        self.keyring: Keyring | None = None
        if identity_dir is not None and (identity_dir / "keys.json").is_file():
            self.keyring = Keyring.load(identity_dir / "keys.json", topics)
            if (identity_dir / "signing.key").is_file():  # (the operator's identity reads, signs nothing)
                self.signer = Signer.load(identity_dir / "signing.key", self.keyring)
        if announce:
            self.client.will_set(topics.status(node), self._status("offline"), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.keepalive = keepalive
        self.connected = threading.Event()
        self.on_connected: Callable[[], None] | None = None  # after every (re)connect; must not block
        self.inbox = Inbox(topics)
        self.signer_of_message: str | None = None  # who signed the message being handled (worker thread)
        self.retained_message = False  # whether it is a retained one, delivered on subscribing (ditto)
        self._keyring_mtime = self._keyring_stamp(identity_dir)
        self._identity_dir = identity_dir
        self.worker = threading.Thread(target=self._work, name=f"mqtt-{node}", daemon=True)
        self.status_as_set: tuple[str, int | None, str] = ("online", None, "")  # state, round, reason

    def _sealed(self, topic: str, payload: bytes) -> bytes:
        if self.signer is None or not payload or self.topics.is_chunks(topic):
            return payload
        return self.signer.wrap(payload)

    def _status(self, state: str, round_: int | None = None, reason: str = "") -> bytes:
        status = NodeStatus(
            node=self.node,
            role=self.role,
            state=state,
            round=round_,
            time=time.time(),
            deployed=self.deployed,
            reason=reason[:300],
        )
        return self._sealed(self.topics.status(self.node), encode_message(status))

    # -- paho callbacks (network thread: no heavy work here) --------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            return
        for topic_filter in self.handlers:
            client.subscribe(topic_filter, qos=1)
        if self.announce:
            self.restate()
        self.connected.set()
        log.info("connected to %s:%d as %s", self.host, self.port, self.node)
        if self.on_connected is not None:
            self.on_connected()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if reason_code.value != 0:
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, message) -> None:
        # an empty payload is a retained message being cleared (docs/protocol.md, Transport): it says
        # nothing, and must not take the place of a message still waiting on a state topic (a RunEnd)
        if message.payload:
            self.inbox.put(message.topic, message.payload, bool(message.retain))

    # -- worker ---------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:
                return
            topic, payload, retained = item
            try:
                self._handle(topic, payload, retained)
            except Exception as err:  # no message, whatever it holds, may stop this thread: the node's ears
                log.warning("dropped message on %s: %s: %s", topic, type(err).__name__, err)

    def _handle(self, topic: str, payload: bytes, retained: bool) -> None:
        if retained and not self.topics.may_be_retained(topic):
            log.warning("dropped a retained message on %s (this topic is never retained)", topic)
            if self.role == "aggregator":  # clear it on the broker, so it is not delivered again
                self.client.publish(topic, b"", qos=1, retain=True)
            return
        self.signer_of_message, self.retained_message = None, retained
        if self.keyring is not None and not self.topics.is_chunks(topic):
            self._reload_keyring()
            try:
                self.signer_of_message, payload = self.keyring.open(payload, topic)
            except SignatureError as err:
                log.warning("dropped message on %s: %s", topic, err)
                return
        for topic_filter, handler in list(self.handlers.items()):
            if paho.topic_matches_sub(topic_filter, topic):
                try:
                    handler(topic, payload)
                except Exception as err:  # a bad message must never stop the node
                    log.warning("handler for %s failed: %s: %s", topic, type(err).__name__, err)

    @staticmethod
    def _keyring_stamp(identity_dir: Path | None) -> float:
        path = identity_dir / "keys.json" if identity_dir is not None else None
        return path.stat().st_mtime if path is not None and path.is_file() else 0.0

    def _reload_keyring(self) -> None:
        """Re-read keys.json when it changed (provision add-site / revoke-site), without a restart."""
        stamp = self._keyring_stamp(self._identity_dir)
        if stamp == self._keyring_mtime or self._identity_dir is None:
            return
        self._keyring_mtime = stamp
        try:
            self.keyring = Keyring.load(self._identity_dir / "keys.json", self.topics)
            log.info("keyring reloaded: %d identities", len(self.keyring.identities))
        except (OSError, ValueError, KeyError) as err:
            log.warning("keyring %s unreadable (%s); keeping the previous one", self._identity_dir, err)

    def knows(self, identity: str) -> bool:
        """Whether `identity` is (still) in the keyring; True when messages are not signed."""
        if self.keyring is None:
            return True
        self._reload_keyring()
        return identity in self.keyring.identities

    # -- public ---------------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> Endpoint:
        self.worker.start()
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            log.warning(
                "no broker at %s:%d yet, or it refuses this client (a provisioned broker takes mqtts:// with "
                "this node's identity folder, and refuses a revoked certificate); still trying",
                self.host,
                self.port,
            )
        return self

    def stop(self) -> None:
        """Publish the offline status (a clean disconnect suppresses the will), then disconnect."""
        if self.announce and self.connected.is_set():
            try:
                self.client.publish(
                    self.topics.status(self.node), self._status("offline"), qos=1, retain=True
                ).wait_for_publish(5)
            except (RuntimeError, ValueError) as err:  # the connection dropped meanwhile: the will says it
                log.info("offline status not sent (%s); the broker publishes the last will", err)
        self.client.disconnect()
        self.client.loop_stop()
        self.inbox.close()
        self.worker.join(timeout=10)

    def set_state(self, state: str, round_: int | None = None, reason: str = "") -> None:
        self.status_as_set = (state, round_, reason)
        self.restate()

    @property
    def state(self) -> str:
        """The state last set (`online` until `set_state`)."""
        return self.status_as_set[0]

    def restate(self) -> None:
        """Publish the status document again as last set (after a change of `deployed`); a reconnect
        does the same: a failure keeps its round and reason."""
        status = self._status(*self.status_as_set)
        self.client.publish(self.topics.status(self.node), status, qos=1, retain=True)

    def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int = 1) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, self._sealed(topic, payload), qos=qos, retain=retain)

    def publish_blob(
        self,
        topic: str,
        blob: bytes,
        blob_id: str,
        chunk_size: int = DEFAULT_CHUNK_BYTES,
        indices: set[int] | None = None,
        timeout: float = 600.0,
    ) -> int:
        """Publish a blob's chunks (all, or only `indices`) and wait until the broker has them all.

        Survives a lost connection: a chunk that paho could not queue while disconnected is published
        again after the reconnect (a duplicate chunk is harmless); queued ones are resent by paho.
        """
        deadline = time.monotonic() + timeout
        pending: list[paho.MQTTMessageInfo] = []
        sent = 0
        for i, chunk in enumerate(split_blob(blob, blob_id, chunk_size)):
            if indices is not None and i not in indices:
                continue
            pending.append(self._publish_when_connected(topic, chunk, deadline))
            sent += 1
            if len(pending) >= 40:  # bound what sits in paho's queue
                self._wait_published(pending.pop(0), deadline)
        for info in pending:
            self._wait_published(info, deadline)
        return sent

    def send(self, topic: str, payload: bytes, retain: bool = False, timeout: float = 30.0) -> bool:
        """Publish and wait for the broker's acknowledgement, riding out a lost connection (waits for the
        reconnect, up to `timeout`). Returns whether it got through; never raises (a broker restart is
        not an error of the caller)."""
        deadline = time.monotonic() + timeout
        try:
            info = self._publish_when_connected(topic, self._sealed(topic, payload), deadline, retain)
        except TimeoutError:
            return False
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        return info.is_published()

    def _publish_when_connected(
        self, topic: str, payload: bytes, deadline: float, retain: bool = False
    ) -> paho.MQTTMessageInfo:
        while True:
            self.connected.wait(max(0.1, deadline - time.monotonic()))
            info = self.client.publish(topic, payload, qos=1, retain=retain)
            if info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_AGAIN):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not publish on {topic}: {paho.error_string(info.rc)}")
            time.sleep(0.2)

    @staticmethod
    def _wait_published(info: paho.MQTTMessageInfo, deadline: float) -> None:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        if not info.is_published():
            raise TimeoutError("the broker did not acknowledge a chunk in time")
