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
from dataclasses import dataclass, field
from pathlib import Path

from .common import StageArguments, left_pad, read_json, settings_of, write_json
from .layout import RunDir
from .split import test_pair, training_part, validation_pair

logger = logging.getLogger(__name__)


@dataclass
class RetrieveArguments:
    _argument_group_name = "retrieve"
    _operational = ('eval_batch_size',)  # fields that do not change the output (left out of the recorded settings)
    retriever: str = field(default="lrurec", metadata={"help": "Retriever model.", "choices": ["lrurec", "sasrec"]})
    seed: int = field(default=42, metadata={"help": "Seed of the initial weights and the batch order."})
    hidden: int = field(default=64, metadata={"help": "Embedding / hidden size."})
    blocks: int = field(default=2, metadata={"help": "Number of LRU (or attention) blocks."})
    ffn: int = field(default=256, metadata={"help": "Feed-forward size."})
    dropout: float = field(default=0.5, metadata={"help": "Dropout (the paper uses 0.5)."})
    attn_dropout: float = field(default=0.5, metadata={"help": "Dropout inside the LRU / attention layer."})
    heads: int = field(default=2, metadata={"help": "Attention heads (SASRec)."})
    max_len: int = field(default=50, metadata={"help": "Longest history the retriever reads."})
    batch_size: int = field(default=64, metadata={"help": "Training batch size (per process)."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    max_epochs: int = field(default=200, metadata={"help": "Upper bound on epochs; early stopping usually ends sooner."})
    eval_every_steps: int = field(default=500, metadata={"help": "Validate (and checkpoint) every N optimizer steps."})
    patience: int = field(default=20, metadata={"help": "Stop after N validations without a better Recall@20."})
    num_candidates: int = field(default=20, metadata={"help": "Candidates kept per user."})
    mask_history: bool = field(default=True, metadata={"help": "Never recommend items already in the history (LlamaRec's rule)."})
    decay_bias_and_norm: bool = field(default=False, metadata={"help": "Apply weight decay to biases and LayerNorm weights too (LlamaRec's trainer exempts them)."})
    adam_epsilon: float = field(default=1e-9, metadata={"help": "AdamW epsilon (LlamaRec's trainer: 1e-9)."})
    max_grad_norm: float | None = field(default=5.0, metadata={"help": "Clip the gradient norm to this (LlamaRec's trainer: 5.0); unset for no clipping."})
    eval_batch_size: int = field(default=1024, metadata={"help": "Users scored at once."})


ARGUMENTS = (StageArguments, RetrieveArguments)


def user_splits(sequences: list[list[int]], max_len: int) -> dict[str, list[tuple[list[int], int]]]:
    """(history, target) pairs per split; histories are cut to the last `max_len` items."""
    splits = {"train": [], "validation": [], "test": []}
    for seq in sequences:
        for split, (history, target) in (("train", test_pair(training_part(seq))), ("validation", validation_pair(seq)), ("test", test_pair(seq))):
            splits[split].append((history[-max_len:], target))
    return splits


def training_rows(sequences: list[list[int]], max_len: int) -> list[list[int]]:
    """Each user's training part (all but the last two items), last max_len + 1 items."""
    return [training_part(seq)[-(max_len + 1):] for seq in sequences if len(training_part(seq)) >= 2]


def next_item_loss(model, batch, torch):
    """Full-softmax cross-entropy of every next item, computed only at real (non-padding) positions."""
    inputs, labels = batch[:, :-1], batch[:, 1:]
    hidden = model(inputs)
    keep = labels > 0
    logits = hidden[keep] @ model_module(model).item_emb.weight.T + model_module(model).bias
    return torch.nn.functional.cross_entropy(logits, labels[keep])


def model_module(model):
    return getattr(model, "module", model)


TIE_RULE = "an equal score ranks the lower item id first, in a user's rank and the stored top-k alike"


def score_users(model, pairs, args: RetrieveArguments, torch, device, progress: str | None = None, top: bool = True):
    """Top-k candidates, their scores and the target's rank (1-based, over all items) for each pair.

    Ties: an equal score ranks the lower item id first, in the rank and in the top-k alike, so a user is a "rank" user
    exactly when the target is among the stored candidates."""
    from tqdm.auto import tqdm

    net = model_module(model)
    net.eval()
    top_ids, top_scores, ranks = [], [], []
    batches = range(0, len(pairs), args.eval_batch_size)
    with torch.no_grad():
        for start in tqdm(batches, desc=progress, disable=progress is None, leave=False):
            chunk = pairs[start:start + args.eval_batch_size]
            seqs = left_pad([h for h, _ in chunk], device=device)[0]
            scores = net.scores(net(seqs)[:, -1]).float()
            scores[:, 0] = -math.inf
            if args.mask_history:
                scores.scatter_(1, seqs, -math.inf)
            targets = torch.tensor([t for _, t in chunk], device=device)
            ranks.extend(rank_with_ties(scores, targets, torch).tolist())
            if top:
                ids, values = top_k_with_ties(scores, args.num_candidates, torch)
                top_ids.extend(ids.tolist())
                top_scores.extend(values.tolist())
    net.train()
    return top_ids, top_scores, ranks


def rank_with_ties(scores, targets, torch):
    """1 + items scored higher + items scored the same with a lower id."""
    target_scores = scores.gather(1, targets[:, None])
    lower_id = torch.arange(scores.shape[1], device=scores.device)[None, :] < targets[:, None]
    return (scores > target_scores).sum(1) + ((scores == target_scores) & lower_id).sum(1) + 1


def top_k_with_ties(scores, k: int, torch):
    """(ids, scores) of the k best items best first, an equal score ranking the lower id first (torch.topk's order
    among equal values is unspecified)."""
    kth = scores.topk(k, dim=1).values[:, -1:]
    above, equal = scores > kth, scores == kth
    keep = above | (equal & (equal.cumsum(1) <= k - above.sum(1, keepdim=True)))
    ids = keep.nonzero()[:, 1].view(len(scores), k)  # ascending ids, exactly k per row
    values = scores.gather(1, ids)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return ids.gather(1, order), values.gather(1, order)


def metrics_for(ranks: list[int], num_candidates: int) -> dict:
    from .metrics import metrics_from_ranks

    return metrics_from_ranks([r if r <= num_candidates else None for r in ranks], ks=(1, 5, 10, 20))


class Checkpoint:
    """Resumable state: accelerate's save_state (model, optimizer, RNG) plus our loop counters."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.state_file = folder / "trainer_state.json"

    def load(self, accelerator) -> dict | None:
        if not self.state_file.exists():
            return None
        accelerator.load_state(str(self.dir))
        return read_json(self.state_file)

    def save(self, accelerator, state: dict) -> None:
        accelerator.save_state(str(self.dir))
        if accelerator.is_main_process:
            write_json(self.state_file, state)


def parameter_groups(model, args: RetrieveArguments, torch) -> list[dict]:
    """AdamW groups: LlamaRec's trainer decays every weight but biases and LayerNorm weights (unless decay_bias_and_norm)."""
    if args.decay_bias_and_norm:
        return [{"params": list(model.parameters()), "weight_decay": args.weight_decay}]
    norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    exempt = [p for name, p in model.named_parameters() if id(p) in norms or name.split(".")[-1] == "bias"]
    decayed = [p for p in model.parameters() if all(p is not q for q in exempt)]
    return [{"params": decayed, "weight_decay": args.weight_decay}, {"params": exempt, "weight_decay": 0.0}]


def padded_rows(rows: list[list[int]], torch, device):
    """All training rows left-padded to one width, kept on the device, with their lengths (a batch is sliced from it)."""
    return left_pad(rows, device=device)[0], torch.tensor([len(r) for r in rows])


def train(args: RetrieveArguments, run: RunDir, sequences: list[list[int]], num_items: int):
    import torch
    from accelerate import Accelerator
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    from .models.retrievers import RetrieverConfig, SequentialRetriever

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True makes a CPU `--multi_gpu` launch real gloo DDP
    torch.manual_seed(args.seed)
    config = RetrieverConfig(num_items=num_items, kind=args.retriever, hidden=args.hidden, blocks=args.blocks, ffn=args.ffn,
                             dropout=args.dropout, attn_dropout=args.attn_dropout, heads=args.heads, max_len=args.max_len)
    model = SequentialRetriever(config)
    optimizer = torch.optim.AdamW(parameter_groups(model, args, torch), lr=args.lr, eps=args.adam_epsilon)
    model, optimizer = accelerator.prepare(model, optimizer)
    matrix, lengths = padded_rows(training_rows(sequences, args.max_len), torch, accelerator.device)
    val_pairs = user_splits(sequences, args.max_len)["validation"]
    ckpt = Checkpoint(run.retriever_checkpoint)
    state = ckpt.load(accelerator) or {"epoch": 0, "batch": 0, "step": 0, "best": -1.0, "best_step": 0, "bad_evals": 0,
                                       "history": [], "finished": False, "train_time_s": 0.0}
    state["resumed_from"] = {"epoch": state["epoch"], "batch": state["batch"], "step": state["step"]} if state["step"] else None
    if state["step"]:
        logger.info("retrieve: resuming at epoch %d, batch %d (step %d)", state["epoch"], state["batch"], state["step"])
    writer = SummaryWriter(str(run.logs("retrieve"))) if accelerator.is_main_process else None
    started = time.time() - state["train_time_s"]
    per_process = args.batch_size
    while not state["finished"] and state["epoch"] < args.max_epochs:
        # Our own sharded permutation (not a DataLoader) so a resumed run replays the exact batch order.
        perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(args.seed + state["epoch"]))
        mine = perm[accelerator.process_index::accelerator.num_processes]
        n_batches = len(mine) // per_process
        bar = tqdm(range(state["batch"], n_batches), desc=f"{args.retriever} epoch {state['epoch']}", disable=not accelerator.is_local_main_process, leave=False)
        for b in bar:
            idx = mine[b * per_process:(b + 1) * per_process]
            width = max(1, int(lengths[idx].max()))  # the batch's own longest row, as a per-batch left_pad would give
            loss = next_item_loss(model, matrix[idx.to(matrix.device), -width:], torch)
            accelerator.backward(loss)
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            state["step"] += 1
            state["batch"] = b + 1
            if writer and state["step"] % 50 == 0:
                writer.add_scalar("train/loss", loss.item(), state["step"])
                bar.set_postfix(loss=f"{loss.item():.3f}", best_r20=f"{state['best']:.4f}")
            if state["step"] % args.eval_every_steps == 0:
                validate(model, val_pairs, args, state, accelerator, writer, run, torch)
                state["train_time_s"] = time.time() - started
                ckpt.save(accelerator, state)
                if state["bad_evals"] >= args.patience:
                    state["finished"] = True
                    break
        if not state["finished"]:
            state["epoch"] += 1
            state["batch"] = 0
    if state["best"] < 0:  # fewer steps than one evaluation interval: validate the final weights
        validate(model, val_pairs, args, state, accelerator, writer, run, torch)
    state["finished"] = True
    state["train_time_s"] = time.time() - started
    ckpt.save(accelerator, state)
    if writer:
        writer.close()
    return state, accelerator


def validate(model, pairs, args, state, accelerator, writer, run: RunDir, torch):
    _, _, ranks = score_users(model, pairs, args, torch, accelerator.device, top=False)
    metrics = metrics_for(ranks, args.num_candidates)
    state["history"].append({"step": state["step"], "epoch": state["epoch"], **{k: round(v, 5) for k, v in metrics.items()}})
    if writer:
        for name, value in metrics.items():
            writer.add_scalar(f"validation/{name}", value, state["step"])
    if metrics["recall@20"] > state["best"]:
        state.update(best=metrics["recall@20"], best_step=state["step"], bad_evals=0)
        if accelerator.is_main_process:
            model_module(model).save_pretrained(run.retriever_model)
    else:
        state["bad_evals"] += 1
    logger.info("retrieve: step %d val recall@20 %.4f ndcg@10 %.4f (best %.4f at step %d)", state["step"], metrics["recall@20"],
                metrics["ndcg@10"], state["best"], state["best_step"])


def load_retriever(run: RunDir):
    from .models.retrievers import SequentialRetriever

    return SequentialRetriever.from_pretrained(run.retriever_model).eval()


def write_candidates(model, sequences, user_ids, args: RetrieveArguments, run: RunDir) -> dict:
    import datasets
    import torch

    device = next(model.parameters()).device
    splits, metrics, data = user_splits(sequences, args.max_len), {}, {}
    for split, pairs in splits.items():
        ids, scores, ranks = score_users(model, pairs, args, torch, device, progress=f"candidates ({split})")
        in_top = [r if r <= args.num_candidates else None for r in ranks]
        for (_, target), top, rank in zip(pairs, ids, in_top):  # the one tie rule makes these agree; never store a user that breaks it
            if (rank is not None) != (target in top) or (rank is not None and top[rank - 1] != target):
                raise RuntimeError(f"retrieve: target {target} has rank {rank} but the top-{args.num_candidates} is {top}")
        data[split] = datasets.Dataset.from_dict({
            "user_id": user_ids, "split": [split] * len(pairs), "history": [h for h, _ in pairs],
            "candidates": ids, "scores": scores, "target": [t for _, t in pairs], "target_rank": in_top,
        })
        metrics[split] = metrics_for(ranks, args.num_candidates)
    datasets.DatasetDict(data).save_to_disk(str(run.candidates_path))
    return metrics


def main(stage: StageArguments, args: RetrieveArguments) -> Path:
    run = RunDir(stage.run_dir)
    if not run.begin("retrieve", {**settings_of(args), "ranking": TIE_RULE}, stage.overwrite, inputs=("prepare",)):
        return run.path("retrieve")
    data = run.prepared()
    start = time.time()
    sequences, user_ids = data["users"]["items"], data["users"]["user_id"]
    state, accelerator = train(args, run, sequences, max(data["items"]["item_id"]))
    if accelerator.is_main_process:
        metrics = write_candidates(load_retriever(run).to(accelerator.device), sequences, user_ids, args, run)
        summary = {
            "retriever": args.retriever, "mask_history": args.mask_history, "selection": "best validation recall@20", "ties": TIE_RULE,
            "num_candidates": args.num_candidates, "best_step": state["best_step"], "steps": state["step"],
            "resumed_from": state["resumed_from"],
            "epochs": round(state["step"] * args.batch_size * accelerator.num_processes / max(1, len(training_rows(sequences, args.max_len))), 2),
            "train_time_s": round(state["train_time_s"], 1), "wall_time_s": round(time.time() - start, 1),
            "metrics": {split: {k: round(v, 6) for k, v in m.items()} for split, m in metrics.items()},
        }
        write_json(run.retriever_metrics_file, summary)
        run.finish("retrieve")
        logger.info("retrieve: test %s", json.dumps({k: round(v, 4) for k, v in metrics["test"].items()}))
    accelerator.wait_for_everyone()
    return run.path("retrieve")
