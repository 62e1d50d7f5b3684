"""`hmgdm-server certs`: a CA that validates the server certificate for the named host."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl

import pytest
from conftest import free_port
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from hmgdm_core.exceptions import HmgdmError
from server.certs import TlsFiles, make_certificates
from server.cli import app
from server.superlink import SuperLink, start_superlink


def test_chain_and_sans_validate(tmp_path):
    files = make_certificates(tmp_path / "tls", host="fl.example.org", days=30)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    # Raises if the issuer, signature or validity window is wrong.
    leaf.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert files.server_key.stat().st_mode & 0o077 == 0
    assert files.ca_key.stat().st_mode & 0o077 == 0


def test_an_ip_host_becomes_an_ip_san_and_existing_files_are_kept(tmp_path):
    files = make_certificates(tmp_path, host="10.1.2.3")
    leaf = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in sans.get_values_for_type(x509.IPAddress)
    before = files.ca_cert.read_bytes()
    with pytest.raises(HmgdmError, match="already exist"):
        make_certificates(tmp_path)
    assert files.ca_cert.read_bytes() == before


def test_cli_writes_files_and_reports_bad_dir_in_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["certs", "--out", str(tmp_path / "t"), "--host", "srv"])
    assert res.exit_code == 0, res.output
    files = TlsFiles.in_dir(tmp_path / "t").check()
    key = x509.load_pem_x509_certificate(files.server_cert.read_bytes()).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    again = runner.invoke(app, ["certs", "--out", str(tmp_path / "t")])
    assert again.exit_code == 2
    assert "already exist" in again.output


@pytest.mark.integration
def test_renew_serves_a_new_certificate_from_the_same_ca_after_a_restart(tmp_path):
    """`certs renew` on a running SuperLink: the old certificate is served until the restart
    it documents, the new one after it, and the sites' unchanged ca.crt accepts it."""
    files = make_certificates(tmp_path / "tls", host="localhost", days=30)
    ca_before = files.ca_cert.read_bytes()
    port = free_port()

    def start() -> SuperLink:
        return start_superlink(
            port=port, state_dir=tmp_path / "state", tls=files, flwr_home=tmp_path / "home"
        )

    def served() -> x509.Certificate:
        return x509.load_pem_x509_certificate(
            ssl.get_server_certificate(("127.0.0.1", port)).encode()
        )

    link = start()
    try:
        before = served()
        res = CliRunner().invoke(app, ["certs", "renew", "--tls-dir", str(files.ca_cert.parent),
                                       "--days", "20"])  # fmt: skip
        assert res.exit_code == 0, res.output
        assert "restart `hmgdm-server start --resume`" in res.output
        assert served() == before  # read at start: nothing changes until the restart
        link.stop()
        link = start()
        after = served()
    finally:
        link.stop()
    assert after.serial_number != before.serial_number
    assert after == x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    after.verify_directly_issued_by(ca)
    assert files.ca_cert.read_bytes() == ca_before and after.subject == before.subject
    assert 19 <= (after.not_valid_after_utc - dt.datetime.now(dt.UTC)).days <= 20
    assert files.server_key.stat().st_mode & 0o077 == 0
    kept = tmp_path / "tls" / "server.pem.old"
    assert x509.load_pem_x509_certificate(kept.read_bytes()) == before
    # A certificate may not outlive its CA: say so in one line, change nothing.
    longer = CliRunner().invoke(app, ["certs", "renew", "--tls-dir", str(files.ca_cert.parent),
                                      "--days", "400"])  # fmt: skip
    assert longer.exit_code == 2 and "make a new CA" in longer.output
    assert x509.load_pem_x509_certificate(files.server_cert.read_bytes()) == after
