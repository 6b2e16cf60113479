"""The suite's record: every figure with its unit and command, as JSON and
Markdown, rewritten whenever a part adds to it.

A `Report` holds the run's header (the command, the budget, the devices'
environment) and one `Part` per part of the suite. A part holds `Row`s
(labels such as method and batch, figures, and the command that reproduces
them), the items it skipped and why, and notes. `Report.write()` writes
`suite.json` and `suite.md` into the output directory, each file whole or
not at all (written aside, then renamed), so a run cut off at any moment
leaves the figures it measured until then.

Units come from the figures' names (`unit`), so that a new figure without
a known unit fails loudly instead of being recorded without one.
"""

import dataclasses
import datetime
import json
import math
from typing import Any, Callable, Sequence

import jax
from etils import epath

JSON_FILE = "suite.json"
MARKDOWN_FILE = "suite.md"

# Units of figures whose names the suffix rules below do not cover.
_UNITS = {
    "mfu": "fraction of the measured peak",
    "flops_per_step": "FLOP per device",
    "backbone_flops_per_step": "FLOP per device",
    "images_per_s_per_device": "samples/s per device",
    "samples_per_s": "samples/s",
    "peak_matmul_size": "matrix side",
    "per_device_batch": "samples per device",
    "epochs": "epochs",
    "steps_per_epoch": "steps",
    "devices": "devices",
    "local_devices": "devices",
    "processes": "processes",
    "step_s_min": "s",
    "step_s_max": "s",
    "cores": "host cores",
    "usable_cores": "host cores",
    "cores_needed": "host cores",
    "jpegs": "files",
}
# (suffix, unit), first match wins.
_SUFFIX_UNITS = (
    ("_bytes", "bytes"),
    ("_flops_per_s", "FLOP/s"),
    ("_hours", "h"),
    ("_per_s_per_core", "samples/s per core"),
    ("_per_cpu_s", "samples per CPU-second"),
    ("_per_s", "samples/s"),
    ("_ratio", "ratio"),
    ("_ratio_paired", "ratio"),
    ("_top1", "fraction correct"),
    ("_s", "s"),
)


def unit(name: str) -> str:
  """The unit of the figure called `name`.

  Raises:
    ValueError: a name no rule covers (give it a unit here).
  """
  if name in _UNITS:
    return _UNITS[name]
  for suffix, text in _SUFFIX_UNITS:
    if name.endswith(suffix):
      return text
  raise ValueError(f"The figure {name!r} has no unit: add one to "
                   "detco_jax/benchmark/report.py.")


@dataclasses.dataclass
class Row:
  """One measured item of a part.

  Attributes:
    labels: what was measured, e.g. {"method": "DetCo", "dtype":
      "bfloat16", "per_device_batch": 64}.
    figures: name -> value (finite numbers only; see `Part.add`).
    command: the command that measures the same figures on its own.
  """
  labels: dict[str, Any]
  figures: dict[str, float]
  command: str

  def to_json(self) -> dict[str, Any]:
    return {"labels": self.labels, "command": self.command,
            "figures": {k: {"value": v, "unit": unit(k)}
                        for k, v in self.figures.items()}}


@dataclasses.dataclass
class Part:
  """One part of the suite and what it measured so far.

  Attributes:
    name: its key, e.g. "train_step".
    title: its heading in suite.md.
    box_s: the seconds it was given.
    status: "pending", "running", "done", "failed" (an error stopped it;
      `error` says which) or "not run" (not asked for, or no time left).
    elapsed_s: seconds it ran.
    rows: its measured items.
    skipped: {"item", "reason"} for each item it left out.
    notes: lines printed under its table.
    error: the error that stopped it, if any.
  """
  name: str
  title: str
  box_s: float = 0.0
  status: str = "pending"
  elapsed_s: float = 0.0
  rows: list[Row] = dataclasses.field(default_factory=list)
  skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  error: str | None = None

  def add(self, labels: dict[str, Any], figures: dict[str, Any],
          command: str) -> Row:
    """Adds a row; figures that are None or not finite are left out.

    A figure left out is named in the part's notes, so that a missing
    value is visible rather than silently absent.
    """
    kept = {}
    for name, value in figures.items():
      if value is None or not math.isfinite(float(value)):
        self.notes.append(f"{_describe(labels)}: {name} not measured "
                          f"({value}).")
      else:
        unit(name)  # Every recorded figure has a unit.
        kept[name] = float(value)
    row = Row(dict(labels), kept, command)
    self.rows.append(row)
    return row

  def skip(self, item: str, reason: str) -> None:
    """Records an item left out and why."""
    self.skipped.append({"item": item, "reason": reason})

  def to_json(self) -> dict[str, Any]:
    return {"title": self.title, "status": self.status,
            "box_s": self.box_s, "elapsed_s": self.elapsed_s,
            "rows": [r.to_json() for r in self.rows],
            "skipped": self.skipped, "notes": self.notes,
            "error": self.error}


def _describe(labels: dict[str, Any]) -> str:
  return ", ".join(f"{k} {v}" for k, v in labels.items()) or "the part"


class Report:
  """The suite's record and its two files.

  Attributes:
    out: the output directory (local or gs://).
    header: run-level facts: command, start, budget, environment.
    parts: name -> Part, in the suite's order.
    renderers: name -> `renderer(part) -> Markdown lines` of its table.
  """

  def __init__(self, out: str, header: dict[str, Any],
               parts: Sequence[Part],
               renderers: dict[str, Callable[[Part], list[str]]]):
    self.out = out
    self.header = header
    self.parts = {p.name: p for p in parts}
    self.renderers = renderers

  def to_json(self) -> dict[str, Any]:
    return {"suite": self.header,
            "parts": {name: p.to_json() for name, p in self.parts.items()}}

  def markdown(self) -> str:
    """suite.md: the header, then each part's table, skips and notes."""
    h = self.header
    lines = [f"# detco_jax suite: {h.get('device_line', 'devices')}", "",
             f"- date: {h.get('started', '?')}; finished: "
             f"{h.get('finished', False)}; elapsed {h.get('elapsed_s', 0):.0f}"
             f" s of a {h.get('budget_s', 0):.0f} s budget",
             f"- command: `{h.get('command', '?')}`",
             f"- versions: {h.get('versions_line', '?')}",
             f"- XLA_FLAGS: `{h.get('environment', {}).get('XLA_FLAGS', '')}`"]
    for line in h.get("header_notes", []):
      lines.append(f"- {line}")
    for part in self.parts.values():
      lines += ["", f"## {part.title}", "",
                f"Status: {part.status}; {part.elapsed_s:.0f} s of a "
                f"{part.box_s:.0f} s box."]
      if part.error:
        lines.append(f"Error: `{part.error}`")
      if part.rows:
        lines += [""] + self.renderers[part.name](part)
      if part.skipped:
        lines += ["", "Left out:"]
        lines += [f"- {s['item']}: {s['reason']}" for s in part.skipped]
      if part.notes:
        lines += [""] + [f"- {n}" for n in part.notes]
      if part.rows:
        lines += ["", "Commands (each measures its row alone):", ""]
        lines += [f"    {c}" for c in dict.fromkeys(r.command
                                                    for r in part.rows)]
    return "\n".join(lines) + "\n"

  def write(self) -> None:
    """Writes suite.json and suite.md whole (process 0 only)."""
    if jax.process_index() != 0:
      return
    out = epath.Path(self.out)
    out.mkdir(parents=True, exist_ok=True)
    self.header["written"] = now()
    for name, text in ((JSON_FILE, json.dumps(self.to_json(), indent=2)),
                       (MARKDOWN_FILE, self.markdown())):
      aside = out / f".{name}.partial"
      aside.write_text(text)
      aside.replace(out / name)


def now() -> str:
  """The time, ISO 8601 in UTC to the second."""
  return datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y-%m-%dT%H:%M:%SZ")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  """A Markdown table; floats with 3 significant digits, None as '-'."""
  def cell(v):
    if v is None:
      return "-"
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return lines
