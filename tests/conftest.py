"""Shared fixtures: the embedded SmolLM2 GGUF, its tokenizer, and tiny random HF models built from a
config (fixed seed) that use that real tokenizer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import CROP_SEGMENT, CROP_SEGMENTS, PLANTED, RATIO, SEGMENT

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    models run faster so, and on a busy CPU two OpenMP threads that wait on each other made the
    estimators' sampling test 15 times slower (16 s -> 250 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedded_gguf() -> Path:
    from uio_gguf.format.embedded import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, embedded_gguf) -> Path:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(embedded_gguf.parent), gguf_file=embedded_gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def make_tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """make_tiny_model_dir(arch, seed) -> a HF directory: a tiny random model and the SmolLM2 tokenizer."""
    made: dict = {}

    def make(arch: str = "llama", seed: int = 0, random_biases: bool = False, **overrides) -> Path:
        """random_biases: the q/k/v biases (Qwen2 has them) drawn at random instead of HF's zeros."""
        key = (arch, seed, random_biases, tuple(sorted(overrides.items())))
        if key not in made:
            from uio_gguf.train.tiny import tiny_base

            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            model = tiny_base(arch, vocab_size=49152, seed=seed, **overrides)
            if random_biases:
                _randomize_biases(model, seed)
            model.save_pretrained(out)
            for item in tokenizer_dir.iterdir():
                shutil.copy(item, out / item.name)
            made[key] = out
        return made[key]

    return make


def _randomize_biases(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


@pytest.fixture(scope="session")
def make_tiny_checkpoint(tmp_path_factory, make_tiny_model_dir):
    """make_tiny_checkpoint(arch, seed, segment, ratio, ...) -> (checkpoint_dir, UIOModel, tokenizer): a UIO
    model over a tiny random base (Qwen2 with random q/k/v biases) with NON-ZERO random adapters and memory
    embedding, saved as train/loop.py saves it (base path and fingerprint recorded)."""
    made: dict = {}

    def make(
        arch: str = "llama",
        seed: int = 0,
        segment: int = 16,
        ratio: int = 4,
        rank: int = 4,
        alpha: float = 8.0,
        distinct_slots: bool = False,
    ):
        key = (arch, seed, segment, ratio, rank, alpha, distinct_slots)
        if key not in made:
            import torch

            from uio_gguf.train.base import fingerprint, load_base
            from uio_gguf.train.checkpoint import save_checkpoint
            from uio_gguf.train.model import UIOConfig, UIOModel
            from uio_gguf.train.tiny import randomize_uio

            model_dir = make_tiny_model_dir(arch, seed, random_biases=arch == "qwen2")
            base, tokenizer = load_base(model_dir)
            meta = {
                "estimator": "unbiased",
                "window": 2,
                "step": 7,
                "base": {
                    "path": str(model_dir.resolve()),
                    "model_type": base.config.model_type,
                    "fingerprint": fingerprint(base),
                },
            }
            torch.manual_seed(seed)
            config = UIOConfig(segment=segment, ratio=ratio, rank=rank, alpha=alpha, distinct_slots=distinct_slots)
            model = randomize_uio(UIOModel(base, config), seed)
            checkpoint = tmp_path_factory.mktemp(f"ckpt-{arch}") / "checkpoint"
            save_checkpoint(model, checkpoint, meta)
            made[key] = (checkpoint, model, tokenizer)
        return made[key]

    return make


@pytest.fixture(scope="session")
def make_tiny_bundle(tmp_path_factory, make_tiny_checkpoint):
    """make_tiny_bundle(arch="llama", seed=0, segment=16, ratio=4, outtype="f32", ...) ->
    (bundle_dir, UIOModel, tokenizer): make_tiny_checkpoint's model converted by the converter."""
    made: dict = {}

    def make(arch: str = "llama", seed: int = 0, segment: int = 16, ratio: int = 4, outtype: str = "f32", **uio):
        key = (arch, seed, segment, ratio, outtype, tuple(sorted(uio.items())))
        if key not in made:
            from uio_gguf.convert import convert_checkpoint

            checkpoint, model, tokenizer = make_tiny_checkpoint(arch, seed, segment, ratio, **uio)
            bundle = convert_checkpoint(
                checkpoint, tmp_path_factory.mktemp(f"bundle-{arch}") / "bundle", outtype=outtype
            )
            made[key] = (bundle, model, tokenizer)
        return made[key]

    return make


@pytest.fixture(scope="session")
def prose() -> str:
    from uio_gguf.train.corpus import stdlib_prose

    return stdlib_prose()


@pytest.fixture(scope="session")
def smollm2(embedded_gguf, tmp_path_factory):
    """(UIO model over the dequantised SmolLM2 with random non-zero adapters, tokenizer, its checkpoint).
    Loading takes ~40 s: every test of this module shares it."""
    import torch

    from uio_gguf.train.base import fingerprint, load_base
    from uio_gguf.train.checkpoint import save_checkpoint
    from uio_gguf.train.model import UIOConfig, UIOModel
    from uio_gguf.train.tiny import randomize_uio

    base, tokenizer = load_base(embedded_gguf)
    meta = {
        "estimator": "unbiased",
        "window": 2,
        "step": 3,
        "base": {"path": str(embedded_gguf), "model_type": base.config.model_type, "fingerprint": fingerprint(base)},
    }
    torch.manual_seed(0)
    model = randomize_uio(UIOModel(base, UIOConfig(segment=64, ratio=8, rank=8, alpha=16.0)), seed=0)
    checkpoint = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    save_checkpoint(model, checkpoint, meta)
    return model, tokenizer, checkpoint


@pytest.fixture(scope="session")
def smollm2_f32_bundle(smollm2, tmp_path_factory):
    model, tokenizer, checkpoint = smollm2
    from uio_gguf.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("smollm2-f32") / "bundle"
    return convert_checkpoint(checkpoint, out, outtype="f32", loaded=(model.base, tokenizer))


@pytest.fixture(scope="module")
def tiny_bundle(make_tiny_bundle) -> Path:
    """The tiny LLaMA bundle (segment 16, ratio 4, f32) that the CLI tests run on."""
    return make_tiny_bundle("llama", segment=16, ratio=4, outtype="f32")[0]


@pytest.fixture()
def cache_env(tmp_path) -> dict:
    """Environment for a CLI run with its own cache (memory files, assembled bundles)."""
    return {"UIO_GGUF_CACHE": str(tmp_path / "cache")}


@pytest.fixture(scope="module")
def book(tmp_path_factory, prose):
    """A file of 60K characters of prose, for training runs."""
    path = tmp_path_factory.mktemp("data") / "book.txt"
    path.write_text(prose[:60_000])
    return path


@pytest.fixture(scope="module")
def runtime(make_tiny_bundle):
    """The tiny LLaMA bundle (segment 16, ratio 4) with an f32 cache, over real prose: two ways of computing
    the same cache differ by float32 rounding only."""
    from uio_gguf.memory.runtime import UIORuntime

    bundle = make_tiny_bundle("llama", segment=SEGMENT, ratio=RATIO, outtype="f32")[0]
    with UIORuntime(bundle, kv_type="f32") as rt:
        yield rt


@pytest.fixture(scope="module")
def stream(runtime, prose):
    return runtime.model.tokenize(prose[:6000], add_special=False)


@pytest.fixture(scope="module")
def planted_book(prose):
    """Prose with the demo's access-code sentence planted on a line of its own after 1,500 characters."""
    cut = prose.index(" ", 1500)
    return prose[:cut] + "\n" + PLANTED + "\n" + prose[cut : cut + 1500]


@pytest.fixture(scope="module")
def tokenizer(embedded_gguf):
    """The embedded model's tokenizer, as training reads it."""
    from uio_gguf.train.base import GGUFTokenizer

    return GGUFTokenizer(embedded_gguf)


@pytest.fixture(scope="module")
def filler_crops(tokenizer, prose):
    """Eight crops of prose, each CROP_SEGMENTS segments and one token long."""
    import numpy as np

    ids = np.asarray(tokenizer(prose, add_special_tokens=False)["input_ids"], dtype=np.int64)
    n = CROP_SEGMENTS * CROP_SEGMENT + 1
    return [ids[i * n : (i + 1) * n] for i in range(8)]
