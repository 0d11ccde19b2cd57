"""`ulmrec ablate RECIPE`: the paper's variants (Fig. 8: without each alignment task; Fig. 9: index schemes
with and without alignment) from one recipe, in one table and one bar chart.

Each variant lives in `<run_dir>-ablate/<variant>/` and links the stages it shares with the base run
(data, retriever, preferences, and the pid index), so only index/tasks/train/evaluate are redone.
"""

import logging
import os
from pathlib import Path

from .common import UlmrecError, read_json, write_json

logger = logging.getLogger(__name__)

ALIGNMENT = ("index_to_preference", "preference_to_index", "history_to_index", "rating", "intent")
NO_ALIGN = [f"--use_{t}=false" for t in ALIGNMENT]
VARIANTS = {
    "full": [],
    "wo_preference": ["--use_index_to_preference=false", "--use_preference_to_index=false"],
    "wo_history_index": ["--use_history_to_index=false"],
    "wo_rating": ["--use_rating=false"],
    "wo_intent": ["--use_intent=false"],
    "wo_all_align": NO_ALIGN,
    "pid_wo_align": NO_ALIGN,
    "nid": ["--index_scheme=nid"],
    "nid_wo_align": ["--index_scheme=nid", *NO_ALIGN],
    "oid": ["--index_scheme=oid"],
    "oid_wo_align": ["--index_scheme=oid", *NO_ALIGN],
}
SHARED = ("data", "retriever", "preferences")


def variant_overrides(names: list[str]) -> dict[str, list[str]]:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UlmrecError(f"ablate: unknown variants {unknown}; known: {list(VARIANTS)}")
    return {n: VARIANTS[n] for n in names}


def stages_for(overrides: list[str]) -> list[str]:
    """The stages a variant must redo: the index only when its scheme differs from the base run's."""
    redo_index = any(o.startswith("--index_scheme") for o in overrides)
    return (["index"] if redo_index else []) + ["tasks", "train", "evaluate"]


def link_shared(base: Path, variant_dir: Path, with_index: bool) -> None:
    variant_dir.mkdir(parents=True, exist_ok=True)
    for name in SHARED + (("user_index",) if with_index else ()):
        src, dst = (base / name).resolve(), variant_dir / name
        if src.exists() and not dst.exists():
            os.symlink(src, dst, target_is_directory=True)


def run_ablation(recipe_path: str, names: list[str], extra: list[str]) -> Path:
    from .cli import check_recipe, run_recipe, run_stage, run_stage_value

    recipe = check_recipe(recipe_path)
    base = Path(run_stage_value(recipe, extra, "run_dir", "runs/demo"))
    run_recipe([recipe_path, *extra])  # the base run; finished stages are skipped
    root = Path(f"{base}-ablate")
    results = {}
    for name, overrides in variant_overrides(names).items():
        vdir = root / name
        stages = stages_for(overrides)
        link_shared(base, vdir, with_index="index" not in stages)
        for stage in stages:
            run_stage(stage, ["--config", recipe_path, *extra, "--run_dir", str(vdir), *overrides])
        results[name] = read_json(vdir / "eval" / "metrics.json")
    write_json(root / "ablation.json", {"recipe": recipe_path, "variants": {n: VARIANTS[n] for n in results}, "results": results})
    (root / "ablation.md").write_text(ablation_table(results))
    plot(results, root / "ablation.png")
    print(ablation_table(results))
    return root


def ablation_table(results: dict) -> str:
    lines = ["| variant | rank N@10 | rank R@10 | overall N@10 | overall R@10 | uid-only rank N@10 |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        m, u = r["metrics"]["ulmrec"], r["metrics"].get("ulmrec_uid_only", {"rank": {"ndcg@10": float("nan")}})
        lines.append(f"| {name} | {m['rank']['ndcg@10']:.4f} | {m['rank']['recall@10']:.4f} | {m['overall']['ndcg@10']:.4f} | "
                     f"{m['overall']['recall@10']:.4f} | {u['rank']['ndcg@10']:.4f} |")
    order = {r["candidate_order"] for r in results.values()}
    return "\n".join(lines) + f"\n\nCandidate order: {', '.join(sorted(order))}.\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(names)), 4))
    for ax, metric in zip(axes, ("ndcg@10", "recall@10")):
        values = [results[n]["metrics"]["ulmrec"]["rank"][metric] for n in names]
        ax.bar(names, values, color=["#4C72B0" if "wo" not in n else "#DD8452" for n in names])
        ax.set_title(f"rank {metric}")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> Path:
    if not argv or argv[0].startswith("-"):
        raise UlmrecError("usage: ulmrec ablate RECIPE.yaml [--variants full wo_all_align ...] [--key value ...]")
    recipe, rest = argv[0], argv[1:]
    names = list(VARIANTS)
    if "--variants" in rest:
        i = rest.index("--variants")
        j = next((k for k in range(i + 1, len(rest)) if rest[k].startswith("--")), len(rest))
        names, rest = rest[i + 1:j], rest[:i] + rest[j:]
    return run_ablation(recipe, names, rest)
