"""Small charts drawn on the server as inline SVG: no script, no styles in the markup.

Colours and sizes come from classes styled in static/charts.css, so the
console's content security policy (style-src 'self') holds. Each bar carries
its number in a <title>, which browsers show on hover and screen readers read;
the pages also list the same numbers in a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

# The drawing's own units; the SVG scales to its container's width.
WIDTH = 600
GAP = 0.2  # of each bar's slot left empty between bars


@dataclass(frozen=True)
class Bar:
    value: float
    label: str  # what the <title> says, e.g. "2025-01-31: 4 images"


def _number(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def bar_heights(values: Sequence[float], height: float) -> list[float]:
    """Each bar's height, the largest filling the chart; all zero when every value is."""
    top = max(values, default=0)
    return [value / top * height if top > 0 else 0.0 for value in values]


def column_chart(bars: Sequence[Bar], summary: str, height: int = 120,
                 name: str = "chart") -> Markup:
    """Vertical bars side by side, oldest left. A zero shows as a thin line on the baseline.

    Every bar has a transparent full-height rectangle under it, so that hovering
    a short (or zero) bar's column still shows its number.
    """
    slot = WIDTH / max(len(bars), 1)
    width = slot * (1 - GAP)
    parts = [f'<svg class="chart {escape(name)}" viewBox="0 0 {WIDTH} {height}" width="100%"'
             f' role="img" aria-label="{escape(summary)}" preserveAspectRatio="none"'
             f' data-chart="{escape(name)}" data-height="{height}">',
             f'<line class="baseline" x1="0" y1="{height}" x2="{WIDTH}" y2="{height}"/>']
    for index, (bar, tall) in enumerate(zip(bars, bar_heights([b.value for b in bars], height),
                                            strict=True)):
        x = index * slot + slot * GAP / 2
        shown = max(tall, 1.0)  # a zero is still drawn: a day without images is a fact
        kind = "bar" if bar.value > 0 else "bar zero"
        parts.append(
            f'<g class="column"><title>{escape(bar.label)}</title>'
            f'<rect class="hit" x="{_number(index * slot)}" y="0" width="{_number(slot)}"'
            f' height="{height}"/>'
            f'<rect class="{kind}" x="{_number(x)}" y="{_number(height - shown)}"'
            f' width="{_number(width)}" height="{_number(shown)}"/></g>')
    parts.append("</svg>")
    return Markup("".join(parts))


def meter(value: float, largest: float, label: str) -> Markup:
    """One horizontal bar, its length `value` out of `largest`: a row of a bar list."""
    length = bar_heights([value, largest], 100)[0] if largest > 0 else 0.0
    return Markup(
        f'<svg class="meter" viewBox="0 0 100 10" width="100%" height="12"'
        f' preserveAspectRatio="none" role="img" aria-label="{escape(label)}">'
        f'<title>{escape(label)}</title><rect class="track" x="0" y="0" width="100" height="10"/>'
        f'<rect class="bar" x="0" y="0" width="{_number(length)}" height="10"/></svg>')
