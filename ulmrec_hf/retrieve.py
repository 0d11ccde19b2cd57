"""Retrieval stage: train LRURec (or SASRec) on `data/`, write top-k candidates to `retriever/`.

Splits of the candidates dataset (one row per user):
- `train`: history = items[:-3], target = items[-3] (the ranker's training sample, as in LlamaRec;
  the retriever has seen this target in training, so its ranks here are optimistic)
- `validation`: history = items[:-2], target = items[-2]
- `test`: history = items[:-1], target = items[-1]
With `mask_history` (default, as LlamaRec) items already in the history are never candidates.
"""

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import RunArguments, load_prepared, mark_complete, read_json, should_skip, stage_dir, write_json

logger = logging.getLogger(__name__)


@dataclass
class RetrieveArguments:
    retriever: str = field(default="lrurec", metadata={"help": "Retriever model.", "choices": ["lrurec", "sasrec"]})
    retriever_hidden: int = field(default=64, metadata={"help": "Embedding / hidden size."})
    retriever_blocks: int = field(default=2, metadata={"help": "Number of LRU (or attention) blocks."})
    retriever_ffn: int = field(default=256, metadata={"help": "Feed-forward size."})
    retriever_dropout: float = field(default=0.5, metadata={"help": "Dropout (the paper uses 0.5)."})
    retriever_attn_dropout: float = field(default=0.5, metadata={"help": "Dropout inside the LRU / attention layer."})
    retriever_heads: int = field(default=2, metadata={"help": "Attention heads (SASRec)."})
    max_len: int = field(default=50, metadata={"help": "Longest history the retriever reads."})
    retriever_batch_size: int = field(default=64, metadata={"help": "Training batch size (per process)."})
    retriever_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    retriever_weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    retriever_max_epochs: int = field(default=200, metadata={"help": "Upper bound on epochs; early stopping usually ends sooner."})
    eval_every_steps: int = field(default=500, metadata={"help": "Validate (and checkpoint) every N optimizer steps."})
    patience: int = field(default=20, metadata={"help": "Stop after N validations without a better Recall@20."})
    num_candidates: int = field(default=20, metadata={"help": "Candidates kept per user."})
    mask_history: bool = field(default=True, metadata={"help": "Never recommend items already in the history (LlamaRec's rule)."})
    retriever_eval_batch_size: int = field(default=1024, metadata={"help": "Users scored at once."})


def user_splits(sequences: list[list[int]], max_len: int) -> dict[str, list[tuple[list[int], int]]]:
    """(history, target) pairs per split; histories are cut to the last `max_len` items."""
    splits = {"train": [], "validation": [], "test": []}
    for seq in sequences:
        splits["validation"].append((seq[:-2][-max_len:], seq[-2]))
        splits["test"].append((seq[:-1][-max_len:], seq[-1]))
        splits["train"].append((seq[:-3][-max_len:], seq[-3]) if len(seq) >= 4 else ([], seq[-3]))
    return splits


def training_rows(sequences: list[list[int]], max_len: int) -> list[list[int]]:
    """Each user's training prefix (all but the last two items), last max_len + 1 items."""
    return [seq[:-2][-(max_len + 1):] for seq in sequences if len(seq) >= 4]


def left_pad(rows: list[list[int]], torch):
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([[0] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)


def next_item_loss(model, batch, torch):
    """Full-softmax cross-entropy of every next item, computed only at real (non-padding) positions."""
    inputs, labels = batch[:, :-1], batch[:, 1:]
    hidden = model(inputs)
    keep = labels > 0
    logits = hidden[keep] @ model_module(model).item_emb.weight.T + model_module(model).bias
    return torch.nn.functional.cross_entropy(logits, labels[keep])


def model_module(model):
    return getattr(model, "module", model)


def score_users(model, pairs, args: RetrieveArguments, torch, device, progress: str | None = None):
    """Top-k candidates, their scores and the target's rank (1-based, over all items) for each pair."""
    from tqdm.auto import tqdm

    net = model_module(model)
    net.eval()
    top_ids, top_scores, ranks = [], [], []
    batches = range(0, len(pairs), args.retriever_eval_batch_size)
    with torch.no_grad():
        for start in tqdm(batches, desc=progress, disable=progress is None, leave=False):
            chunk = pairs[start:start + args.retriever_eval_batch_size]
            seqs = left_pad([h for h, _ in chunk], torch).to(device)
            scores = net.scores(net(seqs)[:, -1])
            scores[:, 0] = -math.inf
            if args.mask_history:
                scores.scatter_(1, seqs, -math.inf)
            targets = torch.tensor([t for _, t in chunk], device=device)
            target_scores = scores.gather(1, targets[:, None])
            ranks.extend((scores > target_scores).sum(1).add(1).tolist())
            values, ids = scores.topk(args.num_candidates, dim=1)
            top_ids.extend(ids.tolist())
            top_scores.extend(values.tolist())
    net.train()
    return top_ids, top_scores, ranks


def metrics_for(ranks: list[int], num_candidates: int) -> dict:
    from .metrics import metrics_from_ranks

    return metrics_from_ranks([r if r <= num_candidates else None for r in ranks], ks=(1, 5, 10, 20))


class Checkpoint:
    """Resumable state: accelerate's save_state (model, optimizer, RNG) plus our loop counters."""

    def __init__(self, out: Path):
        self.dir = out / "checkpoint"
        self.state_file = self.dir / "trainer_state.json"

    def load(self, accelerator) -> dict | None:
        if not self.state_file.exists():
            return None
        accelerator.load_state(str(self.dir))
        return read_json(self.state_file)

    def save(self, accelerator, state: dict) -> None:
        accelerator.save_state(str(self.dir))
        if accelerator.is_main_process:
            write_json(self.state_file, state)


def train(args: RetrieveArguments, run_args: RunArguments, sequences: list[list[int]], num_items: int, out: Path):
    import torch
    from accelerate import Accelerator
    from safetensors.torch import save_model
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    from .models.retrievers import RetrieverConfig, SequentialRetriever

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True makes a CPU `--multi_gpu` launch real gloo DDP
    torch.manual_seed(run_args.seed)
    config = RetrieverConfig(num_items=num_items, kind=args.retriever, hidden=args.retriever_hidden, blocks=args.retriever_blocks,
                             ffn=args.retriever_ffn, dropout=args.retriever_dropout, attn_dropout=args.retriever_attn_dropout,
                             heads=args.retriever_heads, max_len=args.max_len)
    model = SequentialRetriever(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.retriever_lr, weight_decay=args.retriever_weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    rows = training_rows(sequences, args.max_len)
    val_pairs = user_splits(sequences, args.max_len)["validation"]
    ckpt = Checkpoint(out)
    state = ckpt.load(accelerator) or {"epoch": 0, "batch": 0, "step": 0, "best": -1.0, "best_step": 0, "bad_evals": 0,
                                       "history": [], "finished": False, "train_time_s": 0.0}
    if state["step"]:
        logger.info("retrieve: resuming at epoch %d, batch %d (step %d)", state["epoch"], state["batch"], state["step"])
    writer = SummaryWriter(str(out / "runs")) if accelerator.is_main_process else None
    started = time.time() - state["train_time_s"]
    per_process = args.retriever_batch_size
    while not state["finished"] and state["epoch"] < args.retriever_max_epochs:
        # Our own sharded permutation (not a DataLoader) so a resumed run replays the exact batch order.
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(run_args.seed + state["epoch"])).tolist()
        mine = perm[accelerator.process_index::accelerator.num_processes]
        n_batches = len(mine) // per_process
        bar = tqdm(range(state["batch"], n_batches), desc=f"{args.retriever} epoch {state['epoch']}", disable=not accelerator.is_local_main_process, leave=False)
        for b in bar:
            batch = left_pad([rows[i] for i in mine[b * per_process:(b + 1) * per_process]], torch).to(accelerator.device)
            loss = next_item_loss(model, batch, torch)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            state["step"] += 1
            state["batch"] = b + 1
            if writer and state["step"] % 50 == 0:
                writer.add_scalar("train/loss", loss.item(), state["step"])
                bar.set_postfix(loss=f"{loss.item():.3f}", best_r20=f"{state['best']:.4f}")
            if state["step"] % args.eval_every_steps == 0:
                validate(model, val_pairs, args, state, accelerator, writer, out, save_model, torch)
                state["train_time_s"] = time.time() - started
                ckpt.save(accelerator, state)
                if state["bad_evals"] >= args.patience:
                    state["finished"] = True
                    break
        if not state["finished"]:
            state["epoch"] += 1
            state["batch"] = 0
    if state["best"] < 0:  # fewer steps than one evaluation interval: validate the final weights
        validate(model, val_pairs, args, state, accelerator, writer, out, save_model, torch)
    state["finished"] = True
    state["train_time_s"] = time.time() - started
    ckpt.save(accelerator, state)
    if writer:
        writer.close()
    return config, state, accelerator


def validate(model, pairs, args, state, accelerator, writer, out, save_model, torch):
    _, _, ranks = score_users(model, pairs, args, torch, accelerator.device)
    metrics = metrics_for(ranks, args.num_candidates)
    state["history"].append({"step": state["step"], "epoch": state["epoch"], **{k: round(v, 5) for k, v in metrics.items()}})
    if writer:
        for name, value in metrics.items():
            writer.add_scalar(f"validation/{name}", value, state["step"])
    if metrics["recall@20"] > state["best"]:
        state.update(best=metrics["recall@20"], best_step=state["step"], bad_evals=0)
        if accelerator.is_main_process:
            save_model(model_module(model), str(out / "model.safetensors"))
    else:
        state["bad_evals"] += 1
    logger.info("retrieve: step %d val recall@20 %.4f ndcg@10 %.4f (best %.4f at step %d)", state["step"], metrics["recall@20"],
                metrics["ndcg@10"], state["best"], state["best_step"])


def load_retriever(path: Path):
    import torch
    from safetensors.torch import load_model

    from .models.retrievers import RetrieverConfig, SequentialRetriever

    model = SequentialRetriever(RetrieverConfig(**read_json(Path(path) / "config.json")))
    load_model(model, str(Path(path) / "model.safetensors"))
    return model.eval(), torch


def write_candidates(model, torch, sequences, user_ids, args: RetrieveArguments, out: Path) -> dict:
    import datasets

    device = next(model.parameters()).device
    splits, metrics, data = user_splits(sequences, args.max_len), {}, {}
    for split, pairs in splits.items():
        ids, scores, ranks = score_users(model, pairs, args, torch, device, progress=f"candidates ({split})")
        in_top = [r if r <= args.num_candidates else None for r in ranks]
        data[split] = datasets.Dataset.from_dict({
            "user_id": user_ids, "split": [split] * len(pairs), "history": [h for h, _ in pairs],
            "candidates": ids, "scores": scores, "target": [t for _, t in pairs], "target_rank": in_top,
        })
        metrics[split] = metrics_for(ranks, args.num_candidates)
    datasets.DatasetDict(data).save_to_disk(str(out / "candidates"))
    return metrics


def main(run_args: RunArguments, args: RetrieveArguments) -> Path:
    out = stage_dir(run_args, "retriever")
    if should_skip(run_args, out, "retrieve"):
        return out
    data = load_prepared(run_args)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    sequences, user_ids = data["users"]["items"], data["users"]["user_id"]
    num_items = max(data["items"]["item_id"])
    config, state, accelerator = train(args, run_args, sequences, num_items, out)
    if accelerator.is_main_process:
        write_json(out / "config.json", asdict(config))
        model, torch = load_retriever(out)
        metrics = write_candidates(model.to(accelerator.device), torch, sequences, user_ids, args, out)
        summary = {
            "retriever": args.retriever, "mask_history": args.mask_history, "selection": "best validation recall@20",
            "num_candidates": args.num_candidates, "best_step": state["best_step"], "steps": state["step"],
            "epochs": round(state["step"] * args.retriever_batch_size * accelerator.num_processes / max(1, len(training_rows(sequences, args.max_len))), 2),
            "train_time_s": round(state["train_time_s"], 1), "wall_time_s": round(time.time() - start, 1),
            "metrics": {split: {k: round(v, 6) for k, v in m.items()} for split, m in metrics.items()},
            "args": asdict(args),
        }
        write_json(out / "metrics.json", summary)
        mark_complete(out)
        logger.info("retrieve: test %s", json.dumps({k: round(v, 4) for k, v in metrics["test"].items()}))
    accelerator.wait_for_everyone()
    return out
