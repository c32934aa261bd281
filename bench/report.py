"""Benchmark figures: value, unit, optional same-run baseline and their ratio."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Figure:
    value: float
    unit: str
    baseline: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline


@dataclass
class Report:
    name: str
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: str, value: float, unit: str, baseline: float | None = None) -> None:
        self.figures[figure] = Figure(value, unit, baseline)
        f = self.figures[figure]
        line = f"{figure:32s} {value:14.3f} {unit}"
        if baseline is not None:
            line += f"   baseline {baseline:.3f}  ratio {f.ratio:.3f}" if f.ratio is not None \
                else f"   baseline {baseline:.3f}"
        print(line, flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"# {text}", flush=True)

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.json"
        data = {"name": self.name,
                "figures": {k: {"value": f.value, "unit": f.unit, "baseline": f.baseline,
                                "ratio": f.ratio} for k, f in self.figures.items()},
                "notes": self.notes}
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path
