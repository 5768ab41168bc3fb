"""The paper's numbers that dka compares against (Sun, Ravi, Singh, ICCV 2019).

Table 1's CIFAR-10 and Places365 columns, the authors' released Network Dissection tally of their
Places365 Res18-d5a (`pretrained/tally.csv` of sunyiyou/dynamic-k-activation), and the paper's claims
in its own words. Plain data: every layer may import it.
"""

from __future__ import annotations

__all__ = ["PAPER_CIFAR10_TOP1", "PAPER_PLACES365_TOP1_TOP5", "PAPER_RELEASED_TALLY", "PAPER_CLAIMS"]

PAPER_CIFAR10_TOP1 = {
    "res18": 95.10, "res18-d1a": 95.02, "res18-d5a": 95.12, "res18-d10a": 95.22, "res18-d25a": 95.04,
    "res18-d50a": 95.06, "res18-d100a": 95.12, "res50": 95.62, "res50-d25a": 95.58,
}
PAPER_PLACES365_TOP1_TOP5 = {
    "res18": (53.69, 83.78), "res18-d1a": (27.83, 57.56), "res18-d5a": (53.60, 84.15),
    "res18-d10a": (53.64, 84.06), "res18-d25a": (53.87, 84.25), "res18-d50a": (53.58, 84.91),
    "res18-d100a": (53.81, 83.92), "res50": (54.74, 85.08), "res50-d25a": (55.00, 85.07),
}
PAPER_RELEASED_TALLY = {"model": "res18-d5a (Places365, layer4)", "units": 512, "interpretable_units": 441,
                        "unique_concepts": 230}
PAPER_CLAIMS = {
    "classes_within_5_concepts": "more than 95% of classes need at most 5 concepts",
    "units_within_5_concepts": "more than 80% of higher-layer units need at most 5 concepts",
}
