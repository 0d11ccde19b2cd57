from pathlib import Path

import pytest
import yaml

from ulmrec_hf.cli import PIPELINE, STAGES, check_recipe, main, run_stage_value

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.parent.relative_to(p.parents[2])))
def test_recipe_keys_are_known_flags(path):
    recipe = check_recipe(str(path))
    assert set(recipe.get("stages", PIPELINE)) <= set(STAGES)


@pytest.mark.parametrize("name", ["beauty", "games"])
def test_paper_recipes_use_the_paper_settings(name):
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / name / "llama2-7b" / "pipeline.yaml").read_text())
    assert recipe["model_name_or_path"] == "meta-llama/Llama-2-7b-hf" and recipe["quantization"] == "auto"
    assert (recipe["lora_r"], recipe["lora_alpha"], recipe["lora_dropout"]) == (8, 32, 0.05)
    assert (recipe["learning_rate"], recipe["num_train_epochs"], recipe["num_candidates"]) == (1e-4, 1, 20)
    assert (recipe["rq_levels"], recipe["rq_codebook_size"], recipe["rq_code_dim"], recipe["rq_commitment"]) == (4, 256, 32, 0.25)
    assert (recipe["history_len"], recipe["title_max_tokens"], recipe["retriever_dropout"]) == (20, 32, 0.5)


def test_unknown_recipe_key_is_an_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\nlearning_rat: 0.1\n")
    assert main(["run", str(bad)]) == 2
    assert "unknown recipe keys ['learning_rat']" in capsys.readouterr().err


def test_overrides_win_over_the_recipe():
    assert run_stage_value({"run_dir": "a"}, ["--run_dir", "b"], "run_dir", "z") == "b"
    assert run_stage_value({"run_dir": "a"}, ["--run_dir=c"], "run_dir", "z") == "c"
    assert run_stage_value({}, [], "run_dir", "z") == "z"


def test_run_recipe_runs_its_stages_and_skips_finished_ones(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_dir: {tmp_path / 'run'}\nstages: [demo-data, prepare]\ndemo_output: {tmp_path / 'raw'}\n"
                      f"input: {tmp_path / 'raw'}\ndemo_users: 60\n")
    assert main(["run", str(recipe)]) == 0
    stats = (tmp_path / "run" / "data" / "stats.json").read_text()
    assert (tmp_path / "run" / "data" / "_COMPLETE").exists() and '"users"' in stats
    assert main(["run", str(recipe), "--demo_users", "70"]) == 0  # finished stages are skipped
    assert (tmp_path / "run" / "data" / "stats.json").read_text() == stats
    assert "artifacts:" in capsys.readouterr().out
