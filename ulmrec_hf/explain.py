"""Explain a user index in words: the ranker generates the preference sentence it associates with an index
(the index -> preference alignment task run backwards from the training data)."""

from dataclasses import dataclass, field

from .common import RunArguments, UlmrecError
from .layout import RunDir


@dataclass
class ExplainArguments:
    _argument_group_name = "explain"
    index: str | None = field(default=None, metadata={"help": "An index string or prefix, e.g. '<a_3><b_7>'."})
    user: str | None = field(default=None, metadata={"help": "A user id whose index to explain."})
    max_new_tokens: int = field(default=48, metadata={"help": "Length of the generated preference."})


ARGUMENTS = (RunArguments, ExplainArguments)


def main(run_args: RunArguments, args: ExplainArguments) -> str:
    import torch

    from .prompts import build_builder
    from .ranker import load_ranker

    run = RunDir(run_args.run_dir)
    model, tokenizer, _ = load_ranker(run.require("train"))
    index = args.index
    if index is None:
        table = run.index_table()
        lookup = dict(zip(table["user"], table["index"])) | {str(u): i for u, i in zip(table["user_id"], table["index"])}
        if args.user not in lookup:
            raise UlmrecError("explain: give --index '<a_..>...' or a known --user")
        index = lookup[args.user]
    prompt = build_builder(tokenizer, {}, run.prompt_settings()).prompt("index_to_preference", {"user": index})
    enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"{index}: {text}")
    return text
