"""The training loop: random crops, an estimator's gradient, AdamW with warm-up + cosine, clipping,
a JSONL log, held-out perplexity, atomic checkpoints and exact resume; on one process or, under torchrun,
on several (train.distributed)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from uio_gguf.errors import UIOError
from uio_gguf.train import checkpoint as ckpt
from uio_gguf.train.args import CropShape, TrainArgs, crop_shapes, format_raw_segments
from uio_gguf.train.base import fingerprint, load_base, load_config
from uio_gguf.train.chat_recall import ChatRecallCrops, ChatRecallPool
from uio_gguf.train.data import TOKENS_FILE, prepare_tokens, read_run_text
from uio_gguf.train.distributed import Ranks
from uio_gguf.train.estimators import Crop, View, estimate_gradient
from uio_gguf.train.from_bundle import checkpoint_from_bundle, is_bundle
from uio_gguf.train.model import UIOConfig, UIOModel
from uio_gguf.train.retrieval import RetrievalCrops

INIT_FROM_BUNDLE = "init-checkpoint"  # where --init BUNDLE rebuilds the bundle's checkpoint, inside OUT
# What --resume refuses to change, with the value of a run that did not record it: they decide which
# crops come next (the recall shares, --long-segments) or what the estimator's rng draws (the view).
FIXED_ON_RESUME = {
    "retrieval_share": 0.0,
    "chat_recall_share": 0.0,
    "long_segments": None,
    "keep_tokens": 0,
    "raw_segments": (1,),
}


def take_shape(args: TrainArgs) -> tuple[TrainArgs, Path | None]:
    """The model's shape (segment, ratio, rank, alpha) comes from a checkpoint where there is one: the
    run's own on --resume, --init's when starting from it (its weights only fit that shape). Returns the
    arguments and the --init checkpoint to load (None on --resume: the run's own checkpoint wins)."""
    if args.resume:
        source = ckpt.find_checkpoint(Path(args.out) / "checkpoint")
        if source is None:
            return args, None  # train() says "--resume: no checkpoint"
    elif args.init is not None:
        source = ckpt.find_checkpoint(Path(args.init)) or ckpt.find_checkpoint(Path(args.init) / "checkpoint")
        if source is None and is_bundle(args.init):  # a converted head: its checkpoint is rebuilt in OUT
            _check_writable(Path(args.out))
            source = checkpoint_from_bundle(
                args.init, Path(args.out) / INIT_FROM_BUNDLE, load_config(args.base), args.base
            )
        if source is None:
            raise UIOError(f"--init: no UIO checkpoint in {args.init}")
    else:
        return args, None
    config = ckpt.read_config(source)
    saved = ckpt.uio_config_from(config)
    if saved.distinct_slots:
        raise UIOError(f"{source} has distinct slot embeddings, which training does not offer")
    if args.resume:
        for name, default in FIXED_ON_RESUME.items():
            value = config.get("train_args", {}).get(name, default)
            value = tuple(value) if isinstance(value, list) else value  # JSON gives a tuple back as a list
            if value != getattr(args, name):
                option = f"--{name.replace('_', '-')}"
                shown = format_raw_segments(value) if name == "raw_segments" else value
                trained = f"without {option}" if value is None else f"with {option} {shown}"
                raise UIOError(f"--resume: this run was trained {trained}; pass the same")
    shape = {"segment": saved.segment, "ratio": saved.ratio, "rank": saved.rank, "alpha": saved.alpha}
    if any(getattr(args, k) != v for k, v in shape.items()):
        print(
            f"{'--resume' if args.resume else '--init'}: taking "
            + ", ".join(f"{k} {v}" for k, v in shape.items())
            + f" from {source}",
            file=sys.stderr,
        )
    return replace(args, **shape), None if args.resume else source


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UIOError(f"cannot write to the output directory {out}: {err.strerror}") from None


def lr_lambda(steps: int, warmup: float):
    warm = max(1, round(steps * warmup))

    def factor(step: int) -> float:  # step = number of optimizer steps taken so far
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def heldout_loss(model: UIOModel, crops: np.ndarray, segment: int, device, keep: int = 0) -> float:
    """Mean loss of windows 2..T of the held-out crops, each window reading the memory before it (behind
    the crop's first `keep` tokens, as the run trains with --keep-tokens; the raw window one segment)."""
    losses = []
    for row in crops:
        crop = Crop(torch.as_tensor(row[None], device=device), segment)
        memory = [model.encode(crop.window(s)) for s in range(1, crop.n_segments)]
        for t in range(2, crop.n_segments + 1):
            used = torch.cat(memory[: t - 1], dim=2)
            losses.append(model.window_loss(crop.window(t), crop.targets(t), used, crop.sinks(keep)).item())
    return float(np.mean(losses))


def train(args: TrainArgs, progress: bool = True) -> Path:
    """Runs (or resumes) a training run in args.out: one process, or each of torchrun's processes. A run
    that fails before writing anything there leaves no empty --out directory behind."""
    out = Path(args.out)
    existed = out.exists()
    ranks = Ranks.from_env()
    try:
        return _train(args, ranks, progress)
    except BaseException:
        if ranks.main and not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        ranks.stop()


def pick_device(name: str, ranks: Ranks) -> torch.device:
    """auto: CUDA when there is one, else the CPU. Under torchrun each process takes the GPU of its
    local rank."""
    device = torch.device(
        "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)
    )
    return torch.device("cuda", ranks.local) if device.type == "cuda" and ranks.parallel else device


def _train(args: TrainArgs, ranks: Ranks, progress: bool = True) -> Path:
    from tqdm import tqdm

    device = pick_device(args.device, ranks)
    ranks.start(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(args.out)
    with ranks.main_first():  # rank 0 writes tokens.npz and the task pools, the others read them back
        args, init_dir = take_shape(args)
        args.validate()
        _check_writable(out)
        text = read_run_text(out, args.data, args.heldout) if ranks.main else None
        base, tokenizer = load_base(args.base)  # float32 as stored: the fingerprint does not depend on the device
        base_fingerprint = fingerprint(base)
        stream = prepare_tokens(out, text, tokenizer, base_fingerprint, args.data + args.heldout)
        crop_tokens = args.segments * args.segment + 1
        retrieval = (
            RetrievalCrops.for_run(out, tokenizer, base_fingerprint, args.segment, crop_tokens)
            if args.retrieval_share > 0
            else None
        )  # before --prepare-only returns: the pool travels too
        chat_recall = (
            ChatRecallCrops(ChatRecallPool.for_run(out, tokenizer, base_fingerprint), args.segment, crop_tokens)
            if args.chat_recall_share > 0
            else None
        )
    if args.prepare_only:
        return out / TOKENS_FILE
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the float32 adapters' matmuls (the base is bf16)
    base.to(device=device, dtype=dtype)
    shapes = crop_shapes(args)
    stream.check_length(shapes[-1].segments * args.segment + 1)  # the longest crop
    heldout = stream.heldout_crops(args.eval_crops, crop_tokens)

    torch.manual_seed(args.seed)
    model = UIOModel(base, UIOConfig(segment=args.segment, ratio=args.ratio, rank=args.rank, alpha=args.alpha))
    model.to(device)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=args.betas, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.steps, args.warmup))
    # The same seeds on every rank: the ranks draw the same batches and reservoirs (train.distributed).
    data_rng = np.random.default_rng(args.seed)
    estimator_rng = random.Random(args.seed)
    step = 0
    meta = {
        "estimator": args.estimator,
        "window": args.window,
        "world_size": ranks.world,
        "base": {
            "path": str(Path(args.base).resolve()),
            "model_type": base.config.model_type,
            "fingerprint": base_fingerprint,
        },
        "train_args": {
            k: v for k, v in asdict(args).items() if k not in ("resume", "kill_after", "max_minutes", "prepare_only")
        },
    }

    checkpoint_dir = out / "checkpoint"
    if args.resume:
        found = ckpt.find_checkpoint(checkpoint_dir)
        if found is None:
            raise UIOError(f"--resume: no checkpoint in {out}")
        saved = ckpt.read_config(found)
        if saved["base"]["fingerprint"] != meta["base"]["fingerprint"]:
            raise UIOError(f"--resume: the checkpoint in {out} was trained on another base model")
        if saved.get("world_size", 1) != ranks.world:
            raise UIOError(
                f"--resume: this run was trained on {saved.get('world_size', 1)} process(es), not {ranks.world}: "
                "start it with the same torchrun --nproc_per_node"
            )
        ckpt.load_weights(model, found)
        state = torch.load(found / ckpt.STATE_FILE, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rngs = state["rank_rngs"][ranks.rank] if "rank_rngs" in state else state  # one process: at the top
        data_rng.bit_generator.state = rngs["data_rng"]
        estimator_rng.setstate(rngs["estimator_rng"])
        torch.set_rng_state(rngs["torch_rng"])
        step = state["step"]
    elif ckpt.find_checkpoint(checkpoint_dir) is not None:
        raise UIOError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    elif init_dir is not None:
        if ckpt.read_config(init_dir)["base"]["fingerprint"] != meta["base"]["fingerprint"]:
            raise UIOError(f"--init: the checkpoint {init_dir} was trained on another base model")
        ckpt.load_weights(model, init_dir)
    ranks.broadcast_parameters(params)

    def next_crop(shape: CropShape) -> Crop:
        """This rank's crops of the step: the batch of all ranks is drawn (and made into recall tasks)
        on every rank, so that each rank's rng takes the draws one process would."""
        rows = stream.random_crops(data_rng, shape.batch * ranks.world, shape.segments * args.segment + 1)
        if chat_recall is not None and data_rng.random() < args.chat_recall_share:  # a whole batch of recall
            rows, labels = chat_recall.batch(rows, data_rng)
            return Crop(
                torch.as_tensor(ranks.own_rows(rows), device=device),
                args.segment,
                torch.as_tensor(ranks.own_rows(labels), device=device),
            )
        if retrieval is not None:
            for i in range(len(rows)):
                if data_rng.random() < args.retrieval_share:
                    rows[i] = retrieval.make(rows[i], data_rng)
        return Crop(torch.as_tensor(ranks.own_rows(rows), device=device), args.segment)

    def save() -> None:
        """Rank 0 writes the checkpoint, with every rank's rng states; the others wait until it is on disk."""
        rngs = ranks.gather(
            {
                "data_rng": data_rng.bit_generator.state,
                "estimator_rng": estimator_rng.getstate(),
                "torch_rng": torch.get_rng_state(),
            }
        )
        if ranks.main:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step}
            state.update({"rank_rngs": rngs} if ranks.parallel else rngs[0])
            ckpt.save_checkpoint(model, checkpoint_dir, {**meta, "step": step}, state)
        ranks.barrier()

    deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
    log = open(out / "log.jsonl", "a") if ranks.main else None
    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step", disable=not (progress and ranks.main))
    try:
        while step < args.steps:
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            shape = shapes[step % len(shapes)]  # from the step count, so that --resume takes the same turn
            crop = next_crop(shape)
            loss = estimate_gradient(
                model,
                crop,
                args.estimator,
                args.window,
                estimator_rng,
                windows_per_pass=args.windows_per_pass,
                loss_windows=shape.loss_windows,
                view=View(args.keep_tokens, args.raw_segments),
            )
            ranks.average_gradients(params)  # before clipping: every rank clips and steps the same gradient
            loss = ranks.average(loss, device)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip).item()
            optimizer.step()
            scheduler.step()
            step += 1
            record = {
                "step": step,
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": scheduler.get_last_lr()[0],
                "tokens": step * args.batch * ranks.world * (crop_tokens - 1),  # every shape holds as many
                "seconds": time.perf_counter() - started,
            }
            if crop.labels is not None:
                record["chat_recall"] = True  # the loss is the answer's alone
            if len(shapes) > 1:
                record["segments"] = shape.segments
            if ranks.main:  # the log and the held-out perplexity are rank 0's
                if heldout is not None and (step % args.eval_every == 0 or step == args.steps):
                    record["heldout_ppl"] = math.exp(
                        heldout_loss(model, heldout, args.segment, device, args.keep_tokens)
                    )
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(
                    loss=f"{loss:.3f}", **({"ppl": f"{record['heldout_ppl']:.1f}"} if "heldout_ppl" in record else {})
                )
                bar.update(1)
            # rank 0's clock decides for all, so that every rank saves and stops at the same step
            out_of_time = deadline is not None and ranks.agree(time.monotonic() > deadline, device)
            if step % args.save_every == 0 or step == args.steps or out_of_time:
                save()
            if out_of_time and step < args.steps:
                if ranks.main:
                    bar.write(
                        f"stopped at step {step} of {args.steps} (--max-minutes): --resume goes on from here",
                        file=sys.stderr,
                    )
                break
            if args.kill_after is not None and step == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return checkpoint_dir
