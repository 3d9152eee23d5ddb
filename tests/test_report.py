"""experiments.report: synthetic run folders -> measured-vs-published Markdown tables."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from experiments.report import PUBLISHED_DIR, build_report, load_table, load_tables, main


def write_run(root: Path, run_id: str, config: dict, rows: list[dict] | None) -> Path:
    """A run folder like train.py leaves: config.yaml + Lightning-CSVLogger-style metrics.csv."""
    folder = root / run_id
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if rows is not None:
        columns = sorted({k for r in rows for k in r})
        with open(folder / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)  # absent keys -> empty cells, as CSVLogger writes them
    return folder


def pose_config(model: str, **extra) -> dict:
    return {
        "task": {"name": "pose", "task_head": {"keypoint_set": "coco17"}},
        "model": {"name": model},
        "data": {"name": "synthhumans"},
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "num_nodes": 1,
            "precision": "32-true",
            "max_steps": 300,
        },
        "seed": 0,
        **extra,
    }


def table_lines(report: str, table: str) -> list[list[str]]:
    """Cells of the Markdown table rows of section ``table`` (header and divider dropped)."""
    section = report.split(f"## {table}:", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


def rows_for(report: str, table: str, row_id: str) -> list[list[str]]:
    return [cells for cells in table_lines(report, table) if cells[0].split(" ")[0] == row_id]


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    # explicit preset keys; AP peaks at step 199, AR is best at the last step
    write_run(
        root,
        "pose/explicit",
        pose_config("sapiens_0.3b", experiment_table="pose_coco17", experiment_row="sapiens_0.3b"),
        [
            {"epoch": 0, "step": 99, "train/loss": 0.9},
            {"epoch": 0, "step": 99, "val/AP": 0.5, "val/AR": 0.55},
            {"epoch": 1, "step": 199, "val/AP": 0.7, "val/AR": 0.6},
            {"epoch": 2, "step": 299, "val/AP": 0.6, "val/AR": 0.65},
        ],
    )
    # fallback matching through task.name + task.task_head.keypoint_set + model.name
    write_run(
        root,
        "pose/fallback",
        pose_config("sapiens_1b"),
        [
            {"epoch": 0, "step": 49, "val/AP": 0.25},
            {"epoch": 1, "step": 99, "val/AP": 0.125},
        ],
    )
    # depth: lower RMSE is better
    depth = pose_config("sapiens_0.3b")
    depth["task"] = {"name": "depth"}
    write_run(
        root,
        "depth/d1",
        depth,
        [
            {"step": 9, "val/rmse": 0.4},
            {"step": 19, "val/rmse": 0.3},
            {"step": 29, "val/rmse": 0.35},
        ],
    )
    write_run(
        root,
        "pose/unknown_table",
        pose_config("sapiens_0.3b", experiment_table="no_such_table"),
        [{"step": 1, "val/AP": 0.9}],
    )
    write_run(root, "pose/unfinished", pose_config("sapiens_2b"), None)
    return root


def test_values_published_numbers_and_missing_rows(runs: Path) -> None:
    tables = load_tables()
    report = build_report(runs, tables)
    coco = tables["pose_coco17"]

    (explicit,) = rows_for(report, "pose_coco17", "sapiens_0.3b")
    header = ["row"] + [c for m in coco.metrics for c in (m.name, m.name)]
    ap_pub, ap_ours = header.index("AP"), header.index("AP") + 1
    ar_ours = header.index("AR") + 1
    assert explicit[ap_pub] == f"{coco.rows[0].published['AP']:g}"
    assert explicit[ap_ours] == "70 @199"  # best of 0.5 / 0.7 / 0.6, scaled to %
    assert explicit[ar_ours] == "65 @299"
    assert "`pose/explicit`" in explicit
    assert "cpu x1 x1 node(s), 32-true" in explicit
    assert "300/300" in explicit  # steps done / planned

    (fallback,) = rows_for(report, "pose_coco17", "sapiens_1b")
    assert fallback[ap_ours] == "25 @49"
    assert "`pose/fallback`" in fallback

    # rows without a run: published number shown, measured cells say missing
    for row in coco.rows:
        if row.model in ("sapiens_0.6b", "sapiens_2b"):
            (cells,) = rows_for(report, "pose_coco17", row.id)
            assert cells[ap_pub] == f"{row.published['AP']:g}"
            assert cells[ap_ours] == "missing"
            assert "missing" in cells[len(header) :]

    (depth,) = rows_for(report, "depth_hi4d", "sapiens_0.3b")
    assert depth[2] == "0.3 @19"  # RMSE: minimum
    assert "not logged (`val/abs_rel`)" in depth

    # nothing from these runs leaks into tables of other tasks
    for name in ("seg_goliath28", "pose_goliath308", "normal_thuman2"):
        assert all("missing" in cells for cells in table_lines(report, name))


def test_unknown_table_and_unfinished_runs_are_noted(runs: Path) -> None:
    report = build_report(runs, load_tables())
    notes = report.split("## Notes", 1)[1]
    assert "`pose/unknown_table`" in notes and "no_such_table" in notes
    assert "`pose/unfinished`" in notes and "no metrics.csv" in notes
    tables_part = report.split("## Notes", 1)[0]
    assert "pose/unknown_table" not in tables_part


def test_table_filter_and_cli_output(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    assert main(["--runs", str(runs), "--out", str(out), "--table", "depth_hi4d"]) == 0
    text = out.read_text()
    assert "## depth_hi4d:" in text and "## pose_coco17:" not in text
    with pytest.raises(SystemExit):
        main(["--runs", str(runs), "--table", "nope"])


def test_every_published_table_loads_with_recipes() -> None:
    tables = load_tables(PUBLISHED_DIR)
    expected = {
        "pose_coco17",
        "pose_coco_wholebody",
        "pose_goliath308",
        "seg_goliath28",
        "depth_hi4d",
        "normal_thuman2",
        "pretrain_data_ablation",
    }
    assert expected <= set(tables)
    for table in tables.values():
        assert table.rows, table.name
        for row in table.rows:
            # Sapiens2 rows hold recipes only: the reference gives no Sapiens2 numbers (and says so).
            assert row.published or row.status == "no number in the reference", (table.name, row.id)
            recipe = table.recipe(row)
            for key in ("image_size", "gpus", "nodes"):
                assert key in recipe, (table.name, row.id, key)


def test_bad_published_file_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "table": "bad",
                "metrics": [{"name": "AP", "column": "val/AP"}],
                "rows": [{"id": "r", "model": "m", "published": {"mIoU": 1.0}}],
            }
        )
    )
    with pytest.raises(ValueError, match=r"bad\.yaml.*mIoU"):
        load_table(bad)
