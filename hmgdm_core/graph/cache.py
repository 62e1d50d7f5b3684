"""The on-disk graph cache: one archive per slide, written tile by tile, read lazily or whole.

`DIR/graphs/<slide_id>.pt` is a zip archive (like every torch `.pt` file) holding `meta.json`,
one `tiles/NNNNNN.pt` member per region graph and its superpixel label image `seg/NNNNNN.npy`.
Tiles are appended while a slide is being built, so building memory does not grow with slide
size, and a dataset can read any one graph without loading the slide. The archive is written
to a temp name and renamed when complete, so an interrupted build never leaves a half-written
file behind.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Data, Dataset

from hmgdm_core.atomic import fsync
from hmgdm_core.config import stored_config
from hmgdm_core.exceptions import GraphDataError
from hmgdm_core.slide_ids import match_slide_ids

FORMAT_VERSION = 1
GRAPH_FIELDS = ("x", "win", "edge_index", "edge_attr", "edge_win", "pos", "tile_origin")


def graph_path(out_dir: Path, slide_id: str) -> Path:
    """Where a slide's archive lives; ids with `/` (relative paths) give nested folders."""
    return Path(out_dir) / "graphs" / f"{slide_id}.pt"


class SlideGraphWriter:
    """Append region graphs of one slide to `path`; `commit(meta)` makes the file appear.

    Use as a context manager: leaving the block without `commit` (an error, Ctrl-C) deletes
    the temp file and leaves any previous complete archive untouched.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        # Graphs are derived from patients' slides: readable by this user only, from the start.
        os.close(os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED)
        self.n_graphs = self.n_nodes = self.n_edges = 0

    def add(self, graph: Data) -> None:
        """Append one region graph; its `seg` label image, if any, goes to `seg/NNNNNN.npy`."""
        tensors = {k: graph[k] for k in GRAPH_FIELDS if graph.get(k) is not None}
        buf = io.BytesIO()
        torch.save(tensors, buf)
        self._zip.writestr(f"tiles/{self.n_graphs:06d}.pt", buf.getvalue())
        if graph.get("seg") is not None:
            seg = io.BytesIO()
            np.save(seg, graph.seg.numpy(), allow_pickle=False)
            # Label images are piecewise constant: deflate shrinks them ~20x.
            self._zip.writestr(
                f"seg/{self.n_graphs:06d}.npy",
                seg.getvalue(),
                compress_type=zipfile.ZIP_DEFLATED,
                compresslevel=1,
            )
        self.n_graphs += 1
        self.n_nodes += graph.num_nodes
        self.n_edges += graph.edge_index.shape[1] // 2  # stored in both directions

    def commit(self, meta: dict) -> int:
        """Finish the archive with its metadata and atomically move it in place; returns bytes."""
        meta = {
            **meta,
            "format_version": FORMAT_VERSION,
            "n_graphs": self.n_graphs,
            "n_nodes": self.n_nodes,
            "n_edges": self.n_edges,
        }
        self._zip.writestr("meta.json", json.dumps(meta, indent=1, default=str))
        self._zip.close()
        fsync(self._tmp)
        os.replace(self._tmp, self.path)
        fsync(self.path.parent)
        return self.path.stat().st_size

    def __enter__(self) -> SlideGraphWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp.exists():
            self._zip.close()
            self._tmp.unlink()


def remove_stale_temps(out_dir: Path) -> list[Path]:
    """Delete temp archives left by a killed build (their writer process no longer exists)."""
    removed = []
    for tmp in (Path(out_dir) / "graphs").rglob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise GraphDataError(f"{path}: graph file not found") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise GraphDataError(f"{path}: not a readable graph archive ({err}); rebuild it") from None


def _read_meta(zf: zipfile.ZipFile, path: Path) -> dict:
    try:
        meta = json.loads(zf.read("meta.json"))
    except KeyError:
        raise GraphDataError(f"{path}: graph archive has no meta.json; rebuild it") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise GraphDataError(
            f"{path}: graph format {meta.get('format_version')} != {FORMAT_VERSION}; rebuild it"
        )
    return meta


def _read_graph(zf: zipfile.ZipFile, index: int, meta: dict) -> Data:
    blob = zf.read(f"tiles/{index:06d}.pt")
    tensors = torch.load(io.BytesIO(blob), weights_only=True)
    return Data(**tensors, slide_id=meta["slide_id"], tile_index=index)


def load_entity_labels(path: Path) -> list[np.ndarray] | None:
    """Each region's superpixel label image (entity index per pixel of the region read, -1 =
    none), in tile order; None for archives built before they were stored."""
    path = Path(path)
    with _open(path) as zf:
        meta = _read_meta(zf, path)
        names = [f"seg/{i:06d}.npy" for i in range(meta["n_graphs"])]
        if not set(names) <= set(zf.namelist()):
            return None
        return [np.load(io.BytesIO(zf.read(n)), allow_pickle=False) for n in names]


def read_slide_meta(path: Path) -> dict:
    with _open(Path(path)) as zf:
        return _read_meta(zf, Path(path))


def built_mpp(meta: dict) -> float:
    """The µm/px an archive's graphs were built at (graph.target_mpp, also in archives written
    while it was named graph.mpp)."""
    return float(stored_config(meta["graph_config"], "graph")["target_mpp"])


def load_slide_graphs(path: Path) -> tuple[list[Data], dict]:
    """All region graphs of one slide (with `slide_id`, `tile_index`) and the slide's metadata."""
    path = Path(path)
    with _open(path) as zf:
        meta = _read_meta(zf, path)
        return [_read_graph(zf, i, meta) for i in range(meta["n_graphs"])], meta


def graph_files(graph_dir: Path) -> list[Path]:
    """The slide archives of a cache directory (the `--out` of build-graphs), sorted by name."""
    graph_dir = Path(graph_dir)
    sub = graph_dir / "graphs"
    files = sorted(sub.rglob("*.pt")) if sub.is_dir() else []
    if not files:
        raise GraphDataError(
            f"{graph_dir}: no graphs found (expected {sub}/*.pt from build-graphs)"
        )
    return files


def find_slide_archive(graph_dir: Path, name: str) -> Path:
    """The archive of the slide `name` names in a cache: its id, or a name `match_slide_ids`
    resolves (a file stem, a path with suffix)."""
    sub = Path(graph_dir) / "graphs"
    ids = [f.relative_to(sub).with_suffix("").as_posix() for f in graph_files(graph_dir)]
    matched, ambiguous = match_slide_ids([name], ids)
    if name in ambiguous:
        raise GraphDataError(
            f"{graph_dir}: '{name}' fits several slides ({', '.join(ambiguous[name][:3])}); "
            "give the full slide id"
        )
    if name not in matched:
        raise GraphDataError(f"{graph_dir}: no graph archive for slide '{name}'")
    return graph_path(graph_dir, matched[name])


def load_graph_dir(graph_dir: Path) -> list[Data]:
    """Every region graph of every slide in a cache directory, in memory."""
    return [g for f in graph_files(graph_dir) for g in load_slide_graphs(f)[0]]


def read_graph_meta(graph_dir: Path) -> dict:
    """Feature names and graph config shared by a cache; refuses caches built with mixed configs."""
    files = graph_files(graph_dir)
    metas = [read_slide_meta(f) for f in files]
    hashes = {m["config_hash"] for m in metas}
    if len(hashes) > 1:
        raise GraphDataError(f"{graph_dir}: slides were built with {len(hashes)} different configs")
    first = metas[0]
    return {k: first[k] for k in ("x_names", "edge_attr_names", "graph_config", "config_hash")}


class GraphDataset(Dataset):
    """A PyG dataset over a cache directory that reads each graph from disk on access."""

    def __init__(self, graph_dir: Path, slide_ids: Sequence[str] | None = None) -> None:
        super().__init__()
        wanted = None if slide_ids is None else set(slide_ids)
        self._index: list[tuple[Path, int]] = []
        for f in graph_files(graph_dir):
            meta = read_slide_meta(f)
            if wanted is None or meta["slide_id"] in wanted:
                self._index += [(f, i) for i in range(meta["n_graphs"])]

    def len(self) -> int:
        return len(self._index)

    def get(self, idx: int) -> Data:
        path, tile = self._index[idx]
        zf, meta = _cached_archive(path)
        return _read_graph(zf, tile, meta)


@lru_cache(maxsize=16)
def _cached_archive(path: Path) -> tuple[zipfile.ZipFile, dict]:
    # Open handles are reused across `get` calls; a few slides' handles are cheap.
    zf = _open(path)
    return zf, _read_meta(zf, path)
