import gzip
import json
from dataclasses import dataclass, field

import pytest

from ulmrec_hf.common import UlmrecError, read_text, settings_of, text_lines


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_a_bad_byte_is_reported_on_its_own_line(tmp_path, suffix):
    lines = [json.dumps({"n": i, "text": "x" * 200}).encode() for i in range(3000)]
    lines[1499] = b'{"n": 1499, "text": "caf\xe9"}'  # latin-1, on line 1500
    path = tmp_path / f"reviews{suffix}"
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    with pytest.raises(UlmrecError, match=rf"reviews{suffix.replace('.', '[.]')}:1500: not UTF-8 text"):
        list(text_lines(path))
    (tmp_path / "whole.json").write_bytes(b'{\n"a": "ok",\n"b": "caf\xe9"\n}\n')
    with pytest.raises(UlmrecError, match=r"whole.json:3: not UTF-8 text"):
        read_text(tmp_path / "whole.json")


def test_truncated_gzip_is_one_clear_error(tmp_path):
    path = tmp_path / "cut.json.gz"
    path.write_bytes(gzip.compress(b"".join(json.dumps({"n": i}).encode() + b"\n" for i in range(5000)))[:-400])
    with pytest.raises(UlmrecError, match="corrupt or truncated file after line"):
        list(text_lines(path))


def test_settings_leave_out_operational_fields():
    @dataclass
    class Example:
        _operational = ("batch_size",)
        lr: float = 0.1
        batch_size: int = 8
        layers: list[int] = field(default_factory=lambda: [2, 3])

    assert settings_of(Example()) == {"lr": 0.1, "layers": [2, 3]}
