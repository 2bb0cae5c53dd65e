"""Recalled passages as decoded, kept so a later question that recalls the same passages does not decode
them again (Session._decode_alone).

A recall is decoded by itself (its lead token, then the passages) at the positions it takes in the
conversation, and moved in as a llama.cpp sequence state. Its cells depend on the tokens decoded and,
through RoPE, on where they start; a later question recalls the same passages at the same start (the
memory has not grown) or further on (it has): the saved state is then moved there by llama.cpp's
position shift (seq_add, K re-rotated), which equals a fresh decode up to the rounding of that rotation.
The states of one runtime's sessions are kept together, least recently used dropped first past a size.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from dataclasses import dataclass

RECALL_STATES_BYTES = 128 << 20  # ~6 recalls of 900 tokens of SmolLM2-135M (23,040 bytes a cell in f16)


@dataclass
class RecallState:
    state: ctypes.Array  # llama_state_seq_get_data of the kept cells
    start: int  # the position of the first kept cell when it was decoded


class RecallStates:
    """key -> RecallState, at most `limit` bytes of states (least recently used dropped first)."""

    def __init__(self, limit: int = RECALL_STATES_BYTES):
        self.limit = limit
        self._states: OrderedDict[tuple, RecallState] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the server's sessions share the runtime's states

    def get(self, key: tuple) -> RecallState | None:
        with self._lock:
            found = self._states.get(key)
            if found is not None:
                self._states.move_to_end(key)
            return found

    def put(self, key: tuple, state: ctypes.Array, start: int) -> None:
        size = len(state)
        if size > self.limit:
            return
        with self._lock:
            old = self._states.pop(key, None)
            if old is not None:
                self._bytes -= len(old.state)
            self._states[key] = RecallState(state, start)
            self._bytes += size
            while self._bytes > self.limit:
                _, dropped = self._states.popitem(last=False)
                self._bytes -= len(dropped.state)

    def __len__(self) -> int:
        return len(self._states)

    def clear(self) -> None:
        with self._lock:
            self._states.clear()
            self._bytes = 0
