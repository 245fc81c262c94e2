"""Checkpoints in safetensors: pretrained models, and training state that survives a kill.

Two kinds of folder:

* A **model folder** (``save_pretrained`` / ``load_pretrained``), the Hugging Face layout: ``config.json``
  ({"model_type": "glmkit_decoder" or "glmkit_glm2021", ...the config's fields}) and ``model.safetensors``.
  Persistent buffers, such as an MoE router's ``e_score_correction_bias``, travel with the weights. Folders
  written by glmkit 0.1 (model types ``glmkit_glm_dense``, ``glmkit_glm_moe`` and the old ``glmkit_glm2021``
  fields) are converted on load (``LEGACY``); their training state cannot be resumed.
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

from glmkit.models.decoder import Decoder, DecoderConfig
from glmkit.models.glm2021 import GLMConfig, GLMModel

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
# Model families, and the folders glmkit 0.1 wrote
# ----------------------------------------------------------------------------------------------------
FAMILIES: dict[str, tuple[type, type]] = {
    "glmkit_decoder": (DecoderConfig, Decoder),
    "glmkit_glm2021": (GLMConfig, GLMModel),
}
# glmkit 0.1's config fields and tensor names → today's (None: no equivalent; the folder cannot be loaded)
_OLD_FIELDS = {
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "max_seq_len": "max_position_embeddings",
    "qkv_bias": "attention_bias",
    "qk_norm": "use_qk_norm",
    "norm_eps": "rms_norm_eps",
    "init_std": "initializer_range",
    "eos_token_ids": "eos_token_id",
    "d_model": "hidden_size",
    "d_ff": "intermediate_size",
    "layernorm_eps": "layer_norm_eps",
}
_OLD_ONLY = {
    "position": "rope",
    "norm": "rmsnorm",
    "activation": "swiglu",
    "o_bias": False,
    "mlp_bias": False,
    "attn_scale": None,
    "dropout": 0.0,
    "pad_vocab_multiple": 1,
}
_OLD_TENSORS = [
    (".attn.", ".mixer."),
    ("post_attn_norm", "post_mixer_norm"),
    ("word_embeddings", "embed_tokens"),
    ("block_position_embeddings", "block_pos_embed"),
    ("position_embeddings", "pos_embed"),
    (".ln1.", ".input_norm."),
    (".ln2.", ".pre_mlp_norm."),
    ("ln_f.", "final_norm."),
    (".mixer.qkv.", ".mixer.qkv_proj."),
    (".mixer.proj.", ".mixer.o_proj."),
    (".mlp.fc1.", ".mlp.up_proj."),
    (".mlp.fc2.", ".mlp.down_proj."),
]
LEGACY = {"glmkit_glm_dense": "glmkit_decoder", "glmkit_glm_moe": "glmkit_decoder"}


def _upgrade_config(model_type: str, raw: dict[str, Any], where: Path) -> tuple[str, dict[str, Any]]:
    """A glmkit 0.1 config dict as today's (model_type, fields), or a ValueError saying why it cannot be."""
    if model_type == "glmkit_glm2021" and "d_model" not in raw or model_type not in (*LEGACY, "glmkit_glm2021"):
        return model_type, raw
    drop = (*_OLD_ONLY, "block", "rope_pairing") if model_type in LEGACY else ()
    out = {_OLD_FIELDS.get(k, k): v for k, v in raw.items() if k not in drop}
    if model_type in LEGACY:
        bad = {k: raw[k] for k, want in _OLD_ONLY.items() if k in raw and raw[k] != want}
        if raw.get("block", "pre") not in ("pre", "sandwich"):
            bad["block"] = raw["block"]
        if bad:
            raise ValueError(
                f"{where}: a glmkit 0.1 model with {bad}, which today's decoder has no setting for "
                f"(DeepNorm, GeGLU, LayerNorm, 2D positions live in glmkit.course.lineage): retrain it"
            )
        out.update(sandwich_norms=raw.get("block") == "sandwich", rope_interleave=raw.get("rope_pairing") != "half")
        if "first_k_dense_replace" not in raw and "n_routed_experts" in raw:
            out["first_k_dense_replace"] = 1
    return LEGACY.get(model_type, model_type), out


def _upgrade_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """glmkit 0.1 tensor names → today's (the shared expert's separate gate and up are fused)."""
    out = {}
    for name, t in tensors.items():
        for old, new in _OLD_TENSORS:
            name = name.replace(old, new)
        out[name] = t
    for name in [n for n in out if n.endswith("shared_experts.gate_proj.weight")]:
        prefix = name[: -len("gate_proj.weight")]
        out[prefix + "gate_up_proj.weight"] = torch.cat([out.pop(name), out.pop(prefix + "up_proj.weight")])
    return out


def model_type_of(model: torch.nn.Module) -> str:
    """The ``model_type`` a model is saved under (its exact class decides)."""
    for model_type, (_, cls) in FAMILIES.items():
        if type(model) is cls:
            return model_type
    raise TypeError(f"model must be a glmkit model (Decoder, GLMModel), got {type(model).__name__}")


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
    if file_meta.get("model_type") in (*LEGACY, "glmkit_glm2021") and any("attn." in k or "ln_f" in k for k in tensors):
        tensors, file_aliases = _upgrade_tensors(tensors), {}

    expected = model.state_dict()
    _, model_aliases = split_shared(expected)
    needed = {k: v for k, v in expected.items() if k not in model_aliases}
    missing = sorted(k for k in needed if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in needed)
    mismatched = sorted(
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(needed[k].shape)}"
        for k in needed
        if k in tensors and tuple(tensors[k].shape) != tuple(needed[k].shape)
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
    """The config stored in a model folder's config.json: a ``DecoderConfig`` or ``GLMConfig``, as its model_type
    says (glmkit 0.1 folders converted)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}: not a glmkit model folder "
            f"(save one with glmkit.checkpoint.save_pretrained)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    model_type, raw = _upgrade_config(raw.pop("model_type", None), raw, path)
    if model_type not in FAMILIES:
        raise ValueError(
            f"{path}: model_type is {model_type!r}, expected one of {sorted(FAMILIES)} (a Hugging Face "
            f"checkpoint loads with glmkit.hf.load_hf)"
        )
    try:
        return FAMILIES[model_type][0].from_dict(raw)
    except TypeError as e:
        raise ValueError(f"{path}: the fields do not fit {FAMILIES[model_type][0].__name__}: {e}") from e


def _resolve_model_folder(directory: Path) -> Path:
    """A model folder, or a training folder: then its latest checkpoint."""
    if (directory / CONFIG_NAME).exists() or not directory.exists():
        return directory
    latest = latest_checkpoint(directory)
    return latest if latest is not None else directory


def load_pretrained(directory: str | os.PathLike, device: str | torch.device | None = None) -> torch.nn.Module:
    """Build the model described by ``directory/config.json`` (a ``Decoder`` or ``GLMModel``, as its model_type
    says) and load ``model.safetensors`` into it.

    ``directory`` may also be a training folder (``train(..., out_dir=...)``): its latest checkpoint
    is loaded. ``device`` defaults to CPU.
    """
    directory = _resolve_model_folder(Path(directory))
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    model_cls = next(m for c, m in FAMILIES.values() if type(config) is c)
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
        groups.append(
            {k: tuple(v["__tuple__"]) if isinstance(v, dict) and "__tuple__" in v else v for k, v in g.items()}
        )
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
    if (
        state.get("model_type") not in FAMILIES
        or "glmkit_glm2021" == state.get("model_type")
        and "d_model" in json.loads((ckpt / CONFIG_NAME).read_text(encoding="utf-8"))
    ):
        raise ValueError(
            f"{ckpt} is a glmkit 0.1 training checkpoint: its optimizer state does not fit today's "
            f"parameters. Load its weights with glmkit.checkpoint.load_pretrained({str(ckpt)!r}) and "
            f"start a new run from them"
        )
    saved = read_config(ckpt)
    if type(saved) is not type(model.config):
        raise ValueError(
            f"checkpoint {ckpt} holds a {type(saved).__name__} model, not a "
            f"{type(model.config).__name__} one ({type(model).__name__})"
        )
    if saved != model.config:
        diff = {k: (v, getattr(model.config, k)) for k, v in saved.to_dict().items() if getattr(model.config, k) != v}
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
