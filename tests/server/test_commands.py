"""Operator CLI input errors: one clear line and exit code 2, before any process starts."""

from __future__ import annotations

from typer.testing import CliRunner

from server.cli import app


def test_start_refuses_to_run_without_tls_or_with_an_incomplete_tls_dir(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["start", "--state", str(tmp_path / "s")])
    assert res.exit_code == 2 and "--tls-dir is required" in res.output
    res = runner.invoke(app, ["start", "--tls-dir", str(tmp_path), "--state", str(tmp_path)])
    assert res.exit_code == 2
    assert "missing ca.crt, server.pem, server.key" in res.output
    assert not (tmp_path / "s").exists()


def test_start_names_a_bad_config_key(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[federation]\nmin_site = 2\n")
    res = CliRunner().invoke(app, ["start", "--config", str(cfg), "--insecure"])
    assert res.exit_code == 2 and "unknown key 'federation.min_site'" in res.output


def test_sites_add_reports_a_missing_key_file(tmp_path):
    res = CliRunner().invoke(app, ["sites", "add", str(tmp_path / "nope.pub")])
    assert res.exit_code == 2 and "public key not found" in res.output


def test_start_finetune_checks_its_inputs_before_starting_anything(tmp_path):
    runner = CliRunner()
    base = ["start", "--insecure", "--state", str(tmp_path / "s")]
    res = runner.invoke(app, [*base, "--finetune", str(tmp_path / "nope.pt")])
    assert res.exit_code == 2 and "checkpoint not found" in res.output
    ckpt = tmp_path / "final.pt"
    ckpt.write_bytes(b"x")
    res = runner.invoke(app, [*base, "--finetune", str(ckpt)])  # classification without classes
    assert res.exit_code == 2 and "--classes" in res.output
    assert not (tmp_path / "s" / "superlink.db").exists()


def test_plaintext_start_is_refused_off_loopback_and_beside_tls(tmp_path):
    runner = CliRunner()
    base = ["start", "--insecure", "--state", str(tmp_path / "s")]
    for host in ("0.0.0.0", "192.0.2.7", "fl.example.org", "::"):
        res = runner.invoke(app, [*base, "--host", host])
        assert res.exit_code == 2 and f"--insecure with {host}: plaintext" in res.output
    res = runner.invoke(app, [*base, "--tls-dir", str(tmp_path)])
    assert res.exit_code == 2 and "--insecure and --tls-dir: choose one" in res.output
    assert not (tmp_path / "s").exists()
