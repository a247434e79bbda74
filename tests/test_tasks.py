"""The long-context task suite: generation (determinism, depth, length, answers recoverable from the prompt),
scoring, and the whole pipeline on a tiny random model through the API and the CLI.

Prompts are built with a small byte-level BPE tokenizer trained here on Shakespeare's *training* works (so the
tests need no model download); one test repeats the length and depth checks with SmolLM2's own tokenizer when the
converted model is in the cache.
"""

import argparse
import copy
import json
import random
import re
import warnings
from collections import Counter

import pytest
import torch
from tiny_models import tiny_model
from transformers import PreTrainedTokenizerFast

from seer_adapter import SeerAttentionConfig, get_seer_model
from seer_adapter.assets import HELDOUT_WORKS, SMOLLM2, cache_dir, shakespeare_texts
from seer_adapter.cli import _parse_length
from seer_adapter.cli import main as cli_main
from seer_adapter.evaluation import evaluate_selectors
from seer_adapter.tasks import (
    TASKS,
    TaskError,
    TaskGenerator,
    answer_exact_match,
    answer_recall,
    evaluate_tasks,
    format_task_table,
    greedy_generate,
    normalize_answer,
    resolve_tasks,
    selector_free_blocks,
)
from seer_adapter.tasks.generation import _common_words_content, _frequent_words_content, word_pool

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
VOCAB = 1024


def _train_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = shakespeare_texts()
    corpus = "\n\n".join(texts[name][:40_000] for name in sorted(texts) if name not in HELDOUT_WORKS)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],  # ids 0, 1, 2 as in tests/tiny_models.py
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([corpus], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    """Plain text prompts (no chat template)."""
    return _train_tokenizer(None)


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    return chat


@pytest.fixture(scope="module")
def generator(tokenizer):
    return TaskGenerator(tokenizer, seed=0)


@pytest.fixture(scope="module")
def generators_seed1(tokenizer, chat_tokenizer):
    """A plain and a chat-template generator (each tokenises the haystack once for all the tests using it)."""
    return [TaskGenerator(tokenizer, seed=1), TaskGenerator(chat_tokenizer, seed=1)]


def _tokens_before(tokenizer, sample, text: str) -> int:
    """Token position of ``text`` in the decoded prompt, measured independently of the generator's bookkeeping."""
    decoded = tokenizer.decode(sample.input_ids)
    index = decoded.find(text)
    assert index > 0, f"{text!r} is not in the prompt"
    return len(tokenizer(decoded[:index].rstrip(" "), add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------- generation
def test_generation_is_deterministic_under_a_seed(tokenizer):
    tasks = ["niah_single_uuid", "niah_multivalue_word", "variable_tracking", "common_words", "frequent_words"]
    first = TaskGenerator(tokenizer, seed=3)
    again = TaskGenerator(tokenizer, seed=3)
    other = TaskGenerator(tokenizer, seed=4)
    for task in tasks:
        a = first.samples(task, 1200, num_samples=2)
        b = again.samples(task, 1200, num_samples=2)
        c = other.samples(task, 1200, num_samples=2)
        assert [(s.input_ids, s.answers, s.max_new_tokens) for s in a] == [
            (s.input_ids, s.answers, s.max_new_tokens) for s in b
        ]
        assert a[0].answers != c[0].answers and a[0].input_ids != c[0].input_ids
        assert a[0].answers != a[1].answers  # samples differ from each other
    # A sample keeps its question and haystack start across lengths; only the amount of haystack changes.
    short, long = first.samples("niah_multikey", 768, 1)[0], first.samples("niah_multikey", 1536, 1)[0]
    assert short.answers == long.answers and short.info["inserts"] == long.info["inserts"]
    assert long.info["haystack_tokens"] > 1.5 * short.info["haystack_tokens"]


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_single_needle_sits_at_the_requested_depth_and_answers_the_question(tokenizer, generator, depth):
    sample = generator.samples("niah_single", 2048, num_samples=1, depths=[depth])[0]
    (needle,) = sample.info["inserts"]
    key, value = re.fullmatch(r"The secret number for (\S+) is (\d+)\.", needle).groups()
    assert sample.answers == [value]
    decoded = tokenizer.decode(sample.input_ids)
    # The question asks for this key and the prompt states its value exactly once.
    assert decoded.endswith(f"The secret number for {key} is")
    assert re.findall(rf"The secret number for {re.escape(key)} is (\d+)\.", decoded) == [value]
    # Token position of the needle, measured on the prompt, against the haystack's token span.
    position = _tokens_before(tokenizer, sample, needle)
    start, end = sample.info["haystack_token_span"]
    needle_tokens = len(tokenizer(" " + needle, add_special_tokens=False)["input_ids"])
    measured = (position - start) / (end - start - needle_tokens)
    # Needles go to a sentence boundary: at most half a sentence piece (≈ 40 tokens here) from the exact depth.
    assert abs(measured - depth) * (end - start) <= 40, (measured, depth)
    assert sample.info["depths_measured"][0] == pytest.approx(measured, abs=3 / (end - start))


def test_default_depths_spread_from_start_to_end(generator):
    samples = generator.samples("niah_single_word", 1024, num_samples=5)
    assert [s.info["depths"][0] for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    measured = [s.info["depths_measured"][0] for s in samples]
    assert measured == sorted(measured) and measured[0] < 0.05 and measured[-1] > 0.95


def _needles(decoded: str, noun: str) -> list[tuple[str, str]]:
    return re.findall(rf"The secret {noun} for (\S+) is (\S+)\.", decoded)


@pytest.mark.parametrize(
    "task",
    [
        "niah_multikey",
        "niah_multikey_uuid",
        "niah_multivalue",
        "niah_multivalue_word",
        "niah_multiquery",
        "niah_multiquery_uuid",
    ],
)
def test_multi_needle_answers_are_recoverable_from_the_prompt(tokenizer, generator, task):
    noun = {"number": "number", "word": "word", "uuid": "identifier"}[TASKS[task].value_type]
    for sample in generator.samples(task, 1536, num_samples=2):
        decoded = tokenizer.decode(sample.input_ids)
        question = decoded[decoded.rfind("\n\n", 0, decoded.rfind("\n\n")) :]
        needles = _needles(decoded[: len(decoded) - len(question)], noun)
        assert len(needles) == 4
        if TASKS[task].variant == "multikey":
            key = re.search(rf"secret {noun} for (\S+)\?", question).group(1)
            assert len({k for k, _ in needles}) == 4
            assert [v for k, v in needles if k == key] == sample.answers
        elif TASKS[task].variant == "multivalue":
            key = re.search(rf"secret {noun}s? for (\S+)\.", question).group(1)
            assert {k for k, _ in needles} == {key}
            assert sorted(v for _, v in needles) == sorted(sample.answers)
        else:
            keys = re.search(rf"secret {noun}s for (.+?)\?", question).group(1).replace(" and ", ", ").split(", ")
            values = dict(needles)
            assert [values[k] for k in keys] == sample.answers
        if noun == "identifier":
            assert all(re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", a) for a in sample.answers)


def test_variable_tracking_chain_resolves_to_the_answers(tokenizer, generator):
    for sample in generator.samples("variable_tracking", 1536, num_samples=3):
        decoded = tokenizer.decode(sample.input_ids)
        query = re.search(r"holding the value (\d+)\?", decoded).group(1)
        values: dict[str, str] = {}
        for name, source in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", decoded):
            # In reading order every right-hand variable is already defined.
            values[name] = values[source[4:]] if source.startswith("VAR ") else source
        assert len(values) == 10
        assert sorted(n for n, v in values.items() if v == query) == sorted(sample.answers)
        assert len(sample.answers) == 5


def test_common_and_frequent_words_answers_are_the_most_frequent(tokenizer, generator):
    for sample in generator.samples("common_words", 2048, num_samples=2):
        decoded = tokenizer.decode(sample.input_ids)
        words = re.findall(r"\d+\. ([a-z]+)", decoded)
        assert len(words) == sample.info["entries"]
        counts = Counter(words).most_common()
        assert {w for w, _ in counts[:10]} == set(sample.answers)
        assert counts[9][1] > counts[10][1]
    # Far longer lists (up to ≈4M tokens) keep exact sizes and a strict top 10 / top 3.
    content = _common_words_content(random.Random(0), word_pool(), "seed")
    for entries in (120, 30_000, 1_000_000):
        words = content.list_builder(entries)[0].split()[1::2]  # "1. word 2. word ..."
        counts = Counter(words).most_common(11)
        assert len(words) == entries and {w for w, _ in counts[:10]} == set(content.answers)
        assert counts[9][1] >= counts[10][1] + 2
    content = _frequent_words_content(random.Random(0), "seed")
    for num_words in (60, 500_000):
        words = content.list_builder(num_words)[0].split()
        counts = Counter(words).most_common(4)
        assert len(words) == num_words
        assert [w for w, _ in counts[:3]] == content.answers and counts[2][1] > counts[3][1]
    for sample in generator.samples("frequent_words", 2048, num_samples=2):
        decoded = tokenizer.decode(sample.input_ids)
        body = decoded.split("\n\n")[1]
        counts = Counter(body.split()).most_common()
        assert [w for w, _ in counts[:3]] == sample.answers
        assert counts[2][1] > counts[3][1]


@pytest.mark.parametrize(
    "task", ["niah_single", "niah_multiquery_uuid", "variable_tracking", "common_words", "frequent_words"]
)
@pytest.mark.parametrize("length", [800, 1024, 2500])
def test_prompts_hit_the_requested_token_count(generators_seed1, task, length):
    for generator in generators_seed1:
        tok = generator.tokenizer
        if task == "common_words" and length < 1100:
            continue  # too short for 120 list entries with this small vocabulary (tested in test_bad_input)
        for sample in generator.samples(task, length, num_samples=2):
            total = sample.prompt_tokens + sample.max_new_tokens
            # Haystack tasks are cut at a token; list tasks stop at the last whole entry (< 8 tokens here).
            slack = 8 if TASKS[task].family in ("common_words", "frequent_words") else 2
            assert length - slack <= total <= length, (task, length, total)
            assert tok(sample.prompt, add_special_tokens=tok.chat_template is None)["input_ids"] == sample.input_ids
            assert sample.max_new_tokens >= len(tok(" " + ", ".join(sample.answers))["input_ids"])
            if generator.use_chat_template:
                assert sample.prompt.startswith("<s>user: ") and "<s>assistant: " in sample.prompt


@pytest.mark.skipif(
    not (cache_dir() / SMOLLM2.folder / "tokenizer.json").exists(), reason="SmolLM2 is not converted in the cache"
)
def test_smollm2_tokenizer_lengths_and_depths():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cache_dir() / SMOLLM2.folder)
    generator = TaskGenerator(tok, seed=0)
    assert generator.use_chat_template
    for sample in generator.samples("niah_single", 4096, num_samples=3):
        assert sample.prompt_tokens + sample.max_new_tokens == 4096
        assert sample.prompt.startswith("<|im_start|>system")
        assert abs(sample.info["depths_measured"][0] - sample.info["depths"][0]) < 0.01
    sample = generator.samples("variable_tracking", 4096, num_samples=1)[0]
    assert 4096 - 2 <= sample.prompt_tokens + sample.max_new_tokens <= 4096


# ------------------------------------------------------------------------------------------------ scoring
def test_normalisation():
    assert normalize_answer("  The Number is: 1234567.\n") == "the number is 1234567"
    assert normalize_answer("ID «0d14bc02-2285-9e17-6606-20c9435717cb»!") == "id 0d14bc02-2285-9e17-6606-20c9435717cb"
    assert normalize_answer("- RFCYL, – CMTON") == "rfcyl cmton"


def test_scoring_of_exact_partial_and_wrong_answers():
    answers = ["1234567"]
    assert answer_recall(" 1234567.", answers) == 1.0 and answer_exact_match(" 1234567.", answers) == 1.0
    chatty = " 1234567, as the passage says."
    assert answer_recall(chatty, answers) == 1.0 and answer_exact_match(chatty, answers) == 0.0
    assert answer_exact_match(" 1234567.\nAnything else I can help with?", answers) == 1.0  # first line only
    assert answer_recall(" 12345678.", answers) == 0.0  # whole words only
    assert answer_recall(" 7654321.", answers) == 0.0 and answer_exact_match(" 7654321.", answers) == 0.0
    assert answer_recall("", answers) == 0.0

    names = ["RFCYL", "CMTON", "HUQST", "NFQPW", "AZBEP"]
    assert answer_exact_match(" AZBEP, rfcyl, CMTON, HUQST and NFQPW.", names) == 1.0  # any order, any case
    assert answer_recall(" RFCYL, CMTON and NFQPW.", names) == pytest.approx(0.6)
    assert answer_exact_match(" RFCYL, CMTON and NFQPW.", names) == 0.0
    assert answer_exact_match(" RFCYL, CMTON, HUQST, NFQPW, AZBEP, XXXXX.", names) == 0.0  # one too many
    assert answer_recall(" RFCYL RFCYL RFCYL", names) == pytest.approx(0.2)
    uuid = ["0d14bc02-2285-9e17-6606-20c9435717cb"]
    assert answer_recall("It is 0d14bc02-2285-9e17-6606-20c9435717cb.", uuid) == 1.0
    assert answer_recall("It is 0d14bc02-2285-9e17-6606-20c9435717c.", uuid) == 0.0
    with pytest.raises(ValueError, match="empty"):
        answer_recall("x", [])


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_gives_clear_errors(tokenizer, generator):
    with pytest.raises(TaskError, match=r"unknown task 'niah_singel'.*niah_single"):
        resolve_tasks("niah_single,niah_singel")
    assert resolve_tasks("vt,cwe, niah_single") == ["variable_tracking", "common_words", "niah_single"]
    with pytest.raises(TaskError, match=r"too short for task 'niah_multikey'.*at least \d+ tokens"):
        generator.samples("niah_multikey", 256)
    with pytest.raises(
        TaskError, match=r"too short for task 'common_words': 120 list entries \(the minimum\) do not fit"
    ):
        generator.samples("common_words", 700)
    with pytest.raises(TaskError, match="positive number of tokens"):
        generator.samples("niah_single", 0)
    with pytest.raises(TaskError, match="depths must be fractions"):
        generator.samples("niah_single", 1024, depths=[50])
    with pytest.raises(TaskError, match="niah_single tasks only"):
        generator.samples("niah_multikey", 1024, depths=[0.5])
    with pytest.raises(TaskError, match="shorter than the longest answer"):
        generator.samples("niah_single_uuid", 1024, max_new_tokens=4)
    with pytest.raises(TaskError, match="no chat template"):
        TaskGenerator(tokenizer, use_chat_template=True)

    model = get_seer_model(tiny_model("llama", vocab_size=VOCAB), SeerAttentionConfig())
    with pytest.raises(TaskError, match="length 2048 exceeds the model's maximum of 1024 positions"):
        evaluate_tasks(model, tokenizer, "niah_single", [1024, 2048], num_samples=1, progress=False)
    with pytest.raises(ValueError, match=r"unknown selector\(s\) \['mobaa'\]"):
        evaluate_tasks(model, tokenizer, "niah_single", [1024], selectors=("dense", "mobaa"), progress=False)
    with pytest.raises(ValueError, match=r"densities are nz_ratio values in \(0, 1\]"):
        evaluate_tasks(model, tokenizer, "niah_single", [1024], densities=(30,), progress=False)
    with pytest.raises(ValueError, match="decode must be one of"):
        evaluate_tasks(model, tokenizer, "niah_single", [1024], decode="speculative", progress=False)
    # 64-token blocks: at 2k, nz_ratio 0.1 keeps 2 blocks per row, the forced sink and local ones; at 4k, 4.
    config = model.peft_config[model.active_adapter]
    assert selector_free_blocks(config, 2048, 0.1) == 0 and selector_free_blocks(config, 4096, 0.1) == 2
    with pytest.warns(UserWarning, match="nz_ratio=0.1 keeps only the forced sink and local blocks"):
        evaluate_tasks(
            model,
            tokenizer,
            "niah_single",
            [600],
            selectors=("gate",),
            densities=(0.1,),
            num_samples=1,
            max_new_tokens=12,
            progress=False,
        )


# ----------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_seer_model():
    # 16-token blocks: a 600-token prompt has 38 blocks, so top-k at nz_ratio 0.3 picks 5 blocks per row beyond the
    # forced sink and local ones and the selectors really differ.
    return get_seer_model(tiny_model("llama", vocab_size=VOCAB), SeerAttentionConfig(block_size=16))


def test_greedy_generation_equals_generate(tiny_seer_model):
    """The hand-written greedy loop (prefill, then cached decode) gives generate()'s tokens, dense and sparse."""
    model = tiny_seer_model
    ids = torch.randint(3, VOCAB, (1, 384), generator=torch.Generator().manual_seed(0))
    with model.disable_adapter():
        want = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, 384:].tolist()
        got, stats, _ = greedy_generate(model, ids, 8)
        assert got == want and stats == []  # the dense base model records no block statistics
        assert greedy_generate(model, ids, 5, decode="recompute")[0] == want[:5]  # dense: recomputing changes nothing
    saved = model.peft_config[model.active_adapter]
    model.set_sparsity(sparsity_method="nz_ratio", nz_ratio=0.3, dense_below_length=0)
    try:
        want = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, 384:].tolist()
        got, stats, _ = greedy_generate(model, ids, 8)
        assert got == want
        assert [s["mode"] for s in stats] == ["sparse", "sparse"] and all(s["q_len"] == 384 for s in stats)
        got, _, _ = greedy_generate(model, ids, 8, eos_token_ids={want[3]})
        assert got == want[: want.index(want[3]) + 1]  # stops after the first EOS
        # decode="recompute": every token from a fresh sparse prefill; the first token is the same prefill's.
        strict, stats, _ = greedy_generate(model, ids, 5, decode="recompute")
        assert strict[0] == want[0] and all(s["q_len"] == 384 for s in stats)
        assert model.sparsity_stats()[0]["q_len"] == 384 + 4 and model.sparsity_stats()[0]["mode"] == "sparse"
    finally:
        model.peft_config[model.active_adapter] = saved


def test_evaluate_tasks_end_to_end_on_a_tiny_model(tiny_seer_model, chat_tokenizer):
    model = tiny_seer_model
    adapters, config = dict(model.peft_config), model.peft_config[model.active_adapter]
    selectors = ("dense", "gate", "untrained", "moba", "oracle", "random")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = evaluate_tasks(
            model,
            chat_tokenizer,
            "niah_single,fwe",
            [600],
            selectors=selectors,
            densities=(0.3,),
            num_samples=1,
            max_new_tokens=20,
            progress=False,
        )
    assert not [w for w in caught if "same mask" in str(w.message)]
    assert [(r["task"], r["selector"]) for r in rows] == [
        (t, s) for t in ("niah_single", "frequent_words") for s in selectors
    ]
    for row in rows:
        if row["selector"] == "dense":
            assert row["density"] == 1.0 and row["sparsity_method"] == "dense"
        else:
            # top-k selection: every selector keeps the same number of blocks (forced blocks included)
            assert row["nz_ratio"] == 0.3 and 0.25 < row["density"] < 0.6
            same = [
                r["density"]
                for r in rows
                if r["task"] == row["task"] and r["length"] == row["length"] and r["selector"] != "dense"
            ]
            assert max(same) - min(same) < 1e-9
        (record,) = row["samples"]
        assert row["score"] == pytest.approx(100 * answer_recall(record["prediction"], record["answers"]))
        assert row["exact"] == pytest.approx(100 * answer_exact_match(record["prediction"], record["answers"]))
        assert row["prompt_tokens"] + row["max_new_tokens"] <= row["length"]
    # Same prompts, same greedy decoding: the dense rows are the base model's answers, and sparse prefill changes
    # at least one of them (a random model attends everywhere).
    dense = {(r["task"], r["length"]): r["samples"][0]["prediction"] for r in rows if r["selector"] == "dense"}
    assert any(
        r["samples"][0]["prediction"] != dense[r["task"], r["length"]] for r in rows if r["selector"] == "random"
    )
    for task in ("niah_single", "frequent_words"):  # the selectors keep different blocks
        predictions = {r["selector"]: r["samples"][0]["prediction"] for r in rows if r["task"] == task}
        assert predictions["oracle"] != predictions["random"]
    # The model is left as it was: same adapters, same settings.
    assert dict(model.peft_config) == adapters and model.peft_config[model.active_adapter] == config
    table = format_task_table(rows)
    assert "frequent_words" in table and "mean over tasks" in table


def test_evaluate_selectors_still_restores_the_model(tiny_seer_model):
    model = tiny_seer_model
    adapters = dict(model.peft_config)
    ids = torch.randint(3, VOCAB, (400,), generator=torch.Generator().manual_seed(1))
    rows = evaluate_selectors(
        model, ids, 400, nz_ratios=(0.3,), selectors=("gate", "untrained", "random"), progress=False
    )
    assert [r["selector"] for r in rows] == ["dense", "gate", "untrained", "random"]
    assert all(0.25 < r["density"] < 0.6 for r in rows[1:]) and rows[0]["density"] == 1.0
    assert dict(model.peft_config) == adapters


def test_cli_runs_the_task_suite_and_plots(tmp_path, tokenizer, capsys):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "tiny"
    tiny_model("llama", vocab_size=VOCAB).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out, plot = tmp_path / "results" / "tasks.json", tmp_path / "tasks.png"
    argv = (
        f"eval --model {folder} --device cpu --tasks fwe --lengths 512 768 --selectors dense gate moba "
        f"--densities 0.3 0.1 --num-samples 1 --max-new-tokens 20 --out {out} --plot {plot}"
    ).split()
    with pytest.warns(UserWarning, match="every selector gives the same mask"):  # 64-token blocks at 512 tokens
        assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "frequent_words" in printed and "moba" in printed
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["tasks"] == ["frequent_words"] and meta["lengths"] == [512, 768]
    assert meta["device"] == "cpu" and "torch" in meta and "date" in meta and meta["command"].startswith("seer-adapter")
    assert "dense" in meta["decode"]
    assert len(data["rows"]) == 2 * (1 + 2 * 2)
    assert {"task", "length", "selector", "density", "score"} <= set(data["rows"][0])
    assert plot.stat().st_size > 20_000

    assert _parse_length("8k") == 8192 and _parse_length("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError, match="not a length"):
        _parse_length("4.5k")
    with pytest.raises(SystemExit, match="unknown task 'needle'"):
        cli_main(["eval", "--model", str(folder), "--tasks", "needle"])
    with pytest.raises(SystemExit, match="exceeds the model's maximum of 1024"):
        cli_main(["eval", "--model", str(folder), "--device", "cpu", "--tasks", "niah_single", "--lengths", "4k"])


# ----------------------------------------------------------------------------------------- sparse decoding
def _decode_gated_model(seed: int = 0):
    """A tiny model whose gates have a random decode gate (the mean-pooling prior would hide bugs)."""
    model = get_seer_model(tiny_model("llama", vocab_size=VOCAB), SeerAttentionConfig(block_size=16, decode_gate=True))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.gates().values():
            for param in gate.decode.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model


def test_task_decode_modes_dense_and_sparse(chat_tokenizer):
    """decode='dense' switches a decode gate off; 'sparse' decodes through it; 'sparse' without one is an error."""
    model = _decode_gated_model()
    model.set_sparsity(decode_token_budget=16)  # the current block and the sink: really sparse
    options = dict(selectors=("dense", "gate"), densities=(0.5,), num_samples=1, max_new_tokens=20, progress=False)
    dense = evaluate_tasks(model, chat_tokenizer, "fwe", [600], decode="dense", **options)
    sparse = evaluate_tasks(model, chat_tokenizer, "fwe", [600], decode="sparse", **options)
    assert [r["decode"] for r in dense + sparse] == ["dense", "dense", "sparse", "sparse"]
    assert model.peft_config["default"].decode_method == "token_budget"  # restored after the run
    # the dense selector is the base model in both modes; the gated prefill is the same, so only decoding differs
    assert dense[0]["samples"][0]["prediction"] == sparse[0]["samples"][0]["prediction"]
    assert dense[1]["density"] == sparse[1]["density"]
    assert dense[1]["samples"][0]["prediction"] != sparse[1]["samples"][0]["prediction"]
    no_gate = get_seer_model(tiny_model("llama", vocab_size=VOCAB), SeerAttentionConfig(block_size=16))
    with pytest.raises(ValueError, match="decode='sparse' needs an adapter with a decode gate"):
        evaluate_tasks(no_gate, chat_tokenizer, "fwe", [600], decode="sparse", **options)


def test_cli_eval_decode_budgets(tmp_path, tokenizer, capsys):
    folder = tmp_path / "tiny"
    tiny_model("llama", vocab_size=VOCAB).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _decode_gated_model().save_pretrained(tmp_path / "gates")
    text = tmp_path / "text.txt"
    text.write_text(shakespeare_texts()[HELDOUT_WORKS[0]][:20_000])
    common = ["eval", "--model", str(folder), "--data", str(text), "--device", "cpu"]
    prefill_only = tmp_path / "prefill_only"
    get_seer_model(tiny_model("llama", vocab_size=VOCAB), SeerAttentionConfig(block_size=16)).save_pretrained(
        prefill_only
    )
    with pytest.raises(SystemExit, match="needs an adapter with a decode gate"):
        cli_main([*common, "--adapter", str(prefill_only), "--decode-budgets", "32"])
    # no adapter: untrained decode gates (64-token blocks: 3 of 5 kept), and the selectors that need no training
    bounds = tmp_path / "bounds.json"
    options = ["--window", "256", "--decode-tokens", "12", "--greedy-tokens", "0", "--decode-budgets", "192"]
    cli_main([*common, *options, "--decode-selectors", "gate", "oracle", "oracle_mass", "moba", "--out", str(bounds)])
    rows = json.loads(bounds.read_text())["rows"]
    assert [r["selector"] for r in rows] == ["dense", "gate", "oracle", "oracle_mass", "moba"]
    assert all(0.0 < r["decode_density"] < 1.0 for r in rows[1:])
    out = tmp_path / "decode.json"
    gates = ["--adapter", str(tmp_path / "gates"), "--window", "128", "--decode-tokens", "24", "--greedy-tokens", "6"]
    static = ["--decode-cache", "static"]  # shape-static steps (eager on the CPU), after the gate's sparse prefill
    static += ["--max-windows", "2", "--decode-batch-size", "2"]  # two windows as one batch
    cli_main([*common, *gates, "--decode-budgets", "16", "256", "--decode-prefill", "gate", *static, "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r.get("token_budget") for r in result["rows"]] == [None, 16, 256]
    assert {r["cache"] for r in result["rows"]} == {"static"} and {r["cache"] for r in rows} == {"dynamic"}
    assert {r["windows"] for r in result["rows"]} == {2}
    assert result["meta"]["prefill"] == "gate" and result["meta"]["continuation_tokens"] == 24
    assert result["rows"][2]["top1_agreement"] == 100.0  # 152 tokens < 256: the whole context
    assert result["rows"][1]["decode_density"] < 1.0
    assert "token_budget" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="below one block"):
        cli_main([*common, "--adapter", str(tmp_path / "gates"), "--window", "128", "--decode-budgets", "8"])
    # per-layer decode settings: both layers of the tiny model decode dense, so the budget-16 row is dense decoding
    layered = tmp_path / "layered.json"
    both_dense = '{"0": {"decode_method": "dense"}, "1": {"decode_method": "dense"}}'
    cli_main([*common, *gates, "--decode-budgets", "16", "--layer-overrides", both_dense, "--out", str(layered)])
    dense_row, budget_row = json.loads(layered.read_text())["rows"]
    assert budget_row["token_budget"] == 16 and budget_row["ppl"] == dense_row["ppl"]
    assert budget_row["top1_agreement"] == 100.0 and budget_row["decode_density"] == 1.0
    with pytest.raises(SystemExit, match=r"--layer-overrides: layer_overrides\['0'\]\.decode_token_budget=8"):
        cli_main([*common, *gates, "--decode-budgets", "16", "--layer-overrides", '{"0": {"decode_token_budget": 8}}'])
    # which layers' decode selection costs most: the sweep, and its chosen sets printed as --layer-overrides JSON
    capsys.readouterr()
    sweep = tmp_path / "layers.json"
    cli_main([*common, *gates, "--decode-budgets", "16", "--layer-sensitivity", "--top", "1", "2", "--out", str(sweep)])
    result = json.loads(sweep.read_text())
    runs = [r["run"] for r in result["rows"]]
    assert runs == [
        "dense",
        "all sparse",
        "layer 0 overridden",
        "layer 1 overridden",
        "top 1 overridden",
        "top 2 overridden",
    ]
    assert abs(result["rows"][-1]["ppl_delta_pct"]) < 1e-6 and result["meta"]["budget"] == 16  # both dense = dense
    assert '{"0": {"decode_method": "dense"}, "1": {"decode_method": "dense"}}' in capsys.readouterr().out
    given = tmp_path / "given.json"
    options = ["--layer-sets", "1", "--layer-budget", "32", "--first-window", "1", "--uniform-budgets", "32"]
    cli_main([*common, *gates, "--decode-budgets", "16", "--layer-sensitivity", *options, "--out", str(given)])
    rows = json.loads(given.read_text())["rows"]
    assert [r["run"] for r in rows] == ["dense", "all sparse", "1 given overridden", "all sparse at 32"]
    assert rows[2]["layer_overrides"] == {"1": {"decode_token_budget": 32}}
    # --keep-average: layer 1 at 48 tokens, layer 0 down to 16, a mean of 32 like the uniform budget
    options = ["--layer-sets", "1", "--layer-budget", "48", "--keep-average", "--first-window", "1"]
    cli_main([*common, *gates, "--decode-budgets", "32", "--layer-sensitivity", *options, "--out", str(given)])
    result = json.loads(given.read_text())
    assert result["meta"]["keep_average"] and result["rows"][2]["budget"] == 16
    assert result["rows"][2]["mean_budget"] == 32 and "decode_token_budget=16" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="keep_average needs a layer_budget"):
        cli_main([*common, *gates, "--decode-budgets", "32", "--layer-sensitivity", "--keep-average"])
    with pytest.raises(SystemExit, match="one --decode-budgets value"):
        cli_main([*common, *gates, "--decode-budgets", "16", "32", "--layer-sensitivity"])
    with pytest.raises(SystemExit, match=r"gated layers \[0, 1\]"):
        cli_main([*common, *gates, "--decode-budgets", "16", "--layer-sensitivity", "--layer-sets", "0,5"])
