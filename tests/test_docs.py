"""The docs cannot rot: every `hmgdm-*` command in a fenced bash block of the guides (and the
docker README) must parse against the real CLI, and the cheap ones are run on real data.

Static check: program, subcommand path, every option used, required options and argument count,
read from the typer apps themselves. Run check: the commands are executed exactly as written by
bash, in a temp directory whose `configs/` holds a tiny config under the shipped preset's name,
with the guide's `$VARIABLES` pointing into that directory.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GUIDES = ("docs/hospital.md", "docs/operator.md", "docker/README.md")
PROGRAMS = ("hmgdm-client", "hmgdm-server")
_FENCE = re.compile(r"^```bash[ \t]*\n(.*?)^```", re.S | re.M)
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
_SEPARATORS = {";", "&&", "||", "|", ">", ">>", "<", "&"}

# Commands docs/hospital.md and docs/operator.md may show without running them here, and why.
# Any other hmgdm command in those guides is run by test_*_guide_runs, so none goes unchecked.
# (docker/README.md commands run inside containers; they get the static check only.)
NOT_RUN = {
    ("hmgdm-client", "join"): "needs a running SuperLink (covered by tests/server)",
    ("hmgdm-server", "start"): "runs a federation until it finishes",
    ("hmgdm-server", "sites", "add"): "needs a running SuperLink",
    ("hmgdm-server", "sites", "list"): "needs a SuperLink's state (test_service_ops.py)",
    ("hmgdm-server", "sites", "remove"): "needs a running SuperLink (test_service_ops.py)",
    ("hmgdm-server", "report"): "needs a run directory; tests/server/test_report.py runs it",
    ("hmgdm-server", "simulate"): "starts Ray and trains; tests/server/test_simulation.py runs it",
    ("hmgdm-server", "study", "run"): "a grid of trainings; tests/server/test_study_sim.py runs it",
}


@dataclass(frozen=True)
class Invocation:
    guide: str
    line: str  # the whole shell line, as bash runs it
    argv: tuple[str, ...]  # from the hmgdm program to the end of its shell segment
    path: tuple[str, ...] = ()  # program + subcommands, filled in by `resolve`


def bash_lines(text: str) -> list[str]:
    """Command lines of all ```bash blocks: continuations joined, comment-only lines dropped."""
    lines: list[str] = []
    for block in _FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.strip())
    return lines


def segments(line: str) -> list[list[str]]:
    """Shell tokens of `line` split at command separators and redirections."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out: list[list[str]] = [[]]
    for tok in lexer:
        if tok in _SEPARATORS:
            out.append([])
        else:
            out[-1].append(tok)
    return [s for s in out if s]


def invocations(guide: str, text: str) -> list[Invocation]:
    found = []
    for line in bash_lines(text):
        for seg in segments(line):
            starts = [i for i, tok in enumerate(seg) if tok in PROGRAMS]
            if starts:
                found.append(Invocation(guide, line, tuple(seg[starts[0] :])))
    return found


def cli_apps() -> dict[str, click.Command]:
    import typer

    from client.cli import app as client_app
    from server.cli import app as server_app

    return {
        "hmgdm-client": typer.main.get_command(client_app),
        "hmgdm-server": typer.main.get_command(server_app),
    }


def _parse_params(cmd: click.Command, args: list[str], where: str) -> tuple[set[str], list[str]]:
    """Options seen (by param name) and positional arguments, or AssertionError naming the bad one.

    Stops at the first positional argument of a group (the subcommand).
    """
    ctx = click.Context(cmd, info_name=where)
    options: dict[str, click.Option] = {}
    for param in cmd.get_params(ctx):
        if isinstance(param, click.Option):
            for name in (*param.opts, *param.secondary_opts):
                options[name] = param
    seen: set[str] = set()
    positional: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        if tok == "--":
            positional.extend(args[i:])
            break
        if tok.startswith("-") and len(tok) > 1:
            name, has_value, _ = tok.partition("=")
            assert name in options, f"{where}: no option {name} (has {sorted(options)})"
            opt = options[name]
            if not (opt.is_flag or opt.count) and not has_value:
                assert i < len(args), f"{where}: {name} needs a value"
                i += 1
            seen.add(opt.name)
            continue
        positional.append(tok)
        if isinstance(cmd, click.Group):  # the subcommand: the rest belongs to it
            return seen, [*positional, *args[i:]]
    return seen, positional


def resolve(inv: Invocation, apps: dict[str, click.Command]) -> Invocation:
    """Check `inv` against the CLI; return it with its program + subcommand path."""
    cmd: click.Command = apps[inv.argv[0]]
    path = [inv.argv[0]]
    args = list(inv.argv[1:])
    where = f"{inv.guide}: `{' '.join(inv.argv)}`"
    while isinstance(cmd, click.Group):
        seen, rest = _parse_params(cmd, args, where)
        if not rest and seen & {"version", "help"}:  # `hmgdm-client --version`
            return Invocation(inv.guide, inv.line, inv.argv, (*path, f"--{min(seen)}"))
        if not rest and cmd.invoke_without_command:  # `hmgdm-server certs --out DIR`
            return Invocation(inv.guide, inv.line, inv.argv, tuple(path))
        assert rest, f"{where}: no subcommand of {' '.join(path)}"
        sub = cmd.get_command(click.Context(cmd), rest[0])
        assert sub is not None, f"{where}: {' '.join(path)} has no command {rest[0]!r}"
        cmd, args = sub, rest[1:]
        path.append(rest[0])
    seen, positional = _parse_params(cmd, args, where)
    if "help" not in seen and "version" not in seen:
        for param in cmd.params:
            if isinstance(param, click.Option) and param.required:
                assert param.name in seen, f"{where}: required {param.opts[0]} missing"
        arguments = [p for p in cmd.params if isinstance(p, click.Argument)]
        variadic = any(p.nargs == -1 for p in arguments)
        needed = sum(max(p.nargs, 1) for p in arguments if p.required)
        allowed = sum(max(p.nargs, 0) for p in arguments)
        assert len(positional) >= needed, f"{where}: needs {needed} argument(s)"
        assert variadic or len(positional) <= allowed, f"{where}: too many arguments {positional}"
    return Invocation(inv.guide, inv.line, inv.argv, tuple(path))


def guide_invocations(guide: str) -> list[Invocation]:
    apps = cli_apps()
    return [resolve(inv, apps) for inv in invocations(guide, (REPO / guide).read_text())]


# ---- static checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("guide", GUIDES)
def test_every_documented_command_exists_in_the_cli(guide):
    found = guide_invocations(guide)
    assert found, f"{guide}: no hmgdm commands found in its bash blocks"
    for inv in found:
        assert inv.path[0] in PROGRAMS and len(inv.path) >= 2


def test_the_static_check_rejects_what_the_cli_rejects():
    """The checker itself: a typo'd option, a missing subcommand or required option all fail."""
    apps = cli_apps()
    bad = [
        "hmgdm-client keygen --outt /tmp/k",
        "hmgdm-client keygen",
        "hmgdm-server sites remove",
        "hmgdm-server sites delete x.pub",
        "hmgdm-client build-graphs --out cache",
        "hmgdm-client evaluate classify --graphs g --checkpoint c --labels l --out o --folds 3",
        "hmgdm-server start --tls-dir",
    ]
    for line in bad:
        (inv,) = invocations("t", f"```bash\n{line}\n```\n")
        with pytest.raises(AssertionError):
            resolve(inv, apps)
    good = "hmgdm-client -v build-graphs a b --out=c --no-progress"
    (ok,) = invocations("t", f"```bash\n{good}\n```\n")
    assert resolve(ok, apps).path == ("hmgdm-client", "build-graphs")


def test_guides_cover_the_workflows_they_promise():
    """The issue's list: what each reader must find in their guide."""
    paths = {g: {inv.path for inv in guide_invocations(g)} for g in GUIDES}
    hospital = {p[1:] for p in paths["docs/hospital.md"]}
    for needed in [
        ("build-graphs",),
        ("keygen",),
        ("join",),
        ("privacy-report",),
        ("evaluate", "classify"),
    ]:
        assert needed in hospital, f"docs/hospital.md does not show {' '.join(needed)}"
    operator = {p[1:] for p in paths["docs/operator.md"]}
    for needed in [("certs",), ("sites", "add"), ("sites", "list"), ("sites", "remove"),
                   ("start",), ("report",)]:  # fmt: skip
        assert needed in operator, f"docs/operator.md does not show {' '.join(needed)}"
    resume = [i for i in guide_invocations("docs/operator.md") if i.path[1:] == ("start",)]
    assert any("--resume" in i.argv for i in resume), "operator.md never shows --resume"


@pytest.mark.parametrize("guide", GUIDES)
def test_guide_variables_are_exported_and_configs_and_make_targets_exist(guide):
    text = (REPO / guide).read_text()
    lines = bash_lines(text)
    exported: set[str] = set()
    for line in lines:
        for seg in segments(line):
            if seg[0] == "export":
                exported.update(tok.split("=", 1)[0] for tok in seg[1:])
            if seg[0] == "make":
                makefile = (REPO / "Makefile").read_text()
                for target in seg[1:]:
                    assert re.search(rf"^{re.escape(target)}:", makefile, re.M), (
                        f"{guide}: `make {target}` but the Makefile has no such target"
                    )
    for var in {v for line in lines for v in _VAR.findall(line)} - {"PWD"}:
        assert var in exported, f"{guide}: ${var} is used but never exported in the guide"
    for ref in re.findall(r"configs/[\w.-]+\.toml", text):
        assert (REPO / ref).is_file(), f"{guide}: {ref} does not exist"
    for ref in re.findall(r"/opt/hmgdm/(configs/[\w.-]+\.toml)", text):
        assert (REPO / ref).is_file(), f"{guide}: {ref} is not in the image"


PRESETS = ("demo", "hospital", "consortium")


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_key_is_explained(name):
    """Commented presets: each `key = value` line says what the key does."""
    for n, line in enumerate((REPO / "configs" / f"{name}.toml").read_text().splitlines(), 1):
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            assert "#" in line.split("=", 1)[1], f"configs/{name}.toml:{n}: no comment: {line}"


def test_presets_are_combinations_the_code_accepts():
    """Loading is not enough: the server builds its (DP) strategy from them without refusing."""
    from client.site import load_site_privacy
    from hmgdm_core.config import load_config
    from server.strategy import make_strategy

    cfg = {name: load_config(REPO / "configs" / f"{name}.toml") for name in PRESETS}
    for name in ("demo", "consortium"):
        make_strategy(cfg[name].federation, cfg[name].privacy)  # raises on a refused combination
    assert cfg["consortium"].privacy.mode in ("central", "client_central")
    site, disclosure = load_site_privacy(REPO / "configs" / "hospital.toml")
    assert site is not None and site.max_epsilon is not None  # the hospital runs local DP
    assert disclosure.min_patients >= 10  # and the small-cell rule
    # Sites build graphs with hospital.toml; the consortium's model expects the same graphs.
    assert (
        cfg["hospital"].graph == cfg["consortium"].graph and cfg["hospital"].graph.target_mpp == 0.5
    )
    demo = cfg["demo"]
    assert (demo.graph.target_mpp, demo.graph.window_size) == (1.0, 16)
    (sim,) = [i for i in guide_invocations("docs/operator.md") if i.path[1:] == ("simulate",)]
    assert int(sim.argv[sim.argv.index("--sites") + 1]) == demo.federation.min_sites


# ---- runs ------------------------------------------------------------------------------------

TINY_CONFIG = """
[graph]
target_mpp = 1.0
tile_size = 256
entity_area_um2 = 200.0
window_size = 16

[model]
latent_dim = 8
edge_latent_dim = 4
ae_hidden = 16
window_channels = 4
hidden = 16
encoder_layers = 1
heads = 2
self_attn_layers = 0

[diffusion]
timesteps = 20

[train]
autoencoder_epochs = 1
epochs = 1
batch_size = 4
max_nodes = 100

[evaluation]
folds = 2
pca_components = 2
"""


def _run_guide(guide: str, work: Path, env_vars: dict[str, str]) -> dict[tuple[str, ...], str]:
    """Run every command of `guide` not in NOT_RUN, in order, as bash would.

    Returns the stdout of each command that ran, keyed by its program + subcommand path.
    """
    (work / "configs").mkdir(parents=True, exist_ok=True)
    for preset in (REPO / "configs").glob("*.toml"):
        (work / "configs" / preset.name).write_text(TINY_CONFIG)
    env = {**os.environ, **env_vars, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FLWR_HOME", None)
    ran: dict[tuple[str, ...], str] = {}
    for inv in guide_invocations(guide):
        if inv.path in NOT_RUN:
            continue
        used = set(_VAR.findall(inv.line))
        assert used <= env_vars.keys(), f"give the test a value for {used - env_vars.keys()}"
        t0 = time.monotonic()
        res = subprocess.run(
            ["bash", "-c", inv.line],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        print(f"{time.monotonic() - t0:5.1f} s  {inv.line}")
        assert res.returncode == 0, f"{guide}: `{inv.line}` failed:\n{res.stdout}\n{res.stderr}"
        ran[inv.path] = res.stdout
    return ran


def _slides_with_resolution(data_dir: Path, out: Path) -> list[str]:
    """Real Kather 2016 H&E tiles, rewritten as TIFFs that record their 0.495 µm/px like a slide."""
    import numpy as np
    import tifffile
    from PIL import Image

    out.mkdir(parents=True)
    ids = []
    for cls in ("01_TUMOR", "02_STROMA"):
        for k, src in enumerate(sorted((data_dir / "kather2016_tiles" / cls).glob("*.tif"))[:3]):
            rgb = np.asarray(Image.open(src).convert("RGB"))
            sid = f"{cls[3:].lower()}_{k}"
            per_cm = 1e4 / 0.495
            tifffile.imwrite(
                out / f"{sid}.tif", rgb, resolution=(per_cm, per_cm), resolutionunit="CENTIMETER"
            )
            ids.append(sid)
    return ids


@pytest.mark.integration
def test_hospital_guide_runs(tmp_path, data_dir):
    from hmgdm_core.config import load_local_dp
    from hmgdm_core.privacy.ledger import LEDGER_NAME, PrivacyLedger

    work = tmp_path / "hospital"
    ids = _slides_with_resolution(data_dir, tmp_path / "slides")
    site = tmp_path / "site"
    labels = tmp_path / "labels.csv"
    rows = [f"{sid},p{k},{sid.split('_')[0]},{10 + 7 * k},{k % 2}" for k, sid in enumerate(ids)]
    labels.write_text("slide_id,patient_id,label,time,event\n" + "\n".join(rows) + "\n")
    # What `join` leaves behind after a local-DP round (join itself needs a SuperLink).
    privacy = load_local_dp(REPO / "configs" / "hospital.toml")
    (site / "state").mkdir(parents=True)
    ledger = PrivacyLedger.open(site / "state" / LEDGER_NAME, privacy, num_patients=len(ids))
    ledger.record(1, 5, patients=len(ids)).save(site / "state" / LEDGER_NAME)
    env = {
        "SLIDES": str(tmp_path / "slides"),
        "CACHE": str(tmp_path / "cache"),
        "SITE": str(site),
        "CHECKPOINT": str(site / "pretrain" / "last.pt"),
        "LABELS": str(labels),
    }
    ran = _run_guide("docs/hospital.md", work, env)

    assert {path[1:] for path in ran} >= {
        ("build-graphs",),
        ("keygen",),
        ("privacy-report",),
        ("pretrain",),
        ("embed",),
        ("evaluate", "classify"),
        ("evaluate", "survival"),
    }
    report = ran[("hmgdm-client", "privacy-report")]
    assert "epsilon left" in report and "local_dp" in report
    with open(tmp_path / "cache" / "manifest.csv", newline="") as fh:
        manifest = {row["slide_id"]: row["status"] for row in csv.DictReader(fh)}
    assert set(manifest) == set(ids) and set(manifest.values()) == {"done"}
    assert (site / "keys" / "site.key").stat().st_mode & 0o077 == 0
    assert (site / "keys" / "site.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert len((site / "embeddings.csv").read_text().strip().splitlines()) == 1 + len(ids)
    assert (site / "eval-classify" / "metrics.json").is_file()
    assert (site / "eval-survival" / "metrics.json").is_file()


@pytest.mark.integration
def test_operator_guide_runs(tmp_path, data_dir):
    from cryptography import x509

    # The guide's demo reads ../shared/data relative to the checkout.
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(data_dir)
    work = tmp_path / "repo"
    env = {k: str(tmp_path / k.lower()) for k in ("CA", "TLS", "SITES", "STATE")}
    ran = _run_guide("docs/operator.md", work, env)

    assert {path[1:] for path in ran} >= {
        ("info",), ("certs",), ("certs", "renew"), ("build-graphs",)
    }  # fmt: skip
    assert (tmp_path / "ca" / "server.pem.old").is_file()  # renewed where ca.key is, same host
    assert "flwr 1.42" in ran[("hmgdm-server", "info")]
    cert = x509.load_pem_x509_certificate((tmp_path / "ca" / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.consortium.example" in names.get_values_for_type(x509.DNSName)
    assert (work / "demo_out" / "graphs" / "manifest.csv").is_file()


def test_docker_readme_names_real_services_and_files():
    """`docker compose exec|run|logs SERVICE` names services of compose.yml; -f files exist."""
    import yaml

    services = set(yaml.safe_load((REPO / "docker" / "compose.yml").read_text())["services"])
    text = (REPO / "docker" / "README.md").read_text()
    named = 0
    for line in bash_lines(text):
        for seg in segments(line):
            if seg[:2] == ["docker", "compose"] and seg[2] in {"exec", "run", "logs"}:
                rest = [t for t in seg[3:] if not t.startswith("-")]
                assert rest and rest[0] in services, f"docker/README.md: unknown service in {seg}"
                named += 1
            if seg[:2] == ["docker", "build"]:
                dockerfile = seg[seg.index("-f") + 1]
                assert (REPO / dockerfile).is_file(), f"docker/README.md: {dockerfile} missing"
    assert named >= 3
