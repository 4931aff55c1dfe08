"""Tables a paper prints as they are: booktabs LaTeX with units in the headers, whole numbers as integers,
fractions as percent with one decimal, MACs in millions, policies by their short label, an optional bold best
per column (latex_table, export_table, which also writes the full-precision CSV), and the same layout for a
notebook (show_table). Tables come from eelab.workbench and eelab.sweep as plain DataFrames.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import EelabError

# How export_table prints a known column in LaTeX: header (with unit) and kind. pct: a fraction shown as
# percent with one decimal; mmacs: MACs in millions; ms: milliseconds, two decimals; int: whole numbers;
# one: one decimal; three: three decimals; text. Unknown columns: integers stay integers, other numbers three
# significant digits, no exponent.
_COLUMNS: dict[str, tuple[str, str]] = {
    "policy": ("policy", "text"), "grid": ("policy", "text"), "label": ("setting", "text"),
    "mode": ("mode", "text"), "guarantee": ("guarantee", "text"),
    "accuracy": ("test accuracy (%)", "pct"), "test_accuracy": ("test accuracy (%)", "pct"),
    "cal_accuracy": ("cal accuracy (%)", "pct"), "compute_saved": ("compute saved (%)", "pct"),
    "rel_macs": ("MACs / plain (%)", "pct"), "cal_rel_macs": ("cal MACs / plain (%)", "pct"),
    "rel_ms": ("latency / plain (%)", "pct"), "block_index_saving": ("block-index saving (%)", "pct"),
    "macs": ("MACs (M)", "mmacs"), "mean_macs": ("mean MACs (M)", "mmacs"), "full_macs": ("plain MACs (M)", "mmacs"),
    "mean_ms": ("mean latency (ms)", "ms"), "device_ms": ("device time (ms)", "ms"),
    "mean_device_ms": ("mean device time (ms)", "ms"),
    "effectiveness": ("effectiveness", "one"), "effectiveness_block_index": ("effectiveness, block index", "one"),
    "area": ("area (%)", "pct"), "area_macs": ("area, MACs (%)", "pct"), "area_latency": ("area, latency (%)", "pct"),
    "accuracy_at_budget": ("accuracy at budget (%)", "pct"), "accuracy_at_target": ("accuracy at target (%)", "pct"),
    "compute_saved_at_target": ("saved at target (%)", "pct"),
    "epsilon": ("epsilon (%)", "pct"), "delta": ("delta (%)", "pct"), "cal_risk": ("cal risk (%)", "pct"),
    "test_risk": ("test risk (%)", "pct"), "jump": ("jump (points)", "pct"), "lambda": ("lambda", "three"),
    "local_share": ("on device (%)", "pct"), "local_accuracy": ("device accuracy (%)", "pct"),
    "n_seeds": ("seeds", "int"), "seed": ("seed", "int"), "steps": ("steps", "int"), "epoch": ("epoch", "int"),
    "exit": ("exit", "int"), "split_after": ("split after", "int"), "count": ("count", "int"), "bin": ("bin", "int"),
    "bytes_fp32": ("fp32 (bytes)", "int"), "bytes_bf16": ("bf16 (bytes)", "int"), "bytes_int8": ("int8 (bytes)", "int"),
    "mean_bytes_fp32": ("fp32 sent (bytes)", "int"),
    "accuracy_ensembled": ("ensembled accuracy (%)", "pct"), "accuracy_change": ("accuracy change (points)", "pct"),
    "ece": ("ECE (%)", "pct"), "ece_ensembled": ("ensembled ECE (%)", "pct"),
}


def export_table(table: pd.DataFrame, name: str, folder: str | Path = "figures", caption: str | None = None,
                 best: Mapping[str, str] | None = None, float_format: str | None = None,
                 columns: Sequence[str] | None = None) -> list[Path]:
    """Write a table as folder/name.csv (full precision) and folder/name.tex (booktabs); returns the paths.

    The .tex prints known columns with units in the header (percent with one decimal, MACs in millions, ms,
    whole numbers as integers; see _COLUMNS), a mean and its _std column as "mean +- std" (std dropped when
    all NaN), NaN as "--", text LaTeX-escaped. Where a "label" column (Policy.describe) names each row's
    setting, raw parameter columns (numeric columns eelab does not know, and columns a label names as
    "name=") are left out of the .tex. best {column: "max" | "min"} sets the best value of each named column
    in bold (ties all bold, compared as printed). float_format (e.g. "{:.2f}") overrides the format of unknown
    float columns. columns: the columns the .tex keeps, in order (default: all); the CSV keeps every column.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv, tex = folder / f"{name}.csv", folder / f"{name}.tex"
    if not isinstance(table.index, pd.RangeIndex):
        table = table.reset_index()
    table.to_csv(csv, index=False)
    tex.write_text(latex_table(table, caption=caption, best=best, float_format=float_format, columns=columns))
    return [csv, tex]


def latex_table(table: pd.DataFrame, caption: str | None = None, best: Mapping[str, str] | None = None,
                float_format: str | None = None, columns: Sequence[str] | None = None) -> str:
    """The booktabs LaTeX export_table writes (same arguments): a tabular, in a table with caption if given."""
    headers, cells, aligns, bolds = _layout(table, best, float_format, columns, latex=True)
    cells = [[f"\\textbf{{{t}}}" if b else t for t, b in zip(col, flags)] for col, flags in zip(cells, bolds)]
    lines = [f"\\begin{{tabular}}{{{''.join(aligns)}}}", "\\toprule", " & ".join(headers) + " \\\\", "\\midrule"]
    lines += [" & ".join(row) + " \\\\" for row in zip(*cells)]
    lines += ["\\bottomrule", "\\end{tabular}"]
    if caption:
        lines = ["\\begin{table}", "\\centering", f"\\caption{{{_escape(caption)}}}", *lines, "\\end{table}"]
    return "\n".join(lines) + "\n"


def show_table(table: pd.DataFrame, best: Mapping[str, str] | None = None, float_format: str | None = None,
               columns: Sequence[str] | None = None) -> Any:
    """A table as a notebook shows it: the columns, units, rounding and bold best values of its LaTeX export
    (same arguments as latex_table), as a pandas Styler; the DataFrame itself keeps full precision."""
    headers, cells, aligns, bolds = _layout(table, best, float_format, columns, latex=False)
    frame = pd.DataFrame(dict(zip(range(len(headers)), cells)))
    frame.columns = headers if len(set(headers)) == len(headers) else [f"{h} ({i})" for i, h in enumerate(headers)]
    styler = frame.style.hide(axis="index")
    right = [h for h, a in zip(frame.columns, aligns) if a == "r"]
    styler = styler.set_properties(subset=right, **{"text-align": "right"})
    styler = styler.set_table_styles([{"selector": "th", "props": [("text-align", "right")]}])
    marks = pd.DataFrame({h: ["font-weight: bold" if b else "" for b in flags] for h, flags in zip(frame.columns, bolds)})
    return styler.apply(lambda _: marks, axis=None)


def _layout(table: pd.DataFrame, best: Mapping[str, str] | None, float_format: str | None,
            columns: Sequence[str] | None, latex: bool) -> tuple[list[str], list[list[str]], list[str], list[list[bool]]]:
    """(headers, cells per column, alignment per column "l"/"r", best-value flags per column) of a table as
    latex_table and show_table print it; latex: LaTeX text (escapes, $-$), else plain text (\u2212, \u00b1)."""
    if not isinstance(table.index, pd.RangeIndex):
        table = table.reset_index()
    if columns is not None:
        missing = [c for c in columns if c not in table]
        if missing:
            raise EelabError(f"columns names {missing[0]!r}, which the table lacks; it has {', '.join(map(str, table))}")
        table = table[[*columns, *(f"{c}_std" for c in columns if f"{c}_std" in table and f"{c}_std" not in columns)]]
    best = dict(best or {})
    for col, sense in best.items():
        if col not in table:
            raise EelabError(f"best names column {col!r}, which the table lacks; it has {', '.join(map(str, table))}")
        if sense not in ("max", "min"):
            raise EelabError(f"best[{col!r}] must be 'max' or 'min', got {sense!r}")
    labelled = "label" in table and table["label"].notna().any()
    named = set(re.findall(r"(\w+)=", " ".join(map(str, table["label"].dropna())))) if labelled else set()
    known = dict(_COLUMNS)
    if isinstance(table.attrs.get("budget"), (int, float)):  # summarize_policies says what it matched at
        known["accuracy_at_budget"] = (f"accuracy at {_fixed(100 * table.attrs['budget'], 0)}% MACs (%)", "pct")
    if isinstance(table.attrs.get("tolerance"), (int, float)):
        drop = _fixed(100 * table.attrs["tolerance"], 1)
        known["compute_saved_at_target"] = (f"saved at last exit $-$ {drop} pt (%)", "pct")
        known["accuracy_at_target"] = (f"accuracy at last exit $-$ {drop} pt (%)", "pct")
    headers, cells, aligns, bolds = [], [], [], []
    for col in table.columns:
        key = str(col)
        if key.endswith("_std") and key[:-4] in table:
            continue  # printed beside its mean
        values = table[col]
        header, kind = known.get(key, (key.replace("_", " "), None))
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if labelled and numeric and (kind is None or key in named) and key not in best:
            continue  # a raw parameter or fitted scalar: the label says it
        if kind is None:
            kind = "text" if not numeric else ("int" if _integral(values) else "general")
        text = [_cell(v, kind, float_format, latex) for v in values]
        std = table.get(f"{key}_std")
        if std is not None and std.notna().any() and kind not in ("text", "int"):
            pm = " $\\pm$ " if latex else " \u00b1 "
            text = [t if t == "--" or _missing(s) else f"{t}{pm}{_cell(s, kind, float_format, latex)}"
                    for t, s in zip(text, std)]
        bold = [False] * len(text)
        if key in best:
            numbers = pd.to_numeric(values, errors="coerce")
            if numbers.notna().any():
                top = numbers.max() if best[key] == "max" else numbers.min()
                shown = _cell(top, kind, float_format, latex)
                bold = [_cell(v, kind, float_format, latex) == shown for v in numbers]
        if not latex:
            headers.append(header.replace("$-$", "\u2212"))
        else:
            headers.append(_escape(header) if key not in known else header.replace("%", "\\%"))
        cells.append(text)
        aligns.append("l" if kind == "text" else "r")
        bolds.append(bold)
    return headers, cells, aligns, bolds


# ---- helpers ------------------------------------------------------------------------------------
def _cell(value: Any, kind: str, float_format: str | None = None, latex: bool = True) -> str:
    """One table cell as LaTeX text (else plain text), by column kind (see _COLUMNS)."""
    if _missing(value):
        return "--"
    if kind == "text" or isinstance(value, str):
        return _escape(str(value)) if latex else str(value)
    if not latex:
        return _cell(value, kind, float_format).replace("$-$", "\u2212")
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    v = float(value)
    if kind == "pct":
        return _fixed(100 * v, 1)
    if kind == "mmacs":
        return _fixed(v / 1e6, 1)
    if kind == "ms":
        return _fixed(v, 2)
    if kind == "one":
        return _fixed(v, 1)
    if kind == "three":
        return _fixed(v, 3)
    if not math.isfinite(v):
        return _minus("-inf") if v < 0 else "inf"
    if kind == "int" or v == int(v):
        return _minus(f"{int(round(v)):d}")
    if float_format:
        return _minus(float_format.format(v))
    return _minus(np.format_float_positional(v, precision=3, unique=True, fractional=False, trim="-"))


def _fixed(v: float, decimals: int) -> str:
    """v with exactly `decimals` decimals, never "-0.0"; a negative number with a true minus ($-$)."""
    return _minus(f"{v:.{decimals}f}")


def _minus(text: str) -> str:
    """A formatted number with LaTeX's minus sign instead of a hyphen; "-0.0" printed as "0.0"."""
    if not text.startswith("-"):
        return text
    return text[1:] if float(text.replace(",", "")) == 0 else "$-$" + text[1:]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)) or value is pd.NA


def _integral(values: pd.Series) -> bool:
    """Whether every non-missing number of a column is whole (seed 0.0, steps 200.0)."""
    numbers = pd.to_numeric(values, errors="coerce").dropna()
    return bool(len(numbers)) and bool(np.all(np.isfinite(numbers)) and np.all(numbers == np.round(numbers)))


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}


def _escape(text: str) -> str:
    """Text safe in LaTeX: its special characters escaped."""
    return "".join(_LATEX_ESCAPES.get(c, c) for c in str(text))


__all__ = ["export_table", "latex_table", "show_table"]
