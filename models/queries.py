"""Queries and graded relevance derived from product attributes.

The catalogue has no logged queries, so every query here is generated from a template over
articleType, colour, gender and usage, and relevance is graded from the attributes:

    3 exact       same articleType, and every attribute the query names matches
                  (gender compatible: Unisex serves Men and Women)
    2 substitute  same articleType, compatible gender, and the colour only of the same colour
                  family, or the usage differs
    1 partial     same articleType otherwise; or the same subCategory with a matching colour
                  family and compatible gender (a shirt for "red t-shirt")
    0 irrelevant  anything else

Evaluation holds out both products (split by product, duplicates of one photo kept together)
and query templates, so it measures generalisation to unseen phrasings and unseen products.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from models.catalogue import Product
from models.vocabulary import (
    COLOUR_NAMES,
    GENDER_NAMES,
    USAGE_NAMES,
    article_names,
    gender_compatible,
    same_colour_family,
    title_names_colour,
)

EXACT, SUBSTITUTE, PARTIAL, IRRELEVANT = 3, 2, 1, 0
RELEVANT_GRADE = SUBSTITUTE  # MAP and MRR count grades >= 2 as relevant


@dataclass(frozen=True, slots=True)
class QuerySpec:
    """What a query asks for; None means the query does not say."""

    article_type: str
    colour: str | None = None
    gender: str | None = None
    usage: str | None = None
    sub_category: str = ""  # of the article type; decides the "related type" partial grade


def grade(spec: QuerySpec, product: Product) -> int:
    gender_ok = spec.gender is None or gender_compatible(spec.gender, product.gender)
    colour_family_ok = spec.colour is None or same_colour_family(spec.colour, product.colour)
    if product.article_type != spec.article_type:
        related = bool(spec.sub_category) and product.sub_category == spec.sub_category
        return PARTIAL if related and gender_ok and colour_family_ok else IRRELEVANT
    colour_exact = spec.colour is None or spec.colour == product.colour
    usage_ok = spec.usage is None or spec.usage == product.usage
    if gender_ok and colour_exact and usage_ok:
        return EXACT
    if gender_ok and colour_family_ok:
        return SUBSTITUTE
    return PARTIAL


# Templates: slots {type} {colour} {gender_for} {gender_pre} {usage}. A template is used only
# when the spec has the attributes it names. The last ones are never trained on.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "{type}",
    "{colour} {type}",
    "{colour} {type} {gender_for}",
    "{gender_pre} {colour} {type}",
    "{type} {gender_for}",
    "{gender_pre} {type}",
    "{usage} {type} {gender_for}",
    "{colour} {usage} {type}",
    "{gender_pre} {usage} {type}",
    "{gender_pre} {colour} {usage} {type}",
    "{colour} {type} for {usage} wear",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "{type} in {colour} {gender_for}",
    "{gender_pre} {type} {colour}",
    "{colour} coloured {type}",
    "buy {usage} {colour} {type} online",
    "{type} {gender_for} in {colour} colour",
)


@dataclass
class Query:
    text: str
    spec: QuerySpec
    template: str
    candidates: list[str] = field(default_factory=list)  # product ids
    grades: list[int] = field(default_factory=list)


def _slots(template: str) -> set[str]:
    return {
        s
        for s in ("type", "colour", "gender_for", "gender_pre", "usage")
        if "{" + s + "}" in template
    }


def spec_for(template: str, product: Product) -> QuerySpec | None:
    """The spec a template asks for when filled from this product, or None if it can't be."""
    slots = _slots(template)
    gender = product.gender if product.gender in GENDER_NAMES else None
    if product.gender == "Unisex" and slots & {"gender_for", "gender_pre"}:
        gender = None  # a unisex product can seed "for men" or "for women"; choose later
    colour = product.colour if product.colour in COLOUR_NAMES else None
    usage = product.usage if product.usage in USAGE_NAMES else None
    needs_gender = bool(slots & {"gender_for", "gender_pre"})
    if ("colour" in slots and colour is None) or ("usage" in slots and usage is None):
        return None
    if needs_gender and gender is None and product.gender != "Unisex":
        return None
    return QuerySpec(
        article_type=product.article_type,
        colour=colour if "colour" in slots else None,
        gender=gender if needs_gender else None,
        usage=usage if "usage" in slots else None,
        sub_category=product.sub_category,
    )


def render(template: str, spec: QuerySpec, rng: random.Random) -> str:
    values = {"type": rng.choice(article_names(spec.article_type))}
    if spec.colour:
        values["colour"] = rng.choice(COLOUR_NAMES[spec.colour])
    if spec.gender:
        after, before = GENDER_NAMES[spec.gender]
        values["gender_for"], values["gender_pre"] = rng.choice(after), rng.choice(before)
    if spec.usage:
        values["usage"] = rng.choice(USAGE_NAMES[spec.usage])
    return template.format(**values)


def split_products(
    products: Sequence[Product], test_fraction: float = 0.2
) -> tuple[list[Product], list[Product]]:
    """Deterministic split by product: a hash of the duplicate group decides, so byte-identical
    photos never straddle train and test."""
    train, test = [], []
    for p in products:
        bucket = int(hashlib.sha1(p.group.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (test if bucket < test_fraction else train).append(p)
    return train, test


class QueryGenerator:
    """Draws queries seeded by products of a pool and grades a candidate list for each."""

    def __init__(self, pool: Sequence[Product], seed: int):
        self.pool = list(pool)
        self.rng = random.Random(seed)
        self.by_type: dict[str, list[int]] = defaultdict(list)
        self.by_sub: dict[str, list[int]] = defaultdict(list)
        self.by_colour: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(self.pool):
            self.by_type[p.article_type].append(i)
            self.by_sub[p.sub_category].append(i)
            self.by_colour[p.colour].append(i)

    def _draw_spec(
        self, templates: Sequence[str], seed_filter=None
    ) -> tuple[str, QuerySpec] | None:
        product = self.rng.choice(self.pool)
        if seed_filter is not None and not seed_filter(product):
            return None
        template = self.rng.choice(templates)
        spec = spec_for(template, product)
        if spec is None:
            return None
        if spec.gender is None and _slots(template) & {"gender_for", "gender_pre"}:
            spec = replace(spec, gender=self.rng.choice(("Men", "Women")))
        return template, spec

    def candidates(
        self, spec: QuerySpec, size: int, pool_filter=None
    ) -> tuple[list[int], list[int]]:
        """A candidate list mixing exact matches, substitutes, partials, hard negatives (same type
        or same colour, wrong otherwise) and random negatives."""
        allowed = (lambda i: True) if pool_filter is None else (lambda i: pool_filter(self.pool[i]))
        same_type = [i for i in self.by_type[spec.article_type] if allowed(i)]
        related = [i for i in self.by_sub[spec.sub_category] if allowed(i)]
        same_colour = [i for i in self.by_colour.get(spec.colour or "", []) if allowed(i)]
        by_grade: dict[int, list[int]] = defaultdict(list)
        for i in set(same_type) | set(related):
            by_grade[grade(spec, self.pool[i])].append(i)
        picks: list[int] = []
        quotas = {
            EXACT: size // 5,
            SUBSTITUTE: size // 5,
            PARTIAL: size // 4,
            IRRELEVANT: size // 10,
        }
        for g, quota in quotas.items():
            members = sorted(by_grade[g])
            picks += self.rng.sample(members, min(quota, len(members)))
        chosen = set(picks)
        hard = [i for i in same_colour if i not in chosen]
        picks += self.rng.sample(hard, min(size // 8, len(hard)))
        chosen = set(picks)
        attempts = 0
        while len(picks) < size and attempts < size * 20:
            attempts += 1
            i = self.rng.randrange(len(self.pool))
            if i not in chosen and allowed(i):
                chosen.add(i)
                picks.append(i)
        self.rng.shuffle(picks)
        return picks, [grade(spec, self.pool[i]) for i in picks]

    def generate(
        self,
        count: int,
        templates: Sequence[str],
        list_size: int,
        *,
        colour_blind_titles: bool = False,
    ) -> list[Query]:
        """`count` queries with at least one exact match among their candidates. With
        `colour_blind_titles`, only colour queries, and every candidate's title names no colour
        (the slice where only the photo can tell)."""
        pool_filter = (lambda p: not title_names_colour(p.title)) if colour_blind_titles else None
        colour_templates = [t for t in templates if "{colour}" in t]
        queries: list[Query] = []
        seen: set[str] = set()
        attempts = 0
        while len(queries) < count and attempts < count * 50:
            attempts += 1
            drawn = self._draw_spec(
                colour_templates if colour_blind_titles else templates, pool_filter
            )
            if drawn is None:
                continue
            template, spec = drawn
            text = render(template, spec, self.rng)
            if text in seen:
                continue
            picks, grades = self.candidates(spec, list_size, pool_filter)
            if EXACT not in grades or max(grades) == min(grades):
                continue
            if colour_blind_titles and sum(g >= SUBSTITUTE for g in grades) == len(grades):
                continue
            seen.add(text)
            queries.append(Query(text, spec, template, [self.pool[i].id for i in picks], grades))
        return queries


def grades_matrix(queries: Sequence[Query]) -> np.ndarray:
    width = max(len(q.grades) for q in queries)
    out = np.full((len(queries), width), -1, dtype=np.int64)
    for row, q in enumerate(queries):
        out[row, : len(q.grades)] = q.grades
    return out
