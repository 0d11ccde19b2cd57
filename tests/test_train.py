import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from ulmrec_hf import train as train_mod
from ulmrec_hf.common import UlmrecError, read_json, write_json
from ulmrec_hf.layout import RunDir
from ulmrec_hf.runner import parse_stage, run_stage

UP_TO_TASKS = ("prepare", "retrieve", "preferences", "index", "tasks")


@pytest.fixture
def tasks_run(tmp_path, tiny_pipeline, copy_stages):
    return copy_stages(tiny_pipeline, tmp_path / "run", UP_TO_TASKS)


def trainer_for(run: Path, flags: list[str]):
    _, ranker, model_args, training_args = parse_stage("train", flags)
    mixture = RunDir(run).mixture()
    train_mod.resolve(model_args, training_args, RunDir(run), mixture)
    return train_mod.build_trainer(RunDir(run), ranker, model_args, training_args, mixture)[0]


def test_collated_labels_are_the_completion_and_scoring_ids_match(tiny_pipeline, train_flags):
    trainer = trainer_for(tiny_pipeline, train_flags(tiny_pipeline))
    tokenizer = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    for i in range(batch["input_ids"].shape[0]):
        labelled = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert labelled[-1] == tokenizer.eos_token_id
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert ids[-len(labelled):] == labelled  # the labelled span is exactly the end: completion + EOS
    eval_batch = next(iter(trainer.get_eval_dataloader()))
    eval_rows = datasets.load_from_disk(str(tiny_pipeline / "tasks" / "next_item_validation"))
    letters = read_json(tiny_pipeline / "tasks" / "mixture.json")["letter_token_ids"]
    for i in range(eval_batch["input_ids"].shape[0]):
        labels = eval_batch["labels"][i]
        assert int(labels[labels != -100][0]) == letters[eval_rows[i]["target_position"]]  # scoring ids == training-target ids


def test_padding_free_training_has_the_same_loss_mask_and_first_loss(tiny_pipeline, train_flags):
    """The padding-free path (flattened batch, position ids) labels the same tokens and gives the same first-step loss."""
    flags = train_flags(tiny_pipeline, "--per_device_train_batch_size", "4", "--seed", "3")
    padded, free = trainer_for(tiny_pipeline, flags), trainer_for(tiny_pipeline, flags + ["--padding_free", "true"])
    a, b = next(iter(padded.get_train_dataloader())), next(iter(free.get_train_dataloader()))
    assert "attention_mask" not in b and b["input_ids"].shape[0] == 1
    rows = train_mod.sequences(a)
    assert [ids for ids, _ in rows] == [ids for ids, _ in train_mod.sequences(b)]
    assert [lab for _, lab in rows] == [lab for _, lab in train_mod.sequences(b)]  # the same loss mask
    padded.model.eval()
    free.model.eval()
    with torch.no_grad():
        loss_a = padded.compute_loss(padded.model, padded._prepare_inputs(a))
        loss_b = free.compute_loss(free.model, free._prepare_inputs(b))
    torch.testing.assert_close(loss_a, loss_b, atol=1e-4, rtol=1e-4)
    ea, eb = next(iter(padded.get_eval_dataloader())), next(iter(free.get_eval_dataloader()))
    with torch.no_grad():  # the verbalizer reads the same scores from a padding-free evaluation batch
        _, scores_a, gold_a = padded.prediction_step(padded.model, padded._prepare_inputs(ea), False)
        _, scores_b, gold_b = free.prediction_step(free.model, free._prepare_inputs(eb), False)
    assert torch.equal(gold_a, gold_b)
    torch.testing.assert_close(scores_a, scores_b, atol=1e-4, rtol=1e-4)


def test_the_adapter_and_checkpoints_hold_only_trained_rows(tiny_pipeline):
    """No saved tensor is vocabulary-sized: the LoRA matrices and the index-token rows only."""
    vocab = len(read_json(tiny_pipeline / "ranker" / "tokenizer.json")["model"]["vocab"])
    files = [tiny_pipeline / "ranker" / "adapter_model.safetensors", *(tiny_pipeline / "ranker" / "checkpoints").glob("checkpoint-*/adapter_model.safetensors")]
    assert len(files) >= 3
    for f in files:
        tensors = load_file(str(f))
        assert tensors and not any(d >= vocab for t in tensors.values() for d in t.shape), f
        assert any("trainable_tokens_delta" in k for k in tensors) and any("lora_A" in k for k in tensors)
    for f in (tiny_pipeline / "ranker" / "checkpoints").glob("checkpoint-*/optimizer.pt"):
        state = torch.load(f, weights_only=False)["state"]
        assert not any(d >= vocab for s in state.values() for t in s.values() if torch.is_tensor(t) for d in t.shape)
    metrics = read_json(tiny_pipeline / "ranker" / "train_metrics.json")
    assert metrics["adapter_bytes"] == files[0].stat().st_size < 1_000_000


def test_new_token_rows_are_trained_and_the_card_says_what_the_adapter_holds(tiny_pipeline):
    metrics = read_json(tiny_pipeline / "ranker" / "train_metrics.json")
    rows = metrics["index_token_rows"]
    assert rows["rows"] == len(read_json(tiny_pipeline / "user_index" / "tokens.json"))
    assert rows["max_abs_change"] > 0 and rows["rows_changed"] > 0
    assert metrics["worse_than_untrained"] == (metrics["best"]["eval_ndcg@10"] < metrics["untrained"]["untrained_ndcg@10"])
    card = (tiny_pipeline / "ranker" / "README.md").read_text()
    config = read_json(tiny_pipeline / "ranker" / "ranker_config.json")
    assert card.startswith("---\n") and f"base_model_local: {config['base_model']}" in card and "library_name: peft" in card
    assert f"{round(metrics['adapter_bytes'] / 1e6, 2)} MB" in card and "48 added index tokens" in card
    assert "`all_prefixes`" in card and "`random`" in card and "`retriever`" in card and "https://github.com/)" not in card


def test_a_worse_adapter_is_flagged_in_the_card(tiny_pipeline):
    from ulmrec_hf.cards import model_card
    from ulmrec_hf.train import RankerArguments, RankerModelConfig, RankerTrainingConfig, checkpoint_choice

    metrics = read_json(tiny_pipeline / "ranker" / "train_metrics.json")
    config, mixture = read_json(tiny_pipeline / "ranker" / "ranker_config.json"), read_json(tiny_pipeline / "tasks" / "mixture.json")
    user_text = {"preferences": "training interactions only", "index": "training interactions only"}
    allowed = RankerArguments(allow_worse_than_untrained=True)
    bad = {"untrained": {"untrained_ndcg@10": 0.9}, "best": {"eval_ndcg@10": 0.2}}
    worse = {**metrics, **bad, "choice": checkpoint_choice(bad["best"], bad["untrained"], allowed), "worse_than_untrained": True}
    card = str(model_card(config, mixture, worse, RankerTrainingConfig(use_cpu=True), RankerModelConfig(), user_text))
    assert "**Warning:** on validation this adapter ranks worse than the untrained base model" in card and "0.2000 against 0.9000" in card
    assert "kept as allowed by allow_worse_than_untrained" in card and "training interactions only" in card
    good = {"untrained": {"untrained_ndcg@10": 0.2}, "best": {"eval_ndcg@10": 0.3}}
    better = {**metrics, **good, "choice": checkpoint_choice(good["best"], good["untrained"], allowed), "worse_than_untrained": False}
    assert "Warning" not in str(model_card(config, mixture, better, RankerTrainingConfig(use_cpu=True), RankerModelConfig(), user_text))
    flagged = read_json(tiny_pipeline / "ranker" / "train_metrics.json")
    assert ("**Warning:**" in (tiny_pipeline / "ranker" / "README.md").read_text()) == flagged["worse_than_untrained"]


def test_checkpoint_choice_refuses_a_worse_adapter_unless_allowed():
    from ulmrec_hf.train import RankerArguments, checkpoint_choice

    worse, base = {"eval_ndcg@10": 0.25}, {"untrained_ndcg@10": 0.3}
    assert checkpoint_choice(worse, base, RankerArguments())["refused"]
    assert not checkpoint_choice(worse, base, RankerArguments(allow_worse_than_untrained=True))["refused"]
    tie = checkpoint_choice({"eval_ndcg@10": 0.3}, base, RankerArguments())
    assert not tie["refused"] and tie["worse_than_untrained"] is False
    assert checkpoint_choice(worse, None, RankerArguments())["worse_than_untrained"] is None


def test_a_worse_adapter_stops_the_stage_and_a_rerun_that_allows_it_finishes(tasks_run, train_flags, monkeypatch):
    """The untrained model made perfect on validation: no adapter can beat it, so the stage stops with its adapter
    saved; the same settings with the flag resume and finish, and the card records the decision."""
    def perfect(trainer, run, ranker, resume):
        write_json(run.ranker / "untrained_metrics.json", {"untrained_ndcg@10": 1.0})
        return read_json(run.ranker / "untrained_metrics.json")

    monkeypatch.setattr(train_mod, "untrained_metrics", perfect)
    with pytest.raises(UlmrecError, match="WORSE than the untrained model"):
        run_stage("train", train_flags(tasks_run, "--max_steps", "2", "--allow_worse_than_untrained", "false"))
    assert (tasks_run / "ranker" / "adapter_model.safetensors").exists() and not (tasks_run / "ranker" / "_COMPLETE").exists()
    refused = read_json(tasks_run / "ranker" / "train_metrics.json")
    run_stage("train", train_flags(tasks_run, "--max_steps", "2"))
    metrics = read_json(tasks_run / "ranker" / "train_metrics.json")
    assert metrics["worse_than_untrained"] and metrics["choice"]["refused"] is False and (tasks_run / "ranker" / "_COMPLETE").exists()
    assert metrics["steps"] == 2 and metrics["best"]["eval_ndcg@10"] == refused["best"]["eval_ndcg@10"]  # the same adapter, no extra step
    assert read_json(tasks_run / "ranker" / "ranker_config.json")["best_checkpoint"].endswith("checkpoint-2")
    assert "kept as allowed by allow_worse_than_untrained" in (tasks_run / "ranker" / "README.md").read_text()


def test_qlora_trains_lora_on_a_4bit_base(qlora_run):
    lora_b = [v for k, v in load_file(str(qlora_run / "ranker" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)  # LoRA B starts at 0: non-zero means real gradients


@pytest.mark.parametrize("flags, message", [
    (["--use_peft", "false"], "ulmrec trains LoRA adapters only"),
    (["--output_dir", "/tmp/x"], "checkpoints always go to"),
    (["--push_to_hub", "true"], "ulmrec push --run_dir RUN --model_repo ID"),
    (["--metric_for_best_model", "loss"], "--metric_for_best_model loss: validation reports"),
    (["--completion_only_loss", "false"], "the verbalizer evaluation reads the answer"),
    (["--eval_strategy", "no", "--load_best_model_at_end", "false"], "the checkpoint is chosen by validation NDCG@10"),
    (["--eval_strategy", "no"], "train: --load_best_model_at_end requires the save and eval strategy to match"),
])
def test_contradicting_flags_are_errors(tiny_pipeline, train_flags, flags, message):
    with pytest.raises(UlmrecError, match=message.replace("(", r"\(")):
        run_stage("train", train_flags(tiny_pipeline, *flags))


def test_4bit_without_bitsandbytes_is_an_error(tiny_pipeline, train_flags, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UlmrecError, match="--load_in_4bit true needs bitsandbytes"):
        run_stage("train", train_flags(tiny_pipeline, "--load_in_4bit", "true"))


def test_given_flags_are_honoured_and_derived_ones_recorded(tiny_pipeline):
    metrics = read_json(tiny_pipeline / "ranker" / "train_metrics.json")
    assert metrics["derived_defaults"] == {"load_in_4bit": False, "use_bnb_nested_quant": False, "dtype": "float32"}
    settings = read_json(tiny_pipeline / "ranker" / "_COMPLETE")["settings"]
    assert settings["training"]["learning_rate"] == 1e-2 and settings["model"]["lora_target_modules"] == ["q_proj", "v_proj"]
    _, _, model_args, training_args = parse_stage("train", ["--load_in_4bit", "false", "--bf16", "true", "--eval_steps", "7"])
    assert model_args.load_in_4bit is False and training_args.bf16 is True and training_args.save_steps == 7


def test_another_tokenizer_than_the_tasks_one_is_an_error(tmp_path, tasks_run, train_flags):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(read_json(tasks_run / "tasks" / "mixture.json")["model_name_or_path"], other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(UlmrecError, match="has another tokenizer than the one the tasks stage used"):
        run_stage("train", train_flags(tasks_run, "--model_name_or_path", str(other)))


def interrupt_at_step_3(tasks_run, train_flags, monkeypatch):
    """Train until the step after the checkpoint at step 2, then stop as a kill would; the real trainer is put back."""
    real = train_mod.make_trainer_class

    def interrupting():
        class Interrupted(real()):
            def training_step(self, *args, **kwargs):
                if self.state.global_step == 3:
                    raise KeyboardInterrupt
                return super().training_step(*args, **kwargs)

        return Interrupted

    monkeypatch.setattr(train_mod, "make_trainer_class", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_stage("train", train_flags(tasks_run))
    monkeypatch.setattr(train_mod, "make_trainer_class", real)


def test_an_interrupted_run_resumes_from_its_checkpoint_and_says_so(tasks_run, train_flags, monkeypatch, caplog):
    interrupt_at_step_3(tasks_run, train_flags, monkeypatch)
    assert (tasks_run / "ranker" / "checkpoints" / "checkpoint-2").exists()
    with caplog.at_level("INFO"):
        run_stage("train", train_flags(tasks_run))
    metrics = read_json(tasks_run / "ranker" / "train_metrics.json")
    assert metrics["resumed_at_step"] == 2 and metrics["resumed_from"].endswith("checkpoint-2") and metrics["steps"] == 4
    assert "resuming from" in caplog.text and "checkpoint-2 (step 2)" in caplog.text
    assert metrics["untrained"] is not None  # measured before the interruption, read back


def test_a_resume_without_the_untrained_scores_measures_them_first(tasks_run, train_flags, monkeypatch):
    interrupt_at_step_3(tasks_run, train_flags, monkeypatch)
    first = read_json(tasks_run / "ranker" / "untrained_metrics.json")
    (tasks_run / "ranker" / "untrained_metrics.json").unlink()
    run_stage("train", train_flags(tasks_run))
    metrics = read_json(tasks_run / "ranker" / "train_metrics.json")
    assert metrics["resumed_at_step"] == 2 and metrics["untrained"]["untrained_ndcg@10"] == first["untrained_ndcg@10"]
    assert metrics["worse_than_untrained"] == (metrics["best"]["eval_ndcg@10"] < first["untrained_ndcg@10"])


@pytest.mark.slow
def test_two_process_ddp_training(tasks_run, train_flags, free_port):
    accelerate = Path(sys.executable).parent / "accelerate"
    config = Path(__file__).resolve().parents[1] / "accelerate_configs" / "multi_gpu.yaml"  # DDP, as a GPU user launches it
    cmd = [str(accelerate), "launch", "--config_file", str(config), "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--main_process_port", str(free_port()), "--dynamo_backend", "no", "-m", "ulmrec_hf.cli", "train",
           *train_flags(tasks_run, "--eval_before_training", "false")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_json(tasks_run / "ranker" / "train_metrics.json")
    assert set(metrics["best"]) >= {"eval_ndcg@10", "eval_recall@10", "eval_mrr@10"} and metrics["world_size"] == 2
    assert metrics["distributed"]["type"] == "MULTI_CPU" and metrics["distributed"]["processes"] == 2  # DDP over gloo
    assert metrics["distributed"]["sharded_parameters"] == 0  # DDP replicates


def test_sharding_needs_cuda_and_qlora_storage_follows_the_sharded_dtype(monkeypatch):
    """FSDP and DeepSpeed on the CPU are refused (accelerate would train unsharded copies); QLoRA under FSDP stores the
    4-bit weights in the dtype FSDP shards, set when unset and an error when it contradicts."""
    from ulmrec_hf.ranker import quantization_config
    from ulmrec_hf.train import RankerModelConfig, RankerTrainingConfig, sharding_problems

    training = RankerTrainingConfig(use_cpu=True)
    monkeypatch.setattr(train_mod, "cuda", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert "FSDP needs CUDA" in sharding_problems(RankerModelConfig(dtype="float32", load_in_4bit=False), training, {})[0]
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert "DeepSpeed needs CUDA" in sharding_problems(RankerModelConfig(dtype="float32", load_in_4bit=False), training, {})[0]
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setattr(train_mod, "cuda", lambda: True)
    plain = RankerModelConfig(dtype="bfloat16", load_in_4bit=True)
    assert sharding_problems(plain, training, {}) == [] and plain.bnb_4bit_quant_storage is None  # no FSDP: left alone
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    derived, qlora = {}, RankerModelConfig(dtype="bfloat16", load_in_4bit=True, use_bnb_nested_quant=True)
    assert sharding_problems(qlora, training, derived) == [] and derived == {"bnb_4bit_quant_storage": "bfloat16"}
    record = train_mod.base_record(qlora)
    assert quantization_config(record["quantization"], record["dtype"], record["double_quantization"], record["quant_storage"]).bnb_4bit_quant_storage == torch.bfloat16
    wrong = RankerModelConfig(dtype="bfloat16", load_in_4bit=True, bnb_4bit_quant_storage="uint8")
    assert "must be stored as bfloat16" in sharding_problems(wrong, training, {})[0]


@pytest.mark.slow
def test_the_fsdp_config_on_cpu_processes_is_refused(tasks_run, train_flags, free_port):
    """accelerate_configs/fsdp.yaml with 2 CPU processes: accelerate would run them as unsharded DDP (MULTI_CPU), so
    train stops before training with the reason instead of reporting an FSDP run that never sharded."""
    accelerate = Path(sys.executable).parent / "accelerate"
    config = Path(__file__).resolve().parents[1] / "accelerate_configs" / "fsdp.yaml"
    cmd = [str(accelerate), "launch", "--config_file", str(config), "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", str(free_port()), "-m", "ulmrec_hf.cli", "train", *train_flags(tasks_run, "--eval_before_training", "false")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "FSDP needs CUDA" in proc.stderr and "MULTI_CPU" in proc.stderr, proc.stderr[-3000:]
    assert not (tasks_run / "ranker" / "adapter_model.safetensors").exists()


def test_lora_last_layers_limits_the_adapter(tiny_llm):
    from peft import get_peft_model

    from ulmrec_hf.llm import load_tokenizer
    from ulmrec_hf.train import RankerArguments, RankerModelConfig, build_model

    tokenizer = load_tokenizer(tiny_llm)
    args = RankerModelConfig(model_name_or_path=tiny_llm, lora_target_modules=["q_proj", "v_proj"], dtype="float32", load_in_4bit=False)
    model, peft_config, _ = build_model(args, RankerArguments(lora_last_layers=1), tokenizer, [])
    names = [n for n, p in get_peft_model(model, peft_config).named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)  # the tiny model has 2 layers
    with pytest.raises(UlmrecError, match="lora_last_layers"):
        build_model(args, RankerArguments(lora_last_layers=3), tokenizer, [])


@pytest.mark.parametrize("options", [{}, {"use_bnb_nested_quant": False}, {"bnb_4bit_quant_type": "fp4"},
                                     {"bnb_4bit_quant_storage": "bfloat16"}])
def test_training_and_scoring_build_the_same_quantisation(options):
    """The config a ranker records loads the base exactly as TRL's ModelConfig would have for training."""
    from trl import get_quantization_config

    from ulmrec_hf.ranker import quantization_config
    from ulmrec_hf.train import RankerModelConfig

    args = RankerModelConfig(dtype="bfloat16", load_in_4bit=True, **{"use_bnb_nested_quant": True, **options})
    record = train_mod.base_record(args)
    ours = quantization_config(record["quantization"], record["dtype"], record["double_quantization"], record["quant_storage"])
    assert ours.to_dict() == get_quantization_config(args).to_dict()


def test_training_loads_its_base_through_the_scoring_loader(monkeypatch, tiny_llm):
    """train.build_model and ranker.load_ranker share ranker.load_base (one place for precision, dtype and placement)."""
    from ulmrec_hf import ranker
    from ulmrec_hf.train import RankerArguments, RankerModelConfig, build_model

    calls = []

    def load_base(*args):
        calls.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(ranker, "load_base", load_base)
    args = RankerModelConfig(model_name_or_path=tiny_llm, dtype="float32", load_in_4bit=False)
    with pytest.raises(KeyboardInterrupt):
        build_model(args, RankerArguments(), [0] * 10, [])
    assert calls == [(tiny_llm, "none", "float32", None, 10, False, None, "main", "sdpa")]
