"""The options of a training run (`uio-gguf train`), their checks, and the crop shapes they give."""

from __future__ import annotations

from dataclasses import dataclass, field

from uio_gguf.errors import UIOError
from uio_gguf.train.estimators import ESTIMATORS
from uio_gguf.train.model import UIOConfig


@dataclass
class TrainArgs:
    base: str
    data: list[str]
    out: str
    heldout: list[str] = field(default_factory=list)  # held-out files; default: every 10th --data document
    segment: int = 1024
    ratio: int = 32
    segments: int = 8  # T: segments per crop
    batch: int = 1  # crops per step on each process (torchrun: N processes train on N x batch crops a step)
    steps: int = 1000
    estimator: str = "unbiased"
    window: int = 2  # S
    windows_per_pass: int = 1  # decoder windows per call (train.estimators: >1 batches the crop, for GPUs)
    loss_windows: int | None = None  # score this many random windows of each crop (None: all of them)
    long_segments: int | None = None  # every second step: fewer crops of this many segments (crop_shapes)
    # The decoder's view (train.estimators.View): the crop's first N tokens kept raw in front of the
    # memory, and raw windows of these many segments (one drawn per scored window). Default: today's.
    keep_tokens: int = 0
    raw_segments: tuple[int, ...] = (1,)
    rank: int = 32
    alpha: float = 128.0
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup: float = 0.01  # share of the steps
    clip: float = 1.0
    eval_every: int = 100
    eval_crops: int = 4
    save_every: int = 100
    seed: int = 0
    resume: bool = False
    device: str = "auto"
    retrieval_share: float = 0.0  # share of crops turned into pass-key / key-value recall (train.retrieval)
    chat_recall_share: float = (
        0.0  # share of steps whose crops are chat pass-key turns scored on the answer (train.chat_recall)
    )
    init: str | None = None  # start from this checkpoint's (or bundle's) weights (fresh optimizer and schedule)
    max_minutes: float | None = None  # stop (with a checkpoint) after this much wall time; --resume goes on
    prepare_only: bool = False  # tokenize into OUT/tokens.npz and stop
    kill_after: int | None = field(default=None, repr=False)  # tests: SIGKILL self after this step's save

    def validate(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise UIOError(f"unknown estimator '{self.estimator}' (choose from {', '.join(ESTIMATORS)})")
        UIOConfig(segment=self.segment, ratio=self.ratio)  # raises on a ratio that does not divide
        if self.segments < 2:
            raise UIOError("--segments must be at least 2 (memory comes from earlier segments)")
        if self.window < 1:
            raise UIOError("--window must be at least 1")
        if self.windows_per_pass < 1:
            raise UIOError("--windows-per-pass must be at least 1")
        if self.eval_crops < 1:
            raise UIOError("--eval-crops must be at least 1")
        if self.loss_windows is not None and self.loss_windows < 1:
            raise UIOError("--loss-windows must be at least 1")
        for name in ("retrieval_share", "chat_recall_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise UIOError(f"--{name.replace('_', '-')} must lie between 0 and 1")
        if self.long_segments is not None:
            self._validate_long_segments()
        self._validate_view()

    def _validate_view(self) -> None:
        if not 0 <= self.keep_tokens < self.segment:
            raise UIOError(f"--keep-tokens must lie between 0 and the segment length less one ({self.segment - 1})")
        if not self.raw_segments or min(self.raw_segments) < 1:
            raise UIOError("--raw-segments must be 1 or more segments each")
        if max(self.raw_segments) >= self.segments:
            raise UIOError(
                f"--raw-segments {max(self.raw_segments)} needs crops of more segments (--segments {self.segments}): "
                "a window reads the memory of at least one segment before its raw window"
            )

    def _validate_long_segments(self) -> None:
        long = self.long_segments
        if long <= self.segments:
            raise UIOError(f"--long-segments must exceed --segments ({self.segments})")
        if self.batch * self.segments % long:
            raise UIOError(
                f"--long-segments {long} needs --batch × --segments ({self.batch} × {self.segments}) to be a "
                "multiple of it: a long step holds as many tokens as a short one, in fewer crops"
            )
        if self.loss_windows is not None and self.loss_windows * long % self.segments:
            raise UIOError(
                f"--long-segments {long} needs --loss-windows × {long} to be a multiple of --segments "
                f"({self.segments}): a long crop scores the same share of its windows"
            )
        if self.retrieval_share > 0 or self.chat_recall_share > 0:
            raise UIOError(
                "--long-segments does not combine with --retrieval-share or --chat-recall-share "
                "(their tasks are built for crops of --segments)"
            )


@dataclass(frozen=True)
class CropShape:
    """The crops of one step (on each process): how many, of how many segments, with how many scored windows."""

    segments: int
    batch: int
    loss_windows: int | None


def crop_shapes(args: TrainArgs) -> list[CropShape]:
    """The shapes the steps take in turn: crops of --segments, and with --long-segments every second step
    (the 2nd, 4th, ...) crops that long, fewer of them so that the step holds the same tokens, each
    scoring the same share of its windows. One run then reads the memory at both lengths."""
    shapes = [CropShape(args.segments, args.batch, args.loss_windows)]
    if args.long_segments is not None:
        shapes.append(
            CropShape(
                args.long_segments,
                args.batch * args.segments // args.long_segments,
                None if args.loss_windows is None else args.loss_windows * args.long_segments // args.segments,
            )
        )
    return shapes


def parse_raw_segments(text: str) -> tuple[int, ...]:
    """--raw-segments: "1,2,4", "1-16" or a mix ("1,4-6"), as the sorted tuple of the lengths."""
    lengths: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            lengths.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise UIOError(f"--raw-segments: '{text}' is not a list of segment counts such as 1,2,4 or 1-16") from None
    if not lengths:
        raise UIOError(f"--raw-segments: '{text}' names no length")
    return tuple(sorted(lengths))


def format_raw_segments(lengths) -> str:
    """The inverse of parse_raw_segments, for messages: (1, 2, 3, 8) -> "1-3,8"."""
    runs: list[list[int]] = []
    for n in sorted(lengths):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
