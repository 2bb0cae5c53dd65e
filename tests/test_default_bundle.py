"""The bundles shipped for the embedded SmolLM2: they open with the embedded model, are trained, and an
unknown ratio is refused with the ratios that exist."""

import pytest

from uio_gguf.errors import UIOError
from uio_gguf.format.bundle import Bundle
from uio_gguf.format.shipped import default_bundle_path, shipped_bundles


def test_every_shipped_bundle_opens_with_the_embedded_model(tmp_path, monkeypatch):
    monkeypatch.setenv("UIO_GGUF_CACHE", str(tmp_path))
    shipped = shipped_bundles()
    assert shipped, "no default bundle is shipped"
    for ratio, directory in shipped.items():
        bundle = Bundle.open(default_bundle_path(ratio))  # checks the fingerprints against the embedded model
        assert bundle.ratio == ratio and directory.name.endswith(f"-l{bundle.segment}-r{ratio}")
        assert bundle.architecture == "llama" and bundle.n_layer == 30
        assert bundle.trained_steps > 0, f"the shipped ratio-{ratio} head is untrained"
        assert default_bundle_path(ratio) == default_bundle_path(ratio)  # assembled once, then reused


def test_unknown_ratio_names_the_shipped_ones():
    with pytest.raises(UIOError, match="ratios: "):
        default_bundle_path(3)
