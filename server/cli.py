"""`hmgdm-server`: the command a consortium operator runs; command groups live in own modules."""

from __future__ import annotations

import typer

from hmgdm_core import __version__
from hmgdm_core.cli import new_app
from server import commands_eval, commands_fed, commands_study

app = new_app(
    "hmgdm-server",
    "Run the hmgdm federation: SuperLink, ServerApp, certificates, sites and studies. "
    "The server only ever receives model weights and scalar metrics.",
)


@app.command("info")
def info() -> None:
    """Print the versions of hmgdm and of the libraries every site must agree on."""
    import flwr
    import torch

    typer.echo(f"hmgdm {__version__}, flwr {flwr.__version__}, torch {torch.__version__}")


app.add_typer(commands_fed.certs_app, name="certs")
app.command("start")(commands_fed.start)
app.command("simulate")(commands_fed.simulate)
app.command("report")(commands_fed.report)
app.command("finetune")(commands_eval.finetune)
app.command("survival-clinical")(commands_eval.survival_clinical)
app.add_typer(commands_fed.sites, name="sites")
app.add_typer(commands_study.study, name="study")
