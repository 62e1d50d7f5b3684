"""`hmgdm-client build-graphs`: slides and images -> entity-graph cache, manifest, resume."""

from __future__ import annotations

from pathlib import Path

import typer


def build_graphs(
    inputs: list[Path] = typer.Argument(
        ...,
        metavar="SLIDE_OR_DIR...",
        show_default=False,
        help="Slides (.svs .ndpi .mrxs .dcm .tif ...) or images (.png .jpg .tif), directories "
        "searched recursively for them (slide id = path below the directory, without suffix), "
        "or a slides.csv with columns slide_id,path[,mpp].",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Cache directory: graphs/<slide_id>.pt and manifest.csv go here."
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        exists=True,
        dir_okay=False,
        help="TOML config; its \\[graph] section sets resolution, tile and entity sizes.",
    ),
    scan_mpp: float | None = typer.Option(
        None,
        "--mpp",
        min=0.01,
        help="Microns per pixel of the inputs, for images that do not record it (plain PNG/JPEG). "
        "Overrides the value stored in a slide; an mpp in a slides.csv overrides this.",
    ),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="Slides built in parallel."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    qc: bool = typer.Option(
        True,
        "--qc/--no-qc",
        help="Draw OUT/qc/<slide_id>.png per slide (tissue outline, kept and dropped tiles, "
        "entities per tile) and OUT/qc/contact_sheet.png.",
    ),
) -> None:
    """Build entity graphs (one per tissue tile) from slides; slides already built are skipped.

    Exits 1 if any slide failed; the others are still built and the manifest says why.
    """
    from hmgdm_core.config import load_config
    from hmgdm_core.exceptions import HmgdmError
    from hmgdm_core.graph.manifest import manifest_path
    from hmgdm_core.graph.runner import build_graphs as run
    from hmgdm_core.graph.runner import summary_table
    from hmgdm_core.log import console

    try:
        cfg = load_config(config).graph
    except HmgdmError as err:
        console.print(f"[red]error[/red] {err}")
        raise typer.Exit(2) from None
    try:
        results = run(
            inputs, out, cfg, scan_mpp=scan_mpp, workers=workers, show_progress=progress, qc=qc
        )
    except HmgdmError as err:
        console.print(f"[red]error[/red] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: finished slides are kept; rerun to resume")
        raise typer.Exit(130) from None
    console.print(summary_table(results))
    failed = [r for r in results if r.status == "error"]
    console.print(f"manifest: {manifest_path(out)}")
    if failed:
        console.print(
            f"[red]{len(failed)} slide(s) failed[/red]; see the error column of the manifest"
        )
        raise typer.Exit(1)
