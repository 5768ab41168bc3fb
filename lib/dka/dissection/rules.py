"""The two rule sets of `dka.dissect`: dka's own ("dka") and NetDissect-Lite's exact output ("netdissect").

Both count the same way (DESIGN.md, "Network Dissection, as NetDissect-Lite defines it"). They
differ where NetDissect-Lite's code does something its definition does not say, or says loosely:

- threshold. dka: the exact 994/999 quantile of each unit's activations (numpy's linear rule).
  netdissect: its streaming sketch and readout (lite_quantile.py): up to about a rank away, and a
  random sample beyond 24,576 values per unit.
- a `0` in an image-level field of index.csv (scene, texture). dka: ignored, 0 means "no label".
  netdissect: label 0, counted (truth += sh*sw, intersections, activation in the last category);
  it can win that category.
- labels with no coverage in any selected category (label 0 included). dka: they count toward no
  category's activation. netdissect: toward the last category (its one-hot `labelcat`).
- the name of label 0 in tally.csv. dka: `-`. netdissect: an empty string (label.csv has no row 0).
- upsampling. dka: torch's bilinear (PIL's to float32 rounding; a pixel exactly at a threshold can
  flip). netdissect: PIL's arithmetic exactly (pil_resize.py; slower).
- an image with image-level labels but no label map. dka: it counts toward its own labels'
  categories. netdissect: toward the categories left in its loop's vector by the previous firing
  (image, unit) pair, plus its own (a variable its tally loop never resets for such images).
- the order of units with equal scores. dka: by unit number. netdissect: numpy's classic
  quicksort order, reversed (`score.argsort()[::-1]`).

Use "netdissect" wherever numbers are compared with the paper or the authors' released tally.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DissectionRules", "RULES", "get_rules"]


@dataclass(frozen=True)
class DissectionRules:
    name: str
    threshold: str  # "linear" (exact numpy quantile) | "netdissect" (NetDissect-Lite's sketch)
    zero_image_labels: bool  # count `0` entries of image-level fields as label 0
    uncovered_to_last: bool  # labels without a primary category count toward the last category
    empty_label: str  # name written for label 0
    upsample: str  # "torch" | "pil"
    stale_categories: bool  # NetDissect-Lite's reuse of the category vector for map-less images
    unit_order: str  # "stable" | "netdissect"


RULES = {
    "dka": DissectionRules("dka", threshold="linear", zero_image_labels=False, uncovered_to_last=False,
                           empty_label="-", upsample="torch", stale_categories=False, unit_order="stable"),
    "netdissect": DissectionRules("netdissect", threshold="netdissect", zero_image_labels=True,
                                  uncovered_to_last=True, empty_label="", upsample="pil", stale_categories=True,
                                  unit_order="netdissect"),
}


def get_rules(rules: str | DissectionRules) -> DissectionRules:
    if isinstance(rules, DissectionRules):
        return rules
    if rules not in RULES:
        raise ValueError(f"unknown dissection rules {rules!r}; choose one of {sorted(RULES)} ('netdissect' "
                         "reproduces NetDissect-Lite's output, 'dka' is the exact-quantile rule)")
    return RULES[rules]
