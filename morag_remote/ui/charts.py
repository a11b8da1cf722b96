"""The throughput charts as inline SVG: one line per series (claims, completions, failures) over
the buckets of :meth:`Throughput.buckets`, scaled to the largest value; drawn on the server, so the
page needs no charting library."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..throughput import KINDS, Bucket

WIDTH, HEIGHT = 600, 160
LEFT, RIGHT, TOP, BOTTOM = 36, 8, 10, 22


@dataclass(frozen=True)
class Line:
    kind: str
    points: str
    total: int


@dataclass(frozen=True)
class Chart:
    title: str
    lines: list[Line]
    peak: int
    first: datetime
    last: datetime
    step_minutes: int
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    plot_width: int = WIDTH - LEFT - RIGHT
    plot_height: int = HEIGHT - TOP - BOTTOM

    @property
    def empty(self) -> bool:
        return self.peak == 0


def chart(title: str, buckets: list[Bucket], step_minutes: int) -> Chart:
    peak = max((getattr(b, kind) for b in buckets for kind in KINDS), default=0)
    scale = max(peak, 1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    span = max(len(buckets) - 1, 1)
    lines = []
    for kind in KINDS:
        points = " ".join(
            f"{LEFT + plot_w * i / span:.1f},{TOP + plot_h - plot_h * getattr(b, kind) / scale:.1f}"
            for i, b in enumerate(buckets))
        lines.append(Line(kind, points, sum(getattr(b, kind) for b in buckets)))
    return Chart(title, lines, peak, buckets[0].start, buckets[-1].start, step_minutes)
