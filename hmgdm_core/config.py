"""Typed configuration: one pydantic section per concern, loaded from TOML, hashed for caches.

Unknown keys are rejected with their name so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Literal, TypeVar

import tomllib
from pydantic import Field, ValidationError

from hmgdm_core.downstream.config import EvalConfig
from hmgdm_core.exceptions import ConfigError
from hmgdm_core.federation_config import FederationConfig
from hmgdm_core.model.config import DiffusionConfig, ModelConfig, TrainConfig
from hmgdm_core.privacy.config import LocalDP, PrivacyConfig
from hmgdm_core.privacy.disclosure import DisclosureConfig
from hmgdm_core.section import Section, hash_values


class TissueConfig(Section):
    """Tissue detection on a low-resolution thumbnail."""

    thumbnail_mpp: float = Field(8.0, gt=0, description="resolution of the detection thumbnail")
    method: Literal["otsu_saturation", "otsu_od"] = Field(
        "otsu_saturation", description="Otsu threshold on saturation or on optical density"
    )
    min_object_um2: float = Field(20_000.0, ge=0, description="smaller specks are dropped")
    min_hole_um2: float = Field(20_000.0, ge=0, description="holes smaller than this are filled")
    min_tile_fraction: float = Field(0.25, ge=0, le=1, description="tissue share to keep a tile")


class GraphConfig(Section):
    """How a slide or image becomes entity graphs (one graph per tissue tile or region)."""

    target_mpp: float = Field(
        0.5, gt=0, description="resolution the graphs are built at, in microns per pixel"
    )
    tile_size: int = Field(512, ge=32, description="tile side in pixels at target_mpp")
    tile_margin: int = Field(32, ge=0, description="context pixels around a tile for SLIC")
    max_region_size: int = Field(
        1024,
        ge=32,
        description="plain images larger than this (px at target_mpp) are split into tiles",
    )
    entity_area_um2: float = Field(100.0, gt=0, description="target superpixel area in µm²")
    compactness: float = Field(10.0, gt=0, description="SLIC compactness")
    max_entities: int = Field(1000, ge=2, description="entities per region graph at most")
    max_edges: int = Field(5000, ge=1, description="undirected edges per region graph at most")
    window_size: int = Field(32, ge=4, description="instance-window side in pixels")
    knn: int = Field(0, ge=0, description="extra edges to the k nearest centroids (0 = off)")
    edge_windows: bool = Field(
        False, description="store an instance window per edge (triples the cache size)"
    )
    cnn_weights: Path | None = Field(None, description="local torchvision weights for CNN features")
    stain_norm: Literal["none", "macenko", "reinhard"] = Field(
        "none",
        description="stain normalisation before entities are found, estimated on each slide's "
        "tissue: macenko = its H&E stains mapped onto a reference H&E; reinhard = its CIELAB "
        "mean and std matched to a reference's",
    )
    tissue: TissueConfig = Field(TissueConfig(), description="tissue detection ([graph.tissue])")

    def stable_hash(self) -> str:
        # Hashed under the name target_mpp had when caches were first built and, without
        # normalisation, as before the option existed: caches built then are not rebuilt.
        exclude = {"stain_norm"} if self.stain_norm == "none" else set()
        values = self.model_dump(mode="json", exclude=exclude)
        values["mpp"] = values.pop("target_mpp")
        return hash_values(values)


class HmgdmConfig(Section):
    """The whole configuration; a TOML file may set any subset of its sections."""

    graph: GraphConfig = GraphConfig()
    evaluation: EvalConfig = EvalConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    privacy: PrivacyConfig = PrivacyConfig()


S = TypeVar("S", bound=Section)
# A site's own sections, never in HmgdmConfig: nothing a run sends can set them.
LOCAL_DP, DISCLOSURE = "local_dp", "disclosure"
SITE_SECTIONS: dict[str, type[Section]] = {LOCAL_DP: LocalDP, DISCLOSURE: DisclosureConfig}


# Keys renamed after release: old dotted key -> its new name. A file setting an old key is refused
# with a pointer to the new one; a config stored in a checkpoint is read under the new names.
RENAMED = {
    **{
        f"evaluation.finetune_{key}": f"evaluation.finetune.{key}"
        for key in (
            "epochs", "patience", "lr", "encoder_lr", "head_epochs", "batch_slides", "hidden",
            "dropout", "max_tiles", "max_nodes",
        )
    },
    "evaluation.finetune_encoder": "evaluation.finetune.train_encoder",
    "graph.mpp": "graph.target_mpp",
}  # fmt: skip


def _under(key: str, old: str) -> bool:
    """`key` is `old`, or `old` in a config nesting it (a study's cohort.graph)."""
    return key == old or key.endswith(f".{old}")


def _format_validation_error(path: Path | str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        renamed = [key.removesuffix(old) + new for old, new in RENAMED.items() if _under(key, old)]
        return f"{path}: unknown key '{key}'" + "".join(f" (renamed to '{n}')" for n in renamed)
    return f"{path}: invalid value for '{key}': {first['msg']}"


def parse_section(cls: type[S], data: dict, source: Path | str = "<config>") -> S:
    """Validate `data` as `cls`, raising a one-line ConfigError that names the bad key."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None


def read_toml(path: Path, what: str = "config file") -> dict:
    """A TOML file as a dict; a one-line ConfigError naming the file when missing or invalid."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


def with_overrides(data: dict, overrides: dict | None) -> dict:
    """`data` (nested sections) with each dotted key of `overrides` ("train.lr") set in it."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return data


def stored_config(data: dict, section: str = "") -> dict:
    """A config (or its `section`) as a checkpoint stored it, with keys renamed since then moved
    to their new names: what the software itself wrote stays readable after a rename."""
    data = copy.deepcopy(data)
    prefix = f"{section}." if section else ""
    for old, new in RENAMED.items():
        if not old.startswith(prefix):
            continue
        *parents, leaf = old.removeprefix(prefix).split(".")
        node = functools.reduce(lambda n, k: n.get(k, {}), parents, data)
        if leaf in node:
            with_overrides(data, {new.removeprefix(prefix): node.pop(leaf)})
    return data


def load_config(path: Path | str | None = None, overrides: dict | None = None) -> HmgdmConfig:
    """Load a TOML config (all defaults when `path` is None), then apply nested `overrides`.

    A site's own file may hold its [local_dp] and [disclosure] too: checked here, read by
    `load_local_dp` and `load_disclosure` only, never part of the HmgdmConfig that a run sends
    between parties.
    """
    data = with_overrides(read_toml(Path(path)) if path is not None else {}, overrides)
    for name in SITE_SECTIONS:
        _site_section(data, path, name)
        data.pop(name, None)
    return parse_section(HmgdmConfig, data, path or "<defaults>")


def load_local_dp(path: Path | str | None, overrides: dict | None = None) -> LocalDP | None:
    """The [local_dp] section of a site's own TOML (None when it has none: no local DP)."""
    data = with_overrides(read_toml(Path(path)) if path is not None else {}, overrides)
    return _site_section(data, path, LOCAL_DP)


def load_disclosure(path: Path | str | None, overrides: dict | None = None) -> DisclosureConfig:
    """The [disclosure] section of a site's own TOML (its defaults when it has none)."""
    data = with_overrides(read_toml(Path(path)) if path is not None else {}, overrides)
    return _site_section(data, path, DISCLOSURE) or DisclosureConfig()


def _site_section(data: dict, source: Path | str | None, name: str):
    section = data.get(name)
    if section is None:
        return None
    return parse_section(SITE_SECTIONS[name], section, f"{source or '<defaults>'} [{name}]")
