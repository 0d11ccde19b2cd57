import datasets
import pytest

from ulmrec_hf.common import RunArguments, UlmrecError
from ulmrec_hf.explain import ExplainArguments, main


def test_explain_generates_from_an_index(tiny_pipeline, capsys):
    index = datasets.load_from_disk(str(tiny_pipeline / "user_index" / "index"))["index"][0]
    prefix = index[: index.index(">") + 1]
    text = main(RunArguments(run_dir=str(tiny_pipeline)), ExplainArguments(index=prefix, max_new_tokens=5))
    assert isinstance(text, str) and capsys.readouterr().out.startswith(f"{prefix}: ")
    with pytest.raises(UlmrecError, match="give --index"):
        main(RunArguments(run_dir=str(tiny_pipeline)), ExplainArguments(user="nobody"))
