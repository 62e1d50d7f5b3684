"""`hmgdm-client keygen` and the SuperNode command line `join` builds."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve
from typer.testing import CliRunner

from client.cli import app
from client.commands_fed import supernode_command, write_keypair
from hmgdm_core.exceptions import HmgdmError


def test_keys_load_the_way_flower_loads_them(tmp_path):
    priv_path, pub_path = write_keypair(tmp_path)
    # Same loaders as flower-supernode --auth-supernode-private-key / flwr supernode register.
    private = load_ssh_private_key(priv_path.read_bytes(), None)
    public = load_ssh_public_key(pub_path.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert uses_nist_ec_curve(public)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert priv_path.stat().st_mode & 0o077 == 0


def test_keygen_never_overwrites_a_key(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path)]).exit_code == 0
    key = (tmp_path / "site.key").read_bytes()
    res = runner.invoke(app, ["keygen", "--out", str(tmp_path)])
    assert res.exit_code != 0
    assert "already exists" in res.output
    assert (tmp_path / "site.key").read_bytes() == key


def test_supernode_command_points_node_config_at_the_graphs(tmp_path):
    import tomllib

    (tmp_path / "g" / "graphs").mkdir(parents=True)
    priv, _ = write_keypair(tmp_path / "k")
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    cmd = supernode_command(
        superlink="127.0.0.1:9",
        graphs=tmp_path / "g",
        state_dir=tmp_path / "s",
        root_cert=ca,
        auth_key=priv,
        local_port=9999,
    )
    cfg = tomllib.loads((tmp_path / "s" / "node_config.toml").read_text())
    assert cfg == {"graphs-dir": str(tmp_path / "g"), "state-dir": str(tmp_path / "s")}
    assert cmd[cmd.index("--root-certificates") + 1] == str(ca)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(priv)
    assert "--insecure" not in cmd
    with pytest.raises(HmgdmError, match="not a graph cache"):
        supernode_command(
            superlink="x:1",
            graphs=tmp_path,
            state_dir=tmp_path / "s",
            root_cert=None,
            auth_key=None,
        )


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ([], "--root-cert is required"),
        (["--insecure", "--root-cert", "ca.crt"], "--insecure and --root-cert: choose one"),
        (["--insecure", "--superlink", "fl.example.org:9092"], "--insecure with fl.example.org"),
        (["--insecure", "--superlink", "10.0.0.5:9092"], "--insecure with 10.0.0.5"),
    ],
)
def test_join_needs_tls_unless_plaintext_is_asked_for_on_loopback(tmp_path, args, error):
    (tmp_path / "g" / "graphs").mkdir(parents=True)
    base = ["join", "--graphs", str(tmp_path / "g"), "--state-dir", str(tmp_path / "s")]
    if "--superlink" not in args:
        base += ["--superlink", "127.0.0.1:9092"]
    res = CliRunner().invoke(app, [*base, *args])
    assert res.exit_code == 2 and error in " ".join(res.output.split())
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_join_warns_when_local_dp_has_no_budget(tmp_path):
    privacy = tmp_path / "site.toml"
    privacy.write_text("[local_dp]\nnoise_multiplier = 1.0\n")
    res = CliRunner().invoke(app, [
        "join", "--superlink", "127.0.0.1:9", "--insecure", "--graphs", str(tmp_path / "none"),
        "--privacy-config", str(privacy),
    ])  # fmt: skip
    assert "sets no [local_dp] max_epsilon" in res.output  # then: not a graph cache
    assert res.exit_code == 2 and "build-graphs first" in res.output
