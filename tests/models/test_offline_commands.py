"""The offline commands as a user runs them: `python -m models eval` and then `python -m export`
(no --strategy) on the bundled sample, each as a subprocess from the repo root, the way the
README and the Makefile (`make eval`, `make artifacts`) call them.

The evaluation is the suite's `evaluated_sample` (tests/conftest.py runs exactly
`python -m models eval --data data/sample --out DIR` once and the other tests export from its
checkpoints); this test checks what it wrote and printed, then runs the export from a copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.evaluate import METHOD_ORDER, PHOTO_HEAD_FILE, VARIANTS
from models.ranker import STRATEGIES
from tests.conftest import EVAL_STDOUT

REPO = Path(__file__).resolve().parents[2]
EMBEDDINGS_CACHE = REPO / ".cache" / "embeddings"
COMMAND_TIMEOUT_S = 1800
SPLITS = ("heldout", "colour_slice")
METRICS = ("ndcg@10", "map", "mrr")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSIONRANK_")}
    command = [sys.executable, "-m", *args]
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    )
    assert done.returncode == 0, (
        f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_eval_then_export_uses_the_evaluated_default(
    tmp_path: Path, sample_catalogue, evaluated_sample: Path
) -> None:
    # 1. python -m models eval --data data/sample --out DIR (run by the evaluated_sample fixture)
    evaluated = evaluated_sample
    report = json.loads((evaluated / "eval" / "report.json").read_text())
    assert {"provenance", "data", "default", "splits", "wall_seconds"} <= report.keys()
    assert report["provenance"]
    data = report["data"]
    assert data["catalogue"] == "data/sample"
    assert data["catalogue_fingerprint"] == sample_catalogue.fingerprint
    assert data["products"] == len(sample_catalogue)
    assert data["train_products"] + data["test_products"] == data["products"]
    assert data["eval_list_size"] == report["plan"]["eval_list"] > 0
    assert data["heldout_queries"] > 0 and data["colour_slice_queries"] > 0
    default = report["default"]
    assert default in STRATEGIES
    assert report["wall_seconds"] > 0
    assert set(report["splits"]) == set(SPLITS)
    for split in SPLITS:
        rows = report["splits"][split]
        assert set(rows) == set(METHOD_ORDER), split
        for method in METHOD_ORDER:
            for metric in METRICS:
                value = rows[method][metric]
                assert math.isfinite(value) and 0.0 <= value <= 1.0, (split, method, metric)
    photo = report["photo_queries"]  # search by photo, and its raw-feature baseline
    assert photo["queries"] == min(500, data["test_products"]) and photo["candidates_per_query"]
    for ranking in ("photo_head", "model_image_vectors", "raw_efficientnet"):
        assert all(0.0 <= photo[ranking][m] <= 1.0 for m in METRICS), ranking
    assert report["training"]["photo_head"]["seconds"] > 0
    # Wall time per stage: every stage named, in order, adding up to (almost) the whole run.
    stages = report["stage_seconds"]
    assert list(stages)[0] == "item embeddings (titles, photos)"
    assert list(stages)[-1] == "search-by-photo evaluation"
    assert {f"train and score {m}" for m in STRATEGIES} <= stages.keys()
    assert all(seconds >= 0 for seconds in stages.values())
    assert 0.9 * report["wall_seconds"] <= sum(stages.values()) <= report["wall_seconds"] + 1
    assert len(report["load_average"]) == 3
    heldout = report["splits"]["heldout"]
    assert heldout[default]["ndcg@10"] == max(heldout[s]["ndcg@10"] for s in STRATEGIES)

    markdown = (evaluated / "eval" / "report.md").read_text()
    assert f"Default strategy: **{default}**" in markdown
    assert f"| {default} (default) |" in markdown
    assert "## Search by photo" in markdown and "raw EfficientNet-Lite0 features" in markdown
    assert "| photo head vectors (served) |" in markdown
    assert "## Wall time per stage" in markdown and "| train photo head |" in markdown
    assert (evaluated / "eval" / "item_representations.png").stat().st_size > 0

    checkpoints = evaluated / "checkpoints" / data["catalogue_fingerprint"]
    assert json.loads((checkpoints / "default.json").read_text()) == {"strategy": default}
    for method in (*STRATEGIES, *VARIANTS):
        assert (checkpoints / f"{method}.pt").is_file(), method
    assert (checkpoints / PHOTO_HEAD_FILE).is_file()

    stdout = (evaluated / EVAL_STDOUT).read_text()
    assert markdown.strip() in stdout  # the CLI prints the report
    last_line = stdout.strip().splitlines()[-1]
    assert json.loads(last_line) == {"default": default, "wall_seconds": report["wall_seconds"]}

    # 2. python -m export --data data/sample --out OUT: the evaluation's choice, not retrained
    # (OUT: a copy of what the evaluation wrote, so the suite's artifacts stay as they are)
    out = tmp_path / "artifacts"
    out.mkdir()
    for name in ("eval", "checkpoints"):
        shutil.copytree(evaluated / name, out / name)
    EMBEDDINGS_CACHE.mkdir(parents=True, exist_ok=True)
    (out / "cache").symlink_to(EMBEDDINGS_CACHE, target_is_directory=True)
    checkpoint = out / "checkpoints" / data["catalogue_fingerprint"] / f"{default}.pt"
    evaluated_sha, evaluated_mtime = _sha256(checkpoint), checkpoint.stat().st_mtime_ns
    done = _run("export", "--data", "data/sample", "--out", str(out))
    version = (out / "models" / "CURRENT").read_text().strip()
    assert version.startswith(f"{default}-")
    manifest = json.loads((out / "models" / version / "manifest.json").read_text())
    assert manifest["strategy"] == default
    assert manifest["catalogue_fingerprint"] == data["catalogue_fingerprint"]
    # the exported weights are the evaluated checkpoint's, and that checkpoint was not rewritten
    assert manifest["source_checkpoint_sha256"] == evaluated_sha == _sha256(checkpoint)
    assert checkpoint.stat().st_mtime_ns == evaluated_mtime
    assert f"using checkpoint {checkpoint} ({default}: the evaluation's choice)" in done.stdout
    assert "no checkpoint" not in done.stdout and f"training {default}" not in done.stdout
    assert "no photo head" not in done.stdout  # the evaluation's photo head, not retrained
    assert manifest["photo_index"]["items"] == manifest["index"]["items"]
    assert done.stdout.strip().splitlines()[-1].startswith(f"current model: {version} ")
