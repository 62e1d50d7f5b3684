"""The consortium's TLS material: a private CA and the server certificate sites verify
(`hmgdm-server certs`); sites only ever receive the CA certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from hmgdm_core.exceptions import HmgdmError


@dataclass(frozen=True)
class TlsFiles:
    """The files `hmgdm-server certs` writes; sites only ever receive `ca_cert`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, tls_dir: Path) -> TlsFiles:
        # Absolute: the SuperLink and the fleet proxy run with other working directories.
        d = Path(tls_dir).resolve()
        return cls(d / "ca.crt", d / "ca.key", d / "server.pem", d / "server.key")

    def check(self) -> TlsFiles:
        missing = [
            p.name for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()
        ]
        if missing:
            raise HmgdmError(
                f"{self.ca_cert.parent}: missing {', '.join(missing)}; "
                "create them with `hmgdm-server certs --out DIR`"
            )
        return self


def serving_tls(tls_dir: Path | None, insecure: bool, host: str) -> TlsFiles | None:
    """What `start` serves with: the TLS files of TLS_DIR, or None only for an explicit
    `--insecure` (no TLS, no SuperNode authentication) on a loopback host."""
    from hmgdm_core.cli import check_plaintext

    if not insecure:
        if tls_dir is None:
            raise HmgdmError("--tls-dir is required (create it with `hmgdm-server certs`)")
        return TlsFiles.in_dir(tls_dir).check()
    if tls_dir is not None:
        raise HmgdmError("--insecure and --tls-dir: choose one")
    check_plaintext(host)
    return None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # Exclusive create: a CA or key is never silently replaced, and secrets are born 0600.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_certificates(out_dir: Path, host: str = "localhost", days: int = 365) -> TlsFiles:
    """A private CA and a server certificate for `host` (plus 127.0.0.1 and localhost)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    files = TlsFiles.in_dir(out_dir)
    existing = [p.name for p in vars(files).values() if p.exists()]
    if existing:
        raise HmgdmError(f"{out_dir}: {', '.join(existing)} already exist; choose another --out")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key, days)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = server_certificate(ca_key, ca_cert, server_key.public_key(), host, days)
    pem = serialization.Encoding.PEM
    _write_new(files.ca_key, _key_pem(ca_key), 0o600)
    _write_new(files.ca_cert, ca_cert.public_bytes(pem), 0o644)
    _write_new(files.server_key, _key_pem(server_key), 0o600)
    _write_new(files.server_cert, server_cert.public_bytes(pem), 0o644)
    return files


def _validity(builder, days: int):
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(
        now + dt.timedelta(days=days)
    )


def _ca_certificate(ca_key, days: int):
    """The consortium's self-signed CA certificate: it signs only certificates and CRLs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hmgdm federation CA")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
    )
    return _validity(builder, days).sign(ca_key, hashes.SHA384())


def server_certificate(ca_key, ca_cert, public_key, host: str, days: int):
    """A TLS server certificate for `host`, 127.0.0.1 and localhost, signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names: list[x509.GeneralName] = []
    for name in dict.fromkeys([host, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    return _validity(builder, days).sign(ca_key, hashes.SHA384())


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ca_key_usage():
    from cryptography import x509

    # A CA key only signs certificates and revocation lists.
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class Renewal:
    """What `renew_server_certificate` did: the new certificate's dates and the old pair kept."""

    host: str
    not_after: dt.datetime
    previous_not_after: dt.datetime
    backup: Path


def renew_server_certificate(tls_dir: Path, days: int = 365, host: str | None = None) -> Renewal:
    """A new server key and certificate from the same CA, for the same host unless `host` is
    given; sites keep their ca.crt. The old pair is kept as server.pem.old / server.key.old.

    The SuperLink and the Fleet proxy read the certificate when they start: restart
    `hmgdm-server start --resume` to serve the new one (sites reconnect by themselves).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key
    from cryptography.x509.oid import NameOID

    files = TlsFiles.in_dir(tls_dir).check()
    if not files.ca_key.is_file():
        raise HmgdmError(f"{files.ca_key}: the CA key is needed to sign a new server certificate")
    ca_key = load_pem_private_key(files.ca_key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    old = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    if old.issuer != ca_cert.subject:
        raise HmgdmError(f"{files.server_cert}: not issued by {files.ca_cert}")
    host = host or old.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    ca_end = ca_cert.not_valid_after_utc
    if ca_end < dt.datetime.now(dt.UTC) + dt.timedelta(days=days):
        raise HmgdmError(
            f"{files.ca_cert} expires on {ca_end:%Y-%m-%d}, before a {days}-day certificate would: "
            "renew for fewer --days, or make a new CA (`hmgdm-server certs --out NEWDIR`) and "
            "send every site its ca.crt"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = server_certificate(ca_key, ca_cert, key.public_key(), host, days)
    # Old pair copied aside, new pair written beside it and moved in: never a missing file.
    pairs = (
        (files.server_key, _key_pem(key), 0o600),
        (files.server_cert, cert.public_bytes(Encoding.PEM), 0o644),
    )
    for path, data, mode in pairs:
        shutil.copy2(path, path.with_name(path.name + ".old"))
        new = path.with_name(f".{path.name}.new")
        new.unlink(missing_ok=True)
        _write_new(new, data, mode)
        os.replace(new, path)
    backup = files.server_cert.with_name(files.server_cert.name + ".old")
    return Renewal(host, cert.not_valid_after_utc, old.not_valid_after_utc, backup)
