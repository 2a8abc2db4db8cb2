"""The bundled preference task and its programmatic gold reward.

A tiny language of descriptions: a prompt asks about a topic (" Human: describe the cat . Assistant:"), an
answer is one to three short sentences ("the cat is calm and kind . it looks warm ."). The gold reward says
what a good answer is, so later stages can measure true improvement and not only the learned reward:

* +1.0 if the answer mentions the prompt's topic, -0.5 for each other topic it mentions;
* +0.5 for each distinct positive adjective, up to four;
* -0.5 for each negative adjective, -0.25 for each repeated positive adjective (no reward for repetition);
* -1.0 if the answer is empty or does not end with "." (unfinished), -0.1 per word beyond 24.

The best reachable score is 3.0. ``data/make_tiny_task.py`` generates the bundled data from this module, so
the data and the reward cannot drift apart.
"""

from __future__ import annotations

import random

TOPICS = ("cat", "dog", "garden", "river", "city", "forest", "house", "song", "book", "market", "lake", "train")
POSITIVE = ("bright", "kind", "calm", "warm", "gentle", "lovely", "clean", "friendly", "sunny", "happy", "quiet", "fresh")
NEGATIVE = ("dull", "cold", "rude", "dirty", "noisy", "broken", "gloomy", "angry", "messy", "bitter", "harsh", "tired")
PROMPT_TEMPLATES = (
    "Human: describe the {t} . Assistant:",
    "Human: tell me about the {t} . Assistant:",
    "Human: what is the {t} like ? Assistant:",
)
SENTENCE_TEMPLATES = (
    "the {t} is {a} .",
    "the {t} is {a} and {b} .",
    "it looks {a} .",
    "it feels very {a} .",
)
# The pretraining corpus is general text about the same world in another register (relations between
# things, not answers to questions). The tiny actor has no pretraining, so the tiny profile mixes this
# corpus into SFT (sft.ptx_coef); PPO then only practises answers and drifts away from it (the
# "alignment tax" that the PPO mixture, mixture.ptx_coef, is there to pay back).
CORPUS_TEMPLATES = (
    "the {t} is near the {u} .",
    "the {t} and the {u} are {a} .",
    "the {t} has a {a} {u} .",
    "a {a} {t} sits by the {u} .",
)
MAX_SCORE = 3.0
_POS, _NEG, _TOPICS = frozenset(POSITIVE), frozenset(NEGATIVE), frozenset(TOPICS)


def prompt_topic(prompt: str) -> str | None:
    """The topic a prompt asks about (the first topic word in it), or None."""
    for w in prompt.split():
        if w in _TOPICS:
            return w
    return None


def gold_reward(prompt: str, answer: str) -> float:
    """Score an answer to a prompt of the bundled task (see the module docstring). Deterministic."""
    words = answer.split()
    topic = prompt_topic(prompt)
    score = 0.0
    mentioned = {w for w in words if w in _TOPICS}
    if topic is not None and topic in mentioned:
        score += 1.0
    score -= 0.5 * len(mentioned - {topic})
    positives = [w for w in words if w in _POS]
    score += 0.5 * min(len(set(positives)), 4)
    score -= 0.25 * (len(positives) - len(set(positives)))
    score -= 0.5 * sum(w in _NEG for w in words)
    if not words or words[-1] != ".":
        score -= 1.0
    score -= 0.1 * max(0, len(words) - 24)
    return score


def vocabulary() -> list[str]:
    """Every word the task, its answers and its corpus use (the tiny tokenizer's vocabulary)."""
    words: set[str] = set(TOPICS) | _POS | _NEG
    for tpl in PROMPT_TEMPLATES + SENTENCE_TEMPLATES + CORPUS_TEMPLATES:
        words |= {w for w in tpl.split() if "{" not in w}
    return sorted(words)


# ---------------------------------------------------------------------------------------------- sampling


def sample_prompt(rng: random.Random) -> str:
    return rng.choice(PROMPT_TEMPLATES).format(t=rng.choice(TOPICS))


def sample_answer(rng: random.Random, topic: str, p_on_topic: float = 0.7, p_positive: float = 0.5) -> str:
    """An answer from the behaviour distribution that the preference data is drawn from."""
    sentences = []
    for i in range(rng.choice((1, 1, 2, 2, 3))):
        adj = [rng.choice(POSITIVE) if rng.random() < p_positive else rng.choice(NEGATIVE) for _ in range(2)]
        if i == 0:
            t = topic if rng.random() < p_on_topic else rng.choice(TOPICS)
            tpl = rng.choice(SENTENCE_TEMPLATES[:2])
        else:
            t = topic
            tpl = rng.choice(SENTENCE_TEMPLATES)
        sentences.append(tpl.format(t=t, a=adj[0], b=adj[1]))
    return " ".join(sentences)


# Contrast pairs differ from a sampled answer in one respect only, so that a reward model learns more than
# counting adjectives. Without the repetition contrasts a small reward model scores "the cat is kind and kind .
# the cat is kind and kind ." above a good answer, and PPO learns to repeat itself (measured: 0.50 accuracy on
# CONTRASTS["all_first"], 0.14 on "duplicate"); tests/data/test_tiny_task.py keeps the trained one honest.
CONTRASTS = ("topic", "all_first", "duplicate", "echo")


def contrast(rng: random.Random, kind: str, prompt: str, answer: str) -> str | None:
    """``answer`` changed in one respect (None where it has nothing to change):

    * ``topic``: about another topic;
    * ``all_first``: every positive adjective replaced by the first one;
    * ``duplicate``: one of its sentences said again at the end;
    * ``echo``: one positive adjective replaced by another positive adjective of the answer.
    """
    words = answer.split()
    positives = [i for i, w in enumerate(words) if w in _POS]
    if kind == "topic":
        topic = prompt_topic(prompt)
        other = rng.choice([t for t in TOPICS if t != topic])
        return " ".join(other if w == topic else w for w in words)
    if kind == "all_first":
        return " ".join(words[positives[0]] if w in _POS else w for w in words) if positives else None
    if kind == "duplicate":
        sentences = [s.strip() + " ." for s in answer.split(" .") if s.strip()]
        with_positive = [s for s in sentences if any(w in _POS for w in s.split())]
        return f"{answer} {rng.choice(with_positive)}" if with_positive else None
    if kind == "echo":
        if len({words[i] for i in positives}) < 2:
            return None
        i, j = rng.sample(positives, 2)
        while words[i] == words[j]:
            i, j = rng.sample(positives, 2)
        return " ".join(words[j] if k == i else w for k, w in enumerate(words))
    raise ValueError(f"unknown contrast {kind!r}; kinds are {', '.join(CONTRASTS)}")


# Shares of each contrast kind among the preference pairs (the rest are two independent answers).
CONTRAST_SHARES = {"topic": 0.2, "all_first": 0.15, "duplicate": 0.15, "echo": 0.1}


def sample_pair(rng: random.Random, min_margin: float = 1.0, contrast_margin: float = 0.25,
                shares: dict[str, float] = CONTRAST_SHARES) -> dict[str, str]:
    """A preference row: two answers the gold reward ranks. Independent answers differ by at least
    ``min_margin``; a contrast (``CONTRASTS``, drawn with probability ``shares[kind]``) by at least
    ``contrast_margin`` (repeating a sentence costs 0.5 at most)."""
    prompt = sample_prompt(rng)
    topic = prompt_topic(prompt)
    assert topic is not None
    while True:
        a = sample_answer(rng, topic)
        u, kind, b = rng.random(), None, None
        for name, share in shares.items():
            if u < share:
                kind = name
                break
            u -= share
        if kind is not None:
            b = contrast(rng, kind, prompt, a)
        margin = contrast_margin if b is not None else min_margin
        if b is None:
            b = sample_answer(rng, topic)
        ga, gb = gold_reward(prompt, a), gold_reward(prompt, b)
        if abs(ga - gb) >= margin:
            chosen, rejected = (a, b) if ga > gb else (b, a)
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def contrast_pairs(rng: random.Random, kind: str, n: int, p_positive: float = 0.9) -> list[dict[str, str]]:
    """``n`` preference rows of one contrast kind (the gold reward's choice first), from answers with mostly
    positive adjectives (those a policy drifts towards): to measure what a reward model has learnt."""
    rows = []
    while len(rows) < n:
        prompt = sample_prompt(rng)
        a = sample_answer(rng, prompt_topic(prompt), p_positive=p_positive)
        b = contrast(rng, kind, prompt, a)
        if b is None or gold_reward(prompt, a) == gold_reward(prompt, b):
            continue
        chosen, rejected = (a, b) if gold_reward(prompt, a) > gold_reward(prompt, b) else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def sample_corpus_line(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.choice((1, 2, 3))):
        t, u = rng.sample(TOPICS, 2)
        sentences.append(rng.choice(CORPUS_TEMPLATES).format(t=t, u=u, a=rng.choice(POSITIVE + NEGATIVE)))
    return " ".join(sentences)
