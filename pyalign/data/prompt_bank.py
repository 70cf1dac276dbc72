"""A fixed bank of short, varied instructions (templates x topics: 560 prompts in a fixed order) and a
short system prompt: the prompts of the SPO demos and of the generation measurement
(:mod:`pyalign.generation.measure`), in one place so both see the same text.
"""



# A short system prompt: the model's default one is ~20 tokens, which would dominate the length
# of every training sequence on a CPU budget.
SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly."


_TEMPLATES = (
    "Give me a tip about {}.",
    "Write one sentence about {}.",
    "What is interesting about {}?",
    "Explain {} to a child.",
    "Tell me a fact about {}.",
    "Why do people like {}?",
    "Describe {} in a few words.",
    "What should a beginner know about {}?",
    "Write a short poem about {}.",
    "What is a common mistake with {}?",
    "How can I learn more about {}?",
    "Tell me a short story about {}.",
    "Name two things related to {}.",
    "What are the benefits of {}?",
    "Give me a fun question about {}.",
    "Summarize the history of {}.",
    "Compare {} with something similar.",
    "What is the future of {}?",
    "Write a slogan about {}.",
    "Give me advice on {}.",
)


_TOPICS = (
    "the ocean", "coffee", "gardening", "the moon", "bicycles", "chess", "volcanoes",
    "honey bees", "rain", "music", "cooking pasta", "saving money", "sleep", "running",
    "photography", "trees", "the internet", "birds", "mountains", "friendship", "recycling",
    "painting", "electricity", "dogs", "bread", "winter", "trains", "libraries",
)


def prompt_bank() -> list[str]:
    """All template x topic prompts (560), in a fixed order."""
    return [template.format(topic) for topic in _TOPICS for template in _TEMPLATES]
