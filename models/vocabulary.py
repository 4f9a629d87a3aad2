"""How shoppers name the catalogue's attributes: article types, colours and colour families,
genders and usages. Query generation and relevance grading both read from here.

There are no logged queries for this catalogue; these phrasings are written by hand from the
attribute values and common shopping vocabulary.
"""

from __future__ import annotations

import re
from functools import cache

# articleType -> how a shopper names it (first entry is the plain name).
ARTICLE_NAMES: dict[str, tuple[str, ...]] = {
    "Tshirts": ("t-shirt", "tshirt", "tee", "t shirt"),
    "Shirts": ("shirt", "button-down shirt"),
    "Casual Shoes": ("casual shoes", "sneakers", "canvas shoes"),
    "Watches": ("watch", "wrist watch", "analog watch"),
    "Sports Shoes": ("sports shoes", "running shoes", "trainers", "athletic shoes"),
    "Kurtas": ("kurta", "kurtas"),
    "Tops": ("top", "tops", "blouse"),
    "Handbags": ("handbag", "purse", "tote bag"),
    "Heels": ("heels", "high heels", "pumps"),
    "Sunglasses": ("sunglasses", "shades"),
    "Wallets": ("wallet", "purse wallet"),
    "Flip Flops": ("flip flops", "slippers", "chappals"),
    "Sandals": ("sandals", "sandal"),
    "Briefs": ("briefs", "underwear"),
    "Belts": ("belt", "leather belt"),
    "Backpacks": ("backpack", "rucksack", "school bag"),
    "Socks": ("socks", "ankle socks"),
    "Formal Shoes": ("formal shoes", "office shoes", "dress shoes"),
    "Perfume and Body Mist": ("perfume", "body mist", "fragrance"),
    "Jeans": ("jeans", "denims"),
    "Shorts": ("shorts", "half pants"),
    "Trousers": ("trousers", "pants", "chinos"),
    "Flats": ("flats", "ballerinas", "flat shoes"),
    "Bra": ("bra", "brassiere"),
    "Dresses": ("dress", "dresses", "frock"),
    "Sarees": ("saree", "sari"),
    "Earrings": ("earrings", "ear rings"),
    "Deodorant": ("deodorant", "deo"),
    "Nail Polish": ("nail polish", "nail paint", "nail lacquer"),
    "Lipstick": ("lipstick", "lip colour"),
    "Track Pants": ("track pants", "joggers", "trackpants"),
    "Clutches": ("clutch", "clutch bag"),
    "Sweatshirts": ("sweatshirt", "hoodie"),
    "Caps": ("cap", "baseball cap"),
    "Sweaters": ("sweater", "pullover", "jumper"),
    "Ties": ("tie", "necktie"),
    "Jackets": ("jacket", "bomber jacket"),
    "Innerwear Vests": ("vest", "innerwear vest", "undershirt"),
    "Kurtis": ("kurti", "short kurta"),
    "Tunics": ("tunic", "long top"),
    "Nightdress": ("nightdress", "nightie", "night gown"),
    "Leggings": ("leggings", "tights"),
    "Pendant": ("pendant", "locket"),
    "Capris": ("capris", "three-quarter pants"),
    "Necklace and Chains": ("necklace", "chain"),
    "Lip Gloss": ("lip gloss", "gloss"),
    "Night suits": ("night suit", "pyjama set"),
    "Trunk": ("trunks", "underwear trunks"),
    "Skirts": ("skirt", "skirts"),
    "Scarves": ("scarf", "scarves"),
    "Ring": ("ring", "finger ring"),
    "Dupatta": ("dupatta", "chunni"),
    "Cufflinks": ("cufflinks", "cuff links"),
    "Kajal and Eyeliner": ("kajal", "eyeliner"),
    "Duffel Bag": ("duffel bag", "gym bag", "travel bag"),
    "Bangle": ("bangle", "bangles"),
    "Sports Sandals": ("sports sandals", "floaters"),
    "Laptop Bag": ("laptop bag", "laptop sleeve"),
    "Boxers": ("boxers", "boxer shorts"),
    "Lounge Pants": ("lounge pants", "pyjamas"),
    "Blazers": ("blazer", "sports coat"),
    "Rucksacks": ("rucksack", "hiking backpack"),
    "Stoles": ("stole", "shawl"),
}

# baseColour -> words a shopper uses for it (first entry is the plain name).
COLOUR_NAMES: dict[str, tuple[str, ...]] = {
    "Black": ("black",),
    "White": ("white",),
    "Blue": ("blue",),
    "Brown": ("brown",),
    "Grey": ("grey", "gray"),
    "Red": ("red",),
    "Green": ("green",),
    "Pink": ("pink",),
    "Navy Blue": ("navy blue", "navy"),
    "Purple": ("purple", "violet"),
    "Silver": ("silver",),
    "Yellow": ("yellow",),
    "Beige": ("beige",),
    "Gold": ("gold", "golden"),
    "Maroon": ("maroon", "wine"),
    "Orange": ("orange",),
    "Olive": ("olive", "olive green"),
    "Multi": ("multicolour", "multi-coloured", "multicolor"),
    "Cream": ("cream", "ivory"),
    "Steel": ("steel", "steel grey"),
    "Charcoal": ("charcoal", "charcoal grey"),
    "Peach": ("peach",),
    "Off White": ("off white", "off-white"),
    "Skin": ("skin", "skin tone"),
    "Lavender": ("lavender", "lilac"),
    "Grey Melange": ("grey melange", "heather grey"),
    "Khaki": ("khaki",),
    "Magenta": ("magenta", "fuchsia"),
    "Teal": ("teal",),
    "Tan": ("tan",),
    "Mustard": ("mustard",),
    "Bronze": ("bronze",),
    "Copper": ("copper",),
    "Turquoise Blue": ("turquoise", "turquoise blue"),
    "Rust": ("rust",),
    "Burgundy": ("burgundy",),
    "Metallic": ("metallic",),
    "Coffee Brown": ("coffee brown", "coffee"),
    "Mauve": ("mauve",),
    "Rose": ("rose", "rose pink"),
    "Nude": ("nude",),
    "Sea Green": ("sea green",),
    "Mushroom Brown": ("mushroom brown",),
    "Taupe": ("taupe",),
    "Lime Green": ("lime green", "lime"),
    "Fluorescent Green": ("fluorescent green", "neon green"),
}

# Colour families decide the "substitute" grade: navy for blue is a substitute, red is not.
# A colour may sit in two families (maroon is both red and brown to a shopper).
COLOUR_FAMILIES: dict[str, tuple[str, ...]] = {
    "black": ("Black", "Charcoal"),
    "white": ("White", "Off White", "Cream"),
    "grey": ("Grey", "Grey Melange", "Charcoal", "Steel", "Silver"),
    "blue": ("Blue", "Navy Blue", "Turquoise Blue", "Teal"),
    "red": ("Red", "Maroon", "Burgundy", "Rust", "Rose"),
    "pink": ("Pink", "Peach", "Rose", "Magenta", "Mauve"),
    "purple": ("Purple", "Lavender", "Mauve", "Magenta"),
    "green": ("Green", "Olive", "Sea Green", "Lime Green", "Fluorescent Green", "Teal"),
    "yellow": ("Yellow", "Mustard", "Gold"),
    "orange": ("Orange", "Peach", "Rust", "Copper"),
    "brown": ("Brown", "Coffee Brown", "Mushroom Brown", "Tan", "Taupe", "Khaki", "Bronze"),
    "beige": ("Beige", "Cream", "Skin", "Nude", "Khaki", "Tan"),
    "metal": ("Gold", "Silver", "Bronze", "Copper", "Metallic", "Steel"),
    "multi": ("Multi",),
}

# Query gender -> (forms used after the noun, forms used before it).
GENDER_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Men": (("for men", "for guys", "for him"), ("men's", "mens", "men", "male")),
    "Women": (("for women", "for ladies", "for her"), ("women's", "womens", "ladies", "female")),
    "Boys": (("for boys", "for a boy"), ("boys", "boy's", "kids boys")),
    "Girls": (("for girls", "for a girl"), ("girls", "girl's", "kids girls")),
}

USAGE_NAMES: dict[str, tuple[str, ...]] = {
    "Casual": ("casual", "everyday"),
    "Sports": ("sports", "gym", "athletic"),
    "Ethnic": ("ethnic", "traditional"),
    "Formal": ("formal", "office"),
    "Party": ("party", "partywear"),
    "Smart Casual": ("smart casual",),
    "Travel": ("travel",),
}


def article_names(article_type: str) -> tuple[str, ...]:
    """Shopper names for a type; unlisted types fall back to their own lower-cased name."""
    return ARTICLE_NAMES.get(article_type) or (article_type.lower(),)


def gender_compatible(query_gender: str, product_gender: str) -> bool:
    """Unisex products serve both men and women."""
    if query_gender == product_gender:
        return True
    return product_gender == "Unisex" and query_gender in ("Men", "Women")


@cache
def colour_families(colour: str) -> frozenset[str]:
    return frozenset(f for f, members in COLOUR_FAMILIES.items() if colour in members)


def same_colour_family(a: str, b: str) -> bool:
    return a == b or bool(colour_families(a) & colour_families(b))


_COLOUR_WORDS = sorted(
    {w for names in COLOUR_NAMES.values() for w in names}
    | {"gray", "grey", "navy", "multi", "melange", "golden", "silver", "dark", "light"},
    key=len,
    reverse=True,
)
_COLOUR_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in _COLOUR_WORDS) + r")\b", re.I)


def title_names_colour(title: str) -> bool:
    """Does the title say a colour? When not, only the photo can tell it."""
    return _COLOUR_RE.search(title) is not None


def strip_colour_words(title: str) -> str:
    """The title with colour words removed: the training augmentation that teaches the ranker
    to take colour from the photo, as it must for products whose title names none."""
    return re.sub(r"\s{2,}", " ", _COLOUR_RE.sub("", title)).strip()
