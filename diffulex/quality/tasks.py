"""A deterministic synthetic instruction suite with exact-match answers (pure data, no downloads).

Every task generates prompts from a seeded ``random.Random``; ``make_suite(seed)`` returns a fixed
``(train, test)`` split. Single-answer tasks (arithmetic, string edits, sorting, counting, capital facts)
never put a test prompt in the training split; multi-answer tasks ("Name a capital city.") have few
distinct prompts, so their test prompts may also be trained on, with a randomly chosen valid answer per
training row: the model learns a distribution over answers, which is where unmasking several tokens at
once can mix two valid answers into an invalid one. ``grade`` checks membership in the valid set after
stripping whitespace. Answers vary from one character to ``MAX_ANSWER_CHARS`` so that EOS placement
matters. This module imports nothing from the engine.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MAX_ANSWER_CHARS = 14  # with the end-of-turn token, every answer fits a 16-token generation
DEFAULT_TRAIN_PER_TASK = 10_000
DEFAULT_TEST_PER_TASK = 40
# The quick start's question. Two-digit multiplication does not generalise at this model size (about 25%
# exact on held-out pairs after four minutes of training), so the demo is a TRAINED example: it is placed
# in the training split (DEMO_COPIES rows) and kept out of the test split, and the docs say so.
README_DEMO_PROMPT = "What is 15 times 23?"
DEMO_COPIES = 64
# Rows per task are multiplied by these: the arithmetic tasks are the hardest to learn.
TRAIN_WEIGHTS = {"multiplication": 3, "addition": 2}

# (country, capital, region): a small fixed table of facts, every name at most MAX_ANSWER_CHARS long.
CAPITALS: tuple[tuple[str, str, str], ...] = (
    ("France", "Paris", "Europe"),
    ("Germany", "Berlin", "Europe"),
    ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"),
    ("Portugal", "Lisbon", "Europe"),
    ("Greece", "Athens", "Europe"),
    ("Poland", "Warsaw", "Europe"),
    ("Austria", "Vienna", "Europe"),
    ("Norway", "Oslo", "Europe"),
    ("Sweden", "Stockholm", "Europe"),
    ("Finland", "Helsinki", "Europe"),
    ("Ireland", "Dublin", "Europe"),
    ("Hungary", "Budapest", "Europe"),
    ("Japan", "Tokyo", "Asia"),
    ("China", "Beijing", "Asia"),
    ("India", "New Delhi", "Asia"),
    ("Thailand", "Bangkok", "Asia"),
    ("Vietnam", "Hanoi", "Asia"),
    ("Nepal", "Kathmandu", "Asia"),
    ("Iran", "Tehran", "Asia"),
    ("South Korea", "Seoul", "Asia"),
    ("Indonesia", "Jakarta", "Asia"),
    ("Egypt", "Cairo", "Africa"),
    ("Kenya", "Nairobi", "Africa"),
    ("Ghana", "Accra", "Africa"),
    ("Morocco", "Rabat", "Africa"),
    ("Ethiopia", "Addis Ababa", "Africa"),
    ("Nigeria", "Abuja", "Africa"),
    ("Senegal", "Dakar", "Africa"),
    ("Canada", "Ottawa", "America"),
    ("Mexico", "Mexico City", "America"),
    ("Brazil", "Brasilia", "America"),
    ("Argentina", "Buenos Aires", "America"),
    ("Peru", "Lima", "America"),
    ("Chile", "Santiago", "America"),
    ("Cuba", "Havana", "America"),
    ("Australia", "Canberra", "Oceania"),
    ("New Zealand", "Wellington", "Oceania"),
    ("Fiji", "Suva", "Oceania"),
)
REGIONS: tuple[str, ...] = tuple(dict.fromkeys(region for _, _, region in CAPITALS))

CAPITAL_OF_TEMPLATES = (
    "What is the capital of {country}?",
    "Name the capital of {country}.",
    "Which city is the capital of {country}?",
    "The capital of {country} is?",
)
COUNTRY_OF_TEMPLATES = (
    "{capital} is the capital of which country?",
    "Which country has the capital {capital}?",
    "Name the country whose capital is {capital}.",
    "Of which country is {capital} the capital?",
)
# Training-only phrasings: the test asks each fact under one of the templates above that was never trained
# with that fact; more phrasings per fact in training teach the model that the wording does not matter.
CAPITAL_OF_TRAIN_TEMPLATES = (
    "Capital of {country}?",
    "Tell me the capital of {country}.",
    "{country} has which capital?",
    "What city is the capital of {country}?",
    "Give the capital city of {country}.",
    "Which city is {country}'s capital?",
)
COUNTRY_OF_TRAIN_TEMPLATES = (
    "{capital} is in which country?",
    "Which country is {capital} in?",
    "Tell me the country whose capital is {capital}.",
    "Country with the capital {capital}?",
    "What country has {capital} as its capital?",
    "{capital} is the capital city of?",
)
# Share of multiplication training rows with a one-digit factor ("What is 47 times 6?"): partial products
# the two-digit test pairs are built from (the test split only asks two digits by two digits).
ONE_DIGIT_FACTOR_SHARE = 0.25
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Example:
    """One prompt of a task and the set of answers graded correct (one for single-answer tasks)."""

    task: str
    prompt: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    """A named prompt generator: ``sample(rng)`` draws one example; ``multi_answer`` tasks have several
    valid answers. ``fixed_test`` (fact tasks) builds the test split itself instead of sampling it.
    ``train_sample`` (default ``sample``) draws training rows: a superset of the test distribution
    (extra phrasings, easier sub-problems) that never changes the test split."""

    name: str
    sample: Callable[[random.Random], Example]
    multi_answer: bool = False
    fixed_test: Callable[[random.Random], list[Example]] | None = None
    train_sample: Callable[[random.Random], Example] | None = None

    def sample_train(self, rng: random.Random) -> Example:
        return (self.train_sample or self.sample)(rng)


def _number(rng: random.Random, max_digits: int) -> int:
    """A number whose digit count is uniform in 1..max_digits (so short and long operands are common)."""
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _word(rng: random.Random, low: int, high: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _addition(rng: random.Random) -> Example:
    a, b = _number(rng, 3), _number(rng, 3)
    return Example("addition", f"What is {a} plus {b}?", (str(a + b),))


def _subtraction(rng: random.Random) -> Example:
    a, b = _number(rng, 3), _number(rng, 3)
    a, b = max(a, b), min(a, b)
    return Example("subtraction", f"What is {a} minus {b}?", (str(a - b),))


def _product(a: int, b: int) -> Example:
    """The one phrasing of a multiplication question (test and training rows alike)."""
    return Example("multiplication", f"What is {a} times {b}?", (str(a * b),))


def _multiplication(rng: random.Random) -> Example:
    return _product(rng.randint(10, 99), rng.randint(10, 99))


def _multiplication_train(rng: random.Random) -> Example:
    if rng.random() >= ONE_DIGIT_FACTOR_SHARE:
        return _multiplication(rng)
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    return _product(b, a) if rng.random() < 0.5 else _product(a, b)


def _copy(rng: random.Random) -> Example:
    word = _word(rng, 2, 10)
    return Example("copy", f"Repeat: {word}", (word,))


def _reverse(rng: random.Random) -> Example:
    word = _word(rng, 2, 10)
    return Example("reverse", f"Reverse: {word}", (word[::-1],))


def _sort(rng: random.Random) -> Example:
    alphabet = "0123456789" if rng.random() < 0.5 else LETTERS
    items = _word(rng, 3, 8, alphabet)
    return Example("sort", f"Sort: {items}", ("".join(sorted(items)),))


def _count(rng: random.Random) -> Example:
    letter = rng.choice("abc")
    word = _word(rng, 3, 12, "abc")
    return Example("count", f"How many {letter} in {word}?", (str(word.count(letter)),))


def _fact_example(task: str, template: str, fact: tuple[str, str, str], key: int) -> Example:
    """``fact`` asked under ``template``: ``key`` 0 names the country and wants its capital, 1 the reverse."""
    country, capital, _ = fact
    return Example(task, template.format(country=country, capital=capital), (fact[1 - key],))


def _fact_question(task: str, templates: tuple[str, ...], key: int) -> Callable[[random.Random], Example]:
    """Sampler of a fact task: a random fact under a random one of ``templates``."""

    def sample(rng: random.Random) -> Example:
        fact = rng.choice(CAPITALS)
        return _fact_example(task, rng.choice(templates), fact, key)

    return sample


def _held_out_phrasings(task: str, templates: tuple[str, ...], key: int) -> Callable[[random.Random], list]:
    """Test split of a fact task: each fact under one phrasing, that phrasing never trained for that fact
    (the fact is trained under the others, the phrasing with other facts)."""

    def build(rng: random.Random) -> list[Example]:
        return [_fact_example(task, rng.choice(templates), fact, key) for fact in CAPITALS]

    return build


def _any_capital(rng: random.Random) -> Example:
    region = rng.choice((None, *REGIONS))
    if region is None:
        return Example("any_capital", "Name a capital city.", tuple(c for _, c, _ in CAPITALS))
    valid = tuple(c for _, c, r in CAPITALS if r == region)
    return Example("any_capital", f"Name a capital city in {region}.", valid)


def _any_country(rng: random.Random) -> Example:
    region = rng.choice(REGIONS)
    valid = tuple(country for country, _, r in CAPITALS if r == region)
    return Example("any_country", f"Name a country in {region}.", valid)


def _even_below(rng: random.Random) -> Example:
    bound = rng.randint(4, 30)
    return Example("even_below", f"Give an even number below {bound}.", tuple(map(str, range(0, bound, 2))))


def _number_between(rng: random.Random) -> Example:
    low = rng.randint(0, 90)
    high = low + rng.randint(3, 9)
    valid = tuple(str(n) for n in range(low + 1, high))
    return Example("number_between", f"Give a number between {low} and {high}.", valid)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("addition", _addition),
        Task("subtraction", _subtraction),
        Task("multiplication", _multiplication, train_sample=_multiplication_train),
        Task("copy", _copy),
        Task("reverse", _reverse),
        Task("sort", _sort),
        Task("count", _count),
        Task(
            "capital_of",
            _fact_question("capital_of", CAPITAL_OF_TEMPLATES, 0),
            fixed_test=_held_out_phrasings("capital_of", CAPITAL_OF_TEMPLATES, 0),
            train_sample=_fact_question("capital_of", CAPITAL_OF_TEMPLATES + CAPITAL_OF_TRAIN_TEMPLATES, 0),
        ),
        Task(
            "country_of",
            _fact_question("country_of", COUNTRY_OF_TEMPLATES, 1),
            fixed_test=_held_out_phrasings("country_of", COUNTRY_OF_TEMPLATES, 1),
            train_sample=_fact_question("country_of", COUNTRY_OF_TEMPLATES + COUNTRY_OF_TRAIN_TEMPLATES, 1),
        ),
        Task("any_capital", _any_capital, multi_answer=True),
        Task("any_country", _any_country, multi_answer=True),
        Task("even_below", _even_below, multi_answer=True),
        Task("number_between", _number_between, multi_answer=True),
    )
}
MULTI_ANSWER_TASKS = frozenset(name for name, task in TASKS.items() if task.multi_answer)


def _task_rng(seed: int, task: str, split: str) -> random.Random:
    # A string seed is hashed deterministically (not with PYTHONHASHSEED): each task and split has its own
    # stream, so adding a task or changing one split's size leaves the others unchanged.
    return random.Random(f"{seed}:{task}:{split}")


def _distinct(
    sample: Callable[[], Example], count: int, task: str, allow_fewer: bool = False
) -> list[Example]:
    """``count`` examples with distinct prompts (bounded attempts, so a tiny prompt space fails loudly
    unless ``allow_fewer``: then all the distinct prompts found)."""
    seen: dict[str, Example] = {}
    for _ in range(count * 50):
        if len(seen) == count:
            break
        example = sample()
        seen.setdefault(example.prompt, example)
    if len(seen) < count and not allow_fewer:
        raise ValueError(f"task {task!r} has fewer than {count} distinct prompts for its test split")
    return list(seen.values())


def _test_split(task: Task, seed: int, per_task: int) -> list[Example]:
    rng = _task_rng(seed, task.name, "test")
    if task.fixed_test is not None:
        return task.fixed_test(rng)
    if task.multi_answer:
        per_task = min(per_task, 12)  # few distinct prompts; greedy decoding of a repeat adds nothing
    examples = _distinct(lambda: task.sample(rng), per_task, task.name, allow_fewer=task.multi_answer)
    return [example for example in examples if example.prompt != README_DEMO_PROMPT]


def _train_split(task: Task, seed: int, per_task: int, test_prompts: set[str]) -> list[Example]:
    rng = _task_rng(seed, task.name, "train")
    rows: list[Example] = []
    if task.name == "multiplication":
        rows += [Example(task.name, README_DEMO_PROMPT, (str(15 * 23),))] * DEMO_COPIES
    per_task *= TRAIN_WEIGHTS.get(task.name, 1)
    attempts = 0
    while len(rows) < per_task:
        attempts += 1
        if attempts > per_task * 100:
            raise ValueError(f"task {task.name!r}: too few training prompts outside the test split")
        example = task.sample_train(rng)
        if not task.multi_answer and example.prompt in test_prompts:
            continue  # single-answer tasks are tested only on prompts never trained on
        rows.append(example)
    return rows


def _round_robin(groups: Iterable[list[Example]]) -> list[Example]:
    """Interleave the tasks' lists, so any prefix (``--limit N``) covers every task evenly."""
    lists = list(groups)
    longest = max((len(items) for items in lists), default=0)
    return [items[index] for index in range(longest) for items in lists if index < len(items)]


def make_suite(
    seed: int = 0,
    train_per_task: int = DEFAULT_TRAIN_PER_TASK,
    test_per_task: int = DEFAULT_TEST_PER_TASK,
    tasks: Iterable[str] | None = None,
) -> tuple[list[Example], list[Example]]:
    """``(train, test)`` for ``seed``: the same lists for the same arguments, in any process.

    ``train`` holds ``train_per_task`` rows per task (repeats allowed: fact tables are small), interleaved;
    ``test`` holds ``test_per_task`` distinct prompts per generated task (fewer for multi-answer tasks,
    one per fact for the capital tasks), interleaved across tasks. ``tasks`` selects a subset by name.
    """
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; tasks: {', '.join(TASKS)}")
    tests = {name: _test_split(TASKS[name], seed, test_per_task) for name in names}
    trains = [
        _train_split(TASKS[name], seed, train_per_task, {e.prompt for e in tests[name]}) for name in names
    ]
    return _round_robin(trains), _round_robin(tests.values())


def grade(example: Example, text: str) -> bool:
    """True when ``text`` (whitespace stripped) is one of the example's valid answers."""
    return text.strip() in {answer.strip() for answer in example.answers}


__all__ = [
    "CAPITALS",
    "MAX_ANSWER_CHARS",
    "MULTI_ANSWER_TASKS",
    "README_DEMO_PROMPT",
    "TASKS",
    "Example",
    "Task",
    "grade",
    "make_suite",
]
