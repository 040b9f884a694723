import json

import pytest

from benchmarks.__main__ import run
from benchmarks.amber import items as amber
from benchmarks.amber.lexicon import OfflineLexicon, load_lexicon
from benchmarks.amber.score import format_report, judge_caption, normalize_answer, score
from tests.benchmarks import shared_data


@pytest.fixture(scope="module")
def data() -> dict:
    folder = shared_data("amber")
    association = amber.load_association(folder)
    return {
        "annotations": amber.load_annotations(folder),
        "association": association,
        "safe_words": amber.load_safe_words(folder),
        "counter_init": amber.load_counter_init(folder),
        "lexicon": OfflineLexicon(amber.vocabulary_of(association)),
    }


def _score(data: dict, responses: list[dict], normalize: bool = False) -> dict:
    return score(responses=responses, normalize=normalize, **data)


def test_items_and_id_ranges() -> None:
    items = amber.load_items(shared_data("amber"))
    assert len(items) == 15220
    assert items[0].query == "Describe this image." and items[0].image == "AMBER_1.jpg"
    expected = {
        "generative": amber.GENERATIVE_IDS,
        "existence": amber.EXISTENCE_IDS,
        "relation": amber.RELATION_IDS,
    }
    for item in items:
        assert item.id in expected.get(item.dimension, amber.ATTRIBUTE_IDS)
    # each range holds exactly its dimension's ids (not one more, not one fewer)
    ids_of: dict[str, set[int]] = {}
    for item in items:
        group = item.dimension if item.dimension in expected else "attribute"
        ids_of.setdefault(group, set()).add(item.id)
    assert ids_of == {
        name: set(ids) for name, ids in {**expected, "attribute": amber.ATTRIBUTE_IDS}.items()
    }
    # the image comes from the query file: the yes/no items ask about the 1,004 caption images
    assert (items[1004].id, items[1004].image) == (1005, "AMBER_1.jpg")
    assert (items[-1].id, items[-1].image) == (15220, "AMBER_1004.jpg")
    assert {item.image for item in items} == {f"AMBER_{i}.jpg" for i in amber.GENERATIVE_IDS}
    # generative items carry the absent-but-likely objects; discriminative ones a yes / no truth
    assert items[0].truth[:2] == ["sky", "forest"] and items[0].hallu[:2] == ["cloud", "sun"]
    assert (items[1004].truth, items[1004].hallu) == ("yes", None)
    assert len(amber.vocabulary_of(amber.load_association(shared_data("amber")))) == 418


def test_discriminative_answers_are_case_sensitive(data: dict) -> None:
    # 8633-8636 are existence items with truth "no"; 1005 / 1007 state "yes", 1006 state "no".
    answers = {
        8633: "No",
        8634: "no",
        8635: "No.",
        8636: "NO",
        1005: "yes",
        1006: "No",
        1007: "Yes",
    }
    responses = [{"id": i, "response": a} for i, a in answers.items()]
    result = _score(data, responses)["discriminative"]
    # existence: 1 correct of 4 (denominators start at 0.001): acc 1/4.001, P 1/1.001, R 1/4.001.
    assert result["existence"] == {"accuracy": 25.0, "precision": 99.9, "recall": 25.0, "f1": 40.0}
    # state: correct 1006, 1007 of 3 -> 2/3.001 = 66.64 (not 66.7); one "No", rightly.
    assert result["state"] == {"accuracy": 66.6, "precision": 99.9, "recall": 99.9, "f1": 99.9}
    # overall: correct 3 of 7 -> 42.9; P 2/2.001 -> 100.0 (99.95 rounds up); R 2/5.001 -> 40.0.
    assert result["overall"] == {"accuracy": 42.9, "precision": 100.0, "recall": 40.0, "f1": 57.1}
    assert set(result) == {"overall", "existence", "attribute", "state"}
    normalized = _score(data, responses, normalize=True)["discriminative"]
    assert normalized["existence"]["accuracy"] == 100.0 and normalized["state"]["accuracy"] == 100.0


def test_normalize_answer() -> None:
    assert [normalize_answer(a) for a in ("yes.", "No, there is not", " NO", "Yes")] == [
        "Yes",
        "No",
        "No",
        "Yes",
    ]
    assert normalize_answer("There is no dog") == "There is no dog"
    assert normalize_answer("") == ""


def test_perfect_and_inverted_discriminative_answers(data: dict) -> None:
    truths = {a["id"]: a["truth"] for a in data["annotations"] if a["type"] != "generative"}
    perfect = [{"id": i, "response": t.capitalize()} for i, t in truths.items()]
    result = _score(data, perfect)
    assert result["items"] == {
        "state": 4764,
        "number": 2072,
        "action": 792,
        "existence": 4924,
        "relation": 1664,
    }
    assert all(v == 100.0 for rates in result["discriminative"].values() for v in rates.values())
    assert result["generative"] is None and result["amber_score"] is None
    inverted = [{"id": i, "response": "No" if t == "yes" else "Yes"} for i, t in truths.items()]
    assert all(
        v == 0.0
        for rates in _score(data, inverted)["discriminative"].values()
        for v in rates.values()
    )


def test_first_match_association_mapping(data: dict) -> None:
    # Item 14's truth lists grass (whose associations include "ground") before ground itself:
    # "ground" marks grass, the first matching entry, and leaves ground uncovered.
    annotation = data["annotations"][13]
    assert annotation["truth"] == [
        "sky",
        "grass",
        "forest",
        "lake",
        "woman",
        "beach",
        "child",
        "ground",
    ]
    judgement = judge_caption(
        "The ground is wet.",
        annotation["truth"],
        annotation["hallu"],
        data["association"],
        data["safe_words"],
        data["lexicon"],
    )
    assert judgement.covered == [0, 1, 0, 0, 0, 0, 0, 0]
    assert judgement.hallucinated == [0] and judgement.cognition == [0] * 5


CAPTION_1 = (
    "A man and a dog walk along the road next to a lake, under clouds and a blue sky. "
    "An orange kite flies above the mountains."
)


def test_generative_metrics_by_hand(data: dict) -> None:
    # Item 1: truth sky forest grass person lake mountain road; hallu cloud sun bird dog flower.
    # Nouns: man(->person) dog road lake cloud sky orange(safe word) kite mountain = 9,
    # hallucinated dog cloud kite = 3, covered person road lake sky mountain = 5 of 7,
    # hallu mentioned dog cloud = 2 of 5.
    judgement = judge_caption(
        CAPTION_1,
        **{k: data["annotations"][0][k] for k in ("truth", "hallu")},
        association=data["association"],
        safe_words=data["safe_words"],
        lexicon=data["lexicon"],
    )
    assert judgement.hallucinated == [0, 1, 0, 0, 1, 0, 0, 1, 0]
    assert judgement.covered == [1, 0, 0, 1, 1, 1, 1]
    assert judgement.cognition == [1, 0, 0, 1, 0]
    one = _score(data, [{"id": 1, "response": CAPTION_1}])
    # 3/9.001 -> 33.3, 5/7.001 -> 71.4, Hal 100 - 0/1.001 -> 100.0, 2/5.001 -> 40.0
    assert one["generative"] == {"CHAIR": 33.3, "Cover": 71.4, "Hal": 100.0, "Cog": 40.0}
    assert one["mode"] == "offline-fallback" and one["discriminative"] is None
    # Item 14 alone: nothing hallucinated, yet Hal = 100 - 1/1.001*100 = 0.1 (the 0.001 start).
    alone = _score(data, [{"id": 14, "response": "The ground is wet."}])
    assert alone["generative"] == {"CHAIR": 0.0, "Cover": 12.5, "Hal": 0.1, "Cog": 0.0}
    both = _score(
        data, [{"id": 14, "response": "The ground is wet."}, {"id": 1, "response": CAPTION_1}]
    )
    # CHAIR 3/10.001, Cover 6/15.001, Hal 100 - 1/2.001*100 = 50.02, Cog 2/10.001
    assert both["generative"] == {"CHAIR": 30.0, "Cover": 40.0, "Hal": 50.0, "Cog": 20.0}


def test_a_repeated_truth_object_is_never_covered_twice(data: dict) -> None:
    # Item 2 lists "ship" twice (14 captions' truth lists repeat an object): every match marks the
    # first entry, so Cover stays below 100 whatever the caption says.
    truth = data["annotations"][1]["truth"]
    assert truth[2:4] == ["ship", "ship"]
    result = _score(
        data, [{"id": 2, "response": "A ship and two boats."}, {"id": 1, "response": ""}]
    )
    # nouns ship, boat (ship's association) -> first ship only: Cover 1/(10 + 7 + 0.001) = 5.9;
    # the empty caption has no noun and no hallucination: Hal 100 - 2/2.001*100 = 0.0
    assert result["generative"] == {"CHAIR": 0.0, "Cover": 5.9, "Hal": 0.0, "Cog": 0.0}


def test_amber_score_combines_chair_and_f1(data: dict) -> None:
    responses = [
        {"id": 1, "response": CAPTION_1},
        {"id": 8633, "response": "No"},
        {"id": 1005, "response": "No"},
    ]
    result = _score(data, responses)
    f1 = result["discriminative"]["overall"]["f1"]
    assert f1 == 66.6  # P 1/2.001 -> 50.0, R 1/1.001 -> 99.9
    assert result["amber_score"] == round((100 - 33.3 + 66.6) / 2, 2)
    # existence and state only: overall and the AMBER score are flagged partial
    assert result["partial"] is True
    assert result["missing_dimensions"] == ["number", "action", "relation"]
    assert "Partial: no number, action, relation items" in format_report(result)


def test_all_discriminative_dimensions_are_not_partial(data: dict) -> None:
    first = {}
    for annotation in data["annotations"]:
        if annotation["type"] != "generative":
            dimension = amber.dimension_of(annotation["type"])
            first.setdefault(dimension, {"id": annotation["id"], "response": "Yes"})
    assert len(first) == 5
    result = _score(data, list(first.values()))
    assert result["partial"] is False and result["missing_dimensions"] == []
    assert "Partial" not in format_report(result)
    only_captions = _score(data, [{"id": 1, "response": CAPTION_1}])
    assert only_captions["partial"] is False and only_captions["discriminative"] is None


def test_offline_lexicon() -> None:
    lexicon = OfflineLexicon(amber.vocabulary_of(amber.load_association(shared_data("amber"))))
    text = "Dogs and two women sit on grass by glasses, leaves and boxes; you can see earrings and a can."
    # "Dogs" starts the sentence: NLTK + WordNet keep its case, so it is not the vocabulary's "dog".
    assert lexicon.nouns(text) == ["woman", "grass", "glass", "box", "can"]
    assert lexicon.similar("dog", "dog") and not lexicon.similar("dog", "puppy")
    # NLTK's WordNetLemmatizer (WordNet 3.0) keeps "men" (a noun there, as long as "man"), reads
    # "vases" as "vas" and keeps the plurals of words WordNet lacks ("bedsheets", "TVs")
    text = "Two men, three women, two vases on the bedsheets, two TVs and an e-book."
    assert lexicon.nouns(text) == ["woman", "e-book"]
    assert [lexicon.lemma(w) for w in ("busses", "leaves", "TV")] == ["bus", "leaf", "TV"]
    assert load_lexicon("offline", lexicon.vocabulary).mode == "offline-fallback"
    with pytest.raises(ValueError, match="Unknown matching mode"):
        load_lexicon("fuzzy", lexicon.vocabulary)


def test_missing_official_matching_names_the_flag_of_score_and_of_classify(monkeypatch) -> None:
    from benchmarks.amber import lexicon

    monkeypatch.setattr(lexicon, "_try_official", lambda threshold: (None, "no nltk"))
    with pytest.raises(RuntimeError) as error:
        load_lexicon("official", ["dog"])
    assert "--mode offline" in str(error.value)
    assert "--word-matching offline" in str(error.value)  # classify's flag


@pytest.mark.parametrize(
    ("responses", "message"),
    [
        ([{"id": 1, "response": "x"}, {"id": 1, "response": "y"}], "duplicate id 1"),
        ([{"id": 0, "response": "x"}], "not an AMBER item"),
        ([{"id": 15221, "response": "x"}], "not an AMBER item"),
        ([{"response": "x"}], "lacks id"),
        ([{"id": 1, "response": None}], "response of .* is not a string"),
        ([{"id": "AMBER_1", "response": "x"}], "id 'AMBER_1' is not an integer"),
        ([{"id": 1005.7, "response": "Yes"}], "id 1005.7 is not an integer"),  # not item 1005
        ([{"id": True, "response": "x"}], "id True is not an integer"),  # not item 1
    ],
)
def test_id_errors(data: dict, responses: list[dict], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _score(data, responses)


def test_integral_float_and_digit_string_ids_are_accepted(data: dict) -> None:
    as_ints = _score(data, [{"id": 1005, "response": "Yes"}, {"id": 1006, "response": "No"}])
    written = _score(data, [{"id": 1005.0, "response": "Yes"}, {"id": "1006", "response": "No"}])
    assert written == as_ints and sum(written["items"].values()) == 2


def test_cli_json(tmp_path, capsys) -> None:
    folder = shared_data("amber")
    responses = tmp_path / "responses.json"
    responses.write_text(
        json.dumps([{"id": 1, "response": CAPTION_1}, {"id": 8633, "response": "no."}])
    )
    run(
        [
            "amber",
            "score",
            "--data-dir",
            str(folder),
            "--responses",
            str(responses),
            "--json",
            "--mode",
            "offline",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["generative"] == {"CHAIR": 33.3, "Cover": 71.4, "Hal": 100.0, "Cog": 40.0}
    assert printed["discriminative"]["existence"]["accuracy"] == 0.0
    assert printed["mode"] == "offline-fallback"
    run(
        [
            "amber",
            "score",
            "--data-dir",
            str(folder),
            "--responses",
            str(responses),
            "--json",
            "--normalize",
            "--mode",
            "offline",
        ]
    )
    assert json.loads(capsys.readouterr().out)["discriminative"]["existence"]["accuracy"] == 99.9


def test_one_hallucinated_object_makes_a_caption_hallucinated(data: dict) -> None:
    # Item 1's hallu list holds "dog": Hal = 100 - 0/1.001*100, CHAIR 1/1.001 -> 99.9
    result = _score(data, [{"id": 1, "response": "There is a dog."}])
    assert result["generative"]["Hal"] == 100.0
    assert result["generative"]["CHAIR"] == 99.9


def test_existence_f1_adds_the_official_0_001_to_its_denominator(data: dict) -> None:
    # 8633-8636: existence items with truth "no"; P 2/2.001 -> 100.0, R 2/4.001 -> 50.0:
    # F1 1.0 / (1.5 + 0.001) -> 66.6 for existence, 1.0 / (1.5 + 0.0001) -> 66.7 overall
    answers = {8633: "No", 8634: "No", 8635: "Yes", 8636: "Yes"}
    result = _score(data, [{"id": i, "response": a} for i, a in answers.items()])
    existence = result["discriminative"]["existence"]
    assert (existence["precision"], existence["recall"], existence["f1"]) == (100.0, 50.0, 66.6)
    assert result["discriminative"]["overall"]["f1"] == 66.7


class _PuppyIsADogLexicon:
    """Official-mode stand-in: spaCy would find "puppy" similar to "dog"."""

    mode = "official"

    def nouns(self, text: str) -> list[str]:
        return ["puppy"] if "puppy" in text else []

    def similar(self, word1: str, word2: str) -> bool:
        return word1 == word2 or {word1, word2} == {"puppy", "dog"}


def test_a_noun_similar_to_a_hallucination_entry_counts_for_cognition() -> None:
    association = {"cat": [], "dog": [], "puppy": []}
    judgement = judge_caption(
        "A puppy sleeps.", ["cat"], ["dog"], association, [], _PuppyIsADogLexicon()
    )
    assert judgement.hallucinated == [1]
    assert judgement.covered == [0]
    assert judgement.cognition == [1]


def test_a_noun_similar_to_a_truth_entry_covers_it_and_is_no_hallucination() -> None:
    # official mode: spaCy similarity to a truth word (not only an exact match) clears the noun
    association = {"cat": [], "dog": [], "puppy": []}
    judgement = judge_caption(
        "A puppy sleeps.", ["dog"], ["cat"], association, [], _PuppyIsADogLexicon()
    )
    assert judgement.hallucinated == [0]
    assert judgement.covered == [1]
    assert judgement.cognition == [0]


class _PuppyIsLikeCatLexicon(_PuppyIsADogLexicon):
    """spaCy stand-in that also finds "puppy" similar to "cat"."""

    def similar(self, word1: str, word2: str) -> bool:
        return word1 == word2 or {word1, word2} == {"puppy", "cat"}


def test_a_hallucination_entry_is_marked_both_exactly_and_by_similarity() -> None:
    # The official script marks the first exact hallu-list match AND the first similar entry: with
    # "cat" (similar) listed before "puppy" (exact), both objects count for Cog.
    association = {"cat": [], "dog": [], "puppy": []}
    judgement = judge_caption(
        "A puppy sleeps.", ["dog"], ["cat", "puppy"], association, [], _PuppyIsLikeCatLexicon()
    )
    assert judgement.hallucinated == [1]
    assert judgement.cognition == [1, 1]


def test_attribute_aggregate_sums_all_three_dimensions_counters(data: dict) -> None:
    # Official: the attribute rates always add state, number and action counters, so with state
    # items alone the absent dimensions' 0.001 starts still enter the denominators:
    # accuracy 1/(1 + 0.003) -> 99.7 (state alone: 1/1.001 -> 99.9).
    result = _score(data, [{"id": 1005, "response": "Yes"}])["discriminative"]
    assert data["annotations"][1004]["truth"] == "yes"
    assert result["state"]["accuracy"] == 99.9
    assert result["attribute"]["accuracy"] == 99.7


def test_annotations_out_of_id_order_are_refused(tmp_path) -> None:
    annotations = [{"id": 1, "type": "generative"}, {"id": 3, "type": "generative"}]
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    with pytest.raises(ValueError, match="entry 1 has id 3, not 2"):
        amber.load_annotations(tmp_path)


def test_safe_words_are_the_lines_as_the_official_script_reads_them(tmp_path) -> None:
    # inference.py: `for line in file: safe_words.append(line.split("\n")[0])`: a blank line
    # and trailing spaces are kept as they are
    (tmp_path / "safe_words.txt").write_text("orange\nsign \n\nrange")
    assert amber.load_safe_words(tmp_path) == ["orange", "sign ", "", "range"]
    assert amber.load_safe_words(shared_data("amber"))[:3] == ["orange", "snack", "line"]


def test_a_missing_data_file_names_the_data_dir_flag(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="annotations.json not found; pass --data-dir"):
        amber.load_items(tmp_path)
    (tmp_path / "annotations.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="query_all.json not found; pass --data-dir"):
        amber.load_items(tmp_path)
