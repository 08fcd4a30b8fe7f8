from kubedistill_trainer.curate import curated_row
from kubedistill_trainer.judges import Score


def row(candidates: list[str]) -> dict[str, object]:
    return {
        "id": "r1",
        "split": "train",
        "prompt": "Classify: my card was charged twice",
        "candidates": candidates,
    }


def test_best_k_chosen_best_first_and_the_rest_rejected() -> None:
    scores = [Score(0.2, ""), Score(0.9, ""), Score(0.5, ""), Score(0.7, "")]
    out = curated_row(row(["a", "b", "c", "d"]), scores, top_k=2)
    assert out is not None
    assert out["chosen"] == ["b", "d"]
    assert out["rejected"] == ["a", "c"]


def test_rejected_copies_of_a_chosen_answer_are_dropped() -> None:
    # Majority voting: three samples agree on "billing", one says "bug".
    scores = [Score(1.0, ""), Score(1.0, ""), Score(1.0, ""), Score(0.0, "")]
    out = curated_row(row(["billing", "billing", "billing", "bug"]), scores, top_k=2)
    assert out is not None
    assert out["chosen"] == ["billing", "billing"]
    assert out["rejected"] == ["bug"]


def test_a_prompt_whose_candidates_all_fail_is_dropped() -> None:
    scores = [Score(0.0, ""), Score(None, "unparsable")]
    assert curated_row(row(["x", "y"]), scores, top_k=1) is None
