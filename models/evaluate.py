"""Train every fusion strategy and baseline on one catalogue and write the evaluation report.

    python -m models eval --data data/sample --out artifacts

Writes `<out>/eval/report.json`, `report.md` and `item_representations.png`, and one checkpoint
per learned method under `<out>/checkpoints/<catalogue fingerprint>/` (the exporter takes the
default one from there; checkpoints of different catalogues live side by side).
Queries and relevance are derived from product attributes (models.queries): there are no
logged queries for this catalogue.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.baselines import bm25_scores, cosine_scores
from models.catalogue import Catalogue, Product, load_catalogue
from models.embeddings import (
    ItemEmbeddings,
    encode_texts,
    item_embeddings,
    stripped_title_embeddings,
)
from models.metrics import evaluate_lists
from models.photo_eval import photo_query_metrics
from models.photo_head import PhotoHead, PhotoTrainConfig, save_photo_head, train_photo_head
from models.queries import (
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    Query,
    QueryGenerator,
    split_products,
)
from models.ranker import STRATEGIES, FusedRanker, RankerConfig
from models.train import ListBatchData, TrainConfig, score_lists, train_ranker

PROVENANCE = (
    "Queries and graded relevance are derived from product attributes (articleType, colour, "
    "gender, usage) by templates; there are no logged queries for this catalogue."
)
VARIANTS = {"text_only": ("text",), "image_only": ("image",)}
PHOTO_HEAD_FILE = "photo_head.pt"


@dataclass(frozen=True)
class EvalPlan:
    train_queries: int
    heldout_queries: int
    slice_queries: int
    train_list: int = 32
    eval_list: int = 100
    epochs: int = 6

    @classmethod
    def for_catalogue(cls, size: int) -> EvalPlan:
        """Scale the query counts with the catalogue, within the time budget of a 2-core box."""
        if size <= 5000:
            return cls(train_queries=2000, heldout_queries=300, slice_queries=150, epochs=5)
        return cls(train_queries=10000, heldout_queries=1000, slice_queries=500)


def checkpoint_dir(out: Path, fingerprint: str) -> Path:
    return out / "checkpoints" / fingerprint


def save_checkpoint(path: Path, model: FusedRanker, metrics: dict, fingerprint: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "config": model.config.to_dict(),
            "state_dict": model.state_dict(),
            "metrics": metrics,
            "catalogue": fingerprint,
        },
        path,
    )


def load_checkpoint(path: Path) -> tuple[FusedRanker, dict]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = FusedRanker(RankerConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload


def plot_representations(path: Path, features: np.ndarray, labels: list[str], title: str) -> None:
    """2-D PCA of item vectors, coloured by the ten most common articleTypes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centred = features - features.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    common = [
        t
        for t, _ in sorted(
            {t: labels.count(t) for t in set(labels)}.items(), key=lambda kv: -kv[1]
        )[:10]
    ]
    fig, ax = plt.subplots(figsize=(7, 6), dpi=90)
    for t in common:
        mask = np.array([lbl == t for lbl in labels])
        ax.scatter(xy[mask, 0], xy[mask, 1], s=4, alpha=0.6, label=t)
    ax.set_title(title)
    ax.legend(markerscale=3, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class StageClock:
    """Wall seconds per named stage of a run, in order: ``lap(name)`` closes the stage that
    began at the previous lap (or at construction)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._since = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._since, 1)
        self._since = now


@dataclass
class Workbench:
    """Everything training and evaluation share: the catalogue, its embeddings, the split and
    the generated query sets with their candidate lists."""

    catalogue: Catalogue
    embeddings: ItemEmbeddings
    stripped_text: np.ndarray
    row_of: dict[str, int]
    plan: EvalPlan
    train_products: list[Product]
    test_products: list[Product]
    train_data: ListBatchData
    splits: dict[str, tuple[list[Query], ListBatchData]]
    clock: StageClock = field(default_factory=StageClock)

    @property
    def query_counts(self) -> dict[str, int]:
        return {
            "train_queries": len(self.train_data.rows),
            **{f"{name}_queries": len(qs) for name, (qs, _) in self.splits.items()},
        }


def prepare(
    data: Path, out: Path, plan: EvalPlan | None = None, *, verbose: bool = True
) -> Workbench:
    clock = StageClock()
    catalogue = load_catalogue(data)
    cache = out / "cache"
    embeddings = item_embeddings(catalogue, cache, verbose=verbose)
    clock.lap("item embeddings (titles, photos)")
    stripped = stripped_title_embeddings(catalogue, embeddings, cache, verbose=verbose)
    clock.lap("colour-free title embeddings")
    row_of = {pid: i for i, pid in enumerate(embeddings.ids)}
    plan = plan or EvalPlan.for_catalogue(len(catalogue))

    train_products, test_products = split_products(catalogue.products)
    train_q = QueryGenerator(train_products, seed=1).generate(
        plan.train_queries, TRAIN_TEMPLATES, plan.train_list
    )
    heldout_q = QueryGenerator(test_products, seed=2).generate(
        plan.heldout_queries, HELDOUT_TEMPLATES, plan.eval_list
    )
    slice_q = QueryGenerator(test_products, seed=3).generate(
        plan.slice_queries, HELDOUT_TEMPLATES, plan.eval_list, colour_blind_titles=True
    )
    texts = [q.text for q in (*train_q, *heldout_q, *slice_q)]
    query_emb = encode_texts(texts, progress="query embeddings" if verbose else "")
    clock.lap("query sets and their embeddings")
    n_train, n_held = len(train_q), len(heldout_q)
    splits = {
        "heldout": (heldout_q, query_emb[n_train : n_train + n_held]),
        "colour_slice": (slice_q, query_emb[n_train + n_held :]),
    }
    return Workbench(
        catalogue=catalogue,
        embeddings=embeddings,
        stripped_text=stripped,
        row_of=row_of,
        plan=plan,
        train_products=train_products,
        test_products=test_products,
        train_data=ListBatchData.build(train_q, query_emb[:n_train], row_of),
        splits={
            name: (qs, ListBatchData.build(qs, emb, row_of)) for name, (qs, emb) in splits.items()
        },
        clock=clock,
    )


def method_config(name: str) -> RankerConfig:
    if name in VARIANTS:
        return RankerConfig(strategy="early", modalities=VARIANTS[name])
    return RankerConfig(strategy=name)


def train_method(
    bench: Workbench, name: str, *, verbose: bool = True
) -> tuple[FusedRanker, dict, dict]:
    """Train one method; returns the model, its metrics per split and training facts."""
    emb = bench.embeddings
    model, losses = train_ranker(
        method_config(name),
        bench.train_data,
        emb.text,
        emb.image,
        bench.stripped_text,
        TrainConfig(epochs=bench.plan.epochs),
        progress=f"train {name}" if verbose else "",
    )
    metrics = {}
    for split, (qs, data) in bench.splits.items():
        scores = score_lists(model, data, emb.text, emb.image)
        metrics[split] = evaluate_lists([q.grades for q in qs], scores)
    facts = {"losses": [round(x, 5) for x in losses], "seconds": round(model.train_seconds, 1)}
    return model, metrics, facts


def train_photo_model(
    products: list[Product], embeddings: ItemEmbeddings, *, verbose: bool = True
) -> tuple[PhotoHead, dict]:
    """The photo head trained on the train split of ``products`` (the split every ranker
    trains on: held-out products' photos and labels are never seen)."""
    train, _ = split_products(products)
    rows = embeddings.rows([p.id for p in train])
    model, losses, seconds = train_photo_head(
        train,
        embeddings.image[rows],
        PhotoTrainConfig(),
        progress="train photo head" if verbose else "",
    )
    return model, {"losses": [round(x, 5) for x in losses], "seconds": round(seconds, 1)}


def run(data: Path, out: Path, *, plan: EvalPlan | None = None, verbose: bool = True) -> dict:
    started = time.perf_counter()
    bench = prepare(data, out, plan, verbose=verbose)
    catalogue, embeddings, row_of = bench.catalogue, bench.embeddings, bench.row_of
    test_products = bench.test_products

    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in bench.splits}
    training: dict[str, dict] = {}
    models: dict[str, FusedRanker] = {}
    for name in (*STRATEGIES, *VARIANTS):
        model, metrics, training[name] = train_method(bench, name, verbose=verbose)
        bench.clock.lap(f"train and score {name}")
        models[name] = model
        for split, values in metrics.items():
            results[split][name] = values

    titles = {p.id: p.title for p in test_products}
    for split, (qs, data_) in bench.splits.items():
        grades = [q.grades for q in qs]
        results[split]["bm25"] = evaluate_lists(grades, bm25_scores(qs, titles))
        results[split]["minilm_zero_shot"] = evaluate_lists(
            grades, cosine_scores(data_.query_embeddings, qs, embeddings.text, row_of)
        )

    bench.clock.lap("baselines (bm25, minilm_zero_shot)")
    default = max(STRATEGIES, key=lambda s: results["heldout"][s]["ndcg@10"])
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        save_checkpoint(
            checkpoint_dir(out, catalogue.fingerprint) / f"{name}.pt",
            model,
            {split: results[split][name] for split in results},
            catalogue.fingerprint,
        )
    with torch.inference_mode():
        test_rows = np.array([row_of[p.id] for p in test_products])
        best = models[default]
        features = best.item_features(
            torch.from_numpy(embeddings.text[test_rows]),
            best.reduce_image(torch.from_numpy(embeddings.image[test_rows])),
        ).numpy()
    plot_representations(
        eval_dir / "item_representations.png",
        features,
        [p.article_type for p in test_products],
        f"PCA of {default} item vectors (test products)",
    )

    bench.clock.lap("checkpoints and item-vector plot")
    photo_head, training["photo_head"] = train_photo_model(
        catalogue.products, embeddings, verbose=verbose
    )
    bench.clock.lap("train photo head")
    photo_queries = photo_query_metrics(photo_head, best, embeddings, row_of, test_products)
    bench.clock.lap("search-by-photo evaluation")
    save_photo_head(
        checkpoint_dir(out, catalogue.fingerprint) / PHOTO_HEAD_FILE,
        photo_head,
        {"photo_queries": photo_queries},
        catalogue.fingerprint,
    )

    report = {
        "provenance": PROVENANCE,
        "data": {
            "catalogue": str(data),
            "catalogue_fingerprint": catalogue.fingerprint,
            "products": len(catalogue),
            "train_products": len(bench.train_products),
            "test_products": len(test_products),
            **bench.query_counts,
            "train_templates": list(TRAIN_TEMPLATES),
            "heldout_templates": list(HELDOUT_TEMPLATES),
            "eval_list_size": bench.plan.eval_list,
        },
        "default": default,
        "splits": results,
        "photo_queries": photo_queries,
        "training": training,
        "plan": asdict(bench.plan),
        "stage_seconds": bench.clock.seconds,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (eval_dir / "report.json").write_text(json.dumps(report, indent=2))
    (eval_dir / "report.md").write_text(render_markdown(report))
    (checkpoint_dir(out, catalogue.fingerprint) / "default.json").write_text(
        json.dumps({"strategy": default})
    )
    return report


METHOD_ORDER = (
    "early",
    "representation",
    "late",
    "hybrid",
    "text_only",
    "image_only",
    "bm25",
    "minilm_zero_shot",
)


def render_markdown(report: dict) -> str:
    d = report["data"]
    lines = [
        "# fusionrank evaluation",
        "",
        f"> {report['provenance']}",
        "",
        f"Catalogue `{d['catalogue']}`: {d['products']} products ({d['train_products']} train / "
        f"{d['test_products']} test, split by product). "
        f"Held-out split: {d['heldout_queries']} queries "
        f"over test products with query templates never trained on; colour slice: "
        f"{d['colour_slice_queries']} colour queries whose candidates' titles name no colour. "
        f"{d['eval_list_size']} candidates per query. Default strategy: **{report['default']}**. "
        f"Wall time: {report['wall_seconds']:.0f} s.",
        "",
    ]
    for split, title in (
        ("heldout", "Held-out split"),
        ("colour_slice", "Colour-not-in-title slice"),
    ):
        lines += [f"## {title}", "", "| method | NDCG@10 | MAP | MRR |", "|---|---|---|---|"]
        for method in METHOD_ORDER:
            m = report["splits"][split][method]
            mark = " (default)" if method == report["default"] else ""
            lines.append(
                f"| {method}{mark} | {m['ndcg@10']:.4f} | {m['map']:.4f} | {m['mrr']:.4f} |"
            )
        lines.append("")
    lines += ["MAP and MRR count grades >= 2 (exact or substitute) as relevant.", ""]
    photo = report.get("photo_queries")
    if photo:
        lines += [
            "## Search by photo",
            "",
            f"{photo['queries']} held-out products' own photos as queries, about "
            f"{photo['candidates_per_query']:,} held-out candidates each (the query's "
            "duplicate-photo group left out), ranked by the cosine of vectors. The service "
            "ranks a photo without text by its photo-head vector. Grades from the "
            "attributes: 3 same articleType and baseColour, 2 same articleType.",
            "",
            "| ranking | NDCG@10 | MAP | MRR |",
            "|---|---|---|---|",
        ]
        for key, name in (
            ("photo_head", "photo head vectors (served)"),
            ("model_image_vectors", f"{report['default']} ranker's image vectors"),
            ("raw_efficientnet", "raw EfficientNet-Lite0 features (baseline)"),
        ):
            if key not in photo:  # a default without an image tower
                continue
            m = photo[key]
            lines.append(f"| {name} | {m['ndcg@10']:.4f} | {m['map']:.4f} | {m['mrr']:.4f} |")
        lines.append("")
    stages = report.get("stage_seconds")
    if stages:
        load = report.get("load_average")
        lines += [
            "## Wall time per stage",
            "",
            f"Load average (1/5/15 min) at the end: {'/'.join(map(str, load))}; on a shared "
            "two-core machine it decides these times."
            if load
            else "",
            "",
            "| stage | seconds |",
            "|---|---:|",
            *(f"| {name} | {seconds:.1f} |" for name, seconds in stages.items()),
            f"| **total** | {report['wall_seconds']:.1f} |",
            "",
        ]
    return "\n".join(lines)
