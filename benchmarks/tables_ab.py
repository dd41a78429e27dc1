"""Are two calibjax source trees' numbers the same bits? The check a refactor must pass.

    python benchmarks/tables_ab.py OLD_TREE NEW_TREE WORKDIR

Runs, with each tree on PYTHONPATH, every shipped sweep under 300 runs (`calibjax run NAME --no-figures`)
and the tests' layout matrix (tests/test_engine.py: MATRIX with --dense xla, KERNEL_MATRIX with
--dense kernel, each at --chunk-size 4 and as two shards merged), then compares every parquet
table (final and per chunk) with DataFrame.equals. About 20 minutes per tree on 2 CPU cores.
0.10.0's refactor: 74 final tables (2,738,922 rows) and 205 chunk tables, 0 differ from 0.9.0.
"""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("blog", "capacity", "dataset_size", "estimators", "imbalance", "losses", "multiclass2d", "noise_floor",
           "tail_oversampling")  # fmt: skip


def matrices(work: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    import test_engine

    paths = {"matrix": work / "matrix.toml", "kmatrix": work / "kmatrix.toml"}
    paths["matrix"].write_text(test_engine.MATRIX)
    paths["kmatrix"].write_text(test_engine.KERNEL_MATRIX)
    return paths


def run_tree(tree: Path, out: Path, toml: dict[str, Path]) -> None:
    def calibjax(*args):
        cmd = [sys.executable, "-m", "calibjax", *map(str, args), "--no-figures", "--quiet"]
        r = subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True)
        if r.returncode:
            sys.exit(f"{tree}: {' '.join(map(str, args))} failed:\n{r.stderr.decode()[-2000:]}")

    for name in SHIPPED:
        calibjax("run", name, "--out", out / name)
    for name, dense in (("matrix", "xla"), ("kmatrix", "kernel")):
        calibjax("run", toml[name], "--out", out / name, "--dense", dense, "--chunk-size", 4)
        for k in (0, 1):
            calibjax("run", toml[name], "--out", out / f"{name}-sharded", "--dense", dense, "--shard", f"{k}/2")


def compare(a: Path, b: Path) -> int:
    tables = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    if tables != sorted(p.relative_to(b) for p in b.rglob("*.parquet")):
        print("the two trees wrote different sets of tables (or chunk names)")
        return 1
    bad = [rel for rel in tables if not pd.read_parquet(a / rel).equals(pd.read_parquet(b / rel))]
    final = [t for t in tables if "chunks" not in t.parts]
    rows = sum(len(pd.read_parquet(a / t)) for t in final)
    print(f"{len(final)} final tables ({rows:,} rows) and {len(tables) - len(final)} chunk tables; {len(bad)} differ")
    for rel in bad:
        print("  different:", rel)
    return 1 if bad else 0


def main() -> int:
    old, new, work = map(Path, sys.argv[1:4])
    work.mkdir(parents=True, exist_ok=True)
    toml = matrices(work)
    for label, tree in (("old", old), ("new", new)):
        run_tree(tree.resolve(), work / label, toml)
    return compare(work / "old", work / "new")


if __name__ == "__main__":
    sys.exit(main())
