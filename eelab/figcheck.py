"""Does a figure print as it is? figure_problems(fig) lists what a reviewer would reject in any matplotlib
figure (text off the canvas or under 7 pt, tick labels that round or repeat, series that look alike or hide each
other, legends over data); pdf_font_types(path) lists a PDF's font types (journals reject Type 3). Used by
plots.export_figure, the export manifest and the figure tests.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from matplotlib.ticker import FixedFormatter

_MIN_FONT = 7.0  # pt: the smallest text a figure may print (checked by figure_problems)


def figure_problems(fig: Figure) -> list[str]:
    """What a reviewer would reject in a drawn figure, one line each; [] when it prints as it is.

    Draws fig (Agg) and reports: any visible text (titles, labels, tick labels, annotations, legend entries)
    whose extent leaves the canvas or is under 7 pt; tick labels of one axis that repeat, overlap each other, or
    do not print their tick value exactly ("73%" on a tick at 0.725; categorical axes are not read as numbers);
    two series in one plot area (twin axes included; labelled lines, and bar series) with the same colour,
    marker and line style (bars: colour and hatch), or told apart by colour alone with alike greys, or lying
    on the same points with the same marker (one hidden); a legend covering data (line points and segments,
    bars).
    Works on any matplotlib figure, not only eelab's.
    """
    if not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    problems: list[str] = []
    tick_texts: set[int] = set()

    def where(ax: Any) -> str:
        name = ax.get_title() or ax.get_ylabel() or ax.get_xlabel() or f"axes {fig.axes.index(ax)}"
        return f"axes '{' '.join(name.split())}'"

    def check_text(t: Text, what: str) -> None:
        box = t.get_window_extent(renderer)
        sides = [s for s, out in (("left", box.x0 < canvas.x0 - 1), ("bottom", box.y0 < canvas.y0 - 1),
                                  ("right", box.x1 > canvas.x1 + 1), ("top", box.y1 > canvas.y1 + 1)) if out]
        if sides:
            problems.append(f"{what} {_one_line(t.get_text())!r} lies outside the canvas ({', '.join(sides)})")
        if t.get_fontsize() < _MIN_FONT - 0.05:
            problems.append(f"{what} {_one_line(t.get_text())!r} is {t.get_fontsize():g} pt, under {_MIN_FONT:g} pt")

    for ax in fig.axes:
        for axis, letter in ((ax.xaxis, "x"), (ax.yaxis, "y")):
            labels = _drawn_tick_labels(axis)
            tick_texts.update(id(t) for tick in axis.get_major_ticks() for t in (tick.label1, tick.label2))
            tick_texts.update(id(t) for tick in axis.get_minor_ticks() for t in (tick.label1, tick.label2))
            if not ax.axison or not ax.get_visible() or not axis.get_visible() or not labels:  # axis("off")
                continue
            what = f"{where(ax)} {letter} tick label"
            for _, t in labels:
                check_text(t, what)
            texts = [t.get_text() for _, t in labels]
            repeated = sorted({s for s in texts if texts.count(s) > 1 and s.strip()})
            if repeated and len(set(texts)) < len(texts):
                # label1 and label2 (twin sides) of one tick repeat by design: count per side
                for side in (1, 2):
                    per = [t.get_text() for tick in axis.get_major_ticks() for t in [getattr(tick, f"label{side}")]
                           if t.get_visible() and t.get_text() and any(t is u for _, u in labels)]
                    dup = sorted({s for s in per if per.count(s) > 1})
                    if dup:
                        problems.append(f"{what}s repeat: {', '.join(dup)}")
                        break
            shown = sorted((t for _, t in labels if t.get_visible()),
                           key=lambda t: tuple(t.get_window_extent(renderer).p0))
            if any(_texts_overlap(a, b, renderer) for a, b in zip(shown, shown[1:])):
                problems.append(f"{what}s overlap each other")
            formatter = axis.get_major_formatter()
            if isinstance(formatter, FixedFormatter) or type(formatter).__name__ == "StrCategoryFormatter":
                continue  # categories: their labels are names, not values
            scale = _offset_scale(formatter)
            if scale is None:
                continue
            for loc, t in labels:
                value = _parse_number(t.get_text())
                if value is None:
                    continue
                number, percent = value
                want = loc * (100 if percent else 1)
                if abs(number * scale - want) > 1e-6 * max(1.0, abs(want)):
                    problems.append(f"{what} {t.get_text()!r} does not print its value {loc:.10g}")
    for t in fig.findobj(Text):
        if id(t) in tick_texts or not t.get_text().strip() or not _shown(t):
            continue
        check_text(t, "text")
    # texts of different axes running into each other (neighbouring panels' tick labels, titles, axis labels)
    owned = []
    for ax in fig.axes:
        if not ax.axison or not ax.get_visible():
            continue
        texts = [t for axis in (ax.xaxis, ax.yaxis) for _, t in _drawn_tick_labels(axis)]
        texts += [t for t in (ax.title, ax.xaxis.label, ax.yaxis.label) if t.get_visible() and t.get_text().strip()]
        spot = tuple(round(v, 3) for v in ax.get_position().bounds)
        owned += [(spot, t, t.get_window_extent(renderer)) for t in texts]
    for i, (spot, t, a) in enumerate(owned):
        for spot2, u, b in owned[:i]:
            if spot != spot2 and a.x1 - 1 > b.x0 and b.x1 - 1 > a.x0 and a.y1 - 1 > b.y0 and b.y1 - 1 > a.y0:
                problems.append(f"texts {_one_line(u.get_text())!r} and {_one_line(t.get_text())!r} of "
                                f"neighbouring axes overlap")
    problems += _series_problems(fig)
    problems += _legend_problems(fig, renderer)
    return list(dict.fromkeys(problems))


def pdf_font_types(path: str | Path) -> set[str]:
    """The font subtypes a PDF embeds, e.g. {"TrueType"} or {"Type0", "CIDFontType2"}; "Type3" means bitmap-like
    Type 3 fonts that journals reject. Reads the font dictionaries (matplotlib writes them uncompressed)."""
    data = Path(path).read_bytes()
    fonts = set()
    for match in re.finditer(rb"/Type\s*/Font(?:Descriptor)?\b(.{0,400}?)>>", data, re.S):
        sub = re.search(rb"/Subtype\s*/(\w+)", match.group(0))
        if sub:
            fonts.add(sub.group(1).decode())
    for match in re.finditer(rb"/Subtype\s*/(Type3|TrueType|Type1C?|Type0|CIDFontType[02]|OpenType|MMType1)\b", data):
        fonts.add(match.group(1).decode())
    return fonts


def _text_corners(t: Text, renderer: Any) -> np.ndarray:
    """The four corners [4, 2] (display pixels) of a text's own rectangle, turned by its rotation: a rotated
    label's axis-aligned extent is wider than the label, and two slanted neighbours' extents overlap where the
    labels do not."""
    box = t.get_window_extent(renderer)
    angle = t.get_rotation() % 180
    if angle % 90 == 0:
        return np.array([[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1]])
    t.set_rotation(0)  # the unturned size (the same text, font and size)
    try:
        flat = t.get_window_extent(renderer)
    finally:
        t.set_rotation(angle)
    theta = np.deg2rad(angle)
    turn = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    corners = np.array([[0, 0], [flat.width, 0], [flat.width, flat.height], [0, flat.height]]) @ turn.T
    return corners - corners.min(0) + [box.x0, box.y0]  # the turned rectangle fills the extent's corners


def _texts_overlap(a: Text, b: Text, renderer: Any, slack: float = 1.0) -> bool:
    """Whether two texts' turned rectangles overlap by more than slack pixels (separating axes: the two
    rectangles' edge directions)."""
    pa, pb = _text_corners(a, renderer), _text_corners(b, renderer)
    for poly in (pa, pb):
        for edge in (poly[1] - poly[0], poly[3] - poly[0]):
            axis = edge / (np.hypot(*edge) or 1.0)
            ra, rb = pa @ axis, pb @ axis
            if ra.max() - slack <= rb.min() or rb.max() - slack <= ra.min():
                return False
    return True


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _shown(artist: Any) -> bool:
    """Whether an artist and the axes it is drawn in are visible."""
    ax = getattr(artist, "axes", None)
    if ax is not None and (not ax.get_visible() or (not ax.axison and artist in (ax.xaxis.label, ax.yaxis.label))):
        return False
    return artist.get_visible()


def _drawn_tick_labels(axis: Any) -> list[tuple[float, Text]]:
    """(tick value, label) of each visible, non-empty major tick label of an axis within its view."""
    axis.get_majorticklabels()  # brings the labels up to date
    lo, hi = sorted(axis.get_view_interval())
    slack = 1e-9 * max(1.0, abs(hi - lo))
    out = []
    for tick in axis.get_major_ticks():
        loc = tick.get_loc()
        if not tick.get_visible() or loc is None or not (lo - slack <= loc <= hi + slack):
            continue
        for label in (tick.label1, tick.label2):
            if label.get_visible() and label.get_text().strip():
                out.append((float(loc), label))
    return out


def _parse_number(text: str) -> tuple[float, bool] | None:
    """(number, is_percent) of a tick label that is a plain number ("72.5%", "−0.2", "20,000"), else None."""
    s = text.strip().replace("\u2212", "-").replace(",", "").replace("$", "").replace("\\mathdefault{", "").rstrip("}")
    percent = s.endswith("%") or s.endswith("\\%")
    s = s.replace("\\%", "").rstrip("%").strip()
    try:
        return float(s), percent
    except ValueError:
        return None


def _offset_scale(formatter: Any) -> float | None:
    """The factor an axis' offset text multiplies its tick labels by (1 without one); None when unreadable."""
    offset = formatter.get_offset() if hasattr(formatter, "get_offset") else ""
    offset = offset.strip().replace("\u2212", "-").replace("$", "").replace("\\mathdefault", "")
    if not offset:
        return 1.0
    match = re.fullmatch(r"\\times\{?10\^\{?(-?\d+)\}?\}?\{?\}?", offset.replace(" ", ""))
    if match:
        return 10.0 ** int(match.group(1))
    match = re.fullmatch(r"1e(-?\d+)", offset)
    return 10.0 ** int(match.group(1)) if match else None


def _dashes(line: Line2D) -> Any:
    """A line's dash pattern as drawn (offset, on-off sequence), "none" for markers only."""
    if line.get_linestyle() in ("None", "none", " ", ""):
        return "none"
    pattern = getattr(line, "_unscaled_dash_pattern", None)  # matplotlib keeps no public getter
    return (pattern[0], tuple(pattern[1])) if pattern and pattern[1] else line.get_linestyle()


def _series_problems(fig: Figure) -> list[str]:
    """Within one plot area (twin axes together): series with the same colour, marker and line style (bars:
    colour and hatch); series told apart by colour alone whose greys are alike (a greyscale print merges them);
    lines on the same points with the same marker, so one hides the other."""
    areas: dict[tuple, list[tuple[str, tuple, Any]]] = {}
    for ax in fig.axes:
        spot = tuple(round(v, 3) for v in ax.get_position().bounds)
        series = areas.setdefault(spot, [])
        for line in ax.lines:
            label = str(line.get_label())
            if label.startswith("_") or not line.get_visible():
                continue
            marker = line.get_marker()
            marker = "none" if marker in (None, "None", "none", "", " ") else str(marker)
            xy = (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float), line.get_markersize())
            series.append((label, ("line", to_hex(line.get_color(), keep_alpha=True), marker, _dashes(line)), xy))
        for container in ax.containers:
            label = str(container.get_label())
            patches = [p for p in getattr(container, "patches", []) if isinstance(p, Rectangle)]
            if label.startswith("_") or not patches:
                continue
            p = patches[0]
            series.append((label, ("bar", to_hex(p.get_facecolor(), keep_alpha=True), p.get_hatch() or ""), None))
    problems = []
    for series in areas.values():
        for i, (label, key, xy) in enumerate(series):
            for other, key2, xy2 in series[:i]:
                if key == key2:
                    problems.append(f"series {other!r} and {label!r} look the same (colour, marker, line style"
                                    f"{' and hatch' if key[0] == 'bar' else ''})")
                elif key[0] == key2[0] and key[2:] == key2[2:] and abs(_grey(key[1]) - _grey(key2[1])) < 0.2:
                    problems.append(f"series {other!r} and {label!r} differ by colour alone and print as the same "
                                    f"grey; give them different markers, line styles or hatches")
                if xy is not None and xy2 is not None and key[2] == key2[2] and xy[2] == xy2[2] \
                        and xy[0].shape == xy2[0].shape and np.allclose(xy[0], xy2[0], equal_nan=True) \
                        and np.allclose(xy[1], xy2[1], equal_nan=True):
                    problems.append(f"series {other!r} and {label!r} coincide, so one hides the other; draw them "
                                    f"with different markers or merge them under a label that says they coincide")
    return problems


def _grey(color: str) -> float:
    """The grey a colour prints as in greyscale (0 black, 1 white): luma of its sRGB values."""
    from matplotlib.colors import to_rgba

    r, g, b, a = to_rgba(color)
    return (0.299 * r + 0.587 * g + 0.114 * b) * a + (1 - a)


def _legend_problems(fig: Figure, renderer: Any) -> list[str]:
    """Legends whose box covers a drawn data point, line segment or bar."""
    legends = [*fig.legends, *[ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]]
    problems = []
    for legend in legends:
        if not legend.get_visible():
            continue
        box = legend.get_window_extent(renderer).padded(-1)
        for ax in fig.axes:
            clip = ax.bbox
            hit = None
            for line in ax.lines:
                if not line.get_visible():
                    continue
                xy = np.column_stack([np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)])
                xy = xy[np.isfinite(xy).all(1)]
                if not len(xy):
                    continue
                pts = line.get_transform().transform(xy)
                if _dashes(line) != "none" and len(pts) > 1:  # the segments too, not only the vertices
                    t = np.linspace(0, 1, 25)[:, None, None]
                    pts = (pts[:-1][None] * (1 - t) + pts[1:][None] * t).reshape(-1, 2)
                inside = ((pts[:, 0] >= max(box.x0, clip.x0)) & (pts[:, 0] <= min(box.x1, clip.x1))
                          & (pts[:, 1] >= max(box.y0, clip.y0)) & (pts[:, 1] <= min(box.y1, clip.y1)))
                if inside.any():
                    hit = line.get_label()
                    break
            if hit is None:
                for patch in ax.patches:
                    if isinstance(patch, Rectangle) and patch.get_visible() and patch.get_height() and patch.get_width():
                        b = patch.get_window_extent(renderer)
                        x0, x1 = max(b.x0, box.x0, clip.x0), min(b.x1, box.x1, clip.x1)
                        y0, y1 = max(b.y0, box.y0, clip.y0), min(b.y1, box.y1, clip.y1)
                        if x1 > x0 and y1 > y0:
                            hit = patch.get_label() or "a bar"
                            break
            if hit is not None:
                problems.append(f"the legend covers data ({_one_line(str(hit)).lstrip('_') or 'a series'}) in "
                                f"axes '{_one_line(ax.get_title() or ax.get_ylabel())}'")
    return problems


__all__ = ["figure_problems", "pdf_font_types"]
