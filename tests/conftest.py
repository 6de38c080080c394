"""Shared pytest set-up: import paths, markers, and the demo dataset (built once per session)."""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
for path in (REPO_ROOT, TESTS_DIR):  # `import train_gpt`, `from tools import harness`, `import _helpers`
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

DEMO_VOCAB = 512
DEMO_MAX_CHARS = 300_000


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: compiles or launches processes (tens of seconds)")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small stdlib-docstring dataset in the default data's form (tools/harness.py: CaseOps text, a tokenizer with
    the operators, the byte sidecar): dict with `dir`, `tokenizer`, `vocab` and build_demo_data's result. About 20 s to build; every test that needs shards + tokenizer shares it."""
    from tools import harness

    out_dir = tmp_path_factory.mktemp("demo_data")
    info = harness.build_demo_data(out_dir, vocab_size=DEMO_VOCAB, max_chars=DEMO_MAX_CHARS, seed=0)
    return dict(info, dir=out_dir, vocab=DEMO_VOCAB)
