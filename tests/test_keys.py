import re

import pytest

from gradwatch.keys import match_patterns, resolve_key, variable_keys

KEYS = ["model/sub/d/kernel", "model/sub/d/bias", "model/sub/d/kernel#1", "model/dense/kernel"]


def test_variable_keys_suffix_duplicates_in_order():
    paths = ["sub/d/kernel", "sub/d/bias", "sub/d/kernel", "sub/d/bias", "sub/d/kernel"]
    assert variable_keys(paths) == [
        "sub/d/kernel",
        "sub/d/bias",
        "sub/d/kernel#1",
        "sub/d/bias#1",
        "sub/d/kernel#2",
    ]


def test_resolve_key_full_key_and_unambiguous_suffix():
    assert resolve_key("model/dense/kernel", KEYS) == "model/dense/kernel"
    assert resolve_key("dense/kernel", KEYS) == "model/dense/kernel"
    assert resolve_key("d/kernel#1", KEYS) == "model/sub/d/kernel#1"
    assert resolve_key("bias", KEYS) == "model/sub/d/bias"


def test_resolve_key_suffix_only_on_slash_boundaries():
    with pytest.raises(KeyError, match="No variable is named 'ense/kernel'"):
        resolve_key("ense/kernel", KEYS)


def test_resolve_key_ambiguous_lists_matches():
    with pytest.raises(KeyError, match=r"ambiguous.*model/sub/d/kernel.*model/dense/kernel"):
        resolve_key("kernel", KEYS)


def test_match_patterns_globs_suffixes_and_regex_keep_model_order():
    assert match_patterns("dense*", KEYS, "variables") == ["model/dense/kernel"]
    assert match_patterns(["*bias", "dense/*"], KEYS, "variables") == [
        "model/sub/d/bias",
        "model/dense/kernel",
    ]
    assert match_patterns(re.compile(r"#\d+$"), KEYS, "variables") == ["model/sub/d/kernel#1"]
    assert match_patterns("*", KEYS, "variables") == KEYS


def test_match_patterns_no_match_lists_available_keys():
    with pytest.raises(
        ValueError, match=r"'conv\*' in `values` matches no variable.*model/dense/kernel"
    ):
        match_patterns(["*bias", "conv*"], KEYS, "values")


@pytest.mark.parametrize("bad", [3, [], [1], None])
def test_match_patterns_wrong_type(bad):
    with pytest.raises(TypeError, match="`variables` must be a glob"):
        match_patterns(bad, KEYS, "variables")
