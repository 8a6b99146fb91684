"""Multilingual tag vocabulary of the sample world.

Each concept has names in English, Japanese and Chinese; artists tag an illustration
in any one of them, so the same concept appears under several strings, as on real
illustration sites. Each content (see :mod:`umair.sample.painter`) implies a subject
concept and a broader theme concept; a few "noise" concepts are unrelated to the image.
"""

from __future__ import annotations

LANGUAGES = ("en", "ja", "zh")

# concept -> names per language
CONCEPTS: dict[str, dict[str, str]] = {
    "moon": {"en": "moon", "ja": "月", "zh": "月亮"},
    "star": {"en": "star", "ja": "星", "zh": "星星"},
    "house": {"en": "house", "ja": "家", "zh": "房子"},
    "tree": {"en": "tree", "ja": "木", "zh": "树"},
    "sword": {"en": "sword", "ja": "剣", "zh": "剑"},
    "flower": {"en": "flower", "ja": "花", "zh": "花朵"},
    "cat": {"en": "cat", "ja": "猫", "zh": "小猫"},
    "mountain": {"en": "mountain", "ja": "山", "zh": "山峰"},
    "night sky": {"en": "night sky", "ja": "夜空", "zh": "夜空中"},
    "building": {"en": "building", "ja": "建物", "zh": "建筑"},
    "nature": {"en": "nature", "ja": "自然", "zh": "大自然"},
    "weapon": {"en": "weapon", "ja": "武器", "zh": "武器类"},
    "animal": {"en": "animal", "ja": "動物", "zh": "动物"},
    "original": {"en": "original", "ja": "オリジナル", "zh": "原创"},
    "fan art": {"en": "fan art", "ja": "二次創作", "zh": "同人"},
    "sketch": {"en": "sketch", "ja": "落書き", "zh": "涂鸦"},
    "commission": {"en": "commission", "ja": "依頼絵", "zh": "约稿"},
}

# content -> (subject concept, theme concept)
CONTENT_CONCEPTS: dict[str, tuple[str, str]] = {
    "moon": ("moon", "night sky"),
    "star": ("star", "night sky"),
    "house": ("house", "building"),
    "tree": ("tree", "nature"),
    "sword": ("sword", "weapon"),
    "flower": ("flower", "nature"),
    "cat": ("cat", "animal"),
    "mountain": ("mountain", "nature"),
}

NOISE_CONCEPTS: tuple[str, ...] = ("original", "fan art", "sketch", "commission")

# every spelling -> its concept
TAG_TO_CONCEPT: dict[str, str] = {name: c for c, names in CONCEPTS.items() for name in names.values()}


def concept_of(tag: str) -> str | None:
    """The concept a tag string names, in any language (None if unknown)."""
    return TAG_TO_CONCEPT.get(tag)


def name_table() -> list[dict[str, str]]:
    """Rows (concept, lang, name): the multilingual name mappings of the vocabulary."""
    return [{"concept": c, "lang": lang, "name": n} for c, names in CONCEPTS.items() for lang, n in names.items()]
