"""`hmgdm-client explain SLIDE` (which entities drove a fine-tuned model's prediction) and
`hmgdm-client export SLIDE` (a slide's entities as QuPath GeoJSON): pictures and files of one
cached slide."""

from __future__ import annotations

from pathlib import Path

import typer

from client.commands_eval import TRUST_CHECKPOINT

GRAPHS = typer.Option(None, "--graphs", "-g", help="Graph cache of the slide.")
IMAGE = typer.Option(
    None, "--image", help="The slide image, if not at the path recorded when graphs were built."
)
MAX_SIDE = typer.Option(1024, "--max-side", min=64, help="Thumbnail size in pixels.")


def explain(
    slide: str = typer.Argument(..., help="Slide id in --graphs, or a slide's graph archive."),
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="model.pt from `evaluate ... --method finetune`."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="PNG to write (a CSV of entities and a QuPath GeoJSON beside)."
    ),
    graphs: Path | None = GRAPHS,
    method: str = typer.Option(
        "auto",
        "--method",
        "-m",
        help="attention (pooling weights), gradient (x input), or auto: attention for a "
        "classifier, gradient x input for a Cox head.",
    ),
    image: Path | None = IMAGE,
    max_side: int = MAX_SIDE,
    trust_checkpoint: bool = TRUST_CHECKPOINT,
) -> None:
    """Per-entity importance (attention-pooling weights, or gradient x input of the predicted
    class / Cox risk) painted on the slide thumbnail, one Voronoi cell per entity centroid;
    the GeoJSON outlines each entity and classifies it by importance quintile."""
    from client.commands_eval import run_reporting_errors

    run_reporting_errors(
        lambda: _explain(slide, checkpoint, out, graphs, method, image, max_side, trust_checkpoint)
    )


def export(
    slide: str = typer.Argument(..., help="Slide id in --graphs, or a slide's graph archive."),
    out: Path = typer.Option(..., "--out", "-o", help="GeoJSON file to write."),
    graphs: Path | None = GRAPHS,
    color_by: str | None = typer.Option(
        None,
        "--color-by",
        help="A measurement (e.g. 'Haematoxylin OD mean') whose quintiles become the entities' "
        "classes, so QuPath colours them by it.",
    ),
    png: Path | None = typer.Option(
        None, "--png", help="Also draw the written GeoJSON on the slide thumbnail here."
    ),
    image: Path | None = IMAGE,
    max_side: int = MAX_SIDE,
) -> None:
    """Every entity of a slide as a QuPath detection (GeoJSON FeatureCollection in level-0
    pixels): its superpixel outline, descriptors as measurements."""
    from client.commands_eval import run_reporting_errors

    run_reporting_errors(lambda: _export(slide, out, graphs, color_by, png, image, max_side))


def _load(slide: str, graphs: Path | None):
    from hmgdm_core.exceptions import GraphDataError
    from hmgdm_core.graph.cache import find_slide_archive, load_entity_labels, load_slide_graphs

    archive = Path(slide) if graphs is None else find_slide_archive(graphs, slide)
    if not archive.is_file():
        raise GraphDataError(f"{archive}: no graph archive for slide '{slide}'")
    bag, meta = load_slide_graphs(archive)
    return archive, bag, meta, load_entity_labels(archive)


def _thumbnail(meta: dict, image: Path | None, max_side: int):
    """(thumbnail, its µm/px) of the slide the graphs were built from."""
    from hmgdm_core.downstream.explain import thumbnail_mpp
    from hmgdm_core.exceptions import GraphDataError, SlideReadError
    from hmgdm_core.graph.cache import built_mpp
    from hmgdm_core.io.slides import Slide

    source = Path(image or meta["source"])
    try:
        with Slide.open(source, scan_mpp=meta["slide"]["mpp"]) as s:
            mpp = thumbnail_mpp(s.size_um, max_side, built_mpp(meta))
            return s.thumbnail(mpp), mpp
    except (SlideReadError, OSError) as err:
        raise GraphDataError(
            f"{source}: cannot read the slide image to paint on ({err}); pass --image PATH"
        ) from None


def _write_geojson(out: Path, bag, meta, seg, *, values=None, classify_by=None) -> Path:
    from hmgdm_core.graph.geojson import slide_geojson, write_geojson

    return write_geojson(
        out, slide_geojson(bag, meta, seg=seg, values=values, classify_by=classify_by)
    )


def _explain(slide, checkpoint, out, graphs, method, image, max_side, trust_checkpoint) -> None:
    from hmgdm_core.atomic import save_figure, write_csv
    from hmgdm_core.downstream.explain import entity_importance, plot_importance
    from hmgdm_core.downstream.finetune import load_slide_net
    from hmgdm_core.exceptions import ConfigError
    from hmgdm_core.log import console
    from hmgdm_core.train import check_graph_dims

    if method not in ("auto", "attention", "gradient"):
        raise ConfigError(f"--method must be auto, attention or gradient, not '{method}'")
    archive, bag, meta, seg = _load(slide, graphs)
    net, task, _ = load_slide_net(checkpoint, trust=trust_checkpoint)
    check_graph_dims(net.backbone, bag, str(archive))
    if method == "auto":
        method = "attention" if task.kind == "classification" else "gradient"
    explanation = entity_importance(net, task, bag, method)
    thumb, mpp = _thumbnail(meta, image, max_side)
    # One superpixel width, or one thumbnail pixel when a pixel spans several entities.
    radius = max(float(meta["graph_config"]["entity_area_um2"]) ** 0.5, mpp)
    fig = plot_importance(thumb, mpp, explanation, radius, title=str(meta["slide_id"]))
    png = save_figure(out, fig)
    csv = write_csv(Path(out).with_suffix(".csv"), explanation.table)
    importance = {"importance": explanation.table["importance"].to_numpy()}
    geojson = _write_geojson(
        Path(out).with_suffix(".geojson"),
        bag,
        meta,
        seg,
        values=importance,
        classify_by="importance",
    )
    top = explanation.table.nlargest(1, "importance").iloc[0]
    console.print(
        f"{meta['slide_id']}: predicted {explanation.prediction}; {len(explanation.table)} "
        f"entities, most important at ({top.x_um:.0f}, {top.y_um:.0f}) µm"
    )
    console.print(f"wrote {png}, {csv}, {geojson}")


def _export(slide, out, graphs, color_by, png, image, max_side) -> None:
    import json

    from hmgdm_core.graph.geojson import render_geojson
    from hmgdm_core.graph.qc import save_png
    from hmgdm_core.log import console

    _, bag, meta, seg = _load(slide, graphs)
    path = _write_geojson(Path(out), bag, meta, seg, classify_by=color_by)
    kind = "superpixel outlines" if seg is not None else "centroids (cache predates outlines)"
    console.print(f"wrote {path}: {sum(g.num_nodes for g in bag)} entities, {kind}")
    if png is not None:
        thumb, mpp = _thumbnail(meta, image, max_side)
        collection = json.loads(path.read_text())  # draw what was written, as QuPath reads it
        scale = float(meta["slide"]["mpp"]) / mpp  # thumbnail px per level-0 px
        title = f"{meta['slide_id']}: entities of {path.name} in their QuPath classes"
        picture = render_geojson(thumb, scale, collection, title=title)
        console.print(f"wrote {save_png(Path(png), picture)}")
