"""General questions whose answers an SFT job replays to keep what the model knew.

``tuning.sft.replay_rows`` asks the starting model these (and ``tuning.synthetic.prompts``)
before training and trains on its own greedy answers beside the data set's rows. They are
short facts and instructions of the kinds a small chat model is asked every day; none is a
question of the gate's regression set (``tuning.gate.REGRESSION``), nor the same fact asked
in other words (other countries, other elements, other words), so the regression set stays
a measure of what replay did not touch: tests/test_sft.py checks both.

Whatever the starting model answers is replayed, right or wrong: replay keeps behaviour, it
does not teach facts.
"""

from __future__ import annotations

_CAPITALS = ["Spain", "Italy", "Portugal", "Poland", "Sweden", "Finland", "Denmark", "the Netherlands",
             "Belgium", "Switzerland", "India", "Australia", "Mexico", "Argentina", "Turkey", "Peru",
             "Thailand", "South Korea", "Hungary", "Chile"]
_SYMBOLS = ["oxygen", "carbon", "silver", "copper", "helium", "potassium", "hydrogen", "calcium", "nitrogen",
            "lead"]
_LANGUAGES = ["the Netherlands", "Sweden", "Greece", "Egypt", "Mexico", "Poland", "Turkey", "Finland"]
_OPPOSITES = ["soft", "left", "clean", "rich", "early", "full", "tall", "strong", "loud", "empty"]
_PLURALS = ["child", "goose", "foot", "tooth", "person", "woman"]
_CURRENCIES = ["the United Kingdom", "the United States", "India", "Switzerland", "Mexico"]
_FACTS = [
    "What is the largest planet in the solar system?", "Which planet is closest to the Sun?",
    "What is the fastest land animal?", "What is the tallest animal?", "How many legs does a spider have?",
    "How many legs does an insect have?", "Which organ do we breathe with?", "What do bees make?",
    "What is frozen water called?", "How many months are in a year?", "How many minutes are in an hour?",
    "How many continents are there?", "Who painted the Mona Lisa?", "Who wrote Pride and Prejudice?",
    "What is the freezing point of water in Fahrenheit?", "What is the largest desert in the world?",
    "What is the tallest mountain in the world?", "What is the longest river in South America?",
    "Which animal is known as the king of the jungle?", "What color is grass?",
    "What shape has eight sides?", "What is the square root of 81?", "What is 3 + 5?", "What is 10 - 4?",
    "What is 6 times 7?", "What is half of 20?", "What is 100 divided by 4?", "How many hours are in two days?",
]
_INSTRUCTIONS = [
    "Translate 'thank you' into French.", "Translate 'goodbye' into Spanish.", "Say good morning in German.",
    "Write the number fifteen in digits.", "Write the number forty in digits.",
    "Convert 1 meter to centimeters.", "Convert 2 hours to minutes.",
    "Complete the sentence: An apple a day keeps the...", "Complete the sentence: Actions speak louder than...",
    "Give me a synonym for 'big'.", "Give me an antonym for 'brave'.", "Spell the word 'necessary'.",
    "Name three fruits.", "Name two animals that live in the ocean.", "List the days of the weekend.",
    "Write a one-sentence thank-you note.", "Summarize in one sentence: The dog barked at the mailman every morning.",
    "Put these numbers in order: 9, 2, 5.", "Is 17 an even or an odd number?", "Rewrite in the past tense: I walk home.",
]


def questions() -> list[str]:
    """About 100 short general questions and instructions, none in the regression set."""
    qs = [f"What is the capital of {c}?" for c in _CAPITALS]
    qs += [f"What is the chemical symbol for {e}?" for e in _SYMBOLS]
    qs += [f"What language is spoken in {c}?" for c in _LANGUAGES]
    qs += [f"What is the opposite of {w}?" for w in _OPPOSITES]
    qs += [f"What is the plural of '{w}'?" for w in _PLURALS]
    qs += [f"What currency is used in {c}?" for c in _CURRENCIES]
    return qs + _FACTS + _INSTRUCTIONS
