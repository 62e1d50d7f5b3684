"""Build graphs for many slides: input discovery, resume, parallel workers, progress, summary."""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from hmgdm_core.config import GraphConfig
from hmgdm_core.exceptions import GraphDataError
from hmgdm_core.graph.build import SlideResult, build_key, build_slide, slide_fingerprint
from hmgdm_core.graph.cache import graph_path, read_slide_meta, remove_stale_temps
from hmgdm_core.graph.inputs import SlideInput, slide_inputs
from hmgdm_core.graph.manifest import already_built, read_manifest, write_manifest
from hmgdm_core.graph.qc import contact_sheet, qc_path, save_png
from hmgdm_core.log import console

log = logging.getLogger(__name__)

MANIFEST_EVERY_S = 2.0


def legacy_id(out_dir: Path, slide: SlideInput, sha256: str) -> str | None:
    """The file stem, when the archive cached under it was built from this slide.

    Caches built before slide ids were paths relative to the input folder named slides by
    their stem; a slide found again keeps that id, so its graphs are not rebuilt (or, if the
    file changed, are rebuilt in place instead of beside the old ones) and the site's labels
    and patient tables still name it. The archive is this slide's when it recorded the same
    path below the input folder, or the same file name and content (a moved folder).
    """
    stem = slide.path.stem
    if not slide.from_directory or slide.slide_id == stem:
        return None
    try:
        meta = read_slide_meta(graph_path(out_dir, stem))
    except GraphDataError:
        return None
    source = Path(str(meta.get("source", ""))).parts
    below_root = (*slide.slide_id.split("/")[:-1], slide.path.name)
    same_place = source[-len(below_root) :] == below_root
    same_bytes = source[-1:] == (slide.path.name,) and meta.get("sha256") == sha256
    return stem if same_place or same_bytes else None


_progress_queue: mp.Queue | None = None  # set in each worker by _init_worker


def _build_in_worker(*args, slide_id: str, **kwargs) -> SlideResult:
    def report(done: int, total: int) -> None:
        _progress_queue.put((slide_id, done, total))

    return build_slide(*args, slide_id=slide_id, on_tile=report, **kwargs)


@contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """Graph building runs torch on small tensors, where intra-op threads cost more than they
    save (measured 5x slower with 2 threads on a busy 2-core machine); workers give the
    parallelism instead."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _init_worker(progress: mp.Queue) -> None:
    global _progress_queue
    import torch

    torch.set_num_threads(1)
    _progress_queue = progress


def build_graphs(
    inputs: Sequence[Path],
    out_dir: Path,
    cfg: GraphConfig,
    *,
    scan_mpp: float | None = None,
    workers: int = 1,
    show_progress: bool = True,
    qc: bool = False,
) -> list[SlideResult]:
    """Build every input slide not already built from the same bytes with the same build key
    (graph config, µm/px given for it, builder version).

    `inputs` are files, directories and slides CSVs (see `inputs.py`); `scan_mpp` is the µm/px
    of every input without its own in a slides CSV (None: each file's own). Returns one result
    per input (status done / skipped / error); `out_dir/manifest.csv` is rewritten after every
    slide so an interrupted run resumes where it stopped. With `qc`, every slide built gets a
    QC image in `out_dir/qc/` and the run a contact sheet (`qc/contact_sheet.png`). Raises
    SlideReadError, before writing anything, when a named directory holds no slide.
    """
    slides, results = slide_inputs(inputs)
    out_dir = Path(out_dir)
    qc_dir = out_dir / "qc" if qc else None
    out_dir.mkdir(parents=True, exist_ok=True)
    for tmp in remove_stale_temps(out_dir):
        log.info("removed %s left by an interrupted build", tmp.name)
    manifest = read_manifest(out_dir)
    config_hash = cfg.stable_hash()
    todo: list[tuple[Path, str, str, float | None]] = []
    seen: dict[str, Path] = {}
    for slide in slides:
        given = slide.scan_mpp if slide.scan_mpp is not None else scan_mpp
        try:
            sha = slide_fingerprint(slide.path)
        except OSError as err:
            results.append(
                SlideResult(
                    slide.slide_id,
                    str(slide.path),
                    error=f"{slide.path}: cannot read: {err.strerror}",
                )
            )
            continue
        sid = legacy_id(out_dir, slide, sha) or slide.slide_id
        if sid in seen:
            results.append(
                SlideResult(
                    sid,
                    str(slide.path),
                    error=f"{slide.path}: duplicate slide id '{sid}' (also {seen[sid]}); "
                    "name the slides in a slides.csv (slide_id,path)",
                )
            )
            continue
        seen[sid] = slide.path
        done = already_built(out_dir, sid, slide.path, sha, build_key(config_hash, given))
        if done is None:
            todo.append((slide.path, sid, sha, given))
        else:
            results.append(done)
            manifest[sid] = replace(done, status="done", seconds=manifest.get(sid, done).seconds)
    for r in results:
        if r.status == "error":
            manifest[r.slide_id] = r
            _print_error(r)
    write_manifest(out_dir, manifest)

    try:  # rows of finished slides are kept whatever stops the run (Ctrl-C included)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not show_progress,
            transient=False,
        ) as progress:
            slides_task = progress.add_task("slides", total=len(todo))
            tile_tasks: dict[str, int] = {}

            def on_tile(slide_id: str, done: int, total: int) -> None:
                if slide_id not in tile_tasks:
                    tile_tasks[slide_id] = progress.add_task(f"  {slide_id} tiles", total=total)
                progress.update(tile_tasks[slide_id], completed=done, total=total)

            last_write = time.monotonic()

            def finish(res: SlideResult) -> None:
                nonlocal last_write
                if res.slide_id in tile_tasks:
                    progress.remove_task(tile_tasks.pop(res.slide_id))
                manifest[res.slide_id] = res
                # Rewriting the whole manifest per slide is quadratic for tile datasets of thousands
                # of images; a kill loses at most MANIFEST_EVERY_S of rows, which are then rebuilt.
                if time.monotonic() - last_write > MANIFEST_EVERY_S:
                    write_manifest(out_dir, manifest)
                    last_write = time.monotonic()
                results.append(res)
                progress.advance(slides_task)
                if res.warning:
                    console.print(
                        f"[yellow]warning[/yellow] {res.warning}", soft_wrap=True, highlight=False
                    )
                if res.status == "error":
                    _print_error(res)
                else:
                    log.debug("%s: %d graphs in %.1fs", res.slide_id, res.n_graphs, res.seconds)

            if workers <= 1 or len(todo) <= 1:
                with _single_threaded_torch():
                    for f, sid, sha, given in todo:
                        tile_cb = partial(on_tile, sid)
                        finish(
                            build_slide(
                                f,
                                out_dir,
                                cfg,
                                scan_mpp=given,
                                slide_id=sid,
                                sha256=sha,
                                on_tile=tile_cb,
                                qc_dir=qc_dir,
                            )
                        )
            else:
                _run_pool(todo, out_dir, cfg, qc_dir, workers, on_tile, finish)
    finally:
        write_manifest(out_dir, manifest)
    if qc_dir is not None:
        sheet = write_contact_sheet(qc_dir, results)
        console.print(f"QC images: {qc_dir} (contact sheet {sheet.name})")
    return results


def write_contact_sheet(qc_dir: Path, results: Sequence[SlideResult]) -> Path:
    """`qc_dir/contact_sheet.png`: the QC images of this run's slides, failed ones first."""
    failed = sum(r.status == "error" for r in results)
    title = f"build-graphs QC: {len(results)} slides, {failed} failed"
    images = [(r.slide_id, qc_path(qc_dir, r.slide_id), r.error) for r in results]
    return save_png(qc_dir / "contact_sheet.png", contact_sheet(images, title=title))


def _print_error(res: SlideResult) -> None:
    # soft_wrap keeps each error on one line however narrow the terminal (and greppable in logs).
    console.print(f"[red]error[/red] {res.error}", soft_wrap=True, markup=True, highlight=False)


def _run_pool(todo, out_dir, cfg, qc_dir, workers, on_tile, finish) -> None:
    # Forking this process after torch/OpenSlide have started threads is unsafe; a fork server
    # that imported the builder once forks workers without paying the seconds of imports each.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["hmgdm_core.graph.build"])
    q = ctx.Queue()  # handed to workers at start-up: a Manager process would cost seconds
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(q,)
    ) as pool:
        pending = {
            pool.submit(
                _build_in_worker,
                f,
                out_dir,
                cfg,
                scan_mpp=given,
                slide_id=sid,
                sha256=sha,
                qc_dir=qc_dir,
            )
            for f, sid, sha, given in todo
        }
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(q, on_tile)
                for fut in done:
                    finish(fut.result())
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _drain(q: queue.Queue, on_tile) -> None:
    while True:
        try:
            on_tile(*q.get_nowait())
        except queue.Empty:
            return


def summary_table(results: Sequence[SlideResult]) -> Table:
    """One row per slide plus totals: what a person reads at the end of a long build."""
    table = Table(title="build-graphs summary", show_footer=True)
    for name, justify in [
        ("slide", "left"),
        ("status", "left"),
        ("graphs", "right"),
        ("nodes", "right"),
        ("edges", "right"),
        ("cache MB", "right"),
        ("s", "right"),
    ]:
        table.add_column(name, justify=justify)
    for r in sorted(results, key=lambda r: r.slide_id):
        colour = {"done": "green", "skipped": "cyan"}.get(r.status, "red")
        table.add_row(
            r.slide_id,
            f"[{colour}]{r.status}[/{colour}]",
            str(r.n_graphs),
            str(r.n_nodes),
            str(r.n_edges),
            f"{r.bytes / 1e6:.1f}",
            f"{r.seconds:.1f}",
        )
    ok = [r for r in results if r.status != "error"]
    table.columns[0].footer = f"{len(ok)}/{len(results)} ok"
    table.columns[2].footer = str(sum(r.n_graphs for r in ok))
    table.columns[3].footer = str(sum(r.n_nodes for r in ok))
    table.columns[4].footer = str(sum(r.n_edges for r in ok))
    table.columns[5].footer = f"{sum(r.bytes for r in ok) / 1e6:.1f}"
    return table
