"""Method fidelity (issue #18): `recipe: authors` against an independent port of the authors' code.

The authors' code is github.com/mj-storytelling/DiversityTuning at cb06958 (Chung et al. 2025). Each
`authors_*` function below is written here, from reading that code (file and line cited), with its
data structures (lists of texts, dicts keyed by text, `random`, numpy/torch as they call them); none
imports the engine's implementation of the same point. Each test runs a small case through the port
and through the engine under `recipe: authors`, and also shows that `recipe: engine` differs on the
case, so the test can fail in both directions. Sampling points are compared as distributions: the
port enumerates the exact probability of every outcome, the engine is run over many seeds, and a
chi-square test (p > 1e-4, deterministic seeds) compares the two.

Points (README "Fidelity"): 1 DORPO NLL on prompt tokens, 2 deviation groups, 3 title cleaning,
4 length filter, 5 gap pairs, 6 DivPO pairs, 7 max_per_prompt / duplicates, 8 rejected weights,
9 the llama8b configs, 10 embedders, 11 evaluation metrics (`eval.metrics_compat: authors`, not the
recipe), 12 groups of one and score ties (kept as the engine's under both recipes; the tests show why).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import types
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2

from engine.config import DeviationConfig, LossConfig, from_dict, load_config
from engine.data.loading import make_prompt, responses_from_rows
from engine.data.pairs import attach_weights, build_pairs, paired_groups
from engine.data.records import Response, make_prompt_id, make_response_id
from engine.deviation import compute_deviation, get_embedder

ROOT = Path(__file__).resolve().parent.parent
MARKERS = ("**Welcome to the Prompt!**", "this submission has been removed", "**Off-Topic Discussion**")


def group(prompt, scored):
    pid = make_prompt_id(prompt)
    return [
        Response(prompt_id=pid, response_id=make_response_id(pid, t), prompt=prompt, text=t, score=s) for t, s in scored
    ]


def chi_square_ok(observed: Counter, exact: dict, n: int, p_min: float = 1e-4) -> tuple[bool, str]:
    """Goodness of fit of `observed` counts (n draws) to the `exact` probabilities; outcomes with an
    expected count below 5 are pooled. Fails outright on an outcome the exact law gives probability 0."""
    impossible = set(observed) - {k for k, p in exact.items() if p > 0}
    if impossible:
        return False, f"outcomes with probability 0: {sorted(impossible)[:3]}"
    cells, pool_o, pool_e = [], 0, 0.0
    for k, p in exact.items():
        e = float(p) * n
        if e < 5:
            pool_o, pool_e = pool_o + observed.get(k, 0), pool_e + e
        else:
            cells.append((observed.get(k, 0), e))
    if pool_e > 0:
        cells.append((pool_o, pool_e))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    p = float(chi2.sf(stat, max(len(cells) - 1, 1)))
    return p > p_min, f"chi2 {stat:.1f} on {len(cells) - 1} dof, p = {p:.2e}"


# ------------------------------------------------------------------------------ ports of their code


def authors_clean_title(x: str) -> str:
    """scripts_dataset_cleaner/0_data_prep_scoring.py:21-30."""
    pattern = r"^\[.*?\]"
    found = re.findall(pattern, x)
    if found:
        return x[len(found[0]) :].strip()
    return x


def authors_filter_comments(comments: list[str]) -> list[str]:
    """scripts_dataset_cleaner/1_data_prep_filtering.py:57-79."""
    out = []
    for c in comments:
        if "**Welcome to the Prompt!**" in c:
            continue
        if "this submission has been removed" in c:
            continue
        if "**Off-Topic Discussion**" in c:
            continue
        out.append(c)
    return out


def authors_remove_long(tokenizer, prompt: str, comments: list[str], limit: int) -> list[str]:
    """scripts_dataset_cleaner/1_data_prep_filtering.py:26-49 (2048 there; `limit` here)."""
    messages = []
    for c in comments:
        message = [{"role": "user", "content": prompt}, {"role": "assistant", "content": c}]
        messages.append(tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=False))
    if not messages:
        return []
    enc = tokenizer(messages, padding=True, return_tensors="pt")
    keep = (enc["attention_mask"].sum(dim=1) <= limit).numpy()
    return [c for c, k in zip(comments, keep) if k]


def _authors_valid_pairs(available, min_gap):
    """models/utils.py:320-333: the list the authors draw from (pairs of (score, index) in sorted order)."""
    valid = []
    for i in range(len(available)):
        for j in range(i + 1, len(available)):
            a, b = available[i], available[j]
            if a[0] != b[0] and abs(a[0] - b[0]) >= min_gap:
                valid.append((a, b))
    if not valid:
        valid = [
            (available[i], available[j])
            for i in range(len(available))
            for j in range(i + 1, len(available))
            if available[i][0] != available[j][0]
        ]
    return valid


def _authors_orient(pair):
    """scripts_dataset_cleaner/2_data_prep_to_preference.py:71-76: (chosen index, rejected index)."""
    if pair[0][0] > pair[1][0]:
        return pair[0][1], pair[1][1]
    return pair[1][1], pair[0][1]


def authors_gap_distribution(numbers: list, min_gap) -> dict[tuple, Fraction]:
    """Exact law of sample_pairs_with_gap (models/utils.py:294-347) as 2_data_prep_to_preference.py:66 calls
    it: every sequence of (chosen index, rejected index) it can return, with its probability."""
    out: dict[tuple, Fraction] = {}

    def walk(available, drawn, prob):
        valid = _authors_valid_pairs(available, min_gap) if len(available) >= 2 else []
        if not valid:
            out[tuple(drawn)] = out.get(tuple(drawn), Fraction(0)) + prob
            return
        for pair in valid:  # random.choice: each with probability 1 / len(valid)
            gone = (pair[0][1], pair[1][1])
            walk([x for x in available if x[1] not in gone], drawn + [_authors_orient(pair)], prob / len(valid))

    walk(sorted([(num, idx) for idx, num in enumerate(numbers)], key=lambda x: x[0]), [], Fraction(1))
    return out


def authors_gap_pools(numbers: list, min_gap) -> dict[frozenset, Fraction]:
    """The same sampler's law of WHICH responses it pairs (all step 4 reads), by recursion over the set
    of available responses, memoised (2^n states instead of every draw order)."""

    @functools.cache
    def left_over(available: tuple) -> tuple:
        valid = _authors_valid_pairs(list(available), min_gap) if len(available) >= 2 else []
        if not valid:
            return ((frozenset(x[1] for x in available), Fraction(1)),)
        out: dict[frozenset, Fraction] = {}
        for pair in valid:
            gone = (pair[0][1], pair[1][1])
            for rest, p in left_over(tuple(x for x in available if x[1] not in gone)):
                out[rest] = out.get(rest, Fraction(0)) + p / len(valid)
        return tuple(out.items())

    everyone = frozenset(range(len(numbers)))
    start = tuple(sorted([(num, idx) for idx, num in enumerate(numbers)], key=lambda x: x[0]))
    return {everyone - rest: p for rest, p in left_over(start)}


def authors_get_diversity(embeddings: torch.Tensor) -> list[float]:
    """models/diversity_model.py:25-42 (metric cosine), on the embeddings of the texts in list order."""
    e = F.normalize(embeddings, p=2, dim=1)
    distance = 1 - torch.mm(e, e.T)
    distance[torch.eye(distance.shape[0]).bool()] = 0
    return [(torch.sum(distance[i]) / (distance.shape[0] - 1)).item() for i in range(distance.shape[0])]


def authors_deviation_weights(pairs: list[tuple[str, str, str]], embed, max_cutoff: int = -1) -> list[float | None]:
    """scripts_dataset_cleaner/3_data_prep_for_diversified_training.py:40-150 for `--score_process semantic style`,
    then the trainers' `score_chosen + 1` (models/ddpo_trainer.py:1237, models/dorpo_trainer.py:701,834).

    pairs: (prompt, chosen text, rejected text) in dataset order; embed: list of texts -> list of [n, d]
    tensors, one per model. Returns the weight of each pair, None for a pair their cutoff filter drops."""
    comments: dict[str, list[str]] = {}
    for prompt, chosen, rejected in pairs:  # :52-67
        comments.setdefault(prompt, [])
        if max_cutoff != -1 and len(comments[prompt]) >= max_cutoff:
            continue
        comments[prompt].append(chosen)
        comments[prompt].append(rejected)
    scores = [{} for _ in range(2)]  # per model: prompt -> {text: score}, :75-86
    for prompt, texts in comments.items():
        for m, emb in enumerate(embed(texts)):
            div = authors_get_diversity(emb)
            scores[m][prompt] = {t: div[i] for i, t in enumerate(texts)}
    out = []
    for prompt, chosen, rejected in pairs:
        if max_cutoff != -1 and not (chosen in comments[prompt] and rejected in comments[prompt]):  # :70-74
            out.append(None)
            continue
        out.append(authors_transform([scores[m][prompt] for m in range(2)], chosen) + 1)
    return out


def authors_transform(cur_by_model: list[dict[str, float]], chosen: str) -> float:
    """scripts_dataset_cleaner/3_data_prep_for_diversified_training.py:94-145, transform_scores for one pair:
    per model, the prompt's {text: deviation score}; returns the pair's score_chosen (exact equality at :103
    and :143, as theirs)."""
    per_model_all, per_model_chosen = [], []
    for cur in cur_by_model:  # :94-114
        c, vals = cur[chosen], list(cur.values())
        hi, lo = max(vals), min(vals)
        if hi == lo:
            c, vals = 0, [0 for _ in vals]
        else:
            c = 2 * (c - lo) / (hi - lo) - 1
            vals = [2 * (s - lo) / (hi - lo) - 1 for s in vals]
        per_model_all.append(vals)
        per_model_chosen.append(c)
    m_count = len(cur_by_model)
    combined = []  # :122-136
    for i in range(len(per_model_all[0])):
        s = 1
        for m in range(m_count):
            s *= ((per_model_all[m][i] + 1) / 2) ** (1 / m_count)
        combined.append(2 * s - 1)
    sc = 1
    for m in range(m_count):
        sc *= ((per_model_chosen[m] + 1) / 2) ** (1 / m_count)
    sc = 2 * sc - 1
    if min(combined) != max(combined):  # :143-144
        sc = (sc * len(combined) - sum(combined)) / (len(combined) + sum(combined))
    return sc


def authors_group_weights(emb_by_model: list[torch.Tensor], texts: list[str]) -> list[float]:
    """One prompt's group list through :78-86 (get_diversity, then a dict keyed by text) and transform_scores
    with each text as the chosen one, plus the trainers' 1: the weight of every text of the group."""
    cur_by_model = []
    for emb in emb_by_model:
        div = authors_get_diversity(emb)
        cur_by_model.append({t: div[i] for i, t in enumerate(texts)})
    return [authors_transform(cur_by_model, t) + 1 for t in texts]


def authors_process_scores(emb_by_model: list[torch.Tensor]) -> list[float]:
    """scripts_dataset_cleaner/4_data_prep_for_divpo.py:55-103 with both embedders."""

    def normalize_scores(scores):
        if max(scores) == min(scores):
            return [0] * len(scores)
        return [(s - min(scores)) / (max(scores) - min(scores)) * 2 - 1 for s in scores]

    divs = [normalize_scores(authors_get_diversity(e)) for e in emb_by_model]
    processed = [2 * (((divs[0][i] + 1) / 2) ** 0.5 * ((divs[1][i] + 1) / 2) ** 0.5) - 1 for i in range(len(divs[0]))]
    if min(processed) == max(processed):
        return [0] * len(processed)
    n, s = len(processed), sum(processed)
    return [(x * n - s) / (n + s) for x in processed]


def authors_divpo_distribution(
    texts, scores, emb_by_model, *, min_gap, rho=25, max_pair_num=2
) -> dict[tuple, Fraction]:
    """Exact law of the (chosen text, rejected text) sequence of one prompt: step 2's gap pairs decide which
    comments step 4 reads (2_data_prep_to_preference.py:25-27,68,103), then 4_data_prep_for_divpo.py:106-171.
    Ties in upvotes and deviation are ordered as numpy's stable argsort (the README says why)."""
    out: dict[tuple, Fraction] = {}
    for sampled, p_gap in authors_gap_pools(scores, min_gap).items():
        idx = [i for i in range(len(texts)) if i in sampled]
        if not idx:
            out[()] = out.get((), Fraction(0)) + p_gap
            continue
        sub_scores = [scores[i] for i in idx]
        sample_num = max(max_pair_num, len(sub_scores) * (rho / 100))
        if sample_num > len(sub_scores) / 2:
            sample_num = len(sub_scores) / 2
        sample_num = int(sample_num)
        max_num_pair = min(max_pair_num, sample_num)
        high = [idx[i] for i in np.argsort(sub_scores, kind="stable")[::-1][:sample_num]]
        low = [idx[i] for i in np.argsort(sub_scores, kind="stable")[:sample_num]]
        div_high = authors_process_scores([e[high] for e in emb_by_model])
        div_low = authors_process_scores([e[low] for e in emb_by_model])
        high = [high[i] for i in np.argsort(div_high, kind="stable")[::-1][:max_num_pair]]
        low = [low[i] for i in np.argsort(div_low, kind="stable")[:max_num_pair]]
        perms = list(itertools.permutations(range(max_num_pair)))
        for hp in perms:  # random.shuffle of both index lists: every permutation pair equally likely
            for lp in perms:
                seq = tuple((texts[high[hp[i]]], texts[low[lp[i]]]) for i in range(max_num_pair))
                out[seq] = out.get(seq, Fraction(0)) + p_gap / (len(perms) ** 2)
    return out


def authors_compression_ratio(data: list[str]) -> float:
    """diversity/compression.py:10-58 with algorithm 'gzip' and no path (a temporary directory); the text file
    is written with their default encoding, UTF-8 on Linux."""
    temp_dir = tempfile.TemporaryDirectory()
    path = Path(temp_dir.name)
    with (path / "original.txt").open("w+", encoding="utf-8") as f:
        f.write(" ".join(data))
    original_size = os.path.getsize(os.path.join(path, "original.txt"))
    with gzip.GzipFile(str(path / "compressed.gz"), "w+") as f:
        f.write(gzip.compress(" ".join(data).encode("utf-8")))
    compressed_size = os.path.getsize(os.path.join(path, "compressed.gz"))
    temp_dir.cleanup()
    return round(original_size / compressed_size, 3)


def authors_homogenization_score(data: list[str]) -> float:
    """diversity/homogenization.py:10-87 with measure 'rougel', no stemmer (their _calculate_score's memo cache
    changes no value)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def calculate_score(pair):
        if pair[0] == pair[1]:
            return 1
        return scorer.score(pair[0], pair[1])["rougeL"][-1]

    all_pairs = ((data[i], data[j]) for i in range(len(data)) for j in range(len(data)) if i != j)
    curr_str = data[0]
    corpus_score = 0
    doc_score = 0
    for pair in all_pairs:
        if pair[0] == curr_str:
            doc_score += calculate_score(pair)
        else:
            corpus_score += doc_score / (len(data) - 1)
            curr_str = pair[0]
            doc_score = 0
            doc_score += calculate_score(pair)
    if corpus_score == 0:
        corpus_score += doc_score
    return round(corpus_score / len(data), 3)


def authors_ngram_diversity_score(data: list[str], num_n: int = 4) -> float:
    """diversity/ngram_diversity.py:4-26."""
    import nltk

    score = 0
    data = " ".join(data).split(" ")
    for i in range(1, num_n + 1):
        ngrams = list(nltk.ngrams(data, i))
        score += len(set(ngrams)) / len(ngrams)
    return round(score, 3)


def authors_csv_round_trip(groups: list[list[str]], path: Path) -> list[list[str]]:
    """The samples as their metric script sees them: scripts_eval/generation_eval1_1.py:84-99 writes one row per
    sample with pandas, generation_eval1_2.py:24,31-34 reads the file and takes str() of each prompt's responses."""
    import pandas as pd

    rows = [
        {
            "prompt_id": i,
            "prompt": "p",
            "response": t,
            "reddit_reward": 0.0,
            "semantic_diversity": 0.0,
            "style_diversity": 0.0,
        }
        for i, g in enumerate(groups)
        for t in g
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    val_df = pd.read_csv(path)
    out = []
    for prompt_id in val_df["prompt_id"].unique():
        sub_df = val_df[val_df["prompt_id"] == prompt_id]
        out.append([str(r) for r in sub_df["response"].tolist()])
    return out


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def embedders():
    """The authors' two embedders' offline stand-ins (semantic, style), in float32 as recipe authors computes them."""
    return [get_embedder("builtin:minilm", device="cpu", precision="float32"), get_embedder("builtin:stylometric")]


def embed_fn(embedders):
    """texts -> one float32 tensor per model, as their DiversityModel.get_embedding returns them."""

    def embed(texts):
        return [torch.from_numpy(np.asarray(e.encode(list(texts)), dtype=np.float32)) for e in embedders]

    return embed


# One embedder given twice to the ports' two-model code: the geometric mean of a score with itself is that
# score, as the engine's combination of one model. Used where the point is not the combination (test_deviation
# checks the combination), to keep MiniLM's load out of the slower tests.
STYLE_TWICE = [get_embedder("builtin:stylometric")] * 2


def authors_cfg(tmp_path, **deviation):
    return from_dict(
        {
            "recipe": "authors",
            "loss": {"objective": "ddpo"},
            "data": {"pairs": "gap"},
            "deviation": {"cache_dir": str(tmp_path / "emb"), "device": "cpu", **deviation},
        }
    )


def style_only(tmp_path, **deviation):
    return authors_cfg(tmp_path, semantic_model="", **deviation)


STORIES = [
    "The ship drifted through the void, its engines silent, the captain asleep at the helm.",
    "A dragon landed on the roof of the bakery and asked, very politely, for bread.",
    "Rain fell on the detective's office; the witness lied, and the case went cold.",
    '"Run!" she screamed. "It is coming -- now!" Nobody moved.',
    "The last library on Earth kept one book, and the book kept a secret about the reader.",
    "i dunno. the robot just sat there. it was kind of sad tbh",
    "Stars burned out one by one while the astronomer counted them in her notebook.",
    "The wizard's apprentice cleaned the same cauldron for nine hundred years.",
    "Grandma's recipe called for a cup of moonlight and a pinch of regret.",
    "The colonists woke early and found the second sun had gone missing overnight.",
    "Every mirror in town showed the same stranger, smiling a little too late.",
    "He sold his shadow for a sandwich and regretted it by noon.",
    "The ocean filed a complaint about the moon, citing years of harassment.",
    "We built the tower to reach heaven; heaven, it turned out, had a waiting list.",
]


# ---------------------------------------------------------------------------------- 1: prompt NLL


def test_point1_recipe_puts_the_dorpo_nll_on_prompt_tokens():
    """models/dorpo_trainer.py:815-819: the NLL labels are the input ids masked by attention only."""
    for objective, expected in (("dpo", False), ("ddpo", False), ("orpo", True), ("dorpo", True), ("sft", True)):
        section = LossConfig(objective=objective)
        section.apply_recipe("authors")
        assert section.nll_on_prompt is expected, objective
        assert LossConfig(objective=objective).nll_on_prompt is False  # engine: response tokens only
    assert LossConfig(objective="dorpo", nll_on_prompt=False).nll_on_prompt is False  # explicit wins


def test_point1_dorpo_loss_end_to_end(tmp_path):
    """The engine's DORPO loss on a packed batch under `recipe: authors` equals the authors' DORPOTrainer
    (models/dorpo_trainer.py:750-883) on the same token ids, computed with full logits per sequence."""
    from engine.data.packing import collate
    from engine.data.prepare import prepare_data
    from engine.model import build_model, load_tokenizer
    from engine.train import PolicyWithLoss

    cfg = from_dict(
        {
            "recipe": "authors",
            "model": {"name": "llama-tiny"},
            "data": {
                "source": "synthetic",
                "synthetic_prompts": 12,
                "pairs": "gap",
                "max_prompt_length": 32,
                "max_length": 96,
                "max_tokens_per_row": 512,
                "val_fraction": 0.0,
                "cache_dir": str(tmp_path / "c"),
            },
            "deviation": {"semantic_model": "", "cache_dir": str(tmp_path / "emb")},
            "loss": {"objective": "dorpo", "beta": 0.25, "backend": "torch"},
        }
    )
    assert cfg.loss.nll_on_prompt and cfg.data.truncation == "trl"
    tok = load_tokenizer()
    prep = prepare_data(cfg, tok, verbose=False)
    batch = collate(prep.train_rows[:1])
    torch.manual_seed(0)
    model = build_model("llama-tiny", seed=0)
    got = PolicyWithLoss(model, cfg.loss)(batch).loss.item()

    by_id = {t.pair_id: t for t in prep.train_tokenized}
    weights = {p.pair_id: p.chosen_weight for p in prep.train_pairs}
    chosen_avg, rejected_avg, nll_sum, nll_count, w = [], [], 0.0, 0, []
    with torch.no_grad():
        for pid in batch.pair_ids:
            t = by_id[pid]
            for ids, plen, avg in (
                (t.chosen_input_ids, t.chosen_prompt_len, chosen_avg),
                (t.rejected_input_ids, t.rejected_prompt_len, rejected_avg),
            ):
                ids = torch.as_tensor(ids, dtype=torch.long)[None]
                logp = model(ids).logits.float().log_softmax(-1)[0, :-1].gather(1, ids[0, 1:, None])[:, 0]
                avg.append(logp[plen - 1 :].mean())  # get_batch_logps(average_log_prob=True): response labels
                if avg is chosen_avg:  # cross_entropy_loss on labels = input ids (:785-797, :826)
                    nll_sum, nll_count = nll_sum - logp.sum(), nll_count + logp.numel()
            w.append(weights[pid])
    lc, lr, w = torch.stack(chosen_avg), torch.stack(rejected_avg), torch.tensor(w)
    log_odds = w * ((lc - lr) - (torch.log1p(-torch.exp(lc)) - torch.log1p(-torch.exp(lr))))  # :700-703
    expected = (w * (nll_sum / nll_count)).mean() - (0.25 * F.logsigmoid(log_odds)).mean()  # :834-835, :883
    assert got == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- 2, 7: deviation groups


def test_point2_deviation_groups_are_the_paired_responses(tmp_path, embedders):
    """3_data_prep_for_diversified_training.py:52-67: a response is scored against the responses of its
    prompt's pairs. Gap pairs leave a response unpaired here (odd count), so 'all' differs."""
    g = group("Write a story.", [(t, s) for t, s in zip(STORIES[:7], (0, 3, 9, 12, 20, 21, 40))])
    pairs = build_pairs(g, "gap", gap_sampler="authors", max_pairs_per_prompt=None, seed=3)
    assert len({r for p in pairs for r in (p.chosen_id, p.rejected_id)}) < len(g)  # someone is left out
    cfg = authors_cfg(tmp_path)
    kept, members, usage = paired_groups(pairs, cfg.deviation.max_per_prompt)
    got = [p.chosen_weight for p in attach_weights(kept, compute_deviation(members, cfg.deviation, pair_counts=usage))]
    want = authors_deviation_weights([(p.prompt, p.chosen, p.rejected) for p in pairs], embed_fn(embedders))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    # recipe engine: every cleaned response of the prompt is in the group
    engine = compute_deviation(g, DeviationConfig(cache_dir=str(tmp_path / "emb"), device="cpu"))
    assert not np.allclose([engine.weight_of(p.chosen_id) for p in pairs], want, rtol=1e-3)


def test_point7_max_per_prompt_drops_pairs_and_duplicates_count_in_distances_only(tmp_path):
    """3_data_prep_for_diversified_training.py:59-74 (max_cutoff) and :62-67,84-86 (a response once per pair in
    the distances; scaling and normalisation over the dict of distinct texts, :95-111,140-145). 'all' pairs
    reuse responses, so copies matter."""
    g = group("Another story.", [(t, s) for t, s in zip(STORIES[3:9], (1, 2, 4, 8, 16, 32))])
    pairs = build_pairs(g, "all", max_pairs_per_prompt=None)
    embed = embed_fn(STYLE_TWICE)
    for cutoff in (None, 6):
        cfg = style_only(tmp_path, max_per_prompt=cutoff)
        kept, members, usage = paired_groups(pairs, cfg.deviation.max_per_prompt)
        dev = compute_deviation(members, cfg.deviation, pair_counts=usage)
        got = {p.pair_id: p.chosen_weight for p in attach_weights(kept, dev)}
        want = authors_deviation_weights(
            [(p.prompt, p.chosen, p.rejected) for p in pairs], embed, max_cutoff=-1 if cutoff is None else cutoff
        )
        assert [p.pair_id for p, w in zip(pairs, want) if w is not None] == [p.pair_id for p in kept]
        np.testing.assert_allclose(
            [got[p.pair_id] for p in kept], [w for w in want if w is not None], rtol=2e-5, atol=2e-6
        )
    assert len(kept) < len(pairs)  # the cutoff dropped pairs (the engine's groups keep them at weight 1)
    # recipe engine counts each response once: different weights on the same pairs
    once = compute_deviation(members, DeviationConfig(semantic_model="", cache_dir=str(tmp_path / "emb")))
    assert not np.allclose([once.weight_of(p.chosen_id) for p in kept], [got[p.pair_id] for p in kept], rtol=1e-4)


def test_points_2_7_through_prepare_data(tmp_path):
    """prepare_data wires the same groups: its weights equal those of the authors' port on its pairs."""
    from engine.data.prepare import prepare_data
    from engine.model import load_tokenizer

    cfg = from_dict(
        {
            "recipe": "authors",
            "loss": {"objective": "ddpo"},
            "data": {
                "source": "synthetic",
                "synthetic_prompts": 8,
                "pairs": "gap",
                "max_prompt_length": 64,
                "max_length": 256,
                "max_tokens_per_row": 1024,
                "cache_dir": str(tmp_path / "c"),
            },
            "deviation": {
                "semantic_model": "",
                "style_model": "builtin:stylometric",
                "max_per_prompt": 4,
                "cache_dir": str(tmp_path / "emb"),
            },
        }
    )
    prep = prepare_data(cfg, load_tokenizer(), verbose=False)
    d = cfg.data
    all_pairs = build_pairs(
        prep.responses,
        "gap",
        min_gap=d.min_gap,
        max_pairs_per_prompt=d.max_pairs_per_prompt,
        seed=d.seed,
        gap_sampler="authors",
    )
    want = authors_deviation_weights(
        [(p.prompt, p.chosen, p.rejected) for p in all_pairs], embed_fn(STYLE_TWICE), max_cutoff=4
    )
    want = {p.pair_id: w for p, w in zip(all_pairs, want) if w is not None}
    got = {p.pair_id: p.chosen_weight for p in prep.train_pairs + prep.val_pairs}
    assert set(got) <= set(want) and len(want) < len(all_pairs)
    np.testing.assert_allclose([got[k] for k in got], [want[k] for k in got], rtol=1e-5, atol=1e-6)
    assert prep.counts["pair_beyond_max_per_prompt"] == len(all_pairs) - len(want)


# ------------------------------------------------------------------------------------- 3: cleaning


def test_point3_title_cleaning_prompt_join_and_dropped_responses():
    titles = [
        "[WP] A dragon",
        "[Writing Prompt] The long tag",
        "  [WP] leading space",
        "[WP] [EU] Two tags",
        "No tag at all",
        "[WP]no space",
        "[OT] [deleted]",
        "Title [WP] inside",
    ]
    texts = ["", "Some post text.", "  padded  "]
    for title in titles:
        for text in texts:
            assert make_prompt(title, text, "authors") == f"{authors_clean_title(title)}\n{text}"  # :51 of step 2
    assert make_prompt("[Writing Prompt] The long tag", "", "engine") == "The long tag"
    assert make_prompt("[Writing Prompt] The long tag", "", "authors") == "The long tag\n"
    assert make_prompt("[WP] [EU] Two tags", "", "engine") == "Two tags"
    comments = [
        "A story.",
        "[deleted]",
        "",
        "**Welcome to the Prompt!** rules",
        "ok this submission has been removed",
        "[removed]",
        "**Off-Topic Discussion** here",
        "Another story.",
    ]
    rows = [
        (
            0,
            {
                "post_title": "[WP] T",
                "post_text": "",
                "comment_texts": comments,
                "comment_scores": list(range(len(comments))),
            },
        )
    ]
    kept, _ = responses_from_rows(rows, cleaning="authors")
    assert [r.text for r in kept] == authors_filter_comments(comments)
    engine, report = responses_from_rows(rows, cleaning="engine")
    assert [r.text for r in engine] == ["A story.", "Another story."]
    assert report.response_counts["deleted_response"] == 2


# ---------------------------------------------------------------------------------- 4: length filter


def test_point4_length_filter_counts_the_templated_prompt_and_response():
    from engine.data.tokenize import filter_long_responses
    from engine.model import load_tokenizer

    tok = load_tokenizer()
    long_prompt = "Write about " + "a very long and winding premise " * 6
    responses = group(long_prompt, [(t, i) for i, t in enumerate(STORIES)]) + group(
        "Short.", [(t, i) for i, t in enumerate(STORIES)]
    )
    lengths = sorted(len(tok(t)["input_ids"]) for t in STORIES)
    limit = lengths[len(lengths) // 2] + 30
    for prompt in (long_prompt, "Short."):
        rs = [r for r in responses if r.prompt == prompt]
        got, _ = filter_long_responses(rs, tok, limit, count="prompt_and_response")
        assert [r.text for r in got] == authors_remove_long(tok, prompt, [r.text for r in rs], limit)
    authors_kept, _ = filter_long_responses(responses, tok, limit, count="prompt_and_response")
    engine_kept, _ = filter_long_responses(responses, tok, limit, count="response")
    assert len(authors_kept) < len(engine_kept)  # the long prompt costs its responses under the authors' count


# ------------------------------------------------------------------------------------------ 5: gap


@pytest.mark.parametrize(
    "scores, min_gap, engine_differs",
    [
        ((0, 1, 2, 2, 7, 12), 5, True),  # leftovers 2, 2 cannot pair: two or three pairs
        ((0, 0, 4, 5, 6, 12, 13), 5, True),
        # Here both samplers happen to have the same law (e.g. one valid pair per draw in the last case).
        ((1, 2, 2, 3, 9, 9), 5, False),
        ((1, 1, 1, 2), 5, False),
    ],
)
def test_point5_gap_pairs_follow_the_authors_distribution(scores, min_gap, engine_differs):
    """Gap phase, the per-draw fallback to any different scores, equal scores never paired, no cap."""
    texts = [f"r{i}" for i in range(len(scores))]
    g = group("G", list(zip(texts, scores)))
    exact = authors_gap_distribution(list(scores), min_gap)
    assert sum(exact.values()) == 1
    n = 3000
    seen = Counter()
    for seed in range(n):
        pairs = build_pairs(g, "gap", min_gap=min_gap, max_pairs_per_prompt=None, seed=seed, gap_sampler="authors")
        seen[tuple((texts.index(p.chosen), texts.index(p.rejected)) for p in pairs)] += 1
    ok, why = chi_square_ok(seen, exact, n)
    assert ok, why
    # The engine's sampler is another law (greedy + maximum matching): the same test rejects it.
    engine = Counter(
        tuple(
            (texts.index(p.chosen), texts.index(p.rejected))
            for p in build_pairs(g, "gap", min_gap=min_gap, max_pairs_per_prompt=None, seed=s)
        )
        for s in range(n)
    )
    assert chi_square_ok(engine, exact, n)[0] is not engine_differs


# ---------------------------------------------------------------------------------------- 6: divpo


def test_point6_divpo_pairs_follow_the_authors_distribution(tmp_path):
    """4_data_prep_for_divpo.py: pool = gap-paired responses, sets of int(min(max(2, n/4), n/2)), re-ranking
    within each set, the two most / least diverse paired at random."""
    # 14 responses: the gap step leaves the two 2s out or not (pools of 12 or 14), and sets of 3 make the
    # re-ranking within each set decide which two of them are paired.
    scores = (2, 2, 3, 7, 8, 9, 13, 14, 15, 20, 26, 33, 40, 41)
    texts = STORIES[:14]
    g = group("D", list(zip(texts, scores)))
    dev = compute_deviation(g, style_only(tmp_path).deviation, keep_embeddings=True)
    emb = embed_fn(STYLE_TWICE)(texts)
    exact = authors_divpo_distribution(texts, list(scores), emb, min_gap=5)
    assert sum(exact.values()) == 1
    n = 3000
    seen = Counter()
    for seed in range(n):
        pairs = build_pairs(
            g,
            "divpo",
            min_gap=5,
            rho=0.25,
            max_pairs_per_prompt=2,
            seed=seed,
            deviation=dev,
            gap_sampler="authors",
            divpo_sampler="authors",
        )
        seen[tuple((p.chosen, p.rejected) for p in pairs)] += 1
    ok, why = chi_square_ok(seen, exact, n)
    assert ok, why
    assert len({len(k) for k in exact}) == 1 and len(exact) > 4  # two pairs always, many possible outcomes
    # The engine's sampler (whole-prompt ranking, pairs in rank order) is deterministic: another law.
    engine = build_pairs(g, "divpo", rho=0.25, max_pairs_per_prompt=100, deviation=dev)
    assert not chi_square_ok(Counter({tuple((p.chosen, p.rejected) for p in engine): n}), exact, n)[0]


# ------------------------------------------------------------------------------- 8: rejected weights


def test_point8_no_loss_reads_rejected_weights():
    """models/ddpo_trainer.py:1237 and models/dorpo_trainer.py:700-705,834 read score_chosen only; the
    authors' floor on score_rejected (3_data_prep_for_diversified_training.py:147-149) thus changes no
    training, and the engine has no such field. The engine's loss ignores rejected weights too."""
    from engine.data.packing import collate, pack_pairs
    from engine.data.tokenize import TokenizedPair
    from engine.model import build_model
    from engine.train import PolicyWithLoss

    with pytest.raises(Exception, match="unknown key.*deviation.rejected_weight_floor"):
        from_dict({"deviation": {"rejected_weight_floor": 0.2}})
    rng = np.random.default_rng(0)
    items = [
        TokenizedPair(
            f"p{i}",
            rng.integers(5, 200, 20).astype(np.int32),
            6,
            rng.integers(5, 200, 17).astype(np.int32),
            6,
            chosen_weight=0.5 + i,
        )
        for i in range(3)
    ]
    torch.manual_seed(0)
    model = build_model("llama-tiny", seed=0)
    for objective in ("ddpo", "dorpo"):
        losses = []
        for rw in (1.0, 0.2):
            for t in items:
                t.rejected_weight = rw
            batch = collate(pack_pairs(items, 512, pad_id=0))
            if objective == "ddpo":
                batch.ref_chosen_logps = torch.full((3,), -40.0)
                batch.ref_rejected_logps = torch.full((3,), -35.0)
            losses.append(PolicyWithLoss(model, LossConfig(objective=objective))(batch).loss.item())
        assert losses[0] == losses[1], objective


# --------------------------------------------------------------------------------------- 9: configs


def test_point9_llama8b_ddpo_is_the_authors_scripts():
    """scripts_dpo/generation_ddpo_model_train.py, models/generation_model.py, TRL 0.12.1 / transformers 4.46.2
    defaults (requirements.txt): the values below are read off those files."""
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    cfg = load_config(["--config", str(ROOT / "configs/llama8b-ddpo.yaml")])
    assert cfg.recipe == "authors"
    assert (cfg.model.lora_r, cfg.model.lora_alpha) == (128, 256)  # :26-27
    assert cfg.model.lora_target_modules == PEFT_TARGETS["llama"]  # LoraConfig without targets
    assert cfg.model.lora_dropout == LoraConfig().lora_dropout == 0.0
    assert cfg.model.tokenizer == "meta-llama/Llama-3.1-8B-Instruct"  # generation_model.py:75
    assert cfg.model.name != "meta-llama/Llama-3.1-8B"  # an SFT model (:12, :26-32), not the base
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.loss.beta, cfg.optim.grad_accum) == (5e-6, 3, 0.1, 1)  # :18-19,56-57
    # TrainingArguments 4.46.2 defaults: linear decay, no warmup, AdamW(0.9, 0.999, 1e-8), wd 0, clip 1.
    assert (cfg.optim.schedule, cfg.optim.warmup_ratio, cfg.optim.weight_decay) == ("linear", 0.0, 0.0)
    assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.max_grad_norm) == ([0.9, 0.999], 1e-8, 1.0)
    assert cfg.parallel.precision == "bf16"  # :52
    assert (cfg.data.pairs, cfg.data.min_gap, cfg.data.max_pairs_per_prompt, cfg.data.max_response_tokens) == (
        "gap",
        5,
        None,
        2048,
    )
    assert cfg.data.max_length >= 2048  # DPOConfig max_length None: no truncation below the 2048 filter
    dev = cfg.deviation
    assert (dev.groups, dev.count_duplicates, dev.max_per_prompt) == ("paired", True, None)
    assert (cfg.eval.n_samples, cfg.eval.max_new_tokens, cfg.eval.num_prompts) == (4, 2048, 1000)  # eval1_1.py:61,79


def test_point9_llama8b_dorpo_is_the_authors_scripts():
    cfg = load_config(["--config", str(ROOT / "configs/llama8b-dorpo.yaml")])
    assert cfg.model.name == "meta-llama/Llama-3.1-8B" and cfg.model.lora_target_modules == ["q_proj", "v_proj"]
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.loss.beta) == (5e-6, 4, 0.25)  # generation_dorpo_model_train.py
    assert (cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.truncation) == (512, 128, "trl")
    assert cfg.loss.nll_on_prompt and (cfg.optim.schedule, cfg.optim.warmup_ratio) == ("linear", 0.0)


def test_point9_trl_truncation():
    """models/dorpo_trainer.py:514-532: prompt keeps its end when prompt + the LONGER response is too long;
    then both responses are cut to max_length - max_prompt_length."""
    from engine.data.tokenize import ChatEncoder
    from engine.model import load_tokenizer

    enc = ChatEncoder(load_tokenizer(), max_prompt_length=8, max_length=20, truncation="trl")

    def authors(prompt, chosen, rejected, max_length=20, max_prompt_length=8):
        longer = max(len(chosen), len(rejected))
        out = []
        for resp in (chosen, rejected):
            p = prompt[-max_prompt_length:] if len(prompt) + longer > max_length else prompt
            r = resp[: max_length - max_prompt_length] if len(p) + longer > max_length else resp
            out.append((p, r))
        return out

    for lp, lc, lr in ((5, 6, 3), (5, 14, 3), (12, 5, 2), (12, 15, 30), (3, 16, 17), (30, 1, 1)):
        prompt, chosen, rejected = list(range(lp)), list(range(100, 100 + lc)), list(range(200, 200 + lr))
        assert enc.truncate_pair([(prompt, chosen), (prompt, rejected)]) == authors(prompt, chosen, rejected)


# ------------------------------------------------------------------------------------- 10: embedders


MODELING_STANDIN = '''
"""A tiny stand-in for jina-embeddings-v3's custom code: XLM-RoBERTa plus per-task LoRA adapters that act only
when a task's adapter_mask is given (the published model's encode without a task uses none)."""
import torch
from transformers import XLMRobertaConfig, XLMRobertaModel


class StandinConfig(XLMRobertaConfig):
    model_type = "standin_xlm_roberta_lora"

    def __init__(self, lora_tasks=("separation", "text-matching"), lora_rank=2, **kwargs):
        super().__init__(**kwargs)
        self.lora_tasks, self.lora_rank = list(lora_tasks), lora_rank


class StandinModel(XLMRobertaModel):
    config_class = StandinConfig

    def __init__(self, config):
        super().__init__(config)
        t, d, r = len(config.lora_tasks), config.hidden_size, config.lora_rank
        self.lora_A = torch.nn.Parameter(torch.randn(t, d, r) * 0.5)
        self.lora_B = torch.nn.Parameter(torch.randn(t, r, d) * 0.5)

    def forward(self, input_ids=None, attention_mask=None, adapter_mask=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if adapter_mask is not None:
            h = out.last_hidden_state
            out.last_hidden_state = h + torch.einsum("bld,bdr,bre->ble", h, self.lora_A[adapter_mask],
                                                     self.lora_B[adapter_mask])
        return out
'''


def _tiny_tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)})
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _sentence_transformer_dir(hf_dir: Path, out: Path, trust_remote_code: bool) -> Path:
    """hf_dir's model with mean pooling, saved as a sentence-transformers directory (how both published
    embedders are distributed)."""
    from sentence_transformers import SentenceTransformer

    SentenceTransformer(str(hf_dir), device="cpu", trust_remote_code=trust_remote_code).save(str(out))
    return out


def _mean_pooled(model, tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    return F.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy()


@pytest.fixture(scope="module")
def standin_embedders(tmp_path_factory):
    """(style dir: RoBERTa like AnnaWegmann/Style-Embedding, semantic dir: XLM-RoBERTa + LoRA custom code like
    jinaai/jina-embeddings-v3), both tiny, random-init and local."""
    from transformers import RobertaConfig, RobertaModel

    root = tmp_path_factory.mktemp("standins")
    tok = _tiny_tokenizer(STORIES)
    common = dict(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(**common)).save_pretrained(root / "style-hf")
    tok.save_pretrained(root / "style-hf")
    code = root / "modeling_standin.py"
    code.write_text(MODELING_STANDIN)
    spec = importlib.util.spec_from_file_location("modeling_standin", code)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.StandinConfig(**common)
    cfg.auto_map = {"AutoConfig": "modeling_standin.StandinConfig", "AutoModel": "modeling_standin.StandinModel"}
    mod.StandinModel(cfg).save_pretrained(root / "jina-hf")
    tok.save_pretrained(root / "jina-hf")
    shutil.copy(code, root / "jina-hf" / "modeling_standin.py")
    style = _sentence_transformer_dir(root / "style-hf", root / "style", trust_remote_code=False)
    jina = _sentence_transformer_dir(root / "jina-hf", root / "jina", trust_remote_code=True)
    return style, jina, tok


def test_point10_published_embedder_families_load_from_local_directories(tmp_path, standin_embedders):
    """What this covers: loading a sentence-transformers directory of each published architecture family
    offline through the engine (RoBERTa + mean pooling; XLM-RoBERTa with its own code and LoRA adapters,
    which needs trust_remote_code), the default `encode` without a task (no adapter, as the authors call
    it, models/diversity_model.py:12-13), and the weights through compute_deviation. Not covered: the
    published weights and jina's real code (no hub here)."""
    from transformers import AutoModel

    style_dir, jina_dir, tok = standin_embedders
    texts = STORIES[:5]
    style = get_embedder(str(style_dir), device="cpu", precision="float32")
    ref_style = _mean_pooled(AutoModel.from_pretrained(style_dir), tok, texts)
    np.testing.assert_allclose(style.encode(texts), ref_style, atol=1e-5)
    with pytest.raises(RuntimeError, match="could not load"):
        get_embedder(str(jina_dir), device="cpu").encode(texts)  # custom code refused without trust_remote_code
    jina = get_embedder(str(jina_dir), device="cpu", trust_remote_code=True, precision="float32")
    hf = AutoModel.from_pretrained(jina_dir, trust_remote_code=True)
    assert type(hf).__name__ == "StandinModel"
    np.testing.assert_allclose(jina.encode(texts), _mean_pooled(hf, tok, texts), atol=1e-5)
    with torch.no_grad():  # the adapters are real: a task would change the vectors
        enc = tok(texts, padding=True, return_tensors="pt")
        plain = hf(**enc).last_hidden_state
        tasked = hf(**enc, adapter_mask=torch.zeros(len(texts), dtype=torch.long)).last_hidden_state
    assert not torch.allclose(plain, tasked)
    # Through the config: deviation.trust_remote_code reaches the loader.
    cfg = from_dict(
        {
            "deviation": {
                "semantic_model": str(jina_dir),
                "style_model": str(style_dir),
                "trust_remote_code": True,
                "device": "cpu",
                "precision": "float32",
                "cache_dir": str(tmp_path / "emb"),
            }
        }
    )
    g = group("P", [(t, i) for i, t in enumerate(texts)])
    res = compute_deviation(g, cfg.deviation)
    from engine.deviation import deviation_weights

    want = deviation_weights([_mean_pooled(hf, tok, texts), ref_style], np.zeros(len(texts)))
    np.testing.assert_allclose(res.weights, want, atol=1e-5)


def test_point10_default_embedders_are_labelled_truthfully():
    from engine.config import help_text

    text = " ".join(help_text().split())
    assert (
        "'builtin:minilm' (all-MiniLM-L6-v2, shipped for offline use; NOT the published jinaai/jina-embeddings-v3)"
    ) in text
    assert "NOT the published AnnaWegmann/Style-Embedding" in text
    for name in ("experiment", "tiny-cpu"):
        body = (ROOT / "configs" / f"{name}.yaml").read_text()
        assert "builtin:minilm" in body and "published embedders:" not in body.replace("not the published", "")
    for name in ("llama8b-ddpo", "llama8b-ddpo-engine", "llama8b-dorpo-engine"):
        cfg = load_config(["--config", str(ROOT / "configs" / f"{name}.yaml")])
        assert (cfg.deviation.semantic_model, cfg.deviation.style_model) == (
            "jinaai/jina-embeddings-v3",
            "AnnaWegmann/Style-Embedding",
        )
        assert cfg.deviation.trust_remote_code and (cfg.eval.semantic_model, cfg.eval.style_model) == (
            "jinaai/jina-embeddings-v3",
            "AnnaWegmann/Style-Embedding",
        )


# ---------------------------------------------------------------------------------------- 11: metrics


@pytest.fixture
def their_clock(monkeypatch):
    """gzip.compress stamps the call's time into its header (their inner stream); pin it to the second the
    engine's authors' definition uses."""
    from engine.metrics import AUTHORS_GZIP_MTIME

    monkeypatch.setattr(gzip, "time", types.SimpleNamespace(time=lambda: float(AUTHORS_GZIP_MTIME)))


METRIC_GROUPS = [
    STORIES[:4],
    [STORIES[0]] * 3,  # every sample identical: n - 1 there
    [STORIES[1], STORIES[1], STORIES[2], STORIES[3]],  # consecutive copies merge
    [STORIES[4], STORIES[5], STORIES[4], STORIES[6]],  # a copy that does not
    ["", "None", STORIES[7], "NA"],  # read back from their CSV as "nan"
    ["...", "!!!", STORIES[8], STORIES[9]],  # no word character: ROUGE finds no token
    ["Line one.\n\nLine  two", STORIES[10] + "  " + STORIES[11], "\u00e9t\u00e9 \u2014 caf\u00e9", STORIES[12]],
    ["Hi", "there"],  # no 3-gram: their n-gram score divides by zero
    [STORIES[13]],
    [" ".join(STORIES * 3), " ".join(reversed(STORIES * 3)), " ".join(STORIES[::2] * 5), STORIES[0]],
]


def _or_nan(fn, *args):
    try:
        return fn(*args)
    except ZeroDivisionError:
        return float("nan")


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_point11_text_metrics_equal_the_authors_evaluation(tmp_path, their_clock):
    """diversity/compression.py, homogenization.py, ngram_diversity.py (their vendored copy of Shaib et al.'s
    package) on the samples as their CSV returns them (scripts_eval/generation_eval1_1.py:84-99,
    generation_eval1_2.py:24,31-37): equal to the last bit (rounded to 3 decimals there). Where their code raises
    (no 3-gram), the engine reports NaN, which the averages over prompts skip."""
    from engine import metrics as M

    theirs_texts = authors_csv_round_trip(METRIC_GROUPS, tmp_path / "eval.csv")
    ports = {
        "compression_ratio": authors_compression_ratio,
        "homogenization": authors_homogenization_score,
        "ngram_diversity": authors_ngram_diversity_score,
    }
    differs = Counter()
    for samples, seen_by_them in zip(METRIC_GROUPS, theirs_texts):
        ours, engine = M.text_metrics(samples, compat="authors"), M.text_metrics(samples)
        for key, port in ports.items():
            want = _or_nan(port, seen_by_them)
            assert _same(ours[key], want), (key, samples, ours[key], want)
            differs[key] += not _same(engine[key], want)
    assert all(differs[k] >= 3 for k in ports), differs  # the engine's definitions are other numbers


def test_point11_their_compression_ratio_depends_on_the_clock(monkeypatch):
    """The inner gzip.compress writes the time of the call into the stream their file compresses again; for
    some texts a few bytes of time change the outer size. Hence a pinned second (AUTHORS_GZIP_MTIME)."""
    from engine.metrics import AUTHORS_GZIP_MTIME

    words = " ".join(STORIES).split()
    seconds = [AUTHORS_GZIP_MTIME + 3600 * h for h in range(24)]
    for k in range(1, len(words)):
        values = set()
        for t in seconds:
            monkeypatch.setattr(gzip, "time", types.SimpleNamespace(time=lambda t=t: float(t)))
            values.add(authors_compression_ratio([" ".join(words[:k])]))
        if len(values) > 1:
            break
    assert len(values) > 1, "no text found whose value depends on the clock"


def test_point11_embedding_diversity_equals_theirs():
    """models/diversity_model.py:25-42 as scripts_eval/generation_eval1_1.py:82-83 calls it, averaged over the
    prompt's samples; one sample: NaN there (0/0; generation_eval2.py:54-59 writes NaN too), 0.0 in the engine."""
    from engine import metrics as M

    gen = torch.Generator().manual_seed(0)
    for texts in (STORIES[:4], STORIES[5:7], STORIES[:1]):
        style = embed_fn([get_embedder("builtin:stylometric")])(texts)[0]
        for e in (style, torch.randn(len(texts), 24, generator=gen)):
            want = float(np.mean(authors_get_diversity(e)))
            got = M.embedding_diversity(e.numpy(), compat="authors")
            assert _same(got, want) or got == pytest.approx(want, abs=1e-6)  # their float32 arithmetic
            if len(texts) == 1:
                assert math.isnan(got) and M.embedding_diversity(e.numpy()) == 0.0


def _metrics_and_samples(out_dir: Path):
    doc = json.loads((out_dir / "metrics.json").read_text())
    samples: dict[str, list[str]] = {}
    for line in (out_dir / "generations.jsonl").read_text().splitlines():
        g = json.loads(line)
        samples.setdefault(g["prompt_id"], []).append(g["text"])
    return doc, samples


def _assert_authors_rows(doc, samples, tmp_path):
    pids = [row["prompt_id"] for row in doc["per_prompt"]]
    seen_by_them = authors_csv_round_trip([samples[p] for p in pids], tmp_path / "eval.csv")
    for row, texts in zip(doc["per_prompt"], seen_by_them):
        for key, port in (
            ("compression_ratio", authors_compression_ratio),
            ("homogenization", authors_homogenization_score),
            ("ngram_diversity", authors_ngram_diversity_score),
        ):
            want = _or_nan(port, texts)
            assert (row[key] is None and math.isnan(want)) or row[key] == want, (key, row[key], want)


def test_point11_evaluate_cli_and_after_training_use_the_switch(tmp_path, their_clock):
    """`python -m engine.evaluate --metrics-compat authors` and the evaluation after training (eval.metrics_compat)
    write the authors' values and record the choice; the recipe does not set it (see the README)."""
    from types import SimpleNamespace

    from engine.evaluate import main
    from engine.model import build_model, load_tokenizer
    from engine.train import evaluate_after_training

    assert from_dict({"recipe": "authors"}).eval.metrics_compat == "engine"
    assert from_dict({"recipe": "authors", "eval": {"metrics_compat": "authors"}}).eval.metrics_compat == "authors"

    out = tmp_path / "human"
    main(
        [
            "--human",
            "--prompts",
            "synthetic",
            "--split",
            "all",
            "--num-prompts",
            "3",
            "--n",
            "4",
            "--semantic-model",
            "",
            "--style-model",
            "builtin:stylometric",
            "--metrics-compat",
            "authors",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    doc, samples = _metrics_and_samples(out)
    assert doc["settings"]["metrics_compat"] == "authors" and len(doc["per_prompt"]) == 3
    _assert_authors_rows(doc, samples, tmp_path)

    cfg = from_dict(
        {
            "eval": {
                "metrics_compat": "authors",
                "n_samples": 3,
                "num_prompts": 2,
                "max_new_tokens": 8,
                "batch_size": 2,
                "semantic_model": "",
                "style_model": "builtin:stylometric",
            },
            "data": {"source": "synthetic"},
        }
    )
    prepared = SimpleNamespace(val_pairs=[SimpleNamespace(prompt=p) for p in ("Write about a ship.", "A dragon?")])
    torch.manual_seed(0)
    evaluate_after_training(build_model("llama-tiny", seed=0), load_tokenizer(), prepared, cfg, tmp_path / "eval")
    doc, samples = _metrics_and_samples(tmp_path / "eval")
    assert doc["settings"]["metrics_compat"] == "authors"
    _assert_authors_rows(doc, samples, tmp_path)


# ------------------------------------------------------------------------------ 12: groups of one, ties


def test_point12_a_group_of_one_weighs_one_where_theirs_is_nan(tmp_path):
    """models/diversity_model.py:40 divides by n - 1 = 0 for one response, and transform_scores keeps the NaN
    (3_data_prep_for_diversified_training.py:100-145). The engine gives weight 1 and counts such groups."""
    from engine.deviation import weight_summary

    lone = group("Lonely prompt", [(STORIES[0], 3)])
    others = group("Busy prompt", [(t, i) for i, t in enumerate(STORIES[1:5])])
    assert all(math.isnan(w) for w in authors_group_weights(embed_fn(STYLE_TWICE)([STORIES[0]]), [STORIES[0]]))
    res = compute_deviation(lone + others, style_only(tmp_path, groups="all").deviation)
    assert res.weight_of(lone[0].response_id) == 1.0 and res.score_of(lone[0].response_id) == 0.0
    summary = weight_summary(res)
    assert summary["groups_of_one"] == 1 and "NaN" in summary["notes"][0]
    assert weight_summary(compute_deviation(others, style_only(tmp_path).deviation))["groups_of_one"] == 0


def test_point12_exact_ties_turn_rounding_into_weights_0_and_2():
    """:103 and :143 test exact equality. A spread of 1e-12 between the two scores of a group of two, the size
    of float rounding, makes their weights 2 and 0 (min-max scaling to +-1); the engine's tolerance gives the
    exact-arithmetic answer, 1 and 1, which is also theirs whenever their arithmetic ties exactly."""
    from engine.deviation import combine_geometric, minmax_scale_groups, normalise_weights

    d = 0.4375
    for raw in ((d, d + 1e-12), (d + 1e-12, d), (d, d)):
        cur = {"chosen": raw[0], "rejected": raw[1]}
        theirs = [authors_transform([cur, cur], t) + 1 for t in cur]
        codes = np.zeros(2, dtype=np.int64)
        scaled = minmax_scale_groups(np.array(raw), codes, 1)
        ours = normalise_weights(combine_geometric([scaled, scaled]), codes, 1)
        assert ours.tolist() == [1.0, 1.0]
        want = [1.0, 1.0] if raw[0] == raw[1] else sorted([0.0, 2.0], reverse=raw[0] > raw[1])
        assert theirs == pytest.approx(want, abs=1e-12)


def test_point12_groups_of_two_weigh_one_and_ties_change_no_real_group(tmp_path):
    """Every group of two stories: weight 1 and 1 in the engine. The port (their float32 matrix product,
    exact equality) agrees wherever its two scores are bit-equal; where its matrix product is not
    bit-symmetric, rounding alone gives those responses weights far from 1 (hardware-dependent, which is why
    exact equality is not offered). With exact equality on its own arithmetic the engine too would scatter
    weights. Larger groups: the tolerance changes no weight."""
    from engine.deviation import deviation_weights

    emb = embed_fn(STYLE_TWICE)(STORIES)[0]
    twos = list(itertools.combinations(range(len(STORIES)), 2))
    groups = [group(f"P{i}-{j}", [(STORIES[i], 2), (STORIES[j], 1)]) for i, j in twos]
    res = compute_deviation([r for g in groups for r in g], style_only(tmp_path).deviation)
    assert res.weights.tolist() == [1.0] * 2 * len(twos)
    noisy_engine = 0
    for i, j in twos:
        theirs = authors_group_weights([emb[[i, j]]] * 2, [STORIES[i], STORIES[j]])
        div = authors_get_diversity(emb[[i, j]])
        if div[0] == div[1]:
            assert theirs == pytest.approx([1.0, 1.0], abs=1e-12)
        else:
            assert abs(div[0] - div[1]) < 1e-6 and max(abs(w - 1) for w in theirs) > 0.5
        exact = deviation_weights([emb[[i, j]].numpy()], np.zeros(2, dtype=np.int64), tie_atol=0.0)
        noisy_engine += exact.tolist() != [1.0, 1.0]
    assert noisy_engine > 0
    rng = np.random.default_rng(0)
    subsets = [
        sorted(rng.choice(len(STORIES), size=int(rng.integers(3, 7)), replace=False).tolist()) for _ in range(20)
    ]
    groups = [group(f"G{n}", [(STORIES[k], k) for k in idx]) for n, idx in enumerate(subsets)]
    res = compute_deviation([r for g in groups for r in g], style_only(tmp_path).deviation)
    for g, idx in zip(groups, subsets):
        got = [res.weight_of(r.response_id) for r in g]
        want = authors_group_weights([emb[idx]] * 2, [STORIES[k] for k in idx])
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
