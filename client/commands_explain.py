"""`hmgdm-client explain SLIDE`: paint which entities drove a fine-tuned model's prediction."""

from __future__ import annotations

from pathlib import Path

import typer

from client.commands_eval import TRUST_CHECKPOINT


def explain(
    slide: str = typer.Argument(..., help="Slide id in --graphs, or a slide's graph archive."),
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="model.pt from `evaluate ... --method finetune`."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="PNG to write (a CSV of entities beside)."),
    graphs: Path | None = typer.Option(None, "--graphs", "-g", help="Graph cache of the slide."),
    method: str = typer.Option(
        "auto",
        "--method",
        "-m",
        help="attention (pooling weights), gradient (x input), or auto: attention for a "
        "classifier, gradient x input for a Cox head.",
    ),
    image: Path | None = typer.Option(
        None, "--image", help="The slide image, if not at the path recorded when graphs were built."
    ),
    max_side: int = typer.Option(1024, "--max-side", min=64, help="Thumbnail size in pixels."),
    trust_checkpoint: bool = TRUST_CHECKPOINT,
) -> None:
    """Per-entity importance (attention-pooling weights, or gradient x input of the predicted
    class / Cox risk) painted on the slide thumbnail, one Voronoi cell per entity centroid."""
    from client.commands_eval import run_reporting_errors

    run_reporting_errors(
        lambda: _explain(slide, checkpoint, out, graphs, method, image, max_side, trust_checkpoint)
    )


def _explain(slide, checkpoint, out, graphs, method, image, max_side, trust_checkpoint) -> None:
    from hmgdm_core.atomic import save_figure, write_csv
    from hmgdm_core.downstream.explain import entity_importance, plot_importance, thumbnail_mpp
    from hmgdm_core.downstream.finetune import load_slide_net
    from hmgdm_core.exceptions import ConfigError, GraphDataError, SlideReadError
    from hmgdm_core.graph.cache import graph_path, load_slide_graphs
    from hmgdm_core.io.slides import Slide
    from hmgdm_core.log import console
    from hmgdm_core.train import check_graph_dims

    if method not in ("auto", "attention", "gradient"):
        raise ConfigError(f"--method must be auto, attention or gradient, not '{method}'")
    archive = Path(slide) if graphs is None else graph_path(graphs, slide)
    if not archive.is_file():
        raise GraphDataError(f"{archive}: no graph archive for slide '{slide}'")
    bag, meta = load_slide_graphs(archive)
    net, task, _ = load_slide_net(checkpoint, trust=trust_checkpoint)
    check_graph_dims(net.backbone, bag, str(archive))
    if method == "auto":
        method = "attention" if task.kind == "classification" else "gradient"
    explanation = entity_importance(net, task, bag, method)
    gcfg = meta["graph_config"]
    source = Path(image or meta["source"])
    try:
        with Slide.open(source, mpp=meta["slide"]["mpp"]) as s:
            mpp = thumbnail_mpp(s.size_um, max_side, gcfg["mpp"])
            thumb = s.thumbnail(mpp)
    except (SlideReadError, OSError) as err:
        raise GraphDataError(
            f"{source}: cannot read the slide image to paint on ({err}); pass --image PATH"
        ) from None
    # One superpixel width, or one thumbnail pixel when a pixel spans several entities.
    radius = max(float(gcfg["entity_area_um2"]) ** 0.5, mpp)
    fig = plot_importance(thumb, mpp, explanation, radius, title=str(meta["slide_id"]))
    png = save_figure(out, fig)
    csv = write_csv(Path(out).with_suffix(".csv"), explanation.table)
    top = explanation.table.nlargest(1, "importance").iloc[0]
    console.print(
        f"{meta['slide_id']}: predicted {explanation.prediction}; {len(explanation.table)} "
        f"entities, most important at ({top.x_um:.0f}, {top.y_um:.0f}) µm"
    )
    console.print(f"wrote {png}, {csv}")
