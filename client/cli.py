"""`hmgdm-client`: the command a hospital runs; each command group lives in its own module."""

from __future__ import annotations

from client import (
    commands_eval,
    commands_explain,
    commands_fed,
    commands_graphs,
    commands_train,
    privacy,
)
from hmgdm_core.cli import new_app

app = new_app(
    "hmgdm-client",
    "Build entity graphs from your slides, pretrain H-MGDM and join a federation. "
    "Slides, graphs and labels never leave this machine.",
)
app.command("build-graphs")(commands_graphs.build_graphs)
app.command("keygen")(commands_fed.keygen)
app.command("join")(commands_fed.join)
app.command("pretrain")(commands_train.pretrain)
app.command("embed")(commands_train.embed)
app.add_typer(commands_eval.evaluate, name="evaluate")
app.command("explain")(commands_explain.explain)
app.command("export")(commands_explain.export)
app.command("privacy-report")(privacy.privacy_report)
