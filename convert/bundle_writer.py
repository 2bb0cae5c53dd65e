"""convert_checkpoint: a UIO checkpoint (train/checkpoint.py) + its base model -> a bundle directory
(uio_gguf/format/schema.py). The bundle is assembled in a temporary directory beside the target and renamed
into place, so a failed or interrupted conversion never leaves half a bundle."""

from __future__ import annotations

import os
import shutil
from functools import partial
from pathlib import Path

from uio_gguf.atomic import atomic_dir
from uio_gguf.convert.adapters import read_peft_adapter, write_encoder_adapter
from uio_gguf.convert.base_model import write_base_model
from uio_gguf.convert.head import HeadContents, write_head
from uio_gguf.convert.outtypes import outtype as parse_outtype
from uio_gguf.convert.tokenizer import copy_tokenizer_from_gguf, write_hf_tokenizer
from uio_gguf.errors import UIOError
from uio_gguf.format import schema
from uio_gguf.format.bundle import gguf_fingerprint
from uio_gguf.format.digest import file_sha256
from uio_gguf.format.gguf_file import read_gguf
from uio_gguf.train.arch import arch_of_config, arch_of_gguf


def convert_checkpoint(
    checkpoint_dir,
    out_dir,
    base=None,
    base_gguf=None,
    outtype: str = "f16",
    force: bool = False,
    progress: bool = False,
    loaded: tuple | None = None,
) -> Path:
    """Writes the bundle of a checkpoint and returns its directory.

    base: the base model (HF directory or .gguf) to convert; default: the path the checkpoint recorded.
    base_gguf: an existing GGUF of exactly the base weights, used as model.gguf as it is (outtype ignored).
    loaded: (model, tokenizer) of that base already in memory, to skip loading it again.
    Either way the base must have the fingerprint the checkpoint recorded at training time.
    """
    from uio_gguf.train.base import fingerprint, load_base
    from uio_gguf.train.checkpoint import read_config

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    config = read_config(checkpoint_dir)
    kind = parse_outtype(outtype)
    if base is not None and base_gguf is not None:
        raise UIOError("give either a base model to convert or a base GGUF to use as it is, not both")
    _check_target(out_dir, force)
    source = Path(base_gguf or base or config["base"]["path"])
    if base_gguf is not None or source.suffix == ".gguf":
        # A damaged or foreign file fails here, in milliseconds, not after a slow load.
        arch_of_gguf(read_gguf(source).get(schema.GENERAL_ARCHITECTURE))
    model, tokenizer = loaded or load_base(source)
    arch = arch_of_config(model.config)
    recorded, actual = config["base"]["fingerprint"], fingerprint(model)
    if actual != recorded:
        raise UIOError(
            f"the checkpoint {checkpoint_dir} was trained on another base model than {source} "
            f"(fingerprint {recorded[:19]}... expected, {actual[:19]}... found)"
        )

    with atomic_dir(out_dir) as tmp:
        model_path = tmp / schema.MODEL_FILE
        if base_gguf is not None:
            _link_or_copy(source, model_path)
        else:
            if source.suffix == ".gguf":
                add_tokenizer = partial(copy_tokenizer_from_gguf, source=source)
            else:
                add_tokenizer = partial(
                    write_hf_tokenizer, tokenizer=tokenizer, directory=source, vocab_size=model.config.vocab_size
                )
            write_base_model(model, model_path, kind, add_tokenizer, name=source.stem, progress=progress)
        _write_uio_files(checkpoint_dir, config, model.config, arch, tmp, model_path)
    return out_dir


def _write_uio_files(checkpoint_dir: Path, config: dict, hf_config, arch, tmp: Path, model_path: Path) -> None:
    """encoder.lora.gguf and uio.gguf, the latter bound to the model and encoder files by fingerprint."""
    from safetensors.numpy import load_file

    from uio_gguf.train.checkpoint import MEMORY_FILE
    from uio_gguf.train.model import ENCODER, TRANSFER

    encoder = read_peft_adapter(checkpoint_dir / ENCODER, arch, hf_config, schema.ENCODER_PROJECTIONS)
    transfer = read_peft_adapter(checkpoint_dir / TRANSFER, arch, hf_config, schema.TRANSFER_PROJECTIONS)
    encoder_path = tmp / schema.ENCODER_FILE
    write_encoder_adapter(encoder, arch, encoder_path)
    (memory,) = load_file(str(checkpoint_dir / MEMORY_FILE)).values()
    segment, ratio = int(config["segment"]), int(config["ratio"])
    if memory.ndim != 2 or memory.shape[0] not in (1, segment // ratio) or memory.shape[1] != hf_config.hidden_size:
        raise UIOError(f"the checkpoint's memory embedding has shape {memory.shape}, which does not fit the base model")
    write_head(
        HeadContents(
            arch=arch,
            segment=segment,
            ratio=ratio,
            n_layer=hf_config.num_hidden_layers,
            memory_embedding=memory,
            transfer=transfer,
            encoder=encoder,
            trained_steps=int(config.get("step", 0)),
            base_fingerprint=config["base"]["fingerprint"],
            model_fingerprint=gguf_fingerprint(model_path),
            encoder_fingerprint=gguf_fingerprint(encoder_path),
            model_checksum=file_sha256(model_path),
            encoder_checksum=file_sha256(encoder_path),
        ),
        tmp / schema.HEAD_FILE,
    )


def _check_target(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UIOError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and not force:
        raise UIOError(f"{out_dir} already exists: choose another output directory or pass --force to replace it")


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, target)
