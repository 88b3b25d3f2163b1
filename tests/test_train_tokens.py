"""align.metrics.train_tokens, the one `tokens` of every stage: the non-padding tokens (prompt and
response) of every sequence a training step forwards, on each stage's own collated batch, hand-counted."""

from align.data.collate import (collate_indexed_pairs, collate_kto, collate_listwise, collate_rankings, collate_rows,
                                collate_scored_pairs, collate_sft)
from align.metrics import train_tokens

PAD = 0


def test_sft_counts_prompt_and_response_not_padding():
    # rows of 5 (2 prompt + 3 response) and 3 (1 + 2) tokens, padded to 5: 8 tokens, not the 5 response tokens
    batch = collate_sft([{"input_ids": [1, 2, 3, 4, 5], "loss_mask": [0, 0, 1, 1, 1]},
                         {"input_ids": [6, 7, 8], "loss_mask": [0, 1, 1]}], PAD)
    assert batch["input_ids"].shape == (2, 5)
    assert train_tokens(batch) == 8.0


def test_dpo_pairs_count_the_shared_prompt_once_per_sequence():
    # pair 1: prompt 3, chosen 2, rejected 4 -> 5 + 7; pair 2: prompt 2, chosen 1, rejected 1 -> 3 + 3
    batch = collate_indexed_pairs([
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7, 8, 9], "index": 0},
        {"prompt_ids": [1, 2], "chosen_ids": [4], "rejected_ids": [5], "index": 1}], PAD)
    assert train_tokens(batch) == 5 + 7 + 3 + 3


def test_listwise_dpo_counts_every_forwarded_row():
    # k = 3: ranking A (prompt 2; responses 1, 2, 3) -> 3 + 4 + 5; ranking B (prompt 1; responses 2, 1) -> 3 + 2,
    # and its missing third response still forwards the prompt alone -> 1
    batch = collate_listwise([{"prompt_ids": [1, 2], "responses_ids": [[3], [3, 4], [3, 4, 5]], "index": 0},
                              {"prompt_ids": [1], "responses_ids": [[2, 3], [2]], "index": 1}], PAD, k=3)
    assert train_tokens(batch) == 3 + 4 + 5 + 3 + 2 + 1


def test_kto_counts_matched_and_mismatched_rows():
    # matched: (2 + 3) and (1 + 1); mismatched (KL) rows: (2 + 1) and (1 + 4)
    batch = collate_kto([{"prompt_ids": [1, 2], "completion_ids": [3, 4, 5], "kl_completion_ids": [6], "label": True,
                          "index": 0},
                         {"prompt_ids": [1], "completion_ids": [2], "kl_completion_ids": [3, 4, 5, 6], "label": False,
                          "index": 1}], PAD)
    assert train_tokens(batch) == 5 + 2 + 3 + 5


def test_reward_model_pairs_and_rankings():
    pairs = collate_scored_pairs([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [3, 4, 5]}], PAD)
    assert train_tokens(pairs) == 3 + 5
    # a ranking of 3 is 3 sequences (its 3 pairs index into them): (2 + 1) + (2 + 2) + (2 + 3)
    ranking = collate_rankings([{"prompt_ids": [1, 2], "responses_ids": [[3], [3, 4], [3, 4, 5]]}], PAD)
    assert train_tokens(ranking) == 3 + 4 + 5


def test_ppo_rollout_rows():
    # what the policy's update forwards: prompt + response of each row (times ppo_epochs in rlhf/ppo.py)
    batch, _ = collate_rows([{"prompt": [1, 2, 3], "response": [4, 5]}, {"prompt": [1], "response": [2, 3, 4, 5]}],
                            PAD)
    assert train_tokens(batch) == 5 + 5
