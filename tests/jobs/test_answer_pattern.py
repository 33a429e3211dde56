"""``--answer-pattern``: exact match on an extracted answer (chain-of-thought data) instead of the whole response."""
import pytest

from sorsa_kernels.jobs.finetune.config import FinetuneConfig, check_answer_pattern
from sorsa_kernels.jobs.finetune.evaluation import answer_extractor, answers_match, exact_match

COT = "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72"


def test_a_regex_compares_its_group_in_completion_and_response():
    extract = answer_extractor(r"#### (\S+)")
    assert answers_match("48 / 2 = 24, then 48 + 24 = 72\n#### 72", COT, extract)
    assert not answers_match("#### 71", COT, extract)


def test_a_completion_without_the_answer_marker_is_wrong_even_if_it_holds_the_number():
    assert not answers_match("She sold 72 clips.", COT, answer_extractor(r"#### (\S+)"))


def test_last_number_ignores_thousands_separators_trailing_dots_and_zero_decimals():
    extract = answer_extractor("last-number")
    assert extract("so she pays $1,200.00.") == "1200"
    assert answers_match("The answer is 72.", COT, extract)
    assert not answers_match("The answer is 27", COT, extract)
    assert extract("no number here") is None


def test_a_regex_without_a_group_compares_the_whole_match():
    assert answer_extractor(r"-?\d+")("x = 15 or 16") == "15"


def test_without_a_pattern_the_whole_stripped_response_is_compared():
    extract = answer_extractor(None)
    assert answers_match(" 7\n", "7", extract) and not answers_match("7 apples", "7", extract)


def test_a_response_without_the_pattern_is_compared_whole():
    assert answers_match("#### 9", "9", answer_extractor(r"#### (\S+)"))


@pytest.mark.parametrize("pattern, message", [
    ("#### (\\S+", "answer_pattern '#### (\\\\S+' is not a valid regular expression"),
    ("(a)(b)", "answer_pattern '(a)(b)' has 2 groups; it may have at most one"),
])
def test_a_bad_pattern_is_a_one_line_error_naming_it(pattern, message):
    with pytest.raises(ValueError) as e:
        check_answer_pattern(pattern)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="answer_pattern"):
        FinetuneConfig(answer_pattern=pattern)


def test_a_bad_pattern_on_the_command_line_names_the_flag(tmp_path, capsys):
    from sorsa_kernels.cli import main

    rc = main(["finetune", "--answer-pattern", "(a)(b)", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "sorsa-kernels: error: answer-pattern '(a)(b)' has 2 groups" in err, err


def test_exact_match_counts_a_chain_of_thought_completion_by_its_answer():
    import torch

    from sorsa_kernels.jobs.models.embedded import build_tokenizer

    tok = build_tokenizer()
    completion = "3+4=7 so #### 7"

    class Scripted(torch.nn.Module):  # "generates" the same completion for every prompt
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **kwargs):
            ids = torch.tensor(tok(completion, add_special_tokens=False)["input_ids"])
            return torch.cat([input_ids, ids.expand(input_ids.shape[0], -1)], 1)

    rows = [{"prompt": "3+4?", "response": "3 and 4 make 7\n#### 7"}, {"prompt": "2+2?", "response": "#### 4"}]
    model = Scripted()
    assert exact_match(model, tok, rows, "Q: {prompt}\nA: ", False, 8) == 0.0
    assert exact_match(model, tok, rows, "Q: {prompt}\nA: ", False, 8, answer_pattern=r"#### (\S+)") == 0.5


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(a|aa)+$"])
def test_a_catastrophically_backtracking_pattern_is_a_one_line_error_not_a_hang(pattern, monkeypatch):
    import time

    import sorsa_kernels.jobs.finetune.evaluation as EV

    monkeypatch.setattr(EV, "ANSWER_TIMEOUT_S", 0.05)
    extract = answer_extractor(pattern)
    t0 = time.perf_counter()
    try:
        result = extract("a" * 40 + "b")
    except ValueError as e:
        assert pattern in str(e) and "\n" not in str(e)
    else:
        assert result is None
    assert time.perf_counter() - t0 < 5


def test_last_number_reads_a_comma_list_as_separate_numbers():
    extract = answer_extractor("last-number")
    assert extract("4,5") == "5"
    assert not answers_match("4,5", "45", extract)
    assert extract("1,2345") == "2345"
    assert extract("it costs 12,345,678.50") == "12345678.5"


def test_an_unmatched_group_is_no_answer_not_a_crash():
    extract = answer_extractor(r"answer: (\d+)|done")
    assert extract("done") is None and extract("answer: 7") == "7"
    assert not answers_match("done", "answer: 7", extract)


def _tok():
    from sorsa_kernels.jobs.models.embedded import build_tokenizer

    return build_tokenizer()


def test_generation_budget_keeps_the_prompt_whole_and_counts_cut_answers():
    from sorsa_kernels.jobs.finetune.evaluation import generation_budget

    rows = [{"prompt": "3+4?", "response": "7" * 40}, {"prompt": "2+2?", "response": "4"}]
    budget = generation_budget(_tok(), rows, "Q: {prompt}\nA: ", False, max_length=20)
    assert budget.longest_prompt + budget.max_new_tokens <= 20 and budget.prompts_cut == 0
    assert budget.answers_cut == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_length=4), "no token is left to generate an answer"),
    (dict(max_length=20, max_new_tokens=30), "--max-new-tokens 30 does not fit beside the longest held-out prompt"),
])
def test_generation_budget_refuses_a_prompt_it_would_have_to_cut_with_the_numbers(kwargs, message):
    from sorsa_kernels.jobs.finetune.evaluation import generation_budget

    with pytest.raises(ValueError, match=message):
        generation_budget(_tok(), [{"prompt": "3+4?", "response": "7"}], "Q: {prompt}\nA: ", False, **kwargs)


def test_exact_match_says_when_it_cuts_a_prompt_instead_of_cutting_silently():
    import torch

    tok = _tok()

    class Echo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **kwargs):
            return torch.cat([input_ids, input_ids[:, :1]], 1)

    with pytest.warns(UserWarning, match=r"exact match cut 1 held-out prompt\(s\) to their last 2 tokens"):
        exact_match(Echo(), tok, [{"prompt": "3+4?", "response": "7"}], "Q: {prompt}\nA: ", False, 4, max_length=6)
