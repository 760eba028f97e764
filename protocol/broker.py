"""A private local MQTT broker for single-machine use, tests and the demo (``broker = "auto"``).

`LocalBroker` starts the ``mosquitto`` binary on a free loopback port with its own configuration file
(anonymous, no persistence, no size limits: our chunks are 1 MB) and its own PID, and stops it on exit.
`EmbeddedBroker` runs the pure-Python amqtt broker in this process (MQTT 3.1.1 only, slower, more
memory: a fallback for machines without mosquitto). `auto_broker()` picks mosquitto, else amqtt.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(RuntimeError):
    """No broker could be started or reached."""


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if Path(p).is_file()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_url(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) from mqtt://host[:1883] or mqtts://host[:8883]."""
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ValueError(f"broker URL must be mqtt://host[:port] or mqtts://host[:port], got {url!r}")
    tls = parsed.scheme == "mqtts"
    return parsed.hostname, parsed.port or (8883 if tls else 1883), tls


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BrokerError(f"nothing accepts connections on {host}:{port} after {timeout:.0f} s")


class LocalBroker:
    """mosquitto on 127.0.0.1:<free port>; use as a context manager."""

    def __init__(
        self, port: int | None = None, workdir: Path | None = None, config: str | None = None
    ) -> None:
        """`config`: a complete mosquitto configuration (e.g. the provisioned mutual-TLS one) whose
        listener uses `port`; default: an anonymous loopback listener."""
        self.binary = find_mosquitto()
        if self.binary is None:
            raise BrokerError("the mosquitto binary was not found (Debian: apt-get install mosquitto)")
        self.port = port or free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="fedreid-broker-") if workdir is None else None
        self.workdir = Path(self._tmp.name) if self._tmp else workdir
        self.process: subprocess.Popen | None = None
        self.config = config
        self.tls = config is not None and "certfile" in config

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> LocalBroker:
        conf = self.workdir / "mosquitto.conf"
        text = (
            self.config
            or f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "log_dest stdout\nlog_type error\nlog_type warning\nmax_queued_messages 10000\n"
        )
        # started as root, mosquitto would switch to user `mosquitto`, which cannot read our private files
        if not any(line.startswith("user ") for line in text.splitlines()):
            text += f"user {getpass.getuser()}\n"
        conf.write_text(text)
        self.log_path = self.workdir / "mosquitto.log"
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
            )
        try:
            wait_for_port("127.0.0.1", self.port)
        except BrokerError:
            self.stop()
            raise BrokerError(f"mosquitto did not start: {self.log_path.read_text()[-500:]}") from None
        log.info("mosquitto (pid %d) listening on %s", self.process.pid, self.url)
        return self

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its ACL and CRL (after add-site / revoke-site)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


class EmbeddedBroker:
    """The amqtt broker on 127.0.0.1:<free port>, on its own event loop in a daemon thread."""

    def __init__(self, port: int | None = None) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise BrokerError(
                "neither mosquitto nor amqtt is available: apt-get install mosquitto, or pip install amqtt"
            ) from None
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="amqtt", daemon=True)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = Broker(config, loop=self._loop)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._broker.start(), self._loop).result(timeout=10)  # listening now
        log.info("embedded amqtt broker listening on %s", self.url)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout=10)
            asyncio.run_coroutine_threadsafe(_cancel_pending(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _cancel_pending() -> None:
    """Cancel what amqtt leaves running after shutdown (else asyncio logs "Task was destroyed")."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def auto_broker() -> LocalBroker | EmbeddedBroker:
    """mosquitto when its binary is installed, else the embedded amqtt broker (not started yet)."""
    if find_mosquitto() is not None:
        return LocalBroker()
    log.warning("mosquitto not found: using the embedded amqtt broker (slower; install mosquitto)")
    return EmbeddedBroker()
