"""The paper's published numbers (``reports/paper_numbers.yaml``) and which of them a row of ours stands for.

Part of the report builder (``reports/build.py``); imports only ``reports.formatting``."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from reports.formatting import canon

PAPER_NUMBERS_PATH = Path(__file__).resolve().with_name("paper_numbers.yaml")
# Datasets a teacher's name starts with ('cifar10-uncond' -> 'cifar10').
DATASETS = ("cifar10", "imagenet64", "ffhq64", "afhqv2-64", "digits", "gmm")


def load_paper_numbers(path: str | Path | None = None) -> dict:
    """The paper's published numbers with an index by key (`index`)."""
    with open(path or PAPER_NUMBERS_PATH) as f:
        paper = yaml.safe_load(f)
    index: dict[str, dict] = {}
    for row in paper["ablation"]["rows"]:
        index[row["key"]] = {**row, "table": "ablation", "dataset": paper["ablation"]["dataset"],
                             "nfe": row.get("nfe", paper["ablation"].get("nfe"))}
    for dataset, rows in paper["comparison"].items():
        for row in rows:
            index[row["key"]] = {**row, "table": "comparison", "dataset": dataset}
    paper["index"] = index
    return paper


def paper_comparison_frame(paper: dict, dataset: str) -> pd.DataFrame:
    """The paper's Table 2/3 rows of a dataset (hours columns always present)."""
    df = pd.DataFrame(paper["comparison"].get(dataset, []))
    for col in ("hours", "hours_text"):
        if col not in df:
            df[col] = None
    return df


def teacher_dataset(teacher_name: str | None) -> str | None:
    """'cifar10-uncond' -> 'cifar10', 'imagenet64-cond' -> 'imagenet64', 'digits-cond' -> 'digits'."""
    if not teacher_name:
        return None
    name = str(teacher_name).lower()
    return next((ds for ds in DATASETS if name.startswith(ds)), name)


def paper_row(srow: dict, labels: dict, paper: dict, dataset: str, kind: str) -> dict | None:
    """The paper's row that a study row stands for: by its `paper_key`, else (no key given) by its labels, in
    the paper's ablation (CIFAR-10's only) or in the dataset's comparison table; `paper_key: null` means none."""
    key = srow.get("paper_key")
    if key:
        return paper["index"].get(key)
    if not srow or ("paper_key" in srow and key is None):
        return None
    if kind == "ablation":
        return _ablation_match(labels, paper, dataset)
    for p in paper["comparison"].get(dataset, []):
        if canon(p["method"]) == canon(labels["method"]) and p["nfe"] == labels["nfe"]:
            return {**p, "dataset": dataset}
    return None


def _ablation_match(labels: dict, paper: dict, dataset: str) -> dict | None:
    ablation = paper["ablation"]
    if ablation["dataset"] != dataset:  # the paper's ablation is CIFAR-10's: no other dataset's row
        return None
    for p in ablation["rows"]:
        if (canon(p["method"]) == canon(labels["method"]) and canon(p["teacher"]) == canon(labels["teacher"])
                and labels["t_min"] is not None and abs(p["t_min"] - labels["t_min"]) < 1e-9
                and bool(p["afs"]) == bool(labels["afs"]) and canon(p["loss"]) == canon(labels["loss"])):
            return {**p, "dataset": ablation["dataset"]}
    return None
