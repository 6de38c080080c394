"""The train_gpt.py a record ships: write it from the readable source, or check one.

    python3 tools/ship_code.py write OUT [--source train_gpt.py]     # OUT = ship_code(source), train_gpt.py's own
    python3 tools/ship_code.py verify SHIPPED [--source train_gpt.py] # the reviewer's one command: exit 0 and "OK"
    python3 tools/ship_code.py unpack SHIPPED OUT                     # the code SHIPPED runs, to read or diff

The shipped file is the self-extracting wrapper train_gpt.py's ship_code() makes (see its THE SHIPPED CODE
section): it unpacks the readable source's comment-free form and runs it. `verify_shipped` is standard
library only (no torch, no train_gpt) so the harness can call it: it parses the wrapper without running
it, checks the wrapper does nothing but unpack and run, and that what it runs has the readable source's
AST and line count and the readable source's sha256 and size.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import lzma
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The wrapper's statements with every constant blanked; a shipped file must match it exactly.
WRAPPER_TEMPLATE = ("import lzma;READABLE_SHA256='';READABLE_BYTES=0\n"
                    "SHIPPED_SOURCE=lzma.decompress(''.encode('latin-1'))\n"
                    "exec(compile(SHIPPED_SOURCE,'','exec'))\n")


def _blanked(source: bytes | str) -> str:
    """ast.dump of `source`'s tree with each constant replaced by its type's name."""
    class Blank(ast.NodeTransformer):
        def visit_Constant(self, node):
            return ast.Constant(type(node.value).__name__)
    return ast.dump(Blank().visit(ast.parse(source)))


def _constants(tree: ast.Module) -> dict:
    """READABLE_SHA256, READABLE_BYTES, the packed literal and the compile encoding/filename of a wrapper
    whose shape matches WRAPPER_TEMPLATE."""
    _, sha, size, shipped, run = tree.body
    call = shipped.value.args[0]
    return dict(sha=sha.value.value, bytes=size.value.value, packed=call.func.value.value,
                encoding=call.args[0].value, mode=run.value.args[0].args[2].value)


def without_docstrings(source: bytes) -> str:
    """ast.dump of `source` with every module, class and function docstring removed (an emptied body
    holds `pass`)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def unpack_shipped(shipped: bytes) -> tuple[bytes, dict]:
    """(the code a shipped train_gpt.py runs, its READABLE_SHA256 / READABLE_BYTES), without running it.
    Raises ValueError when the file is not exactly the wrapper ship_code writes (other statements, other
    calls) or its payload does not decompress."""
    try:
        tree = ast.parse(shipped)
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"not Python: {e}") from None
    if _blanked(shipped) != _blanked(WRAPPER_TEMPLATE):
        raise ValueError("not the wrapper ship_code writes: its statements differ from the template "
                         "(import lzma, three assignments, exec(compile(SHIPPED_SOURCE, ...)))")
    c = _constants(tree)
    if c["encoding"] != "latin-1" or c["mode"] != "exec":
        raise ValueError("not the wrapper ship_code writes: encoding or compile mode differs")
    try:
        code = lzma.decompress(c["packed"].encode("latin-1"))
    except (lzma.LZMAError, UnicodeEncodeError) as e:
        raise ValueError(f"its payload does not decompress: {e}") from None
    return code, dict(sha256=c["sha"], bytes=c["bytes"])


def verify_shipped(shipped_path: str, readable_path: str) -> list[str]:
    """Every reason the file at shipped_path is not the shipped form of the readable source at
    readable_path; [] when it is: a wrapper of exactly ship_code's shape, which unpacks to code with the
    readable source's AST (docstrings removed) and line count, and records the readable source's sha256
    and size."""
    try:
        with open(shipped_path, "rb") as f:
            shipped = f.read()
        with open(readable_path, "rb") as f:
            readable = f.read()
    except OSError as e:
        return [f"cannot read: {e}"]
    try:
        code, claimed = unpack_shipped(shipped)
    except ValueError as e:
        return [f"{shipped_path}: {e}"]
    reasons = []
    try:
        same_ast = ast.dump(ast.parse(code)) == without_docstrings(readable)
    except (SyntaxError, ValueError) as e:
        return [f"{shipped_path} or {readable_path} does not parse: {e}"]
    if not same_ast:
        reasons.append(f"{shipped_path} runs code whose AST differs from {readable_path}'s (docstrings aside)")
    lines, readable_lines = code.count(b"\n") + 1, readable.count(b"\n") + 1
    if lines != readable_lines:
        reasons.append(f"{shipped_path} runs code of {lines} lines, {readable_path} has {readable_lines}: "
                       "traceback line numbers would not match")
    digest = hashlib.sha256(readable).hexdigest()
    if claimed["sha256"] != digest or claimed["bytes"] != len(readable):
        reasons.append(f"{shipped_path} says it was made from a source of sha256 {claimed['sha256']} "
                       f"({claimed['bytes']} bytes); {readable_path} is {digest} ({len(readable)} bytes)")
    return reasons


def load_ship_code(source_path: str):
    """train_gpt.py's ship_code, imported from source_path (the generator counts what the run counts)."""
    spec = importlib.util.spec_from_file_location("train_gpt_for_shipping", source_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module.ship_code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the shipped train_gpt.py of --source to OUT (never over a file)")
    w.add_argument("out")
    v = sub.add_parser("verify", help="check SHIPPED against --source; exit 1 with the reasons if it is not its shipped form")
    v.add_argument("shipped")
    u = sub.add_parser("unpack", help="write the code SHIPPED runs to OUT")
    u.add_argument("shipped")
    u.add_argument("out")
    for p in (w, v):
        p.add_argument("--source", default=os.path.join(ROOT, "train_gpt.py"))
    args = ap.parse_args(argv)
    if args.command == "write":
        with open(args.source, "rb") as f:
            shipped = load_ship_code(args.source)(f.read())
        with open(args.out, "xb") as f:
            f.write(shipped)
        print(f"wrote {args.out}: {len(shipped)} bytes")
        return 0
    if args.command == "unpack":
        with open(args.shipped, "rb") as f:
            code, claimed = unpack_shipped(f.read())
        with open(args.out, "xb") as f:
            f.write(code)
        print(f"wrote {args.out}: {len(code)} bytes, comment-free form of a {claimed['bytes']}-byte source "
              f"of sha256 {claimed['sha256']}")
        return 0
    reasons = verify_shipped(args.shipped, args.source)
    for r in reasons:
        print(f"NOT SHIPPED FORM: {r}")
    if not reasons:
        print(f"OK: {args.shipped} ({os.path.getsize(args.shipped)} bytes) runs {args.source}'s code: the same AST "
              f"(docstrings aside), the same line numbers, its sha256 recorded")
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())
