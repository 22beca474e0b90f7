import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def text_jsonl(tmp_path_factory) -> Path:
    """Five short text-only samples (a JSONL data source for a plain language model)."""
    path = tmp_path_factory.mktemp("text") / "text.jsonl"
    lines = ["hello", "a longer sentence about shapes and colours", "x", "red circle", "blue square on grey"]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return path
