"""YAML that people write (run configs, overrides, study files), read so that no input does more than a small,
bounded amount of work or means other than it reads.

PyYAML's `safe_load` builds no objects of its own choosing, but it keeps the last of two equal keys
(`student: {nfe: 2, nfe: 3}` runs with 3) and lets aliases share one value many times over: ten levels of ten
aliases (a "billion laughs") load in microseconds as shared lists, and then every walk over them (a deep copy, a
repr in an error message, flattening a config) takes minutes and gigabytes. Here a document is composed first, its
size counted with every alias expanded, and refused past `MAX_NODES` values or `MAX_DEPTH` levels before anything
is built; a key given twice in one mapping is refused; a file must be UTF-8 text of at most `MAX_BYTES`. Aliases
within those bounds (a shared block, `<<:` merge keys) still work. Every refusal is a one-line `YAMLInputError`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # 1 MiB; the largest shipped study file is under 10 kB
MAX_NODES = 100_000  # values (scalars, lists, mappings) once every alias is expanded
MAX_DEPTH = 50  # levels of nesting; a config is 3 deep, a study's search space 4

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YAMLInputError(ValueError):
    """Text that is not YAML this project reads; the message is one line and names no file (callers add it)."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:  # `<<: *base`: keys written beside it override the merged ones
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: SafeConstructor refuses it in a moment
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(None, None, f"key {_shown(key)} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line(exc: yaml.YAMLError) -> str:
    """A PyYAML error as one line: what is wrong and where (PyYAML's own text spans several lines)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        what = exc.problem or exc.context or type(exc).__name__
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return " ".join(f"{what}{where}".split())
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_size(root: yaml.Node) -> None:
    """Count the document's values with every alias expanded (each shared node counted once per use, from a
    memo, so the count itself stays cheap) and refuse it past the bounds; an alias inside its own anchor (a
    recursive document) is refused too."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise YAMLInputError(f"an alias refers to a value that contains it (line {node.start_mark.line + 1}); "
                                 "a recursive document cannot be read")
        if depth > MAX_DEPTH:
            raise YAMLInputError(f"nested more than {MAX_DEPTH} levels deep (line {node.start_mark.line + 1})")
        open_nodes.add(key)
        total = 1
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_NODES:
                raise YAMLInputError(f"more than {MAX_NODES:,} values once its aliases are expanded (a \"billion "
                                     "laughs\" document?); write the values out, or use fewer aliases")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root, 0)


def load_yaml(text: str) -> Any:
    """The one YAML document in `text` (None for an empty one), or a YAMLInputError saying in one line why not."""
    if len(text) > MAX_BYTES:
        raise YAMLInputError(f"{len(text):,} characters; YAML read here is at most {MAX_BYTES:,}")
    loader = _StrictLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_size(root)
        return loader.construct_document(root)
    except YAMLInputError:
        raise
    except yaml.YAMLError as exc:
        raise YAMLInputError(f"not valid YAML: {_one_line(exc)}") from None
    except (ValueError, OverflowError) as exc:  # a value PyYAML's constructors cannot build: an int of 5,000
        # digits (Python's limit is 4,300), a timestamp in month 13
        raise YAMLInputError(f"a value cannot be read ({' '.join(str(exc).split())[:120]})") from None
    except RecursionError:  # PyYAML composes nested values recursively: `[[[[...` thousands deep
        raise YAMLInputError(f"nested more than {MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path) -> Any:
    """The YAML document in the regular file `path`, read whole only when it is small enough; a YAMLInputError
    (one line, without the path) for a file that is not UTF-8 text, too large, or not valid YAML."""
    path = Path(path)
    if not path.is_file():
        raise YAMLInputError("not a regular file")
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise YAMLInputError(f"larger than {MAX_BYTES:,} bytes; a config or study file is a few kB of YAML")
    if b"\0" in data:
        raise YAMLInputError("a binary file (it holds NUL bytes), not YAML text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YAMLInputError(f"not UTF-8 text (byte {exc.start} is {data[exc.start:exc.start + 1]!r}); a config "
                             "or study file is YAML text") from None
    return load_yaml(text)
