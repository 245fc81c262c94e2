"""Checkpoints in safetensors: pretrained models, and training state that survives a kill.

Two kinds of folder:

* A **model folder** (``save_pretrained`` / ``load_pretrained``), the Hugging Face layout:
  ``config.json`` ({"model_type": "glmkit_glm2021", ...the GLMConfig fields}) and ``model.safetensors``.
  The dense and MoE models of the later lessons are stored the same way under their own ``model_type``
  (``glmkit_glm_dense``, ``glmkit_glm_moe``; ``model_families()`` maps a type to its config and model
  classes); their persistent buffers, such as an MoE router's ``e_score_correction_bias``, travel with
  the weights (``state_dict()`` holds them).
  safetensors refuses to store two names that share memory, and a tied head is exactly that
  (``lm_head.weight`` *is* ``word_embeddings.weight``). So the tensor is stored once, under its first
  name, and the file's metadata records the alias (``{"lm_head.weight": "word_embeddings.weight"}``);
  loading re-ties it.

* A **training folder** (``save_training_state`` / ``load_training_state``), one sub-folder per saved step
  plus a pointer file::

      run/
        latest                      -> "step-00000300"   (replaced atomically)
        step-00000200/ ...          (older ones pruned, ``keep`` are kept)
        step-00000300/
          config.json, model.safetensors     a model folder: load_pretrained works on it
          optimizer.safetensors              every optimizer tensor, flattened: "state.<param>.<name>"
          optimizer.json                     the rest: param_groups, non-tensor state entries
          rng.safetensors                    torch (and CUDA) RNG state, numpy / Python RNG arrays
          trainer_state.json                 step, and ``extra`` (seed, configs, loss history ...)

  Atomic by construction: a step is written into a hidden temporary folder and renamed into place
  only once complete (a rename is atomic on one file system), then the ``latest`` pointer is replaced
  with ``os.replace``. A kill at any moment leaves the previous checkpoint and pointer untouched;
  a leftover temporary folder is ignored and cleaned on the next save.

No pickle anywhere: everything is safetensors or JSON, so loading a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from glmkit.models import glm_dense
from glmkit.models.glm2021 import MODEL_TYPE, GLMConfig, GLMModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
OPTIMIZER_META_NAME = "optimizer.json"
RNG_NAME = "rng.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"
LATEST_NAME = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------------------------------
# Small atomic-write helpers
# ----------------------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    _fsync_file(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Model families: which config and model class a folder's model_type stands for
# ----------------------------------------------------------------------------------------------------
def model_families() -> dict[str, tuple[type, type]]:
    """``{model_type: (config class, model class)}`` for every model a folder can hold. The MoE family
    (``glmkit.models.glm_moe``) is listed when that module is importable."""
    families: dict[str, tuple[type, type]] = {
        MODEL_TYPE: (GLMConfig, GLMModel),
        glm_dense.MODEL_TYPE: (glm_dense.GLMDenseConfig, glm_dense.GLMDenseModel),
    }
    try:
        from glmkit.models import glm_moe
    except ImportError:
        return families
    moe_type, moe_cfg, moe_model = (getattr(glm_moe, n, None) for n in ("MODEL_TYPE", "GLMMoEConfig", "GLMMoEModel"))
    if moe_type and moe_cfg and moe_model:
        families[moe_type] = (moe_cfg, moe_model)
    return families


def model_type_of(model: torch.nn.Module) -> str:
    """The ``model_type`` a model is saved under (its exact class decides: a subclass needs its own entry)."""
    for model_type, (_, cls) in model_families().items():
        if type(model) is cls:
            return model_type
    known = ", ".join(cls.__name__ for _, cls in model_families().values())
    raise TypeError(f"model must be a glmkit model ({known}), got {type(model).__name__}")


def _config_from_dict(model_type: str, raw: dict[str, Any], where: Path):
    config_cls = model_families()[model_type][0]
    try:
        if hasattr(config_cls, "from_dict"):
            return config_cls.from_dict(raw)
        return config_cls(**raw)
    except TypeError as e:
        raise ValueError(f"{where}: the fields do not fit {config_cls.__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------------
# Model weights: shared tensors stored once
# ----------------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def split_shared(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop names that alias an earlier name's memory. Returns (unique tensors, {alias: kept name})."""
    seen: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state_dict.items():
        key = _storage_key(t)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t
    return unique, aliases


def _weights_for_file(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    unique, aliases = split_shared(model.state_dict())
    return {k: v.detach().to("cpu").contiguous() for k, v in unique.items()}, aliases


def _write_model_files(model: torch.nn.Module, directory: Path) -> None:
    model_type = model_type_of(model)
    tensors, aliases = _weights_for_file(model)
    meta = {"format": "pt", "model_type": model_type, "aliases": json.dumps(aliases)}
    _atomic_save_file(tensors, directory / WEIGHTS_NAME, meta)
    config = {"model_type": model_type, **model.config.to_dict()}
    _atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")


def _load_weights_into(model: torch.nn.Module, path: Path, device: str | torch.device | None = None) -> None:
    """Load ``path`` into ``model`` strictly: missing, unexpected and wrongly shaped names are named."""
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            file_meta = f.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    file_aliases = json.loads(file_meta.get("aliases", "{}"))

    expected = model.state_dict()
    _, model_aliases = split_shared(expected)
    needed = {k: v for k, v in expected.items() if k not in model_aliases}
    missing = sorted(k for k in needed if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in needed)
    mismatched = sorted(
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(needed[k].shape)}"
        for k in needed if k in tensors and tuple(tensors[k].shape) != tuple(needed[k].shape)
    )
    if missing or unexpected or mismatched:
        lines = [f"weights in {path} do not fit the model ({type(model).__name__}, {model.extra_repr()}):"]
        if missing:
            lines.append(f"  missing from the file: {missing}")
        if unexpected:
            lines.append(f"  unexpected in the file: {unexpected}")
        if mismatched:
            lines.append(f"  shape mismatch: {mismatched}")
        untied = [a for a in file_aliases if a not in model_aliases]
        if untied:
            lines.append(f"  (the file ties {untied}; the model does not: check tie_word_embeddings)")
        raise ValueError("\n".join(lines))
    full = dict(tensors)
    for alias, target in model_aliases.items():
        full[alias] = tensors[target]
    model.load_state_dict(full, strict=True)
    if device is not None:
        model.to(device)


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_model_files(model, directory)
    return directory


def read_config(directory: str | os.PathLike):
    """The config stored in a model folder's config.json: a ``GLMConfig``, ``GLMDenseConfig`` (or the MoE
    config), as its model_type says."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.exists():
        raise FileNotFoundError(f"model folder {directory} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: not a glmkit model folder "
                                f"(save one with glmkit.checkpoint.save_pretrained)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    model_type = raw.pop("model_type", None)
    families = model_families()
    if model_type not in families:
        others = ", ".join(repr(t) for t in families if t != MODEL_TYPE)
        raise ValueError(f"{path}: model_type is {model_type!r}, expected {MODEL_TYPE!r} or one of {others}")
    return _config_from_dict(model_type, raw, path)


def _resolve_model_folder(directory: Path) -> Path:
    """A model folder, or a training folder: then its latest checkpoint."""
    if (directory / CONFIG_NAME).exists() or not directory.exists():
        return directory
    latest = latest_checkpoint(directory)
    return latest if latest is not None else directory


def load_pretrained(directory: str | os.PathLike, device: str | torch.device | None = None) -> torch.nn.Module:
    """Build the model described by ``directory/config.json`` (a ``GLMModel``, ``GLMDenseModel`` or the
    MoE model, as its model_type says) and load ``model.safetensors`` into it.

    ``directory`` may also be a training folder (``train(..., out_dir=...)``): its latest checkpoint
    is loaded. ``device`` defaults to CPU.
    """
    directory = _resolve_model_folder(Path(directory))
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    model_cls = next(m for c, m in model_families().values() if type(config) is c)
    model = model_cls(config)
    _load_weights_into(model, weights, device)
    return model


# ----------------------------------------------------------------------------------------------------
# Optimizer state: tensors to safetensors, everything else to JSON
# ----------------------------------------------------------------------------------------------------
def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    groups = []
    for g in sd["param_groups"]:
        g = dict(g)
        for k, v in g.items():
            if isinstance(v, torch.Tensor):
                raise TypeError(f"optimizer param_group[{k!r}] is a tensor; save it as a float")
            if isinstance(v, tuple):
                g[k] = {"__tuple__": list(v)}
        groups.append(g)
    meta = {"optimizer": type(optimizer).__name__, "param_groups": groups, "scalars": scalars}
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = t
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    groups = []
    for g in meta["param_groups"]:
        groups.append({k: tuple(v["__tuple__"]) if isinstance(v, dict) and "__tuple__" in v else v
                       for k, v in g.items()})
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------------
def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, pystate, gauss = random.getstate()
    tensors["python.state"] = torch.tensor(pystate, dtype=torch.int64)
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, gauss]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss = meta["python"]
    random.setstate((version, tuple(int(x) for x in tensors["python.state"].tolist()), gauss))


# ----------------------------------------------------------------------------------------------------
# Training state
# ----------------------------------------------------------------------------------------------------
@dataclass
class TrainingState:
    """What ``load_training_state`` found: the step saved, the ``extra`` dict, and the folder read."""

    step: int
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / TRAINER_STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The folder of the newest complete training checkpoint under ``directory``, or None."""
    directory = Path(directory)
    pointer = directory / LATEST_NAME
    if pointer.is_file():
        target = directory / pointer.read_text(encoding="utf-8").strip()
        if _STEP_DIR.match(target.name) and (target / TRAINER_STATE_NAME).is_file():
            return target
    dirs = _step_dirs(directory)  # pointer missing or stale: fall back to the highest complete step
    return dirs[-1][1] if dirs else None


def save_training_state(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    extra: dict[str, Any] | None = None,
    *,
    save_rng: bool = True,
    keep: int = 2,
) -> Path:
    """Save model, optimizer, RNG and ``extra`` (JSON-serialisable) as ``directory/step-<step>``.

    Atomic: written to a hidden temporary folder, renamed into place, then ``latest`` is replaced.
    Keeps the newest ``keep`` checkpoints (>= 1). Returns the checkpoint folder.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-step-*"):  # leftovers of a save that was killed
        shutil.rmtree(stale, ignore_errors=True)

    name = f"step-{step:08d}"
    tmp = directory / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_model_files(model, tmp)
        if optimizer is not None:
            opt_tensors, opt_meta = _flatten_optimizer(optimizer)
            save_file(opt_tensors, str(tmp / OPTIMIZER_NAME), metadata={"format": "pt"})
            (tmp / OPTIMIZER_META_NAME).write_text(json.dumps(opt_meta, indent=1) + "\n", encoding="utf-8")
        rng_meta = None
        if save_rng:
            rng_tensors, rng_meta = _rng_state()
            save_file(rng_tensors, str(tmp / RNG_NAME), metadata={"format": "pt"})
        state = {"step": step, "model_type": model_type_of(model), "rng": rng_meta, "extra": extra or {}}
        try:
            text = json.dumps(state, indent=1) + "\n"
        except TypeError as e:
            raise TypeError(f"save_training_state: extra must be JSON-serialisable ({e})") from e
        (tmp / TRAINER_STATE_NAME).write_text(text, encoding="utf-8")  # written last
        for f in tmp.iterdir():
            _fsync_file(f)
        final = directory / name
        if final.exists():  # the same step saved again (e.g. after a resume): swap it out
            trash = directory / f".tmp-old-{name}-{os.getpid()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(directory / LATEST_NAME, name + "\n")
    for _, old in _step_dirs(directory)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> TrainingState | None:
    """Load the newest checkpoint under ``directory`` into ``model`` (and ``optimizer``), in place.

    Returns a ``TrainingState`` (step, extra, path), or None when ``directory`` holds no checkpoint.
    The model's config must match the one saved (checked field by field).
    """
    directory = Path(directory)
    ckpt = directory if (directory / TRAINER_STATE_NAME).is_file() else latest_checkpoint(directory)
    if ckpt is None:
        return None
    state = json.loads((ckpt / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    saved = read_config(ckpt)
    if type(saved) is not type(model.config):
        raise ValueError(f"checkpoint {ckpt} holds a {type(saved).__name__} model, not a "
                         f"{type(model.config).__name__} one ({type(model).__name__})")
    if saved != model.config:
        diff = {k: (v, getattr(model.config, k)) for k, v in saved.to_dict().items()
                if getattr(model.config, k) != v}
        raise ValueError(f"checkpoint {ckpt} was saved from a different model config; (saved, model): {diff}")
    device = model.device
    _load_weights_into(model, ckpt / WEIGHTS_NAME)
    model.to(device)
    if optimizer is not None:
        if not (ckpt / OPTIMIZER_NAME).is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} has no optimizer state ({OPTIMIZER_NAME})")
        meta = json.loads((ckpt / OPTIMIZER_META_NAME).read_text(encoding="utf-8"))
        if meta["optimizer"] != type(optimizer).__name__:
            raise ValueError(f"checkpoint {ckpt} holds {meta['optimizer']} state, not {type(optimizer).__name__}")
        tensors = load_file(str(ckpt / OPTIMIZER_NAME), device="cpu")
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta))
    if restore_rng and state.get("rng") is not None and (ckpt / RNG_NAME).is_file():
        _set_rng_state(load_file(str(ckpt / RNG_NAME), device="cpu"), state["rng"])
    return TrainingState(step=int(state["step"]), extra=state.get("extra", {}), path=ckpt)
