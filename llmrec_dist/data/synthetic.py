"""The embedded ``synthetic`` source: a seeded catalogue and users with learnable structure.

Items have latent attributes (a topic out of ten, a position inside the topic's ordered
"series", a sub-theme that changes every few positions, a mood and a style) and English text
whose words reflect them, e.g. ``"Starfall Protocol — a tense science-fiction thriller about
rogue AIs; fast-paced."``.

Users have a sparse preference over topics. A sequence starts early in a favoured topic and
mostly walks forward through it (the next item, sometimes one or two further on); now and then
the user switches to another favoured topic and resumes where they left it, and rarely picks
a random popular item. So:

* the next item is largely predictable from the last few (a SASRec-style model beats
  popularity clearly);
* nearby items share topic and sub-theme words, so text alone carries signal (cold items);
* early items of each series are more popular, so popularity is a meaningful baseline.

Everything is drawn from one ``numpy.random.Generator`` seeded with ``seed``: the same
arguments always give the same frames.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# Per topic: genre phrase, forms, sub-themes (in series order), moods typical of the topic,
# and title words (first word, second word).
_TOPICS = [
    {
        "genre": "science-fiction",
        "forms": ["thriller", "epic", "drama", "adventure"],
        "subthemes": ["rogue AIs", "first contact", "generation ships", "time loops",
                      "Martian colonies", "cyborg uprisings"],
        "moods": ["tense", "cerebral", "dark"],
        "first": ["Starfall", "Quantum", "Neon", "Orbital", "Binary", "Solar", "Void",
                  "Cobalt", "Hyper", "Zero", "Photon", "Nova"],
        "second": ["Protocol", "Horizon", "Drift", "Signal", "Array", "Frontier", "Engine",
                   "Vector", "Relay", "Paradox", "Singularity", "Circuit"],
    },
    {
        "genre": "fantasy",
        "forms": ["saga", "adventure", "epic", "fable"],
        "subthemes": ["dragon riders", "exiled heirs", "forbidden magic", "cursed forests",
                      "wandering knights", "sea witches"],
        "moods": ["whimsical", "sweeping", "dark"],
        "first": ["Ember", "Silver", "Thorn", "Raven", "Elder", "Moon", "Iron", "Ashen",
                  "Golden", "Hollow", "Wild", "Frost"],
        "second": ["Crown", "Throne", "Grove", "Blade", "Oath", "Tower", "Spire", "Rune",
                   "Kingdom", "Chalice", "Wyrm", "Gate"],
    },
    {
        "genre": "crime",
        "forms": ["mystery", "thriller", "procedural", "noir"],
        "subthemes": ["a heist gone wrong", "a small-town murder", "corrupt detectives",
                      "a missing heiress", "cartel informants", "a serial poisoner"],
        "moods": ["gritty", "tense", "dark"],
        "first": ["Midnight", "Cold", "Broken", "Silent", "Blind", "Crooked", "Last",
                  "Hidden", "Bitter", "Shallow", "Dead", "Velvet"],
        "second": ["Alibi", "Witness", "Ledger", "Motive", "Verdict", "Alley", "Confession",
                   "Precinct", "Evidence", "Cipher", "Trace", "Accomplice"],
    },
    {
        "genre": "romance",
        "forms": ["comedy", "drama", "story", "melodrama"],
        "subthemes": ["second chances", "summer flings", "rival chefs", "long-distance letters",
                      "arranged marriages", "wedding planners"],
        "moods": ["warm", "bittersweet", "light-hearted"],
        "first": ["Paper", "Sweet", "Lemon", "Autumn", "Little", "Rose", "Sunday", "Honey",
                  "Blue", "Secret", "Painted", "Tender"],
        "second": ["Hearts", "Promise", "Letters", "Kiss", "Garden", "Season", "Dance",
                   "Vows", "Café", "Postcard", "Harbour", "Waltz"],
    },
    {
        "genre": "horror",
        "forms": ["film", "chiller", "slasher", "ghost story"],
        "subthemes": ["haunted lighthouses", "possessed dolls", "things in the basement",
                      "cursed videotapes", "isolated cabins", "body snatchers"],
        "moods": ["eerie", "terrifying", "dark"],
        "first": ["Crimson", "Pale", "Hungry", "Grave", "Black", "Rotting", "Wicked",
                  "Howling", "Sunken", "Twisted", "Faceless", "Vile"],
        "second": ["Cellar", "Harvest", "Whispers", "Hollow", "Ritual", "Cradle", "Mask",
                   "Shroud", "Swamp", "Attic", "Hex", "Nursery"],
    },
    {
        "genre": "comedy",
        "forms": ["farce", "caper", "satire", "sitcom film"],
        "subthemes": ["office pranks", "disastrous road trips", "mistaken identities",
                      "family reunions", "hapless burglars", "talking pets"],
        "moods": ["zany", "light-hearted", "witty"],
        "first": ["Totally", "Big", "Crazy", "Lucky", "Super", "Weekend", "Happy", "Dumb",
                  "Accidental", "Hot", "Awkward", "Mega"],
        "second": ["Disaster", "Vacation", "Party", "Roommates", "Mixup", "Wedding",
                   "Shenanigans", "Getaway", "Boss", "Jackpot", "Blunder", "Bash"],
    },
    {
        "genre": "documentary",
        "forms": ["documentary", "series", "portrait", "chronicle"],
        "subthemes": ["coral reefs", "polar expeditions", "ancient empires", "deep-sea life",
                      "jazz legends", "mountain climbers"],
        "moods": ["contemplative", "awe-inspiring", "informative"],
        "first": ["Planet", "Deep", "Ancient", "Wild", "Hidden", "Living", "Great", "Lost",
                  "Frozen", "Vanishing", "Endless", "Untold"],
        "second": ["Oceans", "Worlds", "Empires", "Migrations", "Voices", "Rivers", "Peaks",
                   "Kingdoms", "Secrets", "Journeys", "Currents", "Archives"],
    },
    {
        "genre": "western",
        "forms": ["western", "frontier drama", "revenge tale", "ballad"],
        "subthemes": ["cattle drives", "outlaw brothers", "gold-rush towns", "railroad barons",
                      "lone sheriffs", "stagecoach robberies"],
        "moods": ["rugged", "gritty", "melancholic"],
        "first": ["Dust", "Rattlesnake", "High", "Lonesome", "Red", "Six", "Dry", "Copper",
                  "Saddle", "Sundown", "Buffalo", "Whiskey"],
        "second": ["Creek", "Trail", "Mesa", "Gulch", "Canyon", "Rider", "Bounty", "Ridge",
                   "Ranch", "Pass", "Outpost", "Junction"],
    },
    {
        "genre": "war",
        "forms": ["drama", "epic", "thriller", "chronicle"],
        "subthemes": ["submarine crews", "resistance fighters", "codebreakers",
                      "field hospitals", "trench warfare", "fighter pilots"],
        "moods": ["harrowing", "somber", "heroic"],
        "first": ["Iron", "Steel", "Burning", "Final", "Distant", "Silent", "Long", "Fallen",
                  "Grey", "Winter", "Scarlet", "Thunder"],
        "second": ["Front", "Line", "Battalion", "Sky", "Convoy", "Dawn", "Bridge", "Siege",
                   "Beachhead", "Watch", "Orders", "Retreat"],
    },
    {
        "genre": "animated family",
        "forms": ["adventure", "musical", "comedy", "fairy tale"],
        "subthemes": ["runaway toys", "brave little robots", "talking forest animals",
                      "young inventors", "lost penguins", "monster schools"],
        "moods": ["heartwarming", "whimsical", "uplifting"],
        "first": ["Tiny", "Bouncy", "Sparkle", "Jolly", "Fuzzy", "Puddle", "Rocket",
                  "Pocket", "Bubble", "Cookie", "Wiggly", "Marble"],
        "second": ["Friends", "Island", "Quest", "Parade", "Buddies", "Express", "Castle",
                   "Circus", "Club", "Carnival", "Treehouse", "Rescue"],
    },
]
_STYLES = ["fast-paced", "slow-burning", "dialogue-driven", "visually stunning", "quirky",
           "sprawling", "intimate", "ensemble-cast"]
_SEQUELS = ["", " II", " III", " IV", " V", " VI", " VII", " VIII", " IX", " X"]

START_TIME = 1_420_070_400  # 2015-01-01T00:00:00Z
START_SPREAD = 5 * 365 * 86_400


def _pick(rng: np.random.Generator, cdf: np.ndarray) -> int:
    """One draw from the categorical distribution with cumulative probabilities ``cdf``.

    Much faster than ``rng.choice(n, p=...)`` inside the per-step loop.
    """
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)


def _make_items(rng: np.random.Generator, n_items: int, n_topics: int) -> tuple[pd.DataFrame, list[list[int]]]:
    """Items with attributes and text; returns the frame and, per topic, item rows in series order."""
    topics = _TOPICS[:n_topics]
    topic_of = np.sort(np.arange(n_items) % n_topics)  # near-equal topic sizes
    ids = rng.permutation(n_items) + 1  # item ids do not reveal topic or series order
    series: list[list[int]] = [[] for _ in topics]
    rows = []
    for topic_index, topic in enumerate(topics):
        members = np.flatnonzero(topic_of == topic_index)
        block = max(1, int(np.ceil(len(members) / len(topic["subthemes"]))))
        combos = [(a, b) for a in topic["first"] for b in topic["second"]]
        order = rng.permutation(len(combos))
        for position, row in enumerate(members):
            first, second = combos[order[position % len(combos)]]
            sequel = _SEQUELS[(position // len(combos)) % len(_SEQUELS)]
            subtheme = topic["subthemes"][min(position // block, len(topic["subthemes"]) - 1)]
            mood = topic["moods"][rng.choice(len(topic["moods"]), p=[0.5, 0.3, 0.2])]
            form = topic["forms"][rng.integers(len(topic["forms"]))]
            style = _STYLES[rng.integers(len(_STYLES))]
            title = f"{first} {second}{sequel}"
            article = "an" if mood[0] in "aeiou" else "a"
            text = f"{title} — {article} {mood} {topic['genre']} {form} about {subtheme}; {style}."
            rows.append((row, str(ids[row]), text))
            series[topic_index].append(row)
    rows.sort()
    items = pd.DataFrame({"item_id": [r[1] for r in rows], "text": [r[2] for r in rows]})
    return items, series


def generate_synthetic(
    n_users: int = 1000,
    n_items: int = 400,
    seed: int = 0,
    *,
    n_topics: int = 10,
    min_length: int = 8,
    max_length: int = 50,
    continue_prob: float = 0.8,
    noise_prob: float = 0.05,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Generate ``(interactions, items, info)`` for the synthetic source.

    Args:
        n_users: Number of users (each gets one sequence).
        n_items: Catalogue size; items are spread evenly over the topics.
        seed: Seed of the only random generator used.
        n_topics: Number of topics, 2..10.
        min_length: Shortest sequence (at least 3 so leave-one-out keeps every user).
        max_length: Longest sequence; lengths are log-normal around ~18, clipped.
        continue_prob: Probability of staying in the current topic at each step.
        noise_prob: Probability of a random (popularity-weighted) item at each step.
    """
    if not 2 <= n_topics <= len(_TOPICS):
        raise ValueError(f"n_topics must be in 2..{len(_TOPICS)}, got {n_topics}")
    if n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    if n_items < max(max_length, 2 * n_topics):
        raise ValueError(f"n_items must be >= max(max_length, 2 * n_topics), got {n_items}")
    if not 3 <= min_length <= max_length:
        raise ValueError(f"need 3 <= min_length <= max_length, got {min_length}, {max_length}")

    rng = np.random.default_rng(seed)
    items, series = _make_items(rng, n_items, n_topics)
    item_ids = items["item_id"].to_numpy()

    # Some topics are more popular than others; early items of a series more than late ones.
    topic_weight = rng.dirichlet(np.full(n_topics, 2.0))
    position_of = np.empty(n_items, dtype=np.int64)
    for members in series:
        position_of[members] = np.arange(len(members))
    item_weight = 1.0 / (1.0 + position_of) ** 0.7
    item_cdf = np.cumsum(item_weight)
    step_cdf = np.cumsum([0.7, 0.2, 0.1])

    user_col, item_col, time_col = [], [], []
    for user in range(1, n_users + 1):
        preference = rng.dirichlet(0.3 * n_topics * topic_weight + 0.01)
        preference_cdf = np.cumsum(preference)
        length = int(np.clip(round(rng.lognormal(np.log(18), 0.5)), min_length, max_length))
        cursor = [-1] * n_topics  # last visited series position per topic
        seen: set[int] = set()
        sequence: list[int] = []
        topic = _pick(rng, preference_cdf)
        while len(sequence) < length:
            if rng.random() < noise_prob:
                row = _pick(rng, item_cdf)
                if row not in seen:
                    seen.add(row)
                    sequence.append(row)
                continue
            if sequence and rng.random() > continue_prob:
                topic = _pick(rng, preference_cdf)
            members = series[topic]
            if cursor[topic] < 0:  # first visit: start early in the series
                position = int(len(members) * rng.beta(1.0, 4.0))
            else:
                position = cursor[topic] + _pick(rng, step_cdf) + 1
            while position < len(members) and members[position] in seen:
                position += 1
            if position >= len(members):  # series finished: go elsewhere next step
                cursor[topic] = len(members)
                unseen = [t for t in range(n_topics) if cursor[t] < len(series[t]) - 1]
                if not unseen:
                    break
                weights = preference[unseen] + 1e-3
                topic = unseen[_pick(rng, np.cumsum(weights))]
                continue
            cursor[topic] = position
            seen.add(members[position])
            sequence.append(members[position])
        gaps = rng.exponential(86_400.0, size=len(sequence)).astype(np.int64) + 1
        times = START_TIME + int(rng.integers(START_SPREAD)) + np.cumsum(gaps)
        user_col += [str(user)] * len(sequence)
        item_col += item_ids[sequence].tolist()
        time_col += times.tolist()

    interactions = pd.DataFrame(
        {
            "user_id": pd.Series(user_col, dtype=object),
            "item_id": pd.Series(item_col, dtype=object),
            "order_key": np.asarray(time_col, dtype=np.int64),
        }
    )
    info = {
        "type": "synthetic",
        "variant": "synthetic-v1",
        "files": [],
        "parameters": {
            "n_users": n_users,
            "n_items": n_items,
            "seed": seed,
            "n_topics": n_topics,
            "min_length": min_length,
            "max_length": max_length,
            "continue_prob": continue_prob,
            "noise_prob": noise_prob,
        },
        "time_order": "timestamp",
    }
    return interactions, items, info
