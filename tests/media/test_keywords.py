"""Query syntax (phrases, -exclusions, stop words) and the words of paths."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from searchengine.media.keywords import parse_query, path_words


def test_plain_words_are_optional_and_stop_words_dropped():
    q = parse_query("a dog on the Beach")
    assert q.optional == (("dog",), ("beach",)) and q.required == () and q.excluded == ()
    assert q.semantic_text == "a dog on the Beach"


def test_only_stop_words_are_kept_rather_than_leaving_nothing():
    assert parse_query("the").optional == (("the",),)


def test_quoted_phrases_are_required_and_reach_the_encoder_without_quotes():
    q = parse_query('"golden gate" bridge -fog -"night sky"')
    assert q.required == (("golden", "gate"),)
    assert q.optional == (("bridge",),)
    assert q.excluded == (("fog",), ("night", "sky"))
    assert q.semantic_text == "golden gate bridge"
    assert q.clauses == (("golden", "gate"), ("bridge",))


def test_unterminated_quote_runs_to_the_end_and_punctuation_splits_words():
    q = parse_query('IMG_2041 "red car')
    assert q.optional == (("img", "2041"),) and q.required == (("red", "car"),)


def test_a_lone_dash_is_not_an_exclusion():
    q = parse_query("salt - pepper")
    assert q.excluded == () and q.optional == (("salt",), ("pepper",))


def test_exclusions_only_leave_nothing_to_search():
    q = parse_query("-cat -dog")
    assert not q.searchable and q.semantic_text == ""


@given(st.text(max_size=80))
def test_any_text_parses_into_lowercase_alphanumeric_clauses(text):
    q = parse_query(text)
    for clause in q.optional + q.required + q.excluded:
        assert clause and all(w and w == w.lower() and "_" not in w and '"' not in w for w in clause)


def test_path_words_count_from_the_root_folder_down_and_split_names():
    words = path_words(
        ["/home/me/Pictures/Trip to Rome/BeachDay2023_IMG-0042.JPG"], ["/home/me/Pictures"]
    ).split()
    assert words[:4] == ["pictures", "trip", "to", "rome"]
    for w in ["beachday2023", "img", "0042", "beach", "day", "2023"]:
        assert w in words
    assert "home" not in words and "me" not in words and "jpg" not in words


def test_path_words_of_all_paths_of_an_image_without_a_known_root():
    words = path_words(["/a/b/holiday/x.png", "/c/d/family/y.png"], []).split()
    assert {"b", "holiday", "x", "d", "family", "y"} <= set(words) and "a" not in words


def test_path_words_of_unusual_spellings_are_pathlibs():
    """The writer splits plain paths as strings and leaves odd ones to pathlib: both give the
    words pathlib's reading of the path gives, and none of them fails the batch."""
    assert path_words(["/r/a/./b//c.d.jpg"], ["/r"]).split() == ["r", "a", "b", "c", "d"]
    assert path_words(["/r/.hidden", "/r/x."], ["/r/"]).split() == ["r", "hidden", "x"]
    assert path_words(["//x/IMG_1.jpg"], ["/"]).split() == ["img", "1"]  # raised ValueError before
    assert path_words(["/r/."], ["/r"]) == "r"
