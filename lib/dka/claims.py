"""The paper's quantitative claims, each judged against our measurement by its interval, not by eye.

Every claim of the paper and its supplement that a number can check is defined once here (`CLAIMS`):
what the paper says, where, its number, and the test that decides it. A notebook that measures a
claim records it (`record`: the claim, our interval, the dataset); `collect` gathers a profile's
records into one table and `write_table` writes `results/<profile>/claims.md` (and `.csv`).

Verdicts (`judge`), with `x` our interval and `m` the claim's margin:

- ``equivalent`` (the paper reports parity, |A - B| <= m): reproduced if x lies inside [-m, m],
  not reproduced if x lies entirely outside it, inconclusive otherwise.
- ``greater`` (the paper reports A - B > m, or a value above m): reproduced if x lies above m, not
  reproduced if x lies below m, inconclusive if x contains m.
- ``less``: the mirror image of ``greater``.

A measurement from one seed has no interval over seeds; it is judged with the interval it has (e.g. a
paired bootstrap over test images), and its row says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dka.atomic import write_text
from dka.stats import Interval

__all__ = ["Claim", "CLAIMS", "judge", "record", "collect", "write_table", "VERDICTS"]

VERDICTS = ("reproduced", "not reproduced", "inconclusive")
PARITY_MARGIN = 1.0  # top-1 points: what "on par" is taken to mean (the paper's differences are <= 0.3)


@dataclass(frozen=True)
class Claim:
    """One checkable statement of the paper."""

    id: str
    statement: str
    source: str
    paper: str  # the paper's number(s), as the paper gives them
    kind: str  # "equivalent" | "greater" | "less"
    margin: float
    measure: str  # what our number is, with its unit

    def __post_init__(self):
        if self.kind not in ("equivalent", "greater", "less"):
            raise ValueError(f"claim {self.id}: unknown kind {self.kind!r}")


_CLAIM_LIST = [
    Claim("parity-d5a", "A Dynamic-K head (K=5) costs no accuracy against the dense baseline",
          "Table 1", "CIFAR-10 95.12 vs 95.10; Places365 53.60 vs 53.69", "equivalent", PARITY_MARGIN,
          "top-1 of res18-d5a minus res18 (points)"),
    Claim("parity-dK", "Every K >= 5 keeps the baseline's accuracy", "Table 1",
          "Places365 d5a-d100a 53.58-53.87 vs 53.69", "equivalent", PARITY_MARGIN,
          "top-1 of res18-dKa minus res18 (points)"),
    Claim("collapse-d1a", "K = 1 collapses on Places365 (365 classes)", "Table 1", "27.83 vs 53.69",
          "greater", 5.0, "top-1 of res18 minus res18-d1a (points)"),
    Claim("parity-d1a-cifar", "K = 1 keeps the accuracy on CIFAR-10 (10 classes)", "Table 1", "95.02 vs 95.10",
          "equivalent", PARITY_MARGIN, "top-1 of res18-d1a minus res18 (points)"),
    Claim("parity-res50", "Res50-d25a matches Res50", "Table 1", "Places365 55.00 vs 54.74; CIFAR-10 95.58 vs 95.62",
          "equivalent", PARITY_MARGIN, "top-1 of res50-d25a minus res50 (points)"),
    Claim("sparsity-99", "About 99% of the final layer's weights become ~0 (|w| < 1e-3)", "Sec. 4.1, Fig. 4(b)",
          "~99%", "greater", 0.95, "share of res18-d5a final-layer weights with |w| < 1e-3"),
    Claim("sparsity-order-d1a-d5a", "Smaller K gives a sparser final layer (d1a > d5a)", "Fig. 4(b)",
          "d1a sparsest", "greater", 0.0, "|w| < 1e-3 share of res18-d1a minus res18-d5a"),
    Claim("sparsity-order-d5a-l1", "The Dynamic-K head is far sparser than the L1 head (by > 0.10 of the weights)",
          "Fig. 4(b)", "d5a >> L1", "greater", 0.10, "|w| < 1e-3 share of res18-d5a minus res18-l1"),
    Claim("sparsity-order-l1-res18", "The L1 head is sparser than the dense head", "Fig. 4(b)", "L1 > Res18",
          "greater", 0.0, "|w| < 1e-3 share of res18-l1 minus res18"),
    Claim("iou-d5a-res18", "Dynamic-K makes layer-4 units more interpretable (higher dissection IoU)",
          "Fig. 5(c)(d)", "d5a above Res18", "greater", 0.0, "mean layer-4 IoU of res18-d5a minus res18"),
    Claim("classes-5-concepts", "More than 95% of classes need at most 5 concepts", "Sec. 4.2",
          "> 95%", "greater", 0.95, "share of res18-d5a classes with <= 5 concepts"),
    Claim("residual-d5a", "A few units explain almost all of a Dynamic-K class score (~2% residual)",
          "Sec. 4.3, Fig. 7", "~2%", "less", 0.05, "median |residual| of res18-d5a after its top-5 units (paper's Y_c)"),
    Claim("residual-gap", "... against ~45% left by the dense baseline's top units", "Sec. 4.3, Fig. 7",
          "~45% vs ~2%", "greater", 0.0, "median |residual| of res18 minus res18-d5a after the top-5 units (paper's Y_c)"),
    Claim("internal-parity", "Internal Dynamic-K layers keep the accuracy", "Supplement",
          "Res18-d[32,32,5]a on par with Res18", "equivalent", PARITY_MARGIN,
          "top-1 of res18-d[K,K,5]a minus res18 (points)"),
    Claim("internal-5-concepts", "More than 80% of higher-layer units need at most 5 concepts", "Supplement",
          "> 80%", "greater", 0.80, "share of layer4.0.conv1 units with <= 5 layer3 concepts"),
]
CLAIMS: dict[str, Claim] = {c.id: c for c in _CLAIM_LIST}


def judge(claim: Claim, interval: Interval) -> str:
    """The verdict of `claim` given our interval (see the module docstring)."""
    low, high = interval.low, interval.high
    if math.isnan(low) or math.isnan(high):
        return "inconclusive"
    m = claim.margin
    if claim.kind == "equivalent":
        if -m <= low and high <= m:
            return "reproduced"
        return "not reproduced" if (low > m or high < -m) else "inconclusive"
    if claim.kind == "greater":
        return "reproduced" if low > m else ("not reproduced" if high < m else "inconclusive")
    return "reproduced" if high < m else ("not reproduced" if low > m else "inconclusive")


def record(out_dir: str | Path, claim_id: str, interval: Interval, dataset: str, note: str = "",
           subject: str = "") -> dict:
    """Add (or replace) our measurement of a claim in `out_dir/claims.json`; returns the record.

    Args:
        claim_id: a key of `CLAIMS`.
        interval: our estimate and its interval (see `dka.stats`).
        dataset: what it was measured on, named as a reader needs it ("scenes-demo64 (stand-in for
            Places365)", "CIFAR-10 (JPEG copy)").
        note: how the interval was obtained or what limits the comparison.
        subject: which model(s) when a claim is measured several times (e.g. "res18-d25a").
    """
    if claim_id not in CLAIMS:
        raise KeyError(f"unknown claim {claim_id!r}; valid: {', '.join(CLAIMS)}")
    claim = CLAIMS[claim_id]
    path = Path(out_dir) / "claims.json"
    records = json.loads(path.read_text()) if path.is_file() else []
    entry = {"claim": claim_id, "subject": subject, "dataset": dataset, "interval": interval.as_dict(),
             "verdict": judge(claim, interval), "note": note}
    records = [r for r in records if (r["claim"], r["subject"]) != (claim_id, subject)] + [entry]
    write_text(path, json.dumps(records, indent=2, allow_nan=True) + "\n")
    return entry


def collect(results_dir: str | Path) -> pd.DataFrame:
    """Every claim record under `results/<profile>/` (one `claims.json` per notebook), in `CLAIMS` order."""
    rows = []
    for path in sorted(Path(results_dir).glob("*/claims.json")):
        for r in json.loads(path.read_text()):
            claim = CLAIMS[r["claim"]]
            iv = Interval(**{k: r["interval"][k] for k in ("mean", "low", "high", "n", "sd", "method")})
            rows.append({"claim": claim.id, "statement": claim.statement, "source": claim.source,
                         "paper": claim.paper, "measure": claim.measure, "subject": r["subject"],
                         "dataset": r["dataset"], "ours": iv.format(3 if abs(iv.mean) < 2 else 2),
                         "n": iv.n, "interval": f"[{iv.low:.3g}, {iv.high:.3g}]" if not math.isnan(iv.low) else "–",
                         "test": f"{claim.kind} {claim.margin:g}", "verdict": judge(claim, iv),
                         "note": r["note"], "notebook": path.parent.name})
    order = {c: i for i, c in enumerate(CLAIMS)}
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.sort_values(["claim", "subject"], key=lambda s: s.map(order) if s.name == "claim" else s,
                             kind="stable").reset_index(drop=True)


def write_table(frame: pd.DataFrame, results_dir: str | Path, title: str) -> Path:
    """`claims.md` (and `claims.csv`) in `results_dir`: one row per claim measurement."""
    results_dir = Path(results_dir)
    write_text(results_dir / "claims.csv", frame.to_csv(index=False))
    columns = ["statement", "source", "paper", "measure", "subject", "dataset", "ours", "interval", "verdict", "note"]
    lines = [f"# {title}", "",
             "Each row: the paper's claim, our measurement (mean ± 95% half-width over seeds, or the stated interval), "
             "the dataset it was measured on, and the verdict the interval gives (reproduced / not reproduced / "
             "inconclusive; rules in `dka.claims`).", ""]
    if frame.empty:
        lines.append("No claim was measured at this profile.")
    else:
        # a `|` inside a cell (e.g. "|w| < 1e-3") would end the Markdown cell: escape it
        shown = frame[columns].rename(columns={"interval": "95% interval"}).map(
            lambda v: v.replace("|", "\\|") if isinstance(v, str) else v)
        lines.append(shown.to_markdown(index=False))
        counts = frame["verdict"].value_counts()
        lines += ["", "Verdicts: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS) + "."]
    return write_text(results_dir / "claims.md", "\n".join(lines) + "\n")
