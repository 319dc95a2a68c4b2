"""What a reader follows for one GRPO step: the algorithm box's lines and functions, and the calls out of it.

    python tools/reading_cost.py                # this checkout
    python tools/reading_cost.py --root DIR     # another checkout (an older commit: git worktree add DIR REV)

It reads the source only (ast), runs nothing. It prints the box (train.py and grpo.py: their lines, each
function over --max_function lines, the nested functions a reader must unwind), every `module.name` the
box calls, grouped by module with that module's lines (what a reader opens to follow every call), and the
top level against tools/.
"""
import argparse
import ast
import collections
import glob
import os

BOX = ("train.py", "grpo.py")


def lines(path: str) -> int:
    with open(path) as f:
        return sum(1 for _ in f)


def functions(tree) -> list[tuple[str, int, list[str]]]:
    """(name, lines, nested function names) of every function of a module, nested ones included."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested = [n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and n is not node]
            out.append((node.name, node.end_lineno - node.lineno + 1, nested))
    return out


def calls_out(tree, modules: set[str]) -> collections.Counter:
    """How often each `module.name` of the project's modules appears, as a call or a reference."""
    found = collections.Counter()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            found[f"{node.value.id}.{node.attr}"] += 1
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--max_function", type=int, default=60)
    args = parser.parse_args(argv)
    top = sorted(glob.glob(os.path.join(args.root, "*.py")))
    modules = {os.path.basename(p)[:-3] for p in top}
    box_lines, called = 0, collections.Counter()
    for name in BOX:
        path = os.path.join(args.root, name)
        tree = ast.parse(open(path).read())
        box_lines += lines(path)
        long = [f"{f} ({n} lines)" for f, n, _ in functions(tree) if n > args.max_function]
        nested = sorted({g for _, _, inner in functions(tree) for g in inner})
        print(f"{name}: {lines(path)} lines; functions over {args.max_function} lines: {', '.join(long) or 'none'}; "
              f"nested functions: {', '.join(nested) or 'none'}")
        called += calls_out(tree, modules - {n[:-3] for n in BOX})
    print(f"the box: {box_lines} lines in {len(BOX)} files")
    by_module = collections.defaultdict(list)
    for name, count in sorted(called.items()):
        by_module[name.split(".")[0]].append(f"{name.split('.')[1]} x{count}")
    path_lines = 0
    print("calls out of the box:")
    for module, names in sorted(by_module.items()):
        n = lines(os.path.join(args.root, f"{module}.py"))
        path_lines += n
        print(f"  {module}.py ({n} lines): {', '.join(names)}")
    print(f"following every call: {len(BOX) + len(by_module)} files, {box_lines + path_lines} lines")
    tools = glob.glob(os.path.join(args.root, "tools", "*.py"))
    print(f"top level: {len(top)} .py files, {sum(map(lines, top))} lines; tools/: {len(tools)} .py files, "
          f"{sum(map(lines, tools))} lines")


if __name__ == "__main__":
    main()
