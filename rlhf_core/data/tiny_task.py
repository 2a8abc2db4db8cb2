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


def sample_pair(rng: random.Random, min_margin: float = 1.0, p_topic_contrast: float = 0.25,
                p_repeat_contrast: float = 0.15) -> dict[str, str]:
    """A preference row: two answers whose gold rewards differ by at least ``min_margin``.

    Some pairs are contrasts that differ in one respect only, so that a reward model learns more than
    counting adjectives: the same answer about another topic, or with every positive adjective replaced
    by the first one (repetition earns nothing).
    """
    prompt = sample_prompt(rng)
    topic = prompt_topic(prompt)
    assert topic is not None
    while True:
        a = sample_answer(rng, topic)
        kind = rng.random()
        if kind < p_topic_contrast:
            other = rng.choice([t for t in TOPICS if t != topic])
            b = " ".join(other if w == topic else w for w in a.split())
        elif kind < p_topic_contrast + p_repeat_contrast and any(w in _POS for w in a.split()):
            first = next(w for w in a.split() if w in _POS)
            b = " ".join(first if w in _POS else w for w in a.split())
        else:
            b = sample_answer(rng, topic)
        ga, gb = gold_reward(prompt, a), gold_reward(prompt, b)
        if abs(ga - gb) >= min_margin:
            chosen, rejected = (a, b) if ga > gb else (b, a)
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def sample_corpus_line(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.choice((1, 2, 3))):
        t, u = rng.sample(TOPICS, 2)
        sentences.append(rng.choice(CORPUS_TEMPLATES).format(t=t, u=u, a=rng.choice(POSITIVE + NEGATIVE)))
    return " ".join(sentences)
