"""Provisioning a federation's trust material: a CA, the broker's TLS certificate, one client
certificate and one Ed25519 signing key per identity (the aggregator and every site), a read-only
``operator`` identity for watching a run (`cloud-aggregator status`), a mosquitto configuration with a
mutual-TLS listener, and an ACL that confines each site to its own topics.

Layout of ``--out DIR``::

    ca/ca.crt, ca/ca.key            the federation CA (keep ca.key offline in production)
    broker/                          ca.crt, server.crt, server.key, mosquitto.conf, acl, crl.pem
    <identity>/                      what that node needs, and nothing else: ca.crt, client.crt,
                                     client.key, signing.key, keys.json (every identity's public key)
    operator/                        the same without signing.key: it reads the federation, writes nothing
    federation.json                  federation, broker host/port, identities, revoked serials

The broker authenticates every client by certificate (``require_certificate``) and uses the
certificate's CN as the user name (``use_identity_as_username``), so the ACL's ``user <site>`` blocks
apply to the holder of that site's key. Adding a site and revoking one are one call each
(`add_site`, `revoke_site`); mosquitto re-reads the ACL and CRL on SIGHUP.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import getpass
import ipaddress
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.broker import LocalBroker, auto_broker, free_port
from protocol.chunks import MAX_CHUNK_BYTES, MAX_HEADER_BYTES
from protocol.topics import PREFIX, check_name, check_site_name
from reid.files import atomic_write

AGGREGATOR = "aggregator"
# Watching a run with the aggregator's certificate would take over the running aggregator's session
# (the broker's client id is the certificate's CN): tools that only read connect as this identity.
OPERATOR = "operator"
VALIDITY_DAYS = 825


class ProvisionError(ValueError):
    pass


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue(
    ca_key,
    ca_cert: x509.Certificate | None,
    cn: str,
    key,
    *,
    server_names: list[str] | None = None,
    ca: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject if ca_cert else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650 if ca else VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server_names:
        alt: list[x509.GeneralName] = []
        for host in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def acl_text(federation: str, sites: list[str]) -> str:
    """mosquitto ACL: the aggregator reads and writes the federation's tree; a site writes only its own
    topics and reads only what is addressed to every site or to itself."""
    root = f"{PREFIX}/{federation}"
    lines = [f"# FedReID Edge ACL for federation {federation} (generated; re-run provisioning to change)"]
    lines += [f"user {AGGREGATOR}", f"topic readwrite {root}/#", ""]
    lines += [f"user {OPERATOR}", f"topic read {root}/#", ""]
    for site in sites:
        lines += [
            f"user {site}",
            f"topic readwrite {root}/status/{site}",
            f"topic read {root}/round",
            f"topic read {root}/global/chunks",
            f"topic write {root}/global/resend",
            f"topic write {root}/sites/{site}/update",
            f"topic write {root}/sites/{site}/chunks",
            f"topic write {root}/sites/{site}/eval",
            f"topic read {root}/sites/{site}/ack",
            f"topic read {root}/sites/{site}/resend",
            f"topic read {root}/deploy",
            f"topic read {root}/deploy/chunks",
            f"topic write {root}/deploy/resend",
            "",
        ]
    return "\n".join(lines)


def mosquitto_conf(broker_dir: Path, port: int, bind: str) -> str:
    """The broker's config: absolute paths, bound to `bind`, identity (client id and user name) = the
    certificate's CN, and `user` = the owner of the key files (mosquitto started as root otherwise drops
    to the user "mosquitto", who cannot read them)."""
    broker_dir = broker_dir.resolve()
    return (
        f"user {getpass.getuser()}\n"
        f"listener {port} {bind}\n"
        f"cafile {broker_dir / 'ca.crt'}\n"
        f"certfile {broker_dir / 'server.crt'}\n"
        f"keyfile {broker_dir / 'server.key'}\n"
        f"crlfile {broker_dir / 'crl.pem'}\n"
        "require_certificate true\n"
        "use_identity_as_username true\n"
        "use_username_as_clientid true\n"
        "tls_version tlsv1.2\n"
        f"acl_file {broker_dir / 'acl'}\n"
        "allow_anonymous false\n"
        "persistence false\n"
        "max_queued_messages 10000\n"
        # a message larger than any chunk our nodes send disconnects its sender; a client that reads
        # slowly has at most 256 MiB queued for it (the rest of its QoS 1 messages are dropped and asked
        # for again): a site flooding the broker cannot exhaust its memory (docs/operations.md)
        f"max_packet_size {MAX_CHUNK_BYTES + MAX_HEADER_BYTES + 65536}\n"
        "max_queued_bytes 268435456\n"
        "log_dest stdout\nlog_type error\nlog_type warning\nlog_type notice\n"
    )


@contextlib.contextmanager
def aggregator_broker(url: str, identity_dir: Path | None) -> Iterator[tuple[str, str]]:
    """The broker `serve` connects to, and a line saying which: `url` itself, unless it is "auto". Then a
    private broker on a free loopback port, started here and stopped on exit: mosquitto with the
    provisioned mutual TLS + ACL when `identity_dir` sits in a provisioning folder (its
    ../broker/mosquitto.conf), else mosquitto or amqtt (`protocol.broker.auto_broker`)."""
    if url != "auto":
        yield url, f"broker: {url}"
        return
    provisioned = identity_dir.parent / "broker" if identity_dir else None
    if provisioned is not None and (provisioned / "mosquitto.conf").is_file():
        port = free_port()
        with LocalBroker(port=port, config=mosquitto_conf(provisioned, port, "127.0.0.1")) as broker:
            yield broker.url, f"broker: {broker.url}, mutual TLS + ACL from {provisioned}"
        return
    with auto_broker() as broker:
        yield (
            broker.url,
            (
                f"broker: {broker.url} (agents: edge-agent start --broker {broker.url} --exit-when-done ...; "
                "the broker ends with this process)"
            ),
        )


class Provisioning:
    """The trust material of one federation, in one folder."""

    def __init__(self, out: Path) -> None:
        self.out = out
        meta = out / "federation.json"
        if not meta.is_file():
            raise ProvisionError(f"{out} is not a provisioned folder (no federation.json)")
        self.meta = json.loads(meta.read_text())
        self.ca_key = serialization.load_pem_private_key((out / "ca" / "ca.key").read_bytes(), None)
        self.ca_cert = x509.load_pem_x509_certificate((out / "ca" / "ca.crt").read_bytes())

    @classmethod
    def create(
        cls, out: Path, federation: str, sites: list[str], broker_host: str = "127.0.0.1", port: int = 8883
    ) -> Provisioning:
        check_name(federation, "federation")
        for site in sites:  # (all of them before anything is written)
            check_site_name(site)
        if (out / "federation.json").exists():
            raise ProvisionError(f"{out} is already provisioned: use add-site / revoke-site")
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _issue(ca_key, None, f"FedReID {federation} CA", ca_key, ca=True)
        _write_key(out / "ca" / "ca.key", ca_key)
        _write_cert(out / "ca" / "ca.crt", ca_cert)
        meta = {
            "federation": federation,
            "broker_host": broker_host,
            "port": port,
            "identities": {},
            "revoked": [],
        }
        (out / "federation.json").write_text(json.dumps(meta, indent=2))
        prov = cls(out)
        server_key = ec.generate_private_key(ec.SECP256R1())
        names = sorted({broker_host, "localhost", "127.0.0.1"})
        prov._broker_files(server_key, _issue(ca_key, ca_cert, broker_host, server_key, server_names=names))
        prov._add_identity(AGGREGATOR, "aggregator")
        prov._add_identity(OPERATOR, "operator", signs=False)
        for site in sites:
            prov._add_identity(site, "site")
        prov._write_shared()
        return prov

    # -- identities -----------------------------------------------------------------------------------
    def _add_identity(self, name: str, role: str, signs: bool = True) -> None:
        check_name(name, "identity")
        if name in self.meta["identities"]:
            raise ProvisionError(f"identity {name} already exists")
        folder = self.out / name
        tls_key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(self.ca_key, self.ca_cert, name, tls_key)
        _write_key(folder / "client.key", tls_key)
        _write_cert(folder / "client.crt", cert)
        self.meta["identities"][name] = {"role": role, "serial": str(cert.serial_number)}
        if signs:
            signing = ed25519.Ed25519PrivateKey.generate()
            _write_key(folder / "signing.key", signing)
            public = signing.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            self.meta["identities"][name]["signing_key"] = base64.b64encode(public).decode()

    def add_site(self, site: str) -> None:
        self._add_identity(check_site_name(site), "site")
        self._write_shared()

    def revoke_site(self, site: str) -> None:
        ident = self.meta["identities"].get(site)
        if ident is None or ident["role"] != "site":
            raise ProvisionError(f"no site {site} in this federation")
        self.meta["revoked"].append({"identity": site, "serial": ident["serial"]})
        del self.meta["identities"][site]
        shutil.rmtree(self.out / site, ignore_errors=True)
        self._write_shared()

    @property
    def sites(self) -> list[str]:
        return sorted(n for n, i in self.meta["identities"].items() if i["role"] == "site")

    # -- shared files ---------------------------------------------------------------------------------
    def _broker_files(self, key, cert: x509.Certificate) -> None:
        broker = self.out / "broker"
        _write_key(broker / "server.key", key)
        _write_cert(broker / "server.crt", cert)

    def keyring(self) -> dict[str, dict[str, str]]:
        """identity -> {role, signing_key}: what every node verifies signatures against (the operator
        signs nothing)."""
        return {
            n: {"role": i["role"], "signing_key": i["signing_key"]}
            for n, i in self.meta["identities"].items()
            if "signing_key" in i
        }

    def _write_shared(self) -> None:
        broker = self.out / "broker"
        shutil.copy(self.out / "ca" / "ca.crt", broker / "ca.crt")
        (broker / "acl").write_text(acl_text(self.meta["federation"], self.sites))
        (broker / "mosquitto.conf").write_text(
            mosquitto_conf(broker, self.meta["port"], self.meta["broker_host"])
        )
        now = dt.datetime.now(dt.timezone.utc)
        crl = x509.CertificateRevocationListBuilder().issuer_name(self.ca_cert.subject)
        crl = crl.last_update(now - dt.timedelta(minutes=5)).next_update(
            now + dt.timedelta(days=VALIDITY_DAYS)
        )
        for revoked in self.meta["revoked"]:
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(int(revoked["serial"]))
                .revocation_date(now - dt.timedelta(minutes=1))
                .build()
            )
            crl = crl.add_revoked_certificate(entry)
        (broker / "crl.pem").write_bytes(
            crl.sign(self.ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        )
        keyring = json.dumps({"federation": self.meta["federation"], "identities": self.keyring()}, indent=2)
        for name in self.meta["identities"]:
            shutil.copy(self.out / "ca" / "ca.crt", self.out / name / "ca.crt")
            atomic_write(self.out / name / "keys.json", keyring.encode())  # (nodes re-read it: whole)
        (self.out / "federation.json").write_text(json.dumps(self.meta, indent=2))
