"""Synthetic WritingPrompts preference data with a known ground truth.

Hub datasets cannot be downloaded on our CPU machines, so the default run trains on rows made here, in
the exact schema of `euclaise/WritingPrompts_preferences` (one row per prompt: `post_title`,
`post_text`, `post_scores`, `comment_texts`, `comment_scores`, `comment_times`).

The data carries the signal the method is about. Every response is written in one of a few THEMES
(what the story is about) and one of a few STYLES (how it is written), with a latent craft level.
Upvotes are a known function of the text's true quality plus noise, plus a popularity bonus for the
most common theme and style. Best-vs-worst preference pairs therefore mostly prefer the popular
theme/style, which is what pushes a DPO-tuned model towards homogeneous outputs; deviation weighting
should counter it.

`classify(text)` recovers (theme, style, quality) from any text, generated here or sampled from a
model, so evaluation can score samples against the same ground truth. Upvotes never enter quality.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

# Response length distributions of the generator. "short" (the default data): 4-7 sentences, about 100
# tokens. "stories" (benchmarks at WritingPrompts lengths): sentence counts log-normal with median
# e^3.2 = 25 sentences, sigma 0.6, capped at 150 sentences; measured over 431 responses with the
# bundled tokenizer: median 225 words / 264 tokens, 10th-90th percentile 110-576 tokens, longest 1,310.
LENGTHS = ("short", "stories")
STORY_LOG_MEDIAN = 3.2
STORY_LOG_SIGMA = 0.6
STORY_MAX_SENTENCES = 150

THEMES = ("space", "dragons", "detective", "ghosts", "robots")
STYLES = ("plain", "dialogue", "terse", "ornate")
POPULAR_THEME = "space"
POPULAR_STYLE = "plain"

# How often each theme/style is written: the popular ones are also the most common, as on the forum.
THEME_FREQ = (0.36, 0.16, 0.16, 0.16, 0.16)
STYLE_FREQ = (0.40, 0.20, 0.20, 0.20)

_THEME_WORDS = {
    "space": ("ship", "orbit", "stars", "captain", "planet", "airlock", "comet", "station", "void", "engines"),
    "dragons": ("dragon", "knight", "castle", "scales", "fire", "wings", "sword", "hoard", "mountain", "king"),
    "detective": ("detective", "clue", "murder", "suspect", "alibi", "office", "rain", "witness", "case", "gun"),
    "ghosts": ("ghost", "attic", "whisper", "candle", "grave", "shadow", "house", "cold", "door", "spirit"),
    "robots": ("robot", "circuit", "factory", "android", "signal", "battery", "code", "metal", "sensor", "machine"),
}
_NAMES = ("Mara", "Theo", "Ilse", "Jonah", "Priya", "Oskar", "Wren", "Dalia", "Emeka", "Sol")
# Craft vocabulary: strong stories use vivid words, weak ones lean on filler. Quality is measured from these.
_VIVID = tuple(
    "luminous jagged brittle hollow crimson trembling silent ancient restless "
    "shimmering bitter feral velvet scorched gleaming frantic patient ragged".split()
)
_FILLER = ("very", "really", "thing", "stuff", "basically", "kind", "somehow", "just", "pretty", "okay")
_VERBS = ("watched", "found", "followed", "remembered", "carried", "crossed", "opened", "heard", "lost", "held")
_PROMPT_HOOKS = (
    "You wake up and {x} is the only thing that remembers your name.",
    "Everyone on Earth receives a letter from {x} on the same morning.",
    "After a thousand years, {x} finally gets a day off.",
    "You are the last person who still believes in {x}.",
    "A child trades a secret with {x} and the world changes.",
    "The city bans {x}, and you are hired to find the last one.",
    "You inherit a key that opens {x}.",
    "Write the final page of a story about {x}.",
)
_PROMPT_SUBJECTS = (
    "an old lighthouse",
    "a forgotten song",
    "the moon",
    "a broken clock",
    "a stray cat",
    "the ocean",
    "a locked library",
    "a paper crane",
    "the first snow",
    "a borrowed coat",
    "a silver coin",
    "the north wind",
)
_PROMPT_SETTINGS = (
    "",
    " It happens on a Tuesday.",
    " Nobody else notices.",
    " It is the year 3000.",
    " You are ninety years old.",
    " The power has been out for a week.",
    " It is your wedding day.",
    " You have one hour.",
    " The sky is green.",
    " You cannot speak.",
)


@dataclass(frozen=True)
class TextTruth:
    """Ground truth recovered from a text: its theme and style (None when no clear signal) and quality."""

    theme: str | None
    style: str | None
    quality: float


# ---------------------------------------------------------------------------------------------- text


def _sentence(rng: random.Random, theme: str, craft: float) -> str:
    """One narrative sentence; `craft` in [0, 1] decides vivid vs filler modifiers."""
    words = _THEME_WORDS[theme]
    mod = lambda: rng.choice(_VIVID) if rng.random() < craft else rng.choice(_FILLER)  # noqa: E731
    subject = rng.choice(_NAMES)
    return f"{subject} {rng.choice(_VERBS)} the {mod()} {rng.choice(words)} near the {mod()} {rng.choice(words)}"


def _sentence_count(rng: random.Random, lengths: str) -> int:
    if lengths == "short":
        return rng.randint(4, 7)
    # "stories": log-normal like story lengths on r/WritingPrompts (hundreds of words, a long right tail).
    return min(STORY_MAX_SENTENCES, max(4, round(rng.lognormvariate(STORY_LOG_MEDIAN, STORY_LOG_SIGMA))))


def _render(rng: random.Random, theme: str, style: str, craft: float, lengths: str = "short") -> str:
    n = _sentence_count(rng, lengths)
    sents = [_sentence(rng, theme, craft) for _ in range(n)]
    if style == "plain":
        return " ".join(s + "." for s in sents)
    if style == "terse":
        # Short declaratives: keep subject-verb-object, cut the prepositional tail.
        return (
            " ".join(s.split(" near ")[0] + "." for s in sents)
            + " "
            + " ".join(rng.choice(_THEME_WORDS[theme]).capitalize() + "." for _ in range(3))
        )
    if style == "ornate":
        # Long sentences chained with semicolons and conjunctions.
        out = []
        for i in range(0, n, 2):
            chunk = sents[i : i + 2]
            out.append("; and yet, ".join(chunk) + ", as though the whole world were listening.")
        return " ".join(out)
    # dialogue: every other sentence is quoted speech.
    out = []
    for i, s in enumerate(sents):
        if i % 2:
            who = rng.choice(_NAMES)
            out.append(f'"{s.lower()}," {who} said.')
        else:
            out.append(s + ".")
    return " ".join(out)


# ---------------------------------------------------------------------------------- ground truth

_WORD_RE = re.compile(r"[A-Za-z']+")
_THEME_INDEX = {w: t for t, ws in _THEME_WORDS.items() for w in ws}
_VIVID_SET, _FILLER_SET = frozenset(_VIVID), frozenset(_FILLER)


def classify(text: str) -> TextTruth:
    """Recover (theme, style, quality) of any text with the generator's own definitions.

    theme: the theme whose lexicon has the most hits (None without hits or on a tie);
    style: decided by explicit markers in order: quoted speech -> dialogue, semicolons -> ornate,
        mean sentence length <= 5 words -> terse, otherwise plain if it has >= 2 sentences (else None);
    quality in [0, 1]: share of vivid among (vivid + filler) modifiers, times a length factor that
        rewards 30-120 words and a coherence factor (share of words that are on-theme or craft words
        among content words, so word salad scores low).
    """
    words = [w.lower() for w in _WORD_RE.findall(text)]
    hits: dict[str, int] = {}
    for w in words:
        t = _THEME_INDEX.get(w.rstrip("s")) or _THEME_INDEX.get(w)
        if t:
            hits[t] = hits.get(t, 0) + 1
    theme = None
    if hits:
        ranked = sorted(hits.items(), key=lambda kv: -kv[1])
        if len(ranked) == 1 or ranked[0][1] > ranked[1][1]:
            theme = ranked[0][0]

    sentences = [s for s in re.split(r"[.!?]+", text) if s.strip()]
    mean_len = sum(len(_WORD_RE.findall(s)) for s in sentences) / max(len(sentences), 1)
    if text.count('"') >= 2:
        style = "dialogue"
    elif ";" in text:
        style = "ornate"
    elif len(sentences) >= 2 and mean_len <= 5.0:
        style = "terse"
    elif len(sentences) >= 2:
        style = "plain"
    else:
        style = None

    vivid = sum(w in _VIVID_SET for w in words)
    filler = sum(w in _FILLER_SET for w in words)
    craft = vivid / (vivid + filler) if vivid + filler else 0.0
    n = len(words)
    length = min(1.0, n / 30.0) * (1.0 if n <= 120 else max(0.0, 1.0 - (n - 120) / 120.0))
    theme_words = sum(hits.values())
    coherence = min(1.0, 4.0 * (theme_words + vivid + filler) / n) if n else 0.0
    quality = craft * length * coherence
    return TextTruth(theme=theme, style=style, quality=round(quality, 6))


# -------------------------------------------------------------------------------------------- rows


def upvotes(quality: float, theme: str, style: str, rng: random.Random) -> int:
    """The known score function: quality drives upvotes; the popular theme and style get a bonus."""
    mean = 2.0 + 30.0 * quality + 8.0 * (theme == POPULAR_THEME) + 6.0 * (style == POPULAR_STYLE)
    return max(0, int(round(rng.gauss(mean, 4.0))))


def generate_rows(
    num_prompts: int = 200,
    seed: int = 0,
    *,
    min_responses: int = 4,
    max_responses: int = 10,
    lengths: str = "short",
) -> list[dict]:
    """Rows in the WritingPrompts preference schema, deterministic for (num_prompts, seed, sizes, lengths).

    lengths: "short" (4-7 sentences per response, the default data) or "stories" (WritingPrompts-like
    lengths, see LENGTHS). Stories longer than the quality function's 120-word sweet spot score low
    quality; the upvote ranking still follows theme, style and noise.

    Each row also has a `truth` list aligned with `comment_texts`: dicts with theme, style and quality
    (quality == classify(text).quality). Loaders ignore unknown keys, so the rows stay schema-valid.
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if lengths not in LENGTHS:
        raise ValueError(f"lengths must be one of {', '.join(LENGTHS)}, got {lengths!r}")
    if not 2 <= min_responses <= max_responses:
        raise ValueError(f"need 2 <= min_responses <= max_responses, got {min_responses}, {max_responses}")
    rng = random.Random(seed)
    rows = []
    t0 = 1_500_000_000
    # Distinct prompts (a repeated title would merge two rows into one prompt group downstream):
    # combinations drawn without replacement, numbered past the 960 that exist.
    n_combos = len(_PROMPT_HOOKS) * len(_PROMPT_SUBJECTS) * len(_PROMPT_SETTINGS)
    combos = rng.sample(range(n_combos), min(num_prompts, n_combos))
    for p in range(num_prompts):
        c = combos[p % n_combos]
        hook_i, rest = divmod(c, len(_PROMPT_SUBJECTS) * len(_PROMPT_SETTINGS))
        subject_i, setting_i = divmod(rest, len(_PROMPT_SETTINGS))
        hook = _PROMPT_HOOKS[hook_i].format(x=_PROMPT_SUBJECTS[subject_i]) + _PROMPT_SETTINGS[setting_i]
        title = f"[WP] {hook}" + (f" (part {p // n_combos + 1})" if p >= n_combos else "")
        post_time = t0 + p * 3600
        texts, scores, times, truth = [], [], [], []
        for _ in range(rng.randint(min_responses, max_responses)):
            theme = rng.choices(THEMES, weights=THEME_FREQ)[0]
            style = rng.choices(STYLES, weights=STYLE_FREQ)[0]
            craft = rng.betavariate(2.0, 2.0)
            text = _render(rng, theme, style, craft, lengths)
            q = classify(text).quality
            texts.append(text)
            scores.append(upvotes(q, theme, style, rng))
            times.append(post_time + rng.randint(60, 86_400))
            truth.append({"theme": theme, "style": style, "quality": q})
        rows.append(
            {
                "post_title": title,
                "post_text": "" if rng.random() < 0.7 else "Bonus points for a twist ending.",
                "post_scores": rng.randint(5, 500),
                "comment_texts": texts,
                "comment_scores": scores,
                "comment_times": times,
                "truth": truth,
            }
        )
    return rows


def sample_corpus(num_prompts: int = 400, seed: int = 1234) -> list[str]:
    """Plain texts (prompts and responses) to train the bundled tokenizer on."""
    out = []
    for row in generate_rows(num_prompts, seed):
        out.append(row["post_title"][5:] + "\n" + row["post_text"])
        out.extend(row["comment_texts"])
    return out


def entropy(shares: dict[str, float], k: int) -> float:
    """Normalised Shannon entropy of a share dict over k categories (1 = uniform, 0 = one category)."""
    h = -sum(p * math.log(p) for p in shares.values() if p > 0)
    return h / math.log(k) if k > 1 else 0.0
