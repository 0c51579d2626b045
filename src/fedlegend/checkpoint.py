"""Checkpoints without pickle: tensors in a safetensors file, everything else in JSON.

`encode(tree)` maps the nested Python a round loop carries (dicts with str or int keys, lists,
tuples, sets, str/int/float/bool/None, torch tensors, numpy scalars, fedlegend dataclasses) to
a JSON tree plus {name: tensor}; `decode` maps them back exactly. Anything else is refused with
the path of the offending value, never turned into a string. Decoding builds only those types:
a dataclass is looked up among fedlegend's own modules and filled field by field (no __init__,
no pickle), so reading a checkpoint someone else wrote runs none of their code.

Tags (a JSON object with one "$..." key): {"$tuple": [...]}, {"$set": [...]}, {"$frozenset": [...]},
{"$dict": [[key, value], ...]} (int keys, or str keys starting with "$"), {"$float": "nan"|"inf"|"-inf"},
{"$np": dtype, "v": value}, {"$tensor": name}, {"$dataclass": "module:QualName", "fields": {...}}.

On disk (`write` / `read`) a checkpoint is a folder with `checkpoint.json` (the manifest: the
JSON tree, the tensor file's name and sha256) and `tensors-<round>-<token>.safetensors`. The
tensor file is written under a new name first and the manifest renamed over the old one last,
so a stop at any moment leaves either the old pair or the new one whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import re
import secrets
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

MANIFEST = "checkpoint.json"
KIND = "fedlegend-checkpoint"
_TENSOR_FILE = re.compile(r"tensors-[A-Za-z0-9_-]{1,64}\.safetensors")
_TAGS = ("$tuple", "$set", "$frozenset", "$dict", "$float", "$np", "$tensor", "$dataclass")
_NP_KINDS = "biuf"   # numpy scalar kinds: bool, int, unsigned, float
_TAG_EXTRA = {"$np": ("v",), "$tensor": ("requires_grad",), "$dataclass": ("fields",)}


class EncodeError(TypeError):
    """A value the checkpoint format does not hold (the message names where it is)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read: corrupt, truncated, foreign or of another format version."""


# ---------------------------------------------------------------- the tree <-> (JSON, tensors)
def _encode_float(x: float):
    if math.isfinite(x):
        return x
    return {"$float": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


def _tensor_name(path: str, taken: dict) -> str:
    name, n = path or "root", 1
    while name in taken or name == "__metadata__":   # safetensors' reserved name
        name, n = f"{path}~{n}", n + 1
    return name


def encode(tree, root: str = "") -> tuple[object, dict[str, torch.Tensor]]:
    """(JSON-able tree, {name: tensor}) for `tree`; raises EncodeError on anything it cannot hold.
    A tensor object met twice is stored once (decode gives both places the same tensor)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}

    def enc(x, path: str):
        if x is None or type(x) in (bool, str, int):
            return x
        if type(x) is float:
            return _encode_float(x)
        if isinstance(x, torch.Tensor):
            if type(x) is not torch.Tensor:
                raise EncodeError(f"{path or 'the root'}: a {type(x).__name__} (a torch.Tensor subclass) is not stored")
            if x.is_complex() or x.is_sparse or x.is_quantized:
                raise EncodeError(f"{path or 'the root'}: a {x.dtype} / {x.layout} tensor is not stored")
            if id(x) not in seen:
                name = _tensor_name(path, tensors)
                tensors[name] = x.detach().to("cpu").clone().contiguous()
                seen[id(x)] = name
            return {"$tensor": seen[id(x)], **({"requires_grad": True} if x.requires_grad else {})}
        if isinstance(x, np.generic):
            if x.dtype.kind not in _NP_KINDS:
                raise EncodeError(f"{path}: numpy scalar of dtype {x.dtype} is not stored")
            v = x.item()
            return {"$np": x.dtype.str, "v": _encode_float(v) if isinstance(v, float) else v}
        if type(x) is list:
            return [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if type(x) is tuple:
            return {"$tuple": [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if type(x) in (set, frozenset):
            return {"$set" if type(x) is set else "$frozenset": [enc(v, f"{path}{{}}") for v in x]}
        if type(x) is dict:
            for k in x:
                if type(k) not in (str, int):
                    raise EncodeError(f"{path}: dict key {k!r} of type {type(k).__name__} (only str and int keys)")
            if all(type(k) is str and not k.startswith("$") for k in x):
                return {k: enc(v, f"{path}.{k}" if path else k) for k, v in x.items()}
            return {"$dict": [[k, enc(v, f"{path}[{k!r}]")] for k, v in x.items()]}
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            cls = type(x)
            if not cls.__module__.startswith("fedlegend.") or "<locals>" in cls.__qualname__:
                raise EncodeError(f"{path}: dataclass {cls.__module__}.{cls.__qualname__} is not fedlegend's own")
            names = [f.name for f in dataclasses.fields(x)]
            extra = set(getattr(x, "__dict__", {})) - set(names)
            if extra:
                raise EncodeError(f"{path}: {cls.__qualname__} carries attributes that are not fields: {sorted(extra)}")
            return {"$dataclass": f"{cls.__module__}:{cls.__qualname__}",
                    "fields": {n: enc(getattr(x, n), f"{path}.{n}") for n in names}}
        raise EncodeError(f"{path or 'the root'}: a {type(x).__module__}.{type(x).__qualname__} is not stored "
                          "(checkpoints hold dicts, lists, tuples, sets, scalars, tensors, numpy scalars and "
                          "fedlegend dataclasses)")

    return enc(tree, root), tensors


def _dataclass_type(ref: str, path: str) -> type:
    module, _, qualname = ref.partition(":")
    if not (module == "fedlegend" or module.startswith("fedlegend.")) or not qualname:
        raise CheckpointError(f"{path}: dataclass {ref!r} is not fedlegend's own")
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise CheckpointError(f"{path}: no dataclass {ref!r} in this fedlegend") from None
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise CheckpointError(f"{path}: {ref!r} is not a dataclass")
    return obj


def _decode_float(v, path: str) -> float:
    if isinstance(v, dict) and set(v) == {"$float"} and v["$float"] in ("nan", "inf", "-inf"):
        return float(v["$float"])
    if type(v) in (int, float) and type(v) is not bool:
        return float(v) if type(v) is float else v
    raise CheckpointError(f"{path}: not a number: {v!r:.60}")


def decode(tree, tensors: dict[str, torch.Tensor]):
    """The Python tree `encode` was given, from its JSON tree and tensors; raises CheckpointError
    on anything encode does not write (unknown tag, missing tensor, foreign dataclass)."""

    def dec(x, path: str):
        if x is None or type(x) in (bool, str, int, float):
            return x
        if type(x) is list:
            return [dec(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if type(x) is not dict:
            raise CheckpointError(f"{path}: unexpected {type(x).__name__}")
        tags = [k for k in x if k.startswith("$")]
        if not tags:
            return {k: dec(v, f"{path}.{k}" if path else k) for k, v in x.items()}
        tag = tags[0]
        if tag not in _TAGS:
            raise CheckpointError(f"{path}: unknown tag {tag!r}")
        if set(x) - {tag, *_TAG_EXTRA.get(tag, ())}:
            raise CheckpointError(f"{path}: unexpected keys beside {tag}: {sorted(set(x) - {tag})}")
        body = x[tag]
        if tag == "$float":
            return _decode_float(x, path)
        if tag == "$tensor":
            if type(body) is not str or body not in tensors:
                raise CheckpointError(f"{path}: tensor {body!r} is missing from the tensor file")
            if x.get("requires_grad", False) is not False:
                return tensors[body].requires_grad_(True)
            return tensors[body]
        if tag == "$np":
            try:
                dtype = np.dtype(str(body))
            except TypeError:
                raise CheckpointError(f"{path}: bad numpy dtype {body!r}") from None
            v = x.get("v")
            if dtype.kind == "f":
                return dtype.type(_decode_float(v, path))
            if (dtype.kind == "b" and type(v) is bool) or (dtype.kind in "iu" and type(v) is int):
                return dtype.type(v)
            raise CheckpointError(f"{path}: bad numpy scalar {x!r:.80}")
        if tag == "$dataclass":
            cls = _dataclass_type(body, path)
            fields = x.get("fields")
            names = {f.name for f in dataclasses.fields(cls)}
            if type(fields) is not dict or set(fields) != names:
                raise CheckpointError(f"{path}: the fields of {body} are not {sorted(names)}")
            obj = cls.__new__(cls)
            for k, v in fields.items():
                object.__setattr__(obj, k, dec(v, f"{path}.{k}"))
            return obj
        if type(body) is not list:
            raise CheckpointError(f"{path}: {tag} holds no list")
        if tag == "$tuple":
            return tuple(dec(v, f"{path}[{i}]") for i, v in enumerate(body))
        if tag in ("$set", "$frozenset"):
            items = [dec(v, f"{path}{{}}") for v in body]
            return set(items) if tag == "$set" else frozenset(items)
        out = {}
        for item in body:   # "$dict"
            if type(item) is not list or len(item) != 2 or type(item[0]) not in (str, int):
                raise CheckpointError(f"{path}: bad $dict entry {item!r:.60}")
            out[item[0]] = dec(item[1], f"{path}[{item[0]!r}]")
        return out

    return dec(tree, "")


# ---------------------------------------------------------------- the folder on disk
def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write(folder: Path, meta: dict, tree, version: int, label: str = "") -> None:
    """Write `tree` (encoded) with `meta` (JSON-able: config, wall clock) into `folder`: the tensor
    file under a new name, then the manifest over the old one, then the old files go."""
    from safetensors.torch import save

    body, tensors = encode(tree)
    blob = save(tensors)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"tensors-{label + '-' if label else ''}{secrets.token_hex(4)}.safetensors"
    tmp = folder / f".{name}.tmp"
    _write_bytes(tmp, blob)
    os.replace(tmp, folder / name)
    manifest = {"kind": KIND, "version": version, **meta, "tensors": name,
                "sha256": hashlib.sha256(blob).hexdigest(), "tree": body}
    tmp = folder / f".{MANIFEST}.tmp"
    _write_bytes(tmp, json.dumps(manifest, allow_nan=False, indent=1).encode())
    os.replace(tmp, folder / MANIFEST)
    _fsync_dir(folder)
    for old in folder.iterdir():   # the previous tensor file and any leftover of an interrupted write
        if old.name not in (MANIFEST, name) and old.is_file():
            old.unlink(missing_ok=True)


def read_manifest(folder: Path, version: int) -> dict:
    """The manifest of the checkpoint in `folder` (CheckpointError if it is not one of this version)."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint manifest ({type(err).__name__}: {err})") from None
    if type(manifest) is not dict or manifest.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a fedlegend checkpoint")
    if manifest.get("version") != version:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('version')!r}, this fedlegend reads {version}")
    for key, kind in (("tensors", str), ("sha256", str)):
        if type(manifest.get(key)) is not kind:
            raise CheckpointError(f"{path}: the manifest has no {key!r}")
    if "tree" not in manifest:
        raise CheckpointError(f"{path}: the manifest has no 'tree'")
    return manifest


def read_tree(folder: Path, manifest: dict):
    """The tree of a checkpoint whose manifest `read_manifest` returned, its tensors checked against
    the manifest's sha256 and decoded by safetensors (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    name = manifest["tensors"]
    if not _TENSOR_FILE.fullmatch(name):
        raise CheckpointError(f"{folder / MANIFEST}: bad tensor file name {name!r}")
    path = folder / name
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: the checkpoint's tensor file cannot be read ({err.strerror})") from None
    if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise CheckpointError(f"{path}: the tensor file does not match the manifest's sha256 (truncated or altered)")
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: not a safetensors file ({err})") from None
    try:
        return decode(manifest["tree"], tensors)
    except CheckpointError as err:
        raise CheckpointError(f"{folder / MANIFEST}: {err}") from None
    except RecursionError:
        raise CheckpointError(f"{folder / MANIFEST}: nested too deeply") from None
