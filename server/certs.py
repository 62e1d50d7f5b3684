"""The consortium's TLS material: a private CA and the server certificate sites verify
(`hmgdm-server certs`); sites only ever receive the CA certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
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
