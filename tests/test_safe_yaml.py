"""YAML people write is read within bounds (sfd.safe_yaml): aliases that would expand past MAX_NODES values, a
recursive document, nesting past MAX_DEPTH, a key given twice, a binary or oversized file are one-line refusals
before anything is built, through every reader (run configs, overrides, study files); ordinary aliases and merge
keys still load."""
import resource
import time

import pytest

from sfd.config import ConfigError, load_config
from sfd.safe_yaml import MAX_BYTES, MAX_DEPTH, MAX_NODES, YAMLInputError, load_yaml, read_yaml_file
from sfd.study import StudyError, load_spec


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    """The classic alias bomb: level i is a list of `width` aliases to level i-1, so the last level stands for
    width**levels values (10**9 here) in a few hundred bytes."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


REFUSED = [
    (billion_laughs(), f"more than {MAX_NODES:,} values once its aliases are expanded"),
    ("&a [*a]", "an alias refers to a value that contains it"),
    ("[" * 50_000, f"nested more than {MAX_DEPTH} levels deep"),  # PyYAML's composer recursion
    ("[" * 60 + "]" * 60, f"nested more than {MAX_DEPTH} levels deep"),
    ("student: {nfe: 2, nfe: 3}", "key 'nfe' is given twice (line 1, column 19)"),
    ("a: 1\nb: 2\na: 3\n", "key 'a' is given twice (line 3, column 1)"),
    ("a: &x 1\nb: *y\n", "found undefined alias 'y' (line 2, column 4)"),
    ("a: [1, 2\n", "expected ',' or ']'"),
    ("!!python/object/apply:os.system ['echo hi']", "could not determine a constructor"),
    ("a: " + "1" * 5000, "a value cannot be read (Exceeds the limit (4300 digits)"),
]


@pytest.mark.parametrize("text,why", REFUSED, ids=[
    "billion-laughs", "recursive", "deep-flow", "deep", "duplicate-flow", "duplicate-block", "undefined-alias",
    "syntax", "python-tag", "huge-int"])
def test_refusals_are_one_line_and_quick(text, why):
    t0 = time.perf_counter()
    with pytest.raises(YAMLInputError) as err:
        load_yaml(text)
    assert time.perf_counter() - t0 < 5  # PyYAML composes 50,000 open brackets in ~1 s before it gives up
    message = str(err.value)
    assert why in message and "\n" not in message and len(message) < 300, message


def test_aliases_within_bounds_and_merge_keys_still_load():
    text = ("base: &base {nfe: 2, afs: true}\n"
            "row: {<<: *base, nfe: 3}\n"  # a key beside a merge overrides the merged one: not a duplicate
            "again: *base\n")
    assert load_yaml(text) == {"base": {"nfe": 2, "afs": True}, "row": {"nfe": 3, "afs": True},
                               "again": {"nfe": 2, "afs": True}}
    # a bomb one level short of the bound is still read (10**4 = 10,000 leaves)
    assert len(load_yaml(billion_laughs(levels=3))["l3"]) == 10


def test_the_bomb_costs_no_memory_before_it_is_refused():
    """Counting the expanded size walks each shared node once: the 10**9-value document is refused with the
    process's peak memory unchanged (at the resolution of ru_maxrss: kB), not after expanding it."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(YAMLInputError):
        load_yaml(billion_laughs(levels=12))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 10_000  # kB


def test_files_must_be_small_utf8_text(tmp_path):
    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    with pytest.raises(YAMLInputError, match="a binary file"):
        read_yaml_file(binary)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(YAMLInputError, match=r"not UTF-8 text \(byte 9 is b'\\xe9'\)"):
        read_yaml_file(latin1)
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_BYTES // 10 + 1))
    with pytest.raises(YAMLInputError, match="larger than 1,048,576 bytes"):
        read_yaml_file(big)
    with pytest.raises(YAMLInputError, match="not a regular file"):
        read_yaml_file("/dev/zero")  # endless: never read


def test_every_reader_uses_it(tmp_path):
    """Run configs, overrides and study files all refuse the same inputs in one line naming where."""
    config = tmp_path / "bomb.yaml"
    config.write_text("name: x\n" + billion_laughs().replace("l0:", "student: {nfe: 2}\nl0:"))
    with pytest.raises(ConfigError, match=r"^config file '.*bomb.yaml': more than 100,000 values"):
        load_config(config)
    twice = tmp_path / "twice.yaml"
    twice.write_text("student: {nfe: 2, nfe: 3}\n")
    with pytest.raises(ConfigError, match=r"twice.yaml': not valid YAML: key 'nfe' is given twice"):
        load_config(twice)
    with pytest.raises(ConfigError, match=r"^override student.nfe: the value is not valid YAML: found undefined"):
        load_config(None, ["student.nfe=*x"])
    study = tmp_path / "study.yaml"
    study.write_text("name: s\nkind: ablation\nkind: search\n")
    with pytest.raises(StudyError, match=r"^study study: .*study.yaml: not valid YAML: key 'kind' is given twice"):
        load_spec(str(study))
    study.write_bytes(b"\0\1\2")
    with pytest.raises(StudyError, match="a binary file"):
        load_spec(str(study))
