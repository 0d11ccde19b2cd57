from pathlib import Path

import pytest

from ulmrec_hf.cli import main
from ulmrec_hf.common import UlmrecError, read_json
from ulmrec_hf.runner import (PIPELINE, STAGES, VARIANTS, load_recipe, parse_stage, split_overrides, stage_argv, stage_config,
                              stages_for, variant_overrides)

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_every_recipe_parses_for_every_stage(path):
    recipe = load_recipe(str(path))
    for stage in recipe.get("stages") or PIPELINE:
        assert stage in STAGES
        parse_stage(stage, ["--config", str(path)])  # every key reaches a dataclass field


@pytest.mark.parametrize("name", ["beauty", "games"])
def test_paper_recipes_run_the_paper(name):
    for path in (Path(__file__).resolve().parents[1] / "recipes" / name / "llama2-7b").glob("*.yaml"):
        recipe = load_recipe(str(path))
        assert recipe["model_name_or_path"] == "meta-llama/Llama-2-7b-hf" and recipe["tasks"]["protocol"] == "paper"
        _, ranker, model, training = parse_stage("train", ["--config", str(path)])
        assert (model.lora_r, model.lora_alpha, model.lora_dropout) == (8, 32, 0.05)
        assert (training.learning_rate, training.num_train_epochs, training.optim) == (1e-4, 1, "adamw_torch")
        _, index = parse_stage("index", ["--config", str(path)])
        assert (index.rq_levels, index.rq_codebook_size, index.rq_code_dim, index.rq_commitment) == (4, 256, 32, 0.25)
        _, tasks = parse_stage("tasks", ["--config", str(path)])
        assert (tasks.history_len, tasks.title_max_tokens) == (20, 32)
        _, retrieve = parse_stage("retrieve", ["--config", str(path)])
        assert (retrieve.dropout, retrieve.num_candidates, retrieve.lr, retrieve.batch_size) == (0.5, 20, 1e-3, 64)


def test_recipe_sections_and_shared_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run_dir: runs/x\nseed: 3\nmodel_name_or_path: smollm2\nretrieve:\n  lr: 0.01\ntrain:\n  learning_rate: 0.5\n")
    loaded = load_recipe(str(recipe))
    assert stage_config(loaded, "retrieve") == {"run_dir": "runs/x", "seed": 3, "lr": 0.01}
    assert stage_config(loaded, "train") == {"run_dir": "runs/x", "seed": 3, "model_name_or_path": "smollm2", "learning_rate": 0.5}
    stage, retrieve = parse_stage("retrieve", ["--config", str(recipe), "--lr", "0.02"])
    assert (stage.run_dir, retrieve.seed, retrieve.lr) == ("runs/x", 3, 0.02)  # a flag wins over the recipe


@pytest.mark.parametrize("text, message", [
    ("retriever_lr: 0.1\n", "`retriever_lr` was renamed to `retrieve.lr`"),
    ("learning_rate: 0.1\n", "`learning_rate` belongs in the section of `train:`"),
    ("retrieve:\n  lrr: 0.1\n", "retrieve: unknown key `lrr` (did you mean `lr`?)"),
    ("tasks:\n  candidate_order: shuffled\n", "tasks: `candidate_order` was renamed to `tasks.eval_order`"),
    ("retrieve:\n  learning_rate: 0.1\n", "`learning_rate` is an option of `ulmrec train`, not of `ulmrec retrieve`"),
    ("stages: [prepare, trian]\n", "unknown stage 'trian'"),
])
def test_bad_recipe_keys_are_errors(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(UlmrecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_recipe(str(recipe))


def test_overrides_go_to_the_stages_that_have_them():
    overrides = split_overrides(["--seed", "7", "--train.learning_rate=0.5", "--rq_hidden", "64", "32", "--overwrite"])
    assert overrides == [(None, "seed", ["7"]), ("train", "learning_rate", ["0.5"]), (None, "rq_hidden", ["64", "32"]), (None, "overwrite", [])]
    assert stage_argv("retrieve", "r.yaml", overrides) == ["--config", "r.yaml", "--seed", "7", "--overwrite"]
    assert stage_argv("train", "r.yaml", overrides) == ["--config", "r.yaml", "--seed", "7", "--learning_rate", "0.5", "--overwrite"]
    assert stage_argv("index", "r.yaml", overrides)[-4:] == ["--rq_hidden", "64", "32", "--overwrite"]


def test_run_recipe_runs_its_stages_and_skips_finished_ones(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_dir: {tmp_path / 'run'}\nstages: [demo-data, prepare]\ndemo-data:\n  output: {tmp_path / 'raw'}\n  users: 60\n"
                      f"prepare:\n  input: {tmp_path / 'raw'}\n")
    assert main(["run", str(recipe)]) == 0
    stats = (tmp_path / "run" / "data" / "stats.json").read_text()
    assert read_json(tmp_path / "run" / "data" / "stats.json")["users"] > 0
    assert main(["run", str(recipe)]) == 0  # finished and unchanged: skipped
    assert (tmp_path / "run" / "data" / "stats.json").read_text() == stats
    capsys.readouterr()
    assert main(["run", str(recipe), "--demo-data.users", "70"]) == 2  # new input data: prepare refuses to reuse its output
    assert "settings.input_digest" in capsys.readouterr().err
    assert main(["run", str(recipe), "--demo-data.users", "70", "--overwrite"]) == 0
    assert read_json(tmp_path / "run" / "data" / "stats.json")["users"] != read_json_users(stats)
    assert main(["run", str(recipe), "--nonsense", "1"]) == 2


def read_json_users(text: str) -> int:
    import json

    return json.loads(text)["users"]


def test_ablation_variants_are_all_different():
    """No two variants train the same model; Fig. 9's PID without alignment is Fig. 8's w/o all, run once."""
    settings = [frozenset(overrides) for overrides in VARIANTS.values()]
    assert len(set(settings)) == len(settings)
    assert list(variant_overrides(["wo_all_align", "pid_wo_align"])) == ["wo_all_align"]
    assert variant_overrides(["pid_wo_align"]) == {"wo_all_align": VARIANTS["wo_all_align"]}


def test_an_alias_keeps_its_row_in_the_ablation_table():
    from ulmrec_hf.runner import ablation_table

    metrics = {"rank": {"ndcg@10": 0.25, "recall@10": 0.5}, "overall": {"ndcg@10": 0.05, "recall@10": 0.1}}
    row = {"test": {"ranker": metrics}, "protocol": {"eval_order": "retriever"}}
    table = ablation_table({"wo_all_align": row, "pid_wo_align": row})
    assert "| pid_wo_align (= wo_all_align, trained once) | 0.2500 |" in table and "| wo_all_align | 0.2500 |" in table
    assert table.count("| — (not scored) | — (not scored) | — (not scored) |") == 2
    uid = {"ranker_uid_only": {"rank": {"ndcg@10": 0.3}}, "ranker_uid_only_swapped_index": {"rank": {"ndcg@10": 0.2}}, "random_order": {"rank": {"ndcg@10": 0.1}}}
    assert "| 0.3000 | 0.2000 | 0.1000 |" in ablation_table({"full": {**row, "test": {**row["test"], **uid}}})


def test_ablation_variants():
    configs = variant_overrides(["full", "wo_all_align", "nid", "oid_wo_align", "wo_intent"])
    assert configs["full"] == [] and stages_for(configs["full"]) == ["tasks", "train", "evaluate"]
    assert set(configs["wo_all_align"]) == {"--tasks.use_index_to_preference=false", "--tasks.use_preference_to_index=false",
                                            "--tasks.use_history_to_index=false", "--tasks.use_rating=false", "--tasks.use_intent=false"}
    assert stages_for(configs["nid"]) == ["index", "tasks", "train", "evaluate"] and "--index.scheme=nid" in configs["nid"]
    assert {"nid", "oid", "nid_wo_align", "oid_wo_align"} <= set(VARIANTS)
    with pytest.raises(UlmrecError, match="unknown variants"):
        variant_overrides(["w/o everything"])
    for overrides in VARIANTS.values():  # every variant's flags are real options of the stages it runs
        parsed = split_overrides(overrides)
        for stage, key, _ in parsed:
            parse_stage(stage, [f"--{key}", "nid" if key == "scheme" else "false"])


def test_an_ablations_base_run_computes_only_what_variants_link(tmp_path, monkeypatch):
    """The base run stops before tasks: every variant trains and evaluates in its own folder, so a variant-only flag
    (here --evaluate.uid_only) never meets the base run's own evaluation."""
    import ulmrec_hf.runner as runner

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "smollm2-135m" / "pipeline.yaml"
    ran = []
    run_of = lambda argv: Path(argv[len(argv) - argv[::-1].index("--run_dir")]).name if "--run_dir" in argv else "demo"  # noqa: E731 (the last one counts)
    monkeypatch.setattr(runner, "run_stage", lambda name, argv: ran.append((run_of(argv), name, argv)))
    metrics = {"rank": {"ndcg@10": 0.25, "recall@10": 0.5}, "overall": {"ndcg@10": 0.05, "recall@10": 0.1}}
    monkeypatch.setattr(runner.RunDir, "eval_metrics", lambda self: {"test": {"ranker": metrics}, "protocol": {"eval_order": "shuffled"}})
    (tmp_path / "demo").mkdir()
    runner.ablate([str(recipe), "--variants", "full", "nid", "--evaluate.uid_only", "true", "--run_dir", str(tmp_path / "demo")])
    assert [name for run, name, _ in ran if run == "demo"] == ["demo-data", "prepare", "retrieve", "preferences", "index"]
    assert [(run, name) for run, name, _ in ran if run != "demo"] == [("full", "tasks"), ("full", "train"), ("full", "evaluate"),
                                                                      ("nid", "index"), ("nid", "tasks"), ("nid", "train"), ("nid", "evaluate")]
    assert all(argv[argv.index("--uid_only") + 1] == "true" for run, name, argv in ran if name == "evaluate")
