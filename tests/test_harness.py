"""The lm-evaluation-harness model (samplers/harness.py): exact values on an enumerable toy, the shipped tasks end
to end through lm_eval.simple_evaluate and lm-eval's command line, stop strings, and bad requests."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the dev extra")

from samplers.harness import DiffusionHarnessLM, cut_at_stop  # noqa: E402
from tests.reference import ExactDenoiser, conditional, enumerate_joint  # noqa: E402

V, L = 3, 3


class Letters:
    """A tokenizer of the letters a, b, c (ids 0, 1, 2) for the exact toy."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": ["abc".index(ch) for ch in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join("abc"[i] for i in ids)


def _request(*args):
    return SimpleNamespace(args=args)


@pytest.fixture(scope="module")
def toy():
    joint = enumerate_joint(V, L, seed=5)
    model = ExactDenoiser(joint, prefix=1)  # position 0 is the context, ignored: p(y | c) = p(y)
    return joint, DiffusionHarnessLM(model=model, tokenizer=Letters(), num_points=3, batch_size=64)


def _greedy(joint):
    """Most confident first, argmax, one token per step: the reference for is_greedy."""
    seq, masked = [V] * L, set(range(L))
    while masked:
        best = max(((max(p), i, p.index(max(p))) for i in masked
                    for p in [conditional(joint, tuple(seq), tuple(sorted(masked)), i)]))
        _, i, token = best
        seq[i] = token
        masked.remove(i)
    return tuple(seq)


def test_loglikelihood_is_the_exact_conditional_within_the_estimators_interval(toy):
    joint, lm = toy
    for y in (max(joint, key=joint.get), min(joint, key=joint.get)):
        text = "".join("abc"[i] for i in y)
        draws = []
        for seed in range(130):
            lm.seed = seed
            draws += [ll for ll, _ in lm.loglikelihood([_request(c, text) for c in "abc"])]
        lm.seed = 0
        draws = torch.tensor(draws, dtype=torch.float64)
        standard_error = draws.std() / math.sqrt(len(draws))
        assert abs(draws.mean() - math.log(joint[y])) < 4 * standard_error, (draws.mean(), math.log(joint[y]))


def test_rolling_loglikelihood_is_the_sum_of_the_windows_exact_log_probabilities():
    joint = enumerate_joint(V, L, seed=7)
    lm = DiffusionHarnessLM(model=ExactDenoiser(joint, prefix=0), tokenizer=Letters(), num_points=2)
    first, second = (0, 1, 2), (2, 2, 0)  # "abc" and "cca": windows of the model's 3 tokens
    values = []
    for seed in range(300):
        lm.seed = seed
        values += lm.loglikelihood_rolling([_request("abccca")])
    values = torch.tensor(values, dtype=torch.float64)
    exact = math.log(joint[first]) + math.log(joint[second])
    assert abs(values.mean() - exact) < 4 * values.std() / math.sqrt(len(values)), (values.mean(), exact)
    assert lm.report["loglikelihood_rolling"]["calls"] == 300 * 2  # both windows in one batch: 2 calls a request


def test_is_greedy_is_argmax_decoding_of_the_continuation(toy):
    joint, lm = toy
    greedy = _greedy(joint)
    other = next(y for y in joint if y != greedy)
    flags = [g for _, g in lm.loglikelihood([_request("a", "".join("abc"[i] for i in y)) for y in (greedy, other)])]
    assert flags == [True, False]


def test_a_requests_score_does_not_depend_on_its_batch_or_position(toy):
    _, lm = toy
    alone = lm.loglikelihood([_request("b", "cab")])
    mixed = lm.loglikelihood([_request("a", "abc"), _request("c", "bba"), _request("b", "cab")])
    assert mixed[2] == alone[0]


def test_generate_until_stops_at_the_first_stop_string(toy):
    _, lm = toy
    (full,) = lm.generate_until([_request("a", {"max_gen_toks": 3})])
    assert len(full) == 3
    stop = full[1:]  # a stop string that starts at position 1
    (cut,) = lm.generate_until([_request("a", {"max_gen_toks": 3, "until": [stop, "zz"]})])
    assert cut == full[:1]
    assert cut_at_stop("to be, or not.", [".", ","]) == "to be"


def test_bad_requests_and_arguments_are_named(toy):
    _, lm = toy
    with pytest.raises(ValueError, match=r"loglikelihood request 1: the continuation is 5 tokens, beyond the "
                                         r"model's context of 4"):
        lm.loglikelihood([_request("a", "abc"), _request("a", "abcab")])
    with pytest.raises(ValueError, match=r"generate_until request 0: the generation \(max_gen_toks\) is 5 tokens"):
        lm.generate_until([_request("a", {"max_gen_toks": 5})])
    with pytest.raises(ValueError, match="estimator must be one of"):
        DiffusionHarnessLM(model=lm.model, tokenizer=Letters(), estimator="one_step")
    with pytest.raises(ValueError, match="num_points must be a positive int, got num_points=0"):
        DiffusionHarnessLM(model=lm.model, tokenizer=Letters(), num_points=0)
    with pytest.raises(ValueError, match=r"does not take \['temperature'\]"):
        DiffusionHarnessLM(model=lm.model, tokenizer=Letters(), temperature=0.5)


def test_a_long_context_is_cut_from_the_left_and_counted(toy):
    _, lm = toy
    before = lm.report["loglikelihood"]["cut_contexts"]
    long, short = lm.loglikelihood([_request("cab", "abc"), _request("b", "abc")])
    assert lm.report["loglikelihood"]["cut_contexts"] == before + 1
    assert long == short  # "cab" keeps its last token, "b": the same request


def test_the_shipped_tasks_run_through_simple_evaluate_and_the_command_line(model_dir, tmp_path, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from samplers.cli.harness import TASKS
    from samplers.cli.harness import main as harness_main

    tasks = ["ddlm_next_line", "ddlm_next_word"]
    lm = DiffusionHarnessLM(str(model_dir), num_points=2, batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=4, log_samples=True,
                                      task_manager=TaskManager(include_path=str(TASKS)))
    # every logged response is what the model gives for that request on its own
    for sample in results["samples"]["ddlm_next_line"]:
        direct = lm.loglikelihood([_request(*args) for args in sample["arguments"]])
        assert [list(response[0]) for response in sample["resps"]] == [list(r) for r in direct]
    line = results["samples"]["ddlm_next_line"]
    accuracy = sum(int(max(range(4), key=lambda k: s["resps"][k][0][0]) == s["target"]) for s in line) / len(line)
    assert results["results"]["ddlm_next_line"]["acc,none"] == pytest.approx(accuracy)
    words = results["samples"]["ddlm_next_word"]
    matches = sum(s["filtered_resps"][0].lower() == s["target"].lower() for s in words) / len(words)
    assert results["results"]["ddlm_next_word"]["exact_match,first_word"] == pytest.approx(matches)

    # lm-eval's own command line, through ddlm-lm-eval: the same numbers
    out = tmp_path / "out"
    code = harness_main(["--model", "ddlm", "--model_args", f"pretrained={model_dir},num_points=2",
                         "--tasks", ",".join(tasks), "--limit", "4", "--batch_size", "8", "--device", "cpu",
                         "--output_path", str(out)])
    assert code == 0
    (written,) = out.rglob("results_*.json")
    cli = json.loads(written.read_text())["results"]
    for task, metric in (("ddlm_next_line", "acc,none"), ("ddlm_next_line", "acc_norm,none"),
                         ("ddlm_next_word", "exact_match,first_word")):
        assert cli[task][metric] == results["results"][task][metric], (task, metric)
    assert "network calls each" in capsys.readouterr().err
