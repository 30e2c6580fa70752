"""POPE / SeedBench scorers on hand-built cases: every parse path, empty and garbage predictions."""

import importlib.util
import json
from pathlib import Path

import pytest

from eval import score
from eval.score import (
    PredictionFileError,
    parse_pope_llava,
    parse_pope_lmms,
    parse_seed_letter,
    pope_metrics,
    score_pope,
    score_seedbench,
    seed_hit,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("No.", "no"),
        ("No, there is not.", "no"),
        ("There is not a dog in the image.", "no"),
        ("Yes, there is. No doubt.", "yes"),  # only the first sentence counts
        ("Yes. No.", "yes"),
        ("no,", "no"),  # commas are dropped before splitting
        ("NO", "yes"),  # case-sensitive: only 'No'/'no'/'not' are negative words
        ("Nope", "yes"),
        ("no!", "yes"),  # 'no!' is not the word 'no'
        ("cannot tell", "yes"),
        ("", "yes"),  # empty -> yes (LLaVA's rule)
        ("   ", "yes"),
        (None, "yes"),
        ("@#$%^ garbage", "yes"),
        (".no", "yes"),  # first sentence is empty
        ("I do not know", "no"),
        ("No\n", "no"),  # stripped first (LLaVA strips generations before eval_pope.py)
        (" no thanks", "no"),
    ],
)
def test_pope_llava_parser(text, expected):
    assert parse_pope_llava(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("Yes", "yes"), ("  NO \n", "no"), ("Yes.", "yes."), ("", ""), (None, ""), ("garbage", "garbage")],
)
def test_pope_lmms_parser(text, expected):
    assert parse_pope_lmms(text) == expected


def test_pope_metrics_hand_computed():
    preds = ["yes", "yes", "no", "no", "yes", "garbage"]
    gts = ["yes", "no", "no", "yes", "yes", "yes"]
    m = pope_metrics(preds, gts)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["unparsed"]) == (2, 1, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)  # the garbage answer is left out of FN (lmms-eval's rule)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)  # of the predictions, not of the ground truth


def test_pope_metrics_degenerate_all_no():
    m = pope_metrics(["no"] * 4, ["yes", "yes", "no", "no"])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["accuracy"] == 0.5 and m["yes_ratio"] == 0.0


def _pope_records():
    rows = [
        # category, answer, prediction
        ("adversarial", "yes", "Yes"),
        ("adversarial", "no", "Yes, there is."),
        ("adversarial", "no", "No."),
        ("adversarial", "yes", ""),
        ("popular", "yes", "yes"),
        ("popular", "no", "no"),
        ("popular", "no", "There is not."),
        ("popular", "yes", "NO"),
        ("random", "yes", "Yes"),
        ("random", "no", "No"),
        ("random", "no", "garbage"),
        ("random", "yes", "yes"),
    ]
    return [dict(question_id=i, category=c, answer=a, prediction=p) for i, (c, a, p) in enumerate(rows)]


def test_score_pope_llava_vs_lmms():
    llava = score_pope(_pope_records(), "llava")
    lmms = score_pope(_pope_records(), "lmms")
    assert sorted(llava["categories"]) == ["adversarial", "popular", "random"]
    assert llava["missing_categories"] == []
    # llava: adversarial preds yes, yes, no, yes(empty) -> tp 2 fp 1 tn 1 fn 0
    adv = llava["categories"]["adversarial"]
    assert (adv["tp"], adv["fp"], adv["tn"], adv["fn"]) == (2, 1, 1, 0)
    assert adv["yes_ratio"] == 0.75
    # lmms: adversarial preds yes, 'yes, there is.', 'no.', '' -> only the first one parses
    adv = lmms["categories"]["adversarial"]
    assert (adv["tp"], adv["fp"], adv["tn"], adv["fn"], adv["unparsed"]) == (1, 0, 0, 0, 3)
    assert adv["accuracy"] == 0.25 and adv["yes_ratio"] == 0.25
    # popular: 'NO' is yes for llava (case-sensitive) but no for lmms
    assert llava["categories"]["popular"]["fn"] == 0 and lmms["categories"]["popular"]["fn"] == 1
    # mean F1 is the mean of the category F1s
    f1s = [llava["categories"][c]["f1"] for c in ("adversarial", "popular", "random")]
    assert llava["mean_f1"] == pytest.approx(sum(f1s) / 3)
    assert llava["overall"]["n"] == 12


def test_score_pope_rejects_bad_answer():
    recs = [dict(question_id=0, answer="maybe", prediction="yes", category="random")]
    with pytest.raises(PredictionFileError, match="question_id 0"):
        score_pope(recs)
    with pytest.raises(ValueError, match="parser"):
        score_pope(_pope_records(), "other")


@pytest.mark.parametrize(
    "text, expected",
    [("A", "A"), (" B\n", "B"), ("C. a cat", "C"), ("(D)", "("), ("", ""), (None, ""), ("b", "b"),
     ("The answer is A", "T")],
)
def test_seed_letter_parser(text, expected):
    assert parse_seed_letter(text) == expected


def test_score_seedbench():
    recs = [
        dict(question_id=0, answer="A", prediction="A", category="counting"),
        dict(question_id=1, answer="B", prediction="B. two", category="counting"),
        dict(question_id=2, answer="C", prediction="", category="counting"),
        dict(question_id=3, answer="D", prediction="d", category="scene"),  # lowercase is right (lmms-eval)
        dict(question_id=4, answer="A", prediction="garbage", question_type_id=1),
        dict(question_id=5, answer="A", prediction="A", question_type_id=10, data_type="video"),
    ]
    r = score_seedbench(recs)
    assert r["image"] == pytest.approx(3 / 5)
    assert r["video"] == 1.0
    assert r["all"] == pytest.approx(4 / 6)
    assert r["n"] == {"image": 5, "video": 1, "all": 6}
    assert r["unparsed"] == 2  # '', 'g'
    assert r["categories"]["counting"]["accuracy"] == pytest.approx(2 / 3)
    assert r["categories"]["counting"]["n"] == 3
    assert r["categories"]["scene_understanding"]["accuracy"] == 0.0
    assert r["categories"]["action_recognition"]["accuracy"] == 1.0


def test_score_seedbench_rejects_bad_answer():
    with pytest.raises(PredictionFileError, match="A-D"):
        score_seedbench([dict(question_id=0, answer="E", prediction="A")])


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_cli_pope_and_seedbench(tmp_path, capsys):
    p = _write(tmp_path / "pope.jsonl", _pope_records())
    out = tmp_path / "o" / "pope.json"
    assert score.main(["pope", "--predictions", str(p), "--parser", "lmms", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["parser"] == "lmms"
    s = _write(tmp_path / "seed.jsonl", [dict(question_id=1, answer="A", prediction="A", category="x")])
    assert score.main(["seedbench", "--predictions", str(s)]) == 0
    assert json.loads(capsys.readouterr().out)["all"] == 1.0


def test_cli_bad_files(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "answer": "yes", "prediction": "yes"}\n{not json\n')
    assert score.main(["pope", "--predictions", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    dup = _write(tmp_path / "dup.jsonl", [dict(question_id=1, answer="yes", prediction="")] * 2)
    assert score.main(["pope", "--predictions", str(dup)]) == 2
    assert "duplicate question_id" in capsys.readouterr().err
    miss = _write(tmp_path / "miss.jsonl", [dict(question_id=1, answer="yes")])
    assert score.main(["pope", "--predictions", str(miss)]) == 2
    assert "prediction" in capsys.readouterr().err
    assert score.main(["pope", "--predictions", str(tmp_path / "nope.jsonl")]) == 2
    (tmp_path / "empty.jsonl").write_text("\n")
    assert score.main(["seedbench", "--predictions", str(tmp_path / "empty.jsonl")]) == 2


# lmms-eval's SeedBench rule, by letter form: (prediction, answer, right?)
SEED_FORMS = [
    ("B", "B", True), ("b", "B", True), (" B ", "B", True), ("\tb\n", "B", True),  # case, spaces
    ("B.", "B", True), ("b)", "B", True), ("B: two dogs", "B", True), ("b. two dogs", "B", True),  # punctuation
    ("(B)", "B", False), ("[b]", "B", False), ("'B'", "B", False),  # the first character is the bracket
    ("The answer is B", "B", False), ("Answer: B", "B", False), ("b is right", "B", True),  # sentences
    ("Bb", "B", True), ("A", "B", False), ("a", "A", True), ("", "A", False), (None, "C", False), ("d", "D", True),
]


@pytest.mark.parametrize("prediction, answer, right", SEED_FORMS)
def test_seed_letter_forms_follow_lmms_eval(prediction, answer, right):
    assert seed_hit(prediction, answer) is right
    r = score_seedbench([dict(question_id=0, answer=answer, prediction=prediction)])
    assert r["all"] == float(right)


def _lmms_seed_utils():
    """lmms-eval's own tasks/seedbench/utils.py, loaded by path (its package __init__ pulls in the whole harness)."""

    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lmms-eval is not installed here (`make test-lmms` builds .venv-lmms with it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "tasks" / "seedbench" / "utils.py"
    mod_spec = importlib.util.spec_from_file_location("lmms_seed_utils", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_seed_scoring_equals_lmms_eval_functions():
    lm = _lmms_seed_utils()
    recs = [dict(question_id=i, answer=a, prediction=p, data_type="image") for i, (p, a, _) in enumerate(SEED_FORMS)]
    processed = [lm.seed_process_result({"answer": r["answer"], "data_type": "image", "question_id": r["question_id"]},
                                        [r["prediction"] or ""]) for r in recs]
    theirs = lm.seed_aggregation_result([p["seed_image"] for p in processed])
    assert score_seedbench(recs)["image"] == pytest.approx(theirs, abs=0)
