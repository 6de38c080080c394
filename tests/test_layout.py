"""train_gpt.py reads top to bottom: each banner section uses only the names its own section or an earlier
one defines (anything else it works on is passed in). A reader who reaches a function has met everything
it calls, except functions of its own section, which may come in either order.

The check is static (ast), over the module's top-level statements:
  - a section runs from its banner (a rule line `# ----...`, then `# TITLE`, its reason, a closing rule) to
    the next banner; the imports above the first banner form the PREAMBLE;
  - a module-level name is one a top-level statement binds (def, class, assignment, import, with target);
  - a statement uses the module-level names it loads (ast.Name in Load context) anywhere inside it: in
    nested functions and classes, default values, decorators and base classes too; a name the enclosing
    function, lambda or comprehension binds itself (argument, assignment, import, loop or except target)
    is its own, not a use;
  - annotations are not counted: under `from __future__ import annotations` they are never evaluated,
    and a signature may name a type its section is only handed (fit_budget's `stages: StageTimes`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "train_gpt.py"
RULE = re.compile(r"^# -{20,}$")
PREAMBLE = "PREAMBLE"
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
          ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)



def banners(lines: list[str]) -> list[tuple[int, str]]:
    """(line number, title) of every banner, in file order: a rule line with code or a blank line above
    it and its title below (a closing rule has the banner's comment above it)."""
    return [(i + 1, lines[i + 1][2:].strip()) for i in range(len(lines) - 1)
            if RULE.match(lines[i]) and lines[i + 1].startswith("# ") and not (i and lines[i - 1].startswith("#"))]


def section_of(lineno: int, found: list[tuple[int, str]]) -> str:
    return ([title for start, title in found if start <= lineno] or [PREAMBLE])[-1]


def bound_names(nodes: list[ast.AST]) -> set[str]:
    """The names these nodes bind in their own scope: a nested def or class binds its name, and what is
    inside it or inside a lambda or comprehension binds nothing here."""
    names, todo = set(), list(nodes)
    while todo:
        n = todo.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
            continue
        if isinstance(n, SCOPES):
            continue
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            names.add(n.id)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
        todo.extend(ast.iter_child_nodes(n))
    return names


def arg_names(args: ast.arguments) -> set[str]:
    every = args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]
    return {a.arg for a in every}


def loads(stmt: ast.stmt) -> set[str]:
    """The names `stmt` loads that no function, lambda or comprehension around the load binds: the
    module-level names it uses (builtins among them). Annotations are skipped."""
    found = set()

    def visit(n: ast.AST, local: frozenset) -> None:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for outer in getattr(n, "decorator_list", []) + n.args.defaults + [d for d in n.args.kw_defaults if d]:
                visit(outer, local)
            body = n.body if isinstance(n.body, list) else [n.body]
            inner = local | arg_names(n.args) | bound_names(body)
            for s in body:
                visit(s, inner)
        elif isinstance(n, ast.ClassDef):   # a class body's names are not visible in its methods
            for child in n.decorator_list + n.bases + [k.value for k in n.keywords] + n.body:
                visit(child, local)
        elif isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            inner = local | bound_names([g.target for g in n.generators])
            for child in ast.iter_child_nodes(n):
                visit(child, inner)
        elif isinstance(n, ast.AnnAssign):
            for child in (n.target, n.value):
                if child is not None:
                    visit(child, local)
        elif isinstance(n, ast.Name):
            if isinstance(n.ctx, ast.Load) and n.id not in local:
                found.add(n.id)
        elif not isinstance(n, ast.arg):
            for child in ast.iter_child_nodes(n):
                visit(child, local)

    visit(stmt, frozenset())
    return found


def layout_violations(source: str) -> list[str]:
    """'(user, its section) -> (name, its section)' for every use of a name a later section defines."""
    found = banners(source.split("\n"))
    order = [PREAMBLE] + [title for _, title in found]
    home, placed = {}, []
    for stmt in ast.parse(source).body:
        first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
        section = section_of(first, found)
        defines = bound_names([stmt])
        for name in defines:
            home.setdefault(name, section)
        placed.append((getattr(stmt, "name", None) or ", ".join(sorted(defines)) or f"line {stmt.lineno}", section, stmt))
    return [f"({user}, {section}) -> ({name}, {home[name]})"
            for user, section, stmt in placed for name in sorted(loads(stmt))
            if name in home and order.index(home[name]) > order.index(section)]


def test_banners_are_found():
    titles = [title for _, title in banners(SOURCE.read_text().split("\n"))]
    assert len(titles) == len(set(titles)) >= 10
    assert titles[0] == "CONSTANTS" and titles[-1] == "PIPELINE"     # run_pipeline may use every stage


def test_each_section_uses_only_what_stands_above_it():
    violations = layout_violations(SOURCE.read_text())
    assert not violations, f"{len(violations)} uses of a later section:\n" + "\n".join(violations)


def test_the_check_sees_a_forward_use():
    rule = "# " + "-" * 30
    source = ("import os\n\n" + rule + "\n# FIRST\n# why\n" + rule + "\n\n"
              "def f(x, y=os.sep):\n    g = 1\n    return helper(x) + g + [h for h in later()]\n\n\n"
              "class C(Base):\n    def m(self, later):\n        return later\n\n\n"
              + rule + "\n# SECOND\n# why\n" + rule + "\n\n"
              "def helper(x):\n    return later(x)\n\n\n"
              "def later(x=None):\n    return f\n\n\n"
              "def g(f):\n    return f\n\n\n"
              "Base = object\n")
    assert layout_violations(source) == ["(f, FIRST) -> (helper, SECOND)", "(f, FIRST) -> (later, SECOND)",
                                         "(C, FIRST) -> (Base, SECOND)"]
