"""`python -m sfd.assets list | path NAME | fetch NAME` (also `sfd assets ...`): the named assets, where each is and
what needs it, and their download. `list` reads the teachers and the studies to say which need each asset, which is
why the command line sits here, above both, and not in the asset library they import."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from sfd.assets import ASSETS, FID_REFS, AssetError, asset_path, fetch, require
from sfd.runner import needed_assets
from sfd.runner.preflight import INCEPTION
from sfd.study import StudyError, available_studies, load_spec
from sfd.study.configs import row_config, trial_config
from sfd.teachers import TEACHERS, teacher_spec


def size_text(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def size_of(name: str, path: Path | None) -> str:
    """The local copy's size, else the size registered for the asset, else an honest "unknown"."""
    if path is not None:
        return size_text(path.stat().st_size)
    registered = ASSETS[name].size
    return size_text(registered) if registered is not None else "size unknown"


def teacher_needs() -> dict[str, list[str]]:
    """Asset -> the teachers that read it: a checkpoint teacher's network, its training images (Algorithm 1) and,
    when it is scored by FID (its default metric), the Inception weights and its dataset's statistics."""
    needs: dict[str, list[str]] = {}
    for name in TEACHERS:
        if "<" in name:  # a family (gmm-<k>): analytic, reads no file
            continue
        spec = teacher_spec(name)
        uses = {spec.checkpoint: "", spec.data_asset: " (Algorithm 1's training images)"}
        if spec.default_metric == "fid" and spec.dataset in FID_REFS:
            uses.update({INCEPTION: " (FID)", FID_REFS[spec.dataset]: " (FID)"})
        for asset, why in uses.items():
            if asset is not None:
                needs.setdefault(asset, []).append(f"{name}{why}")
    return needs


def study_needs() -> dict[str, list[str]]:
    """Asset -> the studies whose runs read it (rows the study skips do not count; a search: its base settings and
    each choice of its space), with how many of their rows do."""
    needs: dict[str, list[str]] = {}
    for path in available_studies():
        try:
            spec = load_spec(str(path))
            configs = ([row_config(spec, r) for r in spec.rows if r["id"] not in spec.skip_rows] if spec.rows else
                       [trial_config(spec, {}, 0)] + [trial_config(spec, {k: v}, 0) for k, d in spec.space.items()
                                                       if d["type"] == "categorical" for v in d["choices"]])
        except (StudyError, ValueError):  # an invalid study is listed as such by `studies/run.py --list`
            continue
        counts: dict[str, int] = {}
        for cfg in configs:
            for asset in dict.fromkeys(needed_assets(cfg)):
                counts[asset] = counts.get(asset, 0) + 1
        for asset, n in counts.items():
            rows = f" ({n} of {len(configs)} rows)" if spec.rows and n < len(configs) else ""
            needs.setdefault(asset, []).append(spec.name + rows)
    return needs


def list_assets() -> None:
    """Every asset: its name, size, where it is (or `missing`), what it is, and which teachers and studies need it."""
    teachers, studies = teacher_needs(), study_needs()
    width = max(len(n) for n in ASSETS)
    for name in sorted(ASSETS):
        asset, path = ASSETS[name], asset_path(name)
        needed = [f"teacher {', '.join(teachers[name])}" if name in teachers else "",
                  f"studies {', '.join(studies[name])}" if name in studies else ""]
        print(f"{name:<{width}}  {size_of(name, path):>12}  {path if path else 'missing'}\n"
              f"{'':<{width}}  {asset.description}\n"
              f"{'':<{width}}  needed by: {'; '.join(filter(None, needed)) or 'no teacher or study here'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sfd.assets", description="Named SFD assets.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list assets: size, whether and where they are present, what needs them")
    p_path = sub.add_parser("path", help="print an asset's local path")
    p_path.add_argument("name")
    p_fetch = sub.add_parser("fetch", help="download an asset")
    p_fetch.add_argument("name")
    p_fetch.add_argument("--url", help="download from this URL instead (a mirror)")
    p_fetch.add_argument("--dest", help="folder to put the file in")
    p_fetch.add_argument("--no-progress", action="store_true")
    p_fetch.add_argument("--force", action="store_true", help="download again even if the file is there")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its usage message
        return int(e.code or 0)
    try:
        if args.command == "list":
            list_assets()
        elif args.command == "path":
            print(require(args.name))
        else:
            print(fetch(args.name, dest_dir=args.dest, url=args.url, progress=not args.no_progress,
                        force=args.force))
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `list | head`
        return 0
    except KeyboardInterrupt:
        print("error: interrupted; run the fetch again to resume", file=sys.stderr)
        return 2
    return 0
