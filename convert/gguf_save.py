"""Writing out a gguf.GGUFWriter that has all its keys and tensors: the same four steps for every file."""

from __future__ import annotations

import gguf


def save(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
