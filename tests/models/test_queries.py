import random

from models.catalogue import Product
from models.queries import (
    EXACT,
    HELDOUT_TEMPLATES,
    IRRELEVANT,
    PARTIAL,
    SUBSTITUTE,
    TRAIN_TEMPLATES,
    QueryGenerator,
    QuerySpec,
    grade,
    render,
    split_products,
)
from models.vocabulary import strip_colour_words, title_names_colour


def product(
    pid="1",
    *,
    type_="Tshirts",
    sub="Topwear",
    colour="Red",
    gender="Men",
    usage="Casual",
    title="Nike Men Red Tshirt",
    group="",
):
    return Product(pid, title, gender, "Apparel", sub, type_, colour, usage, "Summer", group)


RED_TEE_MEN = QuerySpec("Tshirts", colour="Red", gender="Men", sub_category="Topwear")


def test_exact_match_and_unisex_serves_men_and_women():
    assert grade(RED_TEE_MEN, product()) == EXACT
    assert grade(RED_TEE_MEN, product(gender="Unisex")) == EXACT
    women = QuerySpec("Tshirts", colour="Red", gender="Women", sub_category="Topwear")
    assert grade(women, product(gender="Unisex")) == EXACT


def test_same_colour_family_or_other_usage_is_a_substitute():
    assert grade(RED_TEE_MEN, product(colour="Maroon")) == SUBSTITUTE
    casual = QuerySpec("Tshirts", colour="Red", usage="Sports", sub_category="Topwear")
    assert grade(casual, product()) == SUBSTITUTE


def test_wrong_colour_family_or_gender_is_partial():
    assert grade(RED_TEE_MEN, product(colour="Blue")) == PARTIAL
    assert grade(RED_TEE_MEN, product(gender="Women")) == PARTIAL
    assert grade(RED_TEE_MEN, product(gender="Boys")) == PARTIAL


def test_related_type_is_partial_only_when_colour_and_gender_fit():
    shirt = dict(type_="Shirts", sub="Topwear")
    assert grade(RED_TEE_MEN, product(**shirt)) == PARTIAL
    assert grade(RED_TEE_MEN, product(**shirt, colour="Green")) == IRRELEVANT
    assert grade(RED_TEE_MEN, product(type_="Jeans", sub="Bottomwear")) == IRRELEVANT


def test_unspecified_attributes_do_not_count():
    spec = QuerySpec("Tshirts", sub_category="Topwear")
    assert grade(spec, product(colour="Blue", gender="Women", usage="Sports")) == EXACT


def test_render_fills_every_slot():
    rng = random.Random(0)
    spec = QuerySpec("Tshirts", colour="Navy Blue", gender="Women", usage="Sports")
    for template in TRAIN_TEMPLATES + HELDOUT_TEMPLATES:
        assert "{" not in render(template, spec, rng)


def test_heldout_templates_are_never_trained_on():
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)


def test_split_keeps_duplicate_photos_together():
    products = [product(str(i), group=f"g{i // 3}") for i in range(300)]
    train, test = split_products(products)
    assert train and test
    train_groups, test_groups = {p.group for p in train}, {p.group for p in test}
    assert not train_groups & test_groups


def test_generated_lists_mix_grades_and_colour_slice_titles_name_no_colour():
    colours = ["Red", "Blue", "Black", "Maroon"]
    pool = [
        product(
            str(i),
            colour=colours[i % 4],
            gender=("Men", "Women", "Unisex")[i % 3],
            title=("Roadster Tshirt" if i % 2 else f"Roadster {colours[i % 4]} Tshirt"),
            type_=("Tshirts", "Shirts", "Jeans")[i % 3 if i % 5 else 0],
            sub=("Topwear", "Topwear", "Bottomwear")[i % 3 if i % 5 else 0],
        )
        for i in range(400)
    ]
    queries = QueryGenerator(pool, seed=0).generate(20, TRAIN_TEMPLATES, 40)
    assert len(queries) == 20
    for q in queries:
        assert len(q.candidates) == len(set(q.candidates)) == 40
        assert EXACT in q.grades and IRRELEVANT in q.grades
        by_id = {p.id: p for p in pool}
        assert q.grades == [grade(q.spec, by_id[c]) for c in q.candidates]
    blind = QueryGenerator(pool, seed=1).generate(
        5, HELDOUT_TEMPLATES, 30, colour_blind_titles=True
    )
    assert blind
    for q in blind:
        assert q.spec.colour is not None
        assert not any(title_names_colour(by_id[c].title) for c in q.candidates)


def test_colour_words_are_found_and_stripped():
    assert title_names_colour("Nike Men Navy Blue T-shirt")
    assert not title_names_colour("Nike Men Sahara Team India Jersey")
    assert strip_colour_words("Nike Men Navy Blue T-shirt") == "Nike Men T-shirt"
