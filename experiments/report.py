"""Measured vs published: one Markdown table per published Sapiens table.

    python -m experiments.report --runs runs/ --out report.md [--table pose_coco17 ...]

Published numbers live in ``experiments/published/<table>.yaml``::

    table: pose_coco17                  # name (= file stem)
    title: ...                          # shown as the heading
    task: pose
    source: ...                         # where the numbers come from
    notes: ...                          # optional (e.g. UNVERIFIED caveats)
    match: {task.name: pose, task.keypoint_set: coco17}   # optional fallback rule, see below
    metrics:                            # what is compared, in column order
      - {name: AP, column: val/AP, scale: 100, best: max, unit: "%", task: pose}
        # column: metrics.csv column; scale: multiply the logged value (0..1 -> %);
        # best: max | min | last; task (optional): only runs of this task.name fill it
    recipe_defaults: {...}              # full-scale recipe shared by the rows
    rows:
      - id: sapiens_0.3b                # unique in the table
        model: sapiens_0.3b             # model.name this row is about
        published: {AP: 79.6}           # metric name -> number (absent = not published)
        status: UNVERIFIED              # optional
        notes: ...                      # optional
        recipe: {...}                   # overrides recipe_defaults for this row

A run is a folder holding ``config.yaml`` (the resolved Hydra config) and ``metrics.csv``
(Lightning's CSVLogger output, with a ``step`` column), anywhere under ``--runs``
(normally ``runs/<task>/<run_name>/``). Matching a run to a (table, row):

1. explicit: the config's top-level ``experiment_table`` names the table and ``experiment_row``
   the row id (written by experiment presets); without ``experiment_row`` the row whose
   ``model`` equals ``model.name`` is taken;
2. fallback (no ``experiment_table``): every table whose ``match`` keys all equal the run's config
   values (dotted paths), and in it the row whose ``model`` equals ``model.name``.

A run matching nothing, naming an unknown table or row, or lacking ``metrics.csv`` is listed
under "Notes" and left out of the tables. The measured value of a metric is the best (``best``)
or last value of its column over the run, times ``scale``. A row without any run shows
"missing" -- nothing is ever filled in from elsewhere.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PUBLISHED_DIR = Path(__file__).resolve().parent / "published"
BEST_MODES = ("max", "min", "last")


@dataclass
class Metric:
    name: str
    column: str
    scale: float = 1.0
    best: str = "max"
    unit: str = ""
    task: str | None = None


@dataclass
class Row:
    id: str
    model: str
    published: dict[str, float]
    status: str = ""
    notes: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)  # this row's overrides only


@dataclass
class Table:
    name: str
    title: str
    task: str
    source: str
    notes: str
    match: dict[str, Any]
    metrics: list[Metric]
    rows: list[Row]
    path: Path
    recipe_defaults: dict[str, Any] = field(default_factory=dict)

    def recipe(self, row: Row) -> dict[str, Any]:
        """The full-scale recipe of ``row``: the table defaults updated by the row's keys."""
        return {**self.recipe_defaults, **row.recipe}


@dataclass
class Run:
    id: str
    path: Path
    config: dict[str, Any]
    series: dict[str, list[tuple[int, float]]]  # column -> [(step, value)] in file order


def _need(data: dict, key: str, path: Path, where: str = "") -> Any:
    if key not in data:
        raise ValueError(f"{path}: missing key '{where}{key}'")
    return data[key]


def load_table(path: Path) -> Table:
    """Read and validate one published-table YAML (schema in the module docstring)."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    metrics = []
    for i, raw in enumerate(_need(data, "metrics", path)):
        where = f"metrics[{i}]."
        m = Metric(
            name=str(_need(raw, "name", path, where)),
            column=str(_need(raw, "column", path, where)),
            scale=float(raw.get("scale", 1.0)),
            best=str(raw.get("best", "max")),
            unit=str(raw.get("unit", "")),
            task=raw.get("task"),
        )
        if m.best not in BEST_MODES:
            raise ValueError(f"{path}: {where}best must be one of {BEST_MODES}, got {m.best!r}")
        metrics.append(m)
    names = {m.name for m in metrics}
    rows, ids = [], set()
    for i, raw in enumerate(_need(data, "rows", path)):
        where = f"rows[{i}]."
        row = Row(
            id=str(_need(raw, "id", path, where)),
            model=str(_need(raw, "model", path, where)),
            published=dict(raw.get("published") or {}),
            status=str(raw.get("status", "")),
            notes=str(raw.get("notes", "")),
            recipe=dict(raw.get("recipe") or {}),
        )
        unknown = set(row.published) - names
        if unknown:
            raise ValueError(
                f"{path}: {where}published has metrics {sorted(unknown)} that are "
                f"not in 'metrics' ({sorted(names)})"
            )
        if row.id in ids:
            raise ValueError(f"{path}: row id {row.id!r} appears twice")
        ids.add(row.id)
        rows.append(row)
    return Table(
        name=str(data.get("table", path.stem)),
        title=str(data.get("title", path.stem)),
        task=str(data.get("task", "")),
        source=str(data.get("source", "")),
        notes=str(data.get("notes", "")),
        match=dict(data.get("match") or {}),
        metrics=metrics,
        rows=rows,
        path=path,
        recipe_defaults=dict(data.get("recipe_defaults") or {}),
    )


def load_tables(directory: Path = PUBLISHED_DIR) -> dict[str, Table]:
    """Every ``*.yaml`` of ``directory`` as a :class:`Table`, by name."""
    paths = sorted(Path(directory).glob("*.yaml"))
    if not paths:
        raise FileNotFoundError(f"no published tables (*.yaml) in {directory}")
    return {t.name: t for t in map(load_table, paths)}


def config_value(config: dict, dotted: str) -> Any:
    """``config_value(cfg, "task.name")``; None when any part is absent."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """CSVLogger file -> column -> [(step, value)] for the non-empty, numeric cells."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{path}: no 'step' column (not a Lightning CSVLogger file?)")
        for line in reader:
            try:
                step = int(float(line["step"]))
            except (TypeError, ValueError):
                continue
            for column, cell in line.items():
                if column == "step" or cell in (None, ""):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(value):
                    series.setdefault(column, []).append((step, value))
    return series


def find_runs(root: Path, notes: list[str]) -> list[Run]:
    """Every folder under ``root`` with a ``config.yaml``; problems are appended to ``notes``."""
    runs = []
    for cfg_path in sorted(Path(root).rglob("config.yaml")):
        folder = cfg_path.parent
        if any(p.name == ".hydra" for p in folder.parents) or folder.name == ".hydra":
            continue  # Hydra's own copy of the unresolved config
        run_id = str(folder.relative_to(root))
        metrics = folder / "metrics.csv"
        if not metrics.is_file():
            found = sorted(folder.rglob("metrics.csv"))
            if not found:
                notes.append(f"`{run_id}`: no metrics.csv (unfinished or not logged); ignored")
                continue
            metrics = found[0]
        try:
            config = yaml.safe_load(cfg_path.read_text()) or {}
            series = read_metrics_csv(metrics)
        except (yaml.YAMLError, ValueError, OSError) as err:
            notes.append(f"`{run_id}`: unreadable ({err}); ignored")
            continue
        runs.append(Run(run_id, folder, config, series))
    return runs


def match_run(run: Run, tables: dict[str, Table], notes: list[str]) -> list[tuple[Table, Row]]:
    """The (table, row) pairs a run reports on (rules in the module docstring)."""
    model = config_value(run.config, "model.name")
    explicit = run.config.get("experiment_table")
    if explicit is not None:
        table = tables.get(str(explicit))
        if table is None:
            notes.append(
                f"`{run.id}`: experiment_table {explicit!r} is not a published table "
                f"({', '.join(sorted(tables))}); ignored"
            )
            return []
        wanted = run.config.get("experiment_row")
        key, value = ("id", str(wanted)) if wanted is not None else ("model", str(model))
        row = next((r for r in table.rows if getattr(r, key) == value), None)
        if row is None:
            notes.append(f"`{run.id}`: table {table.name} has no row with {key} {value!r}; ignored")
            return []
        return [(table, row)]
    pairs = []
    for table in tables.values():
        if not table.match:
            continue
        if all(config_value(run.config, k) == v for k, v in table.match.items()):
            row = next((r for r in table.rows if r.model == model), None)
            if row is not None:
                pairs.append((table, row))
    if not pairs:
        notes.append(
            f"`{run.id}`: matches no published row (task.name="
            f"{config_value(run.config, 'task.name')!r}, model.name={model!r}, no "
            "experiment_table); ignored"
        )
    return pairs


def measured(run: Run, metric: Metric) -> str:
    """Formatted measured value of ``metric`` in ``run`` (with the step it was reached at)."""
    task = config_value(run.config, "task.name")
    if metric.task is not None and task != metric.task:
        return "—"
    points = run.series.get(metric.column)
    if not points:
        return f"not logged (`{metric.column}`)"
    if metric.best == "last":
        step, value = points[-1]
    else:
        pick = max if metric.best == "max" else min
        step, value = pick(points, key=lambda p: p[1])
    return f"{value * metric.scale:.4g} @{step}"


def _steps(run: Run) -> str:
    if run.config.get("mode") == "validate":  # python train.py ... mode=validate
        init = config_value(run.config, "task.init_from")
        return f"validate only ({Path(str(init)).name})"
    last = max((s for pts in run.series.values() for s, _ in pts), default=None)
    planned = config_value(run.config, "trainer.max_steps")
    done = "?" if last is None else str(last + 1)  # Lightning logs 0-based steps
    return f"{done}/{planned}" if planned not in (None, -1) else done


def _hardware(run: Run) -> str:
    t = run.config.get("trainer") or {}
    return (
        f"{t.get('accelerator', '?')} x{t.get('devices', '?')} x{t.get('num_nodes', 1)} "
        f"node(s), {t.get('precision', '?')}"
    )


def _data(run: Run) -> str:
    name = config_value(run.config, "data.name")
    return str(name) if name is not None else "?"


def _recipe(recipe: dict[str, Any]) -> str:
    parts = []
    for key, value in recipe.items():
        if isinstance(value, list):
            value = "x".join(str(v) for v in value)
        parts.append(f"{key}: {value}")
    return "; ".join(parts)


def render_table(table: Table, runs_by_row: dict[str, list[Run]]) -> str:
    """Markdown section for one published table."""
    metric_head = []
    for m in table.metrics:
        unit = f" ({m.unit})" if m.unit else ""
        metric_head += [f"{m.name}{unit} published", f"{m.name} ours"]
    header = ["row", *metric_head, "run", "data", "steps", "hardware"]
    lines = [f"## {table.name}: {table.title}", "", f"Source: {table.source}"]
    if table.notes:
        lines += ["", f"Notes: {table.notes}"]
    lines += [
        "",
        "Measured values: best (`best: max|min`) or last value of the metrics.csv column "
        "times `scale`, `@step` where it was reached; `—` = not this run's task.",
        "",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        label = row.id + (f" ({row.status})" if row.status else "")
        runs = runs_by_row.get(row.id, [])
        for run in runs or [None]:
            cells = [label]
            for m in table.metrics:
                pub = row.published.get(m.name)
                cells.append("—" if pub is None else f"{pub:g}")
                cells.append("missing" if run is None else measured(run, m))
            if run is None:
                cells += ["missing", "", "", ""]
            else:
                cells += [f"`{run.id}`", _data(run), _steps(run), _hardware(run)]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Full-scale recipe (every row): {_recipe(table.recipe_defaults)}.",
        "",
        "Per row (overrides and notes):",
        "",
    ]
    for row in table.rows:
        text = "; ".join(t for t in (_recipe(row.recipe), row.notes) if t)
        lines.append(f"- {row.id}: {text or 'as above'}")
    return "\n".join(lines)


def build_report(runs_dir: Path, tables: dict[str, Table], only: list[str] | None = None) -> str:
    """The whole Markdown report for the runs under ``runs_dir``."""
    notes: list[str] = []
    runs = find_runs(runs_dir, notes) if Path(runs_dir).is_dir() else []
    if not Path(runs_dir).is_dir():
        notes.append(f"runs folder {runs_dir} does not exist; every row is missing")
    by_table: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        for table, row in match_run(run, tables, notes):
            by_table.setdefault(table.name, {}).setdefault(row.id, []).append(run)
    selected = only or list(tables)
    sections = [render_table(tables[name], by_table.get(name, {})) for name in selected]
    head = [f"# Measured vs published ({len(runs)} run(s) found under `{runs_dir}`)", "", ""]
    tail = ["", "## Notes", ""] + ([f"- {n}" for n in notes] or ["- none"])
    return "\n".join(head) + "\n\n".join(sections) + "\n" + "\n".join(tail) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder of run folders")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file (default: stdout)")
    parser.add_argument("--table", nargs="+", default=None, help="only these published tables")
    parser.add_argument(
        "--published", type=Path, default=PUBLISHED_DIR, help="folder of published-table YAMLs"
    )
    args = parser.parse_args(argv)
    try:
        tables = load_tables(args.published)
    except (FileNotFoundError, ValueError, yaml.YAMLError) as err:
        parser.exit(2, f"error: {err}\n")
    unknown = [t for t in args.table or [] if t not in tables]
    if unknown:
        parser.exit(2, f"error: unknown table(s) {unknown}; available: {sorted(tables)}\n")
    text = build_report(args.runs, tables, args.table)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
