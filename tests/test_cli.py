"""The `megapairs` command line: config errors, the corpus builder, the pipeline on a corpus."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from megapairs_ray.cli import app
from megapairs_ray.corpus import OPENCLIPART, build_corpus, svg_caption

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
needs_openclipart = pytest.mark.skipif(
    not (OPENCLIPART / "png").is_dir(),
    reason="Debian's openclipart-png/-svg are not installed (scripts/setup.sh installs them)")


def test_bad_config_field_exits_2_and_names_it():
    result = runner.invoke(app, ["config", "-c", str(ROOT / "configs" / "tiny.yaml"),
                                 "-s", "embed.batch_size=-3"])
    assert result.exit_code == 2
    assert "embed.batch_size" in result.output


def test_config_prints_defaults():
    result = runner.invoke(app, ["config", "-c", str(ROOT / "configs" / "tiny.yaml")])
    assert result.exit_code == 0, result.output
    assert "max_pixels: 89478485" in result.output


def test_unknown_stage_is_an_error():
    result = runner.invoke(app, ["run", "-c", str(ROOT / "configs" / "tiny.yaml"),
                                 "--stages", "ingest,paint"])
    assert result.exit_code == 2
    assert "paint" in result.output


def test_svg_caption(tmp_path):
    svg = tmp_path / "a.svg"
    svg.write_text('<svg><metadata><cc:Work><dc:title>Red &amp; blue kite</dc:title>'
                   "<dc:description>A kite, flying</dc:description></cc:Work></metadata></svg>")
    assert svg_caption(svg) == "Red & blue kite. A kite, flying"
    (tmp_path / "b.svg").write_text("<svg></svg>")
    assert svg_caption(tmp_path / "b.svg") is None


@needs_openclipart
def test_corpus_is_real_images_with_captions_in_webdataset_form(tmp_path):
    summary = build_corpus(tmp_path / "c", n_images=25, shard_size=10)
    assert summary["shards"] == 3
    shards = sorted((tmp_path / "c").glob("*.tar"))
    assert len(shards) == 3
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000000.json").read())
        caption = tar.extractfile("000000000.txt").read().decode()
    assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    assert "000000009.png" in names  # every tenth image stays an RGBA PNG
    assert caption and meta["caption"] == caption
    assert max(meta["width"], meta["height"]) <= 384
    # Idempotent: a second build with the same arguments does not rewrite the shards.
    mtime = shards[0].stat().st_mtime_ns
    build_corpus(tmp_path / "c", n_images=25, shard_size=10)
    assert shards[0].stat().st_mtime_ns == mtime
