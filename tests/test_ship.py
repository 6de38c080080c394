"""The shipped train_gpt.py (train_gpt.ship_code, tools/ship_code.py): it unpacks to the readable source's
code, counts its own bytes, runs with usable tracebacks, and verify_shipped refuses anything else."""

from __future__ import annotations

import ast
import hashlib
import io
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

import train_gpt
from tools import ship_code
from _helpers import SHIPPED_CODE_LIMIT

ROOT = Path(__file__).resolve().parents[1]
READABLE = ROOT / "train_gpt.py"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    """The shipped form of this checkout's train_gpt.py, written by the generator's command line."""
    out = tmp_path_factory.mktemp("ship") / "train_gpt.py"
    assert ship_code.main(["write", str(out), "--source", str(READABLE)]) == 0
    return out


def test_shipped_is_small_deterministic_and_counted(shipped):
    data = shipped.read_bytes()
    assert len(data) <= SHIPPED_CODE_LIMIT < READABLE.stat().st_size
    assert data == train_gpt.ship_code(READABLE.read_bytes())             # same source, same bytes
    assert train_gpt.code_bytes() == len(data)                             # what a run from the readable file counts
    assert not train_gpt.code_shipped() and train_gpt.SOURCE_SHA256 == hashlib.sha256(READABLE.read_bytes()).hexdigest()


def test_verify_accepts_the_shipped_form(shipped, capsys):
    assert ship_code.verify_shipped(str(shipped), str(READABLE)) == []
    assert ship_code.main(["verify", str(shipped), "--source", str(READABLE)]) == 0
    assert capsys.readouterr().out.startswith("OK:")


def test_shipped_form_keeps_the_code_and_every_line_number():
    source = READABLE.read_bytes()
    shipped = train_gpt.shipped_form(source)
    assert ast.dump(ast.parse(shipped)) == ship_code.without_docstrings(source) != ast.dump(ast.parse(source))
    assert shipped.count(b"\n") == source.count(b"\n")
    assert not [t for t in tokenize.tokenize(io.BytesIO(shipped).readline) if t.type == tokenize.COMMENT]
    assert ast.get_docstring(ast.parse(shipped)) is None and len(shipped) < 0.8 * len(source)
    # a body that was only a docstring keeps a `pass` on the docstring's line
    small = b'class E(Exception):\n    """Doc\n    more."""\n\n\ndef f():  # note\n    """Doc."""\n    return 1\n'
    assert train_gpt.shipped_form(small) == b"class E(Exception):\n    pass\n\n\n\ndef f():\n\n    return 1\n"
    with pytest.raises(ValueError, match="shares its lines"):
        train_gpt.shipped_form(b'def f():\n    """Doc."""; return 1\n')


@pytest.mark.parametrize("data", [bytes(range(256)), b"\x001\x00\x00a\\'\r\n\x007\\\\", b""])
def test_latin1_literal_round_trips(data):
    source = b"# coding: latin-1\nX='" + train_gpt.latin1_literal(data) + b"'.encode('latin-1')\n"
    namespace = {}
    exec(compile(source, "<literal>", "exec"), namespace)
    assert namespace["X"] == data


def _wrapper_with(tmp_path: Path, source: bytes, edit=lambda w: w) -> Path:
    path = tmp_path / "train_gpt.py"
    path.write_bytes(edit(train_gpt.ship_code(source)))
    return path


def test_verify_refuses_other_code(tmp_path):
    source = READABLE.read_bytes()
    other = source.replace(b"GPTQ_BLOCK = 128", b"GPTQ_BLOCK = 64", 1)
    assert other != source
    reasons = ship_code.verify_shipped(str(_wrapper_with(tmp_path, other)), str(READABLE))
    assert any("AST differs" in r for r in reasons) and any("sha256" in r for r in reasons)


def test_verify_refuses_an_extra_statement(tmp_path):
    path = _wrapper_with(tmp_path, READABLE.read_bytes(), lambda w: w + b"import os;os.environ['X']='1'\n")
    assert ["statements differ" in r for r in ship_code.verify_shipped(str(path), str(READABLE))] == [True]


def test_verify_refuses_a_corrupt_payload(tmp_path):
    def corrupt(w: bytes) -> bytes:
        """One bit of the compressed code flipped, where neither byte is part of an escape."""
        plain = lambda b: b not in b"\\'\r\n\x000123456789"                   # noqa: E731
        i = next(i for i in range(w.index(b"lzma.decompress('") + 2000, len(w))
                 if plain(w[i - 1]) and plain(w[i]) and plain(w[i] ^ 1))
        return w[:i] + bytes([w[i] ^ 1]) + w[i + 1:]
    reasons = ship_code.verify_shipped(str(_wrapper_with(tmp_path, READABLE.read_bytes(), corrupt)), str(READABLE))
    assert len(reasons) == 1 and "does not decompress" in reasons[0]


def test_verify_refuses_shifted_lines(tmp_path):
    source = READABLE.read_bytes().replace(b"\n\n\nclass PipelineError", b"\n\nclass PipelineError", 1)
    path = tmp_path / "train_gpt.py"
    path.write_bytes(train_gpt.ship_code(source))
    reasons = ship_code.verify_shipped(str(path), str(READABLE))
    assert any("line numbers would not match" in r for r in reasons)


RUN_SHIPPED = """
import runpy, sys, traceback
g = runpy.run_path(sys.argv[1], run_name="shipped")
print(g["code_shipped"](), g["code_bytes"](), g["SOURCE_SHA256"], g["SOURCE_BYTES"], len(g["SOURCE"]))
try:
    g["quant_group"](None)
except TypeError:
    frame = traceback.extract_tb(sys.exc_info()[2])[-1]
    print(frame.filename, frame.lineno, frame.line, sep="\\n")
"""


@pytest.mark.slow
def test_the_shipped_file_runs_counts_itself_and_shows_readable_tracebacks(shipped):
    out = subprocess.run([sys.executable, "-c", RUN_SHIPPED, str(shipped)], capture_output=True, text=True,
                         timeout=300, cwd=shipped.parent)
    assert out.returncode == 0, out.stderr
    summary, filename, lineno, line = out.stdout.strip().split("\n")
    readable = READABLE.read_bytes()
    assert summary.split() == ["True", str(shipped.stat().st_size), hashlib.sha256(readable).hexdigest(),
                               str(len(readable)), str(len(train_gpt.shipped_form(readable)))]
    assert filename == train_gpt.SHIPPED_FILENAME
    readable_line = readable.decode().split("\n")[int(lineno) - 1]
    assert line == readable_line.strip() and '".mlp." in name' in line       # the readable file's line, same number
