"""Stop strings and held-back text in a job's stream (no model): what a client receives is
the same however the text was cut into pieces, and the work is linear in the text."""

from hypothesis import given, settings, strategies as st

from mlx_qspec.batch import Job
from mlx_qspec.stop_strings import StopMatcher


def _reference(text: str, stops: list):
    """The text a stop cuts, by the rule stated in StopMatcher: the first character at
    which a stop string is complete ends the text; of those complete there, the longest."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[:end - max(map(len, done))], True
    return text, False


def _run(pieces: list, stops: list):
    """Feed ``pieces`` to a job as the engine does: ``(delivered events, stopped)``."""
    events = []
    job = Job(prompt=[1], max_tokens=len(pieces), deliver=events.append, stop=stops)
    for piece in pieces:
        if job.add(piece, None):
            return events, True
    job.flush()
    return events, False


def _cuts(text: str, points: list) -> list:
    points = sorted({p % (len(text) + 1) for p in points})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


ALPHABET = "ab c"  # few letters: stop strings occur, overlap and half-occur often


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(text=st.text(ALPHABET, max_size=40),
       stops=st.lists(st.text(ALPHABET, min_size=1, max_size=5), max_size=4),
       points=st.lists(st.integers(0, 40), max_size=12))
def test_delivered_text_is_the_reference_cut_however_the_text_arrives(text, stops, points):
    events, stopped = _run(_cuts(text, points), stops)
    assert ("".join(e["text"] for e in events), stopped) == _reference(text, stops)
    assert all(e["type"] == "text" and e["text"] for e in events)


def test_a_possible_stop_is_held_back_until_it_cannot_be_one():
    events = []
    job = Job(prompt=[1], max_tokens=9, deliver=events.append, stop=["world", "wok"])
    assert not job.add("Hello wo", None)
    assert [e["text"] for e in events] == ["Hello "]  # 'wo' may begin either stop
    assert not job.add("r", None)
    assert [e["text"] for e in events] == ["Hello "]
    assert not job.add("d!", None)  # 'word': neither
    assert [e["text"] for e in events] == ["Hello ", "word!"]
    assert job.add(" wok", None)
    assert [e["text"] for e in events] == ["Hello ", "word!", " "]


def test_logprobs_of_a_token_are_delivered_even_when_its_text_is_held():
    events = []
    job = Job(prompt=[1], max_tokens=2, deliver=events.append, stop=["xy"])
    job.add("x", [{"token": "x"}])
    assert events == [{"type": "text", "text": "", "logprobs": [{"token": "x"}]}]


def test_an_incomplete_last_character_is_dropped_streamed_or_not():
    """A streaming detokenizer holds back a character's bytes until they complete, and its
    finalize() writes an incomplete one as U+FFFD: a response cut at max_tokens inside a
    character ends with the last whole character."""
    events, _ = _run(["Hi", " \ufffd"], [])
    assert [e["text"] for e in events] == ["Hi", " "]
    events, _ = _run(["Hi \ufffd", "ok"], [])  # a U+FFFD inside the text stays
    assert "".join(e["text"] for e in events) == "Hi \ufffdok"


class CountingStr(str):
    """A str that counts the characters read from it by index."""

    reads = 0

    def __getitem__(self, i):
        CountingStr.reads += 1
        return str.__getitem__(self, i)


def test_matching_is_linear_in_the_text_and_the_stop_strings():
    """The adversarial case for naive matching: a long stop string that the text keeps
    almost completing ('aaa…a' against 'aaa…ab'). The issue measured 22.5 s for a
    600k-character stop string; here the characters read by index are counted."""
    n = 20_000
    stop = CountingStr("a" * n + "b")
    matcher = StopMatcher([stop])
    CountingStr.reads = 0
    for _ in range(2 * n // 100):
        assert matcher.feed("a" * 100) is None
    assert matcher.partial == n
    assert matcher.feed("b") == 1 - (n + 1)  # began n characters back
    assert CountingStr.reads <= 4 * (2 * n + 1 + len(stop)), CountingStr.reads


def test_a_long_stop_string_holds_back_only_what_may_begin_it():
    stop = "x" * 50_000 + "!"
    events = []
    job = Job(prompt=[1], max_tokens=9, deliver=events.append, stop=[stop])
    for _ in range(500):
        assert not job.add("x" * 100, None)
    assert events == []  # all of it may still be the stop string
    assert not job.add("y", None)
    assert "".join(e["text"] for e in events) == "x" * 50_000 + "y"
