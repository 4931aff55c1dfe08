"""The README results section from a cal/test pair of exit records, as markdown: per-exit accuracy and cost, and
every policy at matched accuracy (fitted on cal, reported on test) with its compute saved in MACs and in the
exit-index measure, beside what the published systems report (theirs, on the original CIFAR-10).

Run: python benchmarks/results_table.py CAL TEST [--tolerance 0.01] [--headline 0.005] [--policies threshold,...]
                                                 [--cache runs/fitted]
e.g. python benchmarks/results_table.py checkpoints/ee_cnn-cifar10-jpeg/{cal,test}.pt
"""
from __future__ import annotations

import argparse
import math

import pandas as pd

from eelab import POLICIES, load_record, workbench
from eelab.sweep import precompute_grids


def pct(value: float, signed: bool = False, digits: int = 1) -> str:
    """A fraction as a percentage, '-' where undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:+.{digits}f}%" if signed else f"{100 * value:.{digits}f}%"


def markdown(table: pd.DataFrame) -> str:
    """A DataFrame of strings as a markdown table (numbers right-aligned)."""
    head = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(table.columns))) + "|"
    return "\n".join([head, rule] + ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cal", help="cal exit record (policies are fitted and operating points chosen here)")
    parser.add_argument("test", help="test exit record (every reported figure comes from here)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="matched accuracy: the last exit's cal accuracy minus this (default 0.01)")
    parser.add_argument("--headline", type=float, default=0.005,
                        help="the reference's headline: a max-prob threshold fitted on cal to stay within this of "
                             "the last exit's cal accuracy, against the oracle at equal accuracy (default 0.005)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated families (default: all)")
    parser.add_argument("--cache", help="folder of fitted policies to reuse (e.g. runs/fitted, as notebook 04)")
    args = parser.parse_args()
    cal, test = load_record(args.cal), load_record(args.test)
    names = [name.strip() for name in args.policies.split(",") if name.strip()]
    grids = precompute_grids(names, cal, test, cache=args.cache)
    target = workbench.target_accuracy(cal, args.tolerance)
    matched = workbench.operating_points(grids, accuracy=target)
    exits = workbench.exit_table(cal, test)
    theirs = workbench.PUBLISHED["early-exit-cnn"]
    # the published system whose per-exit figures sit beside this model's (airbench94 beside ee_airnet)
    beside = workbench.PUBLISHED["airbench94" if test.meta.get("model") == "ee_airnet" else "early-exit-cnn"]
    beside_name = "airbench94" if beside is not theirs else "early-exit-cnn"
    ceed = workbench.PUBLISHED["ceed-eenn"]
    meta = test.meta

    print(f"### Results on {meta.get('dataset', 'the test record')}\n")
    print(f"{meta.get('model', 'model')} checkpoint `{str(meta.get('checkpoint_sha256', ''))[:12]}`, "
          f"{test.n:,} test and {cal.n:,} cal images of **{meta.get('dataset', '?')}** (the JPEG copy of CIFAR-10 "
          f"where that is the dataset: close to, not the same as, the original). Policies are fitted and operating "
          f"points chosen on cal; every figure below is on test. MACs are counted with `torch.utils.flop_counter` "
          f"on the real input, heads included; the plain network is the same backbone with only its last head "
          f"({test.full_cost / 1e6:.1f} M MACs).\n")
    print("**Per exit**\n")
    per_exit = pd.DataFrame({
        "exit": exits["exit"],
        "MACs": [f"{m / 1e6:.1f} M" for m in exits["macs"]],
        "MACs / plain": [pct(r) for r in exits["rel_macs"]],
        "cal accuracy": [pct(a) for a in exits["cal_accuracy"]],
        "test accuracy": [pct(a) for a in exits["test_accuracy"]],
        f"{beside_name}, theirs (CIFAR-10)": [pct(a) for a in beside["exit_accuracy"][:len(exits)]]
        + ["-"] * max(0, len(exits) - len(beside["exit_accuracy"])),
    })
    print(markdown(per_exit) + "\n")
    if "threshold" in grids:
        row = workbench.matched_point(grids["threshold"], accuracy=workbench.target_accuracy(cal, args.headline))
        if row is None:
            print(f"**Headline**: no max-prob threshold stays within {100 * args.headline:g} points of the last "
                  "exit on cal.\n")
        else:
            head = workbench.against_oracle(grids["threshold"], row)
            print(f"**Headline**: the max-prob threshold fitted on cal to stay within {100 * args.headline:g} "
                  f"points of the last exit's cal accuracy (`{grids['threshold'].table.at[row, 'label']}`) reaches "
                  f"{pct(head['accuracy'], digits=2)} on test (last exit {pct(exits['test_accuracy'].iloc[-1], digits=2)}) "
                  f"and saves **{pct(head['compute_saved'])}** of the plain network's MACs; the oracle frontier at "
                  f"the same test accuracy saves {pct(head['oracle_compute_saved'])}, so the threshold reaches "
                  f"{pct(head['oracle_share'])} of the oracle's saving.\n")
    print(f"**Each policy at matched accuracy**: its cheapest grid point whose cal accuracy is at least the last "
          f"exit's cal accuracy minus {100 * args.tolerance:g} percentage point{'' if args.tolerance == 0.01 else 's'} "
          f"({pct(target, digits=2)}). Compute saved is shown in "
          f"MACs (1 - mean MACs / plain network's) and in the early-exit-cnn project's exit-index measure "
          f"(1 - mean (exit + 1) / K), which ignores what the heads cost and that blocks differ in cost; "
          f"effectiveness = 100 x accuracy x saving in each measure.\n")
    rows = pd.DataFrame({
        "policy": matched["policy"],
        "operating point (fitted on cal)": [f"`{label}`" if isinstance(label, str) else "none reaches it"
                                            for label in matched["label"]],
        "test accuracy": [pct(a, digits=2) for a in matched["accuracy"]],
        "saved, MACs": [pct(s, signed=True) for s in matched["compute_saved"]],
        "saved, exit index": [pct(s, signed=True) for s in matched["block_index_saving"]],
        "effectiveness, MACs": [f"{e:.2f}" if e == e else "-" for e in matched["effectiveness"]],
        "effectiveness, exit index": [f"{e:.2f}" if e == e else "-" for e in matched["effectiveness_block_index"]],
    })
    print(markdown(rows) + "\n")
    print("The oracle reads the labels (each image at its earliest right exit): a bound, not a deployable policy.\n")
    print("**What the published systems report** (theirs, on the original CIFAR-10, not re-run here):\n")
    published = pd.DataFrame([
        {"system": theirs["source"], "accuracy": pct(theirs["accuracy"], digits=2),
         "saved, exit index": f"{100 * theirs['block_index_saving']:.1f}% (their \"compute saved\")",
         "saved, MACs or time": "not reported", "effectiveness": f"{theirs['effectiveness_block_index']:.2f} (exit index)"},
        *([{"system": beside["source"], "accuracy": f"{pct(beside['accuracy'], digits=2)} (with flip test-time "
                                                     f"augmentation: {pct(beside['tta_accuracy'], digits=2)})",
            "saved, exit index": "one exit", "saved, MACs or time": f"{beside['macs'] / 1e6:.0f} M MACs",
            "effectiveness": "-"}] if beside is not theirs else []),
        {"system": ceed["source"], "accuracy": f"{pct(ceed['accuracy'], digits=2)} (plain ResNet-50: "
                                               f"{pct(ceed['plain_accuracy'], digits=2)})",
         "saved, exit index": "not reported",
         "saved, MACs or time": f"{ceed['ms']} ms against {ceed['plain_ms']} ms: "
                                f"{pct(1 - ceed['ms'] / ceed['plain_ms'])} of the time saved",
         "effectiveness": "-"},
    ])
    print(markdown(published))
    print(f"\n_Generated by `python benchmarks/results_table.py {args.cal} {args.test}"
          f"{f' --tolerance {args.tolerance:g}' if args.tolerance != 0.01 else ''}"
          f"{f' --headline {args.headline:g}' if args.headline != 0.005 else ''}`._")


if __name__ == "__main__":
    main()
