"""Owners of native handles (llama.cpp models, contexts, batches, captures) free them in close().

Handle makes each of them a context manager, so `with UIORuntime(...) as rt:` frees everything at the
end of the block, and closing twice is harmless (close() methods check what they still hold).
"""

from __future__ import annotations


class Handle:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
