import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (real data lives in ../shared/data)")
    return path


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory) -> Path:
    from ulmrec_hf.common import RunArguments
    from ulmrec_hf.demo_data import DemoDataArguments, main

    out = tmp_path_factory.mktemp("demo_raw")
    main(RunArguments(run_dir=str(out)), DemoDataArguments(demo_output=str(out)))
    return out


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_raw) -> Path:
    """A run directory with the demo data prepared."""
    from ulmrec_hf.common import RunArguments
    from ulmrec_hf.prepare import PrepareArguments, main

    run = tmp_path_factory.mktemp("demo_run")
    main(RunArguments(run_dir=str(run)), PrepareArguments(input=str(demo_raw)))
    return run
