"""A deterministic product catalog for the demo: a few hundred plausible household products."""

from __future__ import annotations

import csv
import random
from pathlib import Path

_KINDS = [
    ("Electric kettle", ["1.7 l", "1.0 l", "glass 1.5 l"]), ("Toaster", ["2-slice", "4-slice"]),
    ("Chef's knife", ["20 cm", "15 cm"]), ("Frying pan", ["24 cm", "28 cm", "non-stick 20 cm"]),
    ("Saucepan", ["16 cm", "18 cm", "20 cm"]), ("Cutting board", ["bamboo", "oak", "plastic"]),
    ("Coffee grinder", ["manual", "electric"]), ("French press", ["0.35 l", "1.0 l"]),
    ("Tea towel", ["linen, set of 2", "cotton, set of 3"]), ("Bath towel", ["70x140", "50x100"]),
    ("Pillow", ["medium", "firm", "soft"]), ("Duvet cover", ["single", "double", "king"]),
    ("Desk lamp", ["LED", "clamp"]), ("LED bulb", ["E27 806 lm", "GU10 345 lm", "E14 470 lm"]),
    ("Extension lead", ["4-way 2 m", "6-way 3 m"]), ("Batteries", ["AA x4", "AAA x4", "AA x12"]),
    ("Storage box", ["10 l", "25 l", "45 l"]), ("Hanger", ["wood x5", "velvet x10"]),
    ("Candle", ["unscented", "vanilla", "cedar"]), ("Picture frame", ["A4", "13x18", "30x40"]),
    ("Water bottle", ["0.5 l steel", "0.75 l"]), ("Lunch box", ["glass", "bento"]),
    ("Doormat", ["coir", "rubber"]), ("Laundry basket", ["60 l", "wicker"]),
    ("Screwdriver set", ["6 pcs", "precision 24 pcs"]), ("Hammer", ["claw 450 g"]),
    ("Measuring tape", ["5 m", "8 m"]), ("Umbrella", ["compact", "golf"]),
    ("Plant pot", ["12 cm", "17 cm", "24 cm"]), ("Watering can", ["1 l", "5 l"]),
]
_COLOURS = ["white", "black", "grey", "blue", "green", "red", "oak", "sand"]


def products(count: int = 300, seed: int = 7) -> list[tuple[str, str]]:
    """Return `count` (sku, name) pairs; the same arguments always give the same list."""
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        kind, variants = rng.choice(_KINDS)
        name = f"{kind} {rng.choice(variants)}, {rng.choice(_COLOURS)}"
        if name not in seen:
            seen.add(name)
            names.append(name)
        elif len(seen) > 0.9 * len(_KINDS) * 3 * len(_COLOURS):
            names.append(f"{name} #{len(names)}")
    return [(f"SKU-{i + 1:05d}", name) for i, name in enumerate(names)]


def write_csv(path: Path, items: list[tuple[str, str]]) -> None:
    """Write the catalog as the hub reads it: CSV with a header row `sku,name`."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sku", "name"])
        writer.writerows(items)
