"""The operator's Control API calls without a SuperLink to talk to: a site key that is not one is
refused naming its file before anything is sent, and a SuperLink that is down says so in one line
(tests/server/test_deployment.py makes the same calls against a real SuperLink)."""

from __future__ import annotations

import pytest
from conftest import free_port
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from client.commands_fed import write_keypair
from hmgdm_core.exceptions import HmgdmError
from server.flwr_cli import list_sites, public_key_pem, register_site, write_flower_config


def test_a_site_key_becomes_the_pem_flower_stores_and_anything_else_is_refused(tmp_path):
    _, pub = write_keypair(tmp_path / "keys", "a")
    assert public_key_pem(pub).startswith(b"-----BEGIN PUBLIC KEY-----")
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key\n")
    with pytest.raises(HmgdmError, match=r"garbage\.pub: not an OpenSSH public key"):
        public_key_pem(garbage)
    rsa_pub = tmp_path / "rsa.pub"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    rsa_pub.write_bytes(key.public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH))  # fmt: skip
    with pytest.raises(HmgdmError, match=r"rsa\.pub: not an EC public key"):
        register_site(tmp_path / "flwr_home", rsa_pub)
    with pytest.raises(HmgdmError, match=r"missing\.pub: public key not found"):
        register_site(tmp_path / "flwr_home", tmp_path / "missing.pub")


def test_a_superlink_that_is_down_is_one_line_saying_unavailable(tmp_path):
    write_flower_config(tmp_path, f"127.0.0.1:{free_port()}", root_cert=None)  # nobody listens
    with pytest.raises(HmgdmError, match=r"^SuperLink ListNodes failed: unavailable \(Connect"):
        list_sites(tmp_path)
