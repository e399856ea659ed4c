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


def write_reward_adapter(base, folder) -> str:
    """A reward adapter in TRL RewardTrainer's SEQ_CLS format on `base`: LoRA r4 on q/v with
    its B weights and the score head drawn from seed 0 (so it is not a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            seq = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
            rm = get_peft_model(seq, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                target_modules=["q_proj", "v_proj"]))
            with torch.no_grad():
                for n, w in rm.named_parameters():
                    if w.requires_grad and ("lora_B" in n or "score" in n):
                        torch.nn.init.normal_(w, std=0.1)
            rm.save_pretrained(str(folder))
    finally:
        hf_logging.set_verbosity(verbosity)
    return str(folder)
