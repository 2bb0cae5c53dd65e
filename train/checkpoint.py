"""The UIO checkpoint: a directory that the converter and `--resume` read.

    uio_config.json              segment, ratio, LoRA rank/alpha, estimator, base model + fingerprint, step
    encoder/                     PEFT LoRA adapter (q_proj, v_proj): adapter_config.json + adapter_model.safetensors
    transfer/                    PEFT LoRA adapter (k_proj, v_proj), applied to the memory rows only
    memory_embedding.safetensors the learned slot embedding(s) e_mem, shape (1 or k, d_model)
    trainer_state.pt             optimizer, scheduler, step and RNG states (training only)
    checksums.json               sha256 of every file above: a damaged checkpoint is refused, not loaded

Saves are atomic: written to a temporary directory, then swapped in with renames.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from uio_gguf.atomic import atomic_dir, previous_dir
from uio_gguf.errors import UIOError
from uio_gguf.train.model import ENCODER, TRANSFER, UIOConfig, UIOModel

CONFIG_FILE = "uio_config.json"
MEMORY_FILE = "memory_embedding.safetensors"
STATE_FILE = "trainer_state.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "checksums.json"
FORMAT = "uio-checkpoint/1"
TARGETS = {ENCODER: ["q_proj", "v_proj"], TRANSFER: ["k_proj", "v_proj"]}
PEFT_PREFIX = "base_model.model."


def adapter_state_dict(model: UIOModel, adapter: str) -> dict[str, torch.Tensor]:
    """One adapter's weights under PEFT's key names (base_model.model.<module>.lora_A.weight)."""
    marker_a, marker_b = f".lora_A.{adapter}.", f".lora_B.{adapter}."
    out = {}
    for name, param in model.base.named_parameters():
        if marker_a in name or marker_b in name:
            key = name.replace(marker_a, ".lora_A.").replace(marker_b, ".lora_B.")
            out[PEFT_PREFIX + key] = param.detach().float().cpu().contiguous()
    return out


def _load_adapter(model: UIOModel, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.base.named_parameters())
    expected = adapter_state_dict(model, adapter)
    if set(tensors) != set(expected):
        raise UIOError(f"the {adapter} adapter does not fit this base model (its tensor names differ)")
    for key, value in tensors.items():
        name = (
            key[len(PEFT_PREFIX) :]
            .replace(".lora_A.", f".lora_A.{adapter}.")
            .replace(".lora_B.", f".lora_B.{adapter}.")
        )
        if params[name].shape != value.shape:
            raise UIOError(f"the {adapter} adapter does not fit this base model ({key}: {tuple(value.shape)})")
        with torch.no_grad():
            params[name].copy_(value)


def save_checkpoint(model: UIOModel, directory: Path, meta: dict, trainer_state: dict | None = None) -> None:
    adapters = {adapter: adapter_state_dict(model, adapter) for adapter in (ENCODER, TRANSFER)}
    memory = model.memory_embedding.detach().float().cpu().contiguous()
    write_checkpoint(directory, adapters, memory, {"format": FORMAT, **model.config.to_dict(), **meta}, trainer_state)


def write_checkpoint(
    directory: Path,
    adapters: dict[str, dict[str, torch.Tensor]],
    memory: torch.Tensor,
    config: dict,
    trainer_state: dict | None = None,
) -> None:
    """Writes the checkpoint files: adapters {ENCODER: PEFT state dict, TRANSFER: ...}, the memory
    embedding and uio_config.json (config holds rank, alpha and base.path)."""
    from peft import LoraConfig

    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        for adapter, tensors in adapters.items():
            (tmp / adapter).mkdir()
            save_file(tensors, str(tmp / adapter / ADAPTER_WEIGHTS))
            LoraConfig(
                r=config["rank"],
                lora_alpha=config["alpha"],
                lora_dropout=0.0,
                target_modules=TARGETS[adapter],
                bias="none",
                task_type="CAUSAL_LM",
                base_model_name_or_path=config.get("base", {}).get("path"),
            ).save_pretrained(str(tmp / adapter))
        save_file({"memory_embedding": memory}, str(tmp / MEMORY_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE_FILE)
        (tmp / MANIFEST).write_text(json.dumps(_file_digests(tmp), indent=2) + "\n")


def _file_digests(directory: Path) -> dict[str, str]:
    """relative path -> sha256 of every file in the checkpoint but the manifest."""
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def verify_files(directory: Path) -> None:
    """UIOError unless every file the manifest lists is there with its checksum (checkpoints written
    before the manifest have none and are read as they are)."""
    manifest = Path(directory) / MANIFEST
    if not manifest.exists():
        return
    try:
        recorded = json.loads(manifest.read_text())
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise UIOError(f"damaged {manifest}: {err}") from None
    for name, digest in recorded.items():
        path = Path(directory) / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise UIOError(f"damaged checkpoint {directory}: {name} is missing or does not match its checksum")


def find_checkpoint(directory: Path) -> Path | None:
    """The checkpoint directory, or the previous one if a crash hit between the two renames of a save."""
    directory = Path(directory)
    if (directory / CONFIG_FILE).exists():
        return directory
    old = previous_dir(directory)
    return old if (old / CONFIG_FILE).exists() else None


def read_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise UIOError(f"not a UIO checkpoint (no {CONFIG_FILE}): {directory}")
    verify_files(directory)
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UIOError(f"damaged {path}: {err}") from None
    if not isinstance(config, dict):
        raise UIOError(f"damaged {path}: not a JSON object")
    if config.get("format") != FORMAT:
        raise UIOError(f"{path}: unknown checkpoint format {config.get('format')!r} (expected {FORMAT})")
    return config


def uio_config_from(config: dict) -> UIOConfig:
    fields = UIOConfig.__dataclass_fields__
    return UIOConfig(**{k: v for k, v in config.items() if k in fields})


def read_head_tensors(directory: Path) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """({ENCODER: PEFT state dict, TRANSFER: ...}, the memory embedding) as the files hold them."""
    directory = Path(directory)
    try:
        adapters = {adapter: load_file(str(directory / adapter / ADAPTER_WEIGHTS)) for adapter in (ENCODER, TRANSFER)}
        memory = load_file(str(directory / MEMORY_FILE))["memory_embedding"]
    except Exception as err:  # OSError, KeyError, safetensors' own error on a damaged file
        raise UIOError(f"incomplete or damaged checkpoint {directory}: {err}") from None
    return adapters, memory


def load_weights(model: UIOModel, directory: Path) -> None:
    directory = Path(directory)
    verify_files(directory)
    adapters, memory = read_head_tensors(directory)
    for adapter, tensors in adapters.items():
        _load_adapter(model, adapter, tensors)
    if memory.shape != model.memory_embedding.shape:
        raise UIOError(f"memory embedding {tuple(memory.shape)} does not fit this base model")
    with torch.no_grad():
        model.memory_embedding.copy_(memory)


def load_uio_model(
    directory: Path, base_path: str | Path | None = None, dtype=torch.float32
) -> tuple[UIOModel, object, dict]:
    """Rebuilds (model, tokenizer, config) from a checkpoint; refuses a base other than the one it was
    trained on (fingerprint)."""
    from uio_gguf.train.base import fingerprint, load_base

    config = read_config(directory)
    base_path = base_path or config["base"]["path"]
    base, tokenizer = load_base(base_path, dtype=dtype)
    model = UIOModel(base, uio_config_from(config))
    if fingerprint(base) != config["base"]["fingerprint"]:
        raise UIOError(
            f"the checkpoint {directory} was trained on another base model than {base_path} (fingerprint mismatch)"
        )
    load_weights(model, directory)
    return model, tokenizer, config
