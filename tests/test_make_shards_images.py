"""``python -m data.make_shards images`` and the converter discovery of the dispatcher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import data.converters as converters_pkg
from data.converters.images import convert_images
from data.make_shards import main
from sapiens.data.shards import build_eval_pipeline

REPO = Path(__file__).resolve().parents[1]


def gradient(h: int, w: int, shift: int = 0) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    rgb = np.stack([xs * 4 + shift, ys * 4, (xs + ys + shift) * 2], -1)
    return (rgb % 256).astype(np.uint8)


def write_image(path: Path, rgb: np.ndarray, alpha: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if alpha:
        bgr = np.concatenate([bgr, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1)
    assert cv2.imwrite(str(path), bgr)


@pytest.fixture
def image_folder(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """A nested folder with jpg / JPG / png (RGBA) / webp images and a non-image file."""
    root = tmp_path / "images"
    images = {
        "a.jpg": gradient(24, 32, 0),
        "sub/b.JPG": gradient(30, 20, 40),
        "sub/deeper/c.png": gradient(16, 16, 80),
        "d.webp": gradient(20, 28, 120),
    }
    for name, rgb in images.items():
        write_image(root / name, rgb, alpha=name.endswith(".png"))
    (root / "notes.txt").write_text("not an image")
    return root, images


def read_all(out: Path) -> list[dict]:
    return [
        {"key": k, "image": img}
        for batch in build_eval_pipeline(str(out), 1, num_workers=0)
        for k, img in zip(batch["key"], batch["image"].numpy(), strict=True)
    ]


def test_images_from_folder_roll_over_and_round_trip(image_folder, tmp_path, capsys):
    root, images = image_folder
    out = tmp_path / "shards"
    assert main(["images", "--src", str(root), "--out", str(out), "--max-count", "3"]) == 0
    assert "wrote 4 samples into 2 shards" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    samples = read_all(out)
    ordered = sorted(images, key=lambda n: str(root / n))  # keys follow sorted path order
    assert [s["key"] for s in samples] == [f"{i:09d}" for i in range(4)]
    for sample, name in zip(samples, ordered, strict=True):
        expected = images[name]
        assert sample["image"].shape == expected.shape
        error = np.abs(sample["image"].astype(int) - expected.astype(int)).mean()
        assert error < 6, f"{name}: mean abs error {error}"


def test_images_from_file_list_keep_list_order(image_folder, tmp_path):
    root, images = image_folder
    listing = tmp_path / "list.txt"
    listing.write_text(f"# chosen images\nimages/sub/deeper/c.png\n\n{root / 'a.jpg'}\n")
    summary = convert_images(listing, tmp_path / "out", progress=False)
    assert summary.samples == 2 and summary.shards == 1
    samples = read_all(tmp_path / "out")
    assert [s["image"].shape for s in samples] == [(16, 16, 3), (24, 32, 3)]


def test_bad_image_is_an_error_naming_it_or_skipped(image_folder, tmp_path, capsys):
    root, _ = image_folder
    bad = root / "sub" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff this is no jpeg")
    out = tmp_path / "out"
    assert main(["images", "--src", str(root), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "--skip-bad" in err
    assert not list(out.glob("*.tar*"))  # nothing half-written under a final name
    argv = ["images", "--src", str(root), "--out", str(out), "--skip-bad", "--no-progress"]
    assert main(argv) == 0
    assert "wrote 4 samples" in capsys.readouterr().out
    summary = convert_images(root, tmp_path / "out2", skip_bad=True, progress=False)
    assert (summary.samples, summary.skipped) == (4, 1)


def test_missing_source_and_empty_folder_are_clear_errors(tmp_path, capsys):
    assert main(["images", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["images", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no .jpg/.jpeg/.png/.webp images" in capsys.readouterr().err


def test_cli_entry_point_runs_as_module(image_folder, tmp_path):
    root, _ = image_folder
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "data.make_shards",
        "images",
        "--src",
        str(root),
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(read_all(out)) == 4


def test_dispatcher_discovers_converter_modules(tmp_path, monkeypatch, capsys):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "zz_echo.py").write_text(
        "def add_parser(subparsers):\n"
        "    p = subparsers.add_parser('echo-test')\n"
        "    p.add_argument('--word', required=True)\n"
        "    p.set_defaults(func=lambda args: print('echo', args.word))\n"
    )
    (plugin_dir / "zz_broken.py").write_text("import module_that_does_not_exist\n")
    monkeypatch.setattr(converters_pkg, "__path__", [*converters_pkg.__path__, str(plugin_dir)])
    for name in ("zz_echo", "zz_broken"):
        monkeypatch.delitem(sys.modules, f"data.converters.{name}", raising=False)
    assert main(["echo-test", "--word", "hi"]) == 0
    assert "echo hi" in capsys.readouterr().out
    assert main(["zz_broken"]) == 2
    assert "module_that_does_not_exist" in capsys.readouterr().err
    assert main(["images", "--src", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
