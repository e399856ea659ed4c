"""The few review sentences and prompt openings the test assets are built from (shared)."""

REVIEWS = [
    "the movie was great and i loved every minute of it",
    "a terrible film with bad acting and a boring plot",
    "the music was nice but the story made no sense",
    "what a wonderful performance by the whole cast",
    "i would not watch this movie again",
    "a movie review should say what the film is about",
    "the ending was sad and beautiful at the same time",
    "two hours of my life that i will never get back",
    "the acting in this film was the best part",
    "my friends and i laughed at the plot of the story",
]

# Distinct openings: prompt ids index this list.
PROMPTS = [
    "the movie was", "a terrible film with", "the music was nice but", "what a wonderful",
    "i would not watch", "a movie review should", "the ending was sad and", "two hours of my",
    "the acting in this film", "my friends and i", "the plot of the story", "this is the best",
    "the cast was", "i loved the", "we watched the", "the story made no",
    "a wonderful performance by", "the film is about", "the whole cast was", "every minute of it",
]
