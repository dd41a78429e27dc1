"""The numbers the README quotes for the study's three claims, from a results directory's tables.

python benchmarks/blog_numbers.py [results/blog]
"""

import sys

import pandas as pd

STUDY_STEPS = {"example1": [10, 50, 100], "example2": [10, 100, 1000], "example3": [100, 1000, 10000, 50000]}


def main(out: str = "results/blog") -> None:
    runs = pd.read_parquet(f"{out}/runs.parquet")[["run_id", "case"]]
    m = pd.read_parquet(f"{out}/metrics.parquet").merge(runs)
    d = pd.read_parquet(f"{out}/density.parquet").merge(runs)
    for case, steps in STUDY_STEPS.items():
        for s in steps:
            x = m[(m.case == case) & (m.step == s)]
            print(
                f"{case} step {s}: kl {x.kl.median():.2g} [{x.kl.quantile(0.25):.2g}, {x.kl.quantile(0.75):.2g}]"
                f"  max_err {x.max_err.median():.3f}  err_dense {x.err_dense.median():.3f}"
                f"  err_sparse {x.err_sparse.median():.3f}  accuracy {x.accuracy.median():.4f}"
                f" / Bayes {x.bayes_accuracy.median():.4f}  ece {x.ece.median():.4f}"
                f"  true_ece {x.true_ece.median():.4f}"
            )
    x = d[(d.case == "example3") & d.step.isin(STUDY_STEPS["example3"])]
    table = (
        x.groupby(["log10_density_lo", "log10_density_hi", "step"])
        .agg(mass=("mass", "median"), max_err=("max_err", "median"))
        .unstack("step")
    )
    print("example3, median over seeds, by log10 p(x) bin:")
    print(table.to_string(float_format=lambda v: f"{v:.2g}"))


if __name__ == "__main__":
    main(*sys.argv[1:])
