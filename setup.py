"""What setuptools installs; the rest of the configuration is in pyproject.toml.

One installed package, uio_gguf, whose subpackages are found (a new folder under uio_gguf/ needs no
listing). The stages keep their top-level folders in the repository but install as subpackages of
uio_gguf (docs/design.md §3), so nothing generic like `train` lands in site-packages.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# installed package -> its folder in the repository
PACKAGE_DIR = {
    "uio_gguf": "uio_gguf",
    "uio_gguf.train": "train",
    "uio_gguf.convert": "convert",
    "uio_gguf.native": "native",
}


def packages() -> list[str]:
    found = find_packages(where=str(HERE), include=["uio_gguf", "uio_gguf.*"])
    return [*found, *(package for package in PACKAGE_DIR if package != "uio_gguf")]


if __name__ == "__main__":
    setup(packages=packages(), package_dir=PACKAGE_DIR)
