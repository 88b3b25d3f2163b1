"""Collators: exact tensors for a two-example batch."""

import torch

from align.data import collate_binary, collate_pairwise, collate_prompts, collate_sft

PAD = 0


def t(rows, dtype=torch.long):
    return torch.tensor(rows, dtype=dtype)


def test_collate_sft_right_pads():
    batch = collate_sft([{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]},
                         {"input_ids": [8, 9], "loss_mask": [0, 1]}], PAD)
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
    assert torch.equal(batch["input_ids"], t([[5, 6, 7], [8, 9, 0]]))
    assert torch.equal(batch["attention_mask"], t([[1, 1, 1], [1, 1, 0]]))
    assert torch.equal(batch["loss_mask"], t([[0, 1, 1], [0, 1, 0]]))


def test_collate_sft_packed_rows_and_multiple_of_8():
    batch = collate_sft([{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1], "position_ids": [0, 0, 1]},
                         {"input_ids": [8], "loss_mask": [0], "position_ids": [0]}], PAD, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 8)
    assert torch.equal(batch["position_ids"][0], t([0, 0, 1, 0, 0, 0, 0, 0]))
    assert batch["attention_mask"].sum().item() == 4


def test_collate_pairwise_one_concatenated_batch():
    examples = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5], "margin": 0.5, "weight": 1.0},
                {"prompt_ids": [6], "chosen_ids": [7, 8, 9], "rejected_ids": [10], "margin": 0.0, "weight": 0.25}]
    batch = collate_pairwise(examples, PAD)
    assert torch.equal(batch["input_ids"], t([[1, 2, 3, 0], [6, 7, 8, 9], [1, 2, 4, 5], [6, 10, 0, 0]]))
    assert torch.equal(batch["attention_mask"], t([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]))
    assert torch.equal(batch["loss_mask"], t([[0, 0, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 0, 0]]))
    assert torch.equal(batch["margin"], t([0.5, 0.0], torch.float32))
    assert torch.equal(batch["weight"], t([1.0, 0.25], torch.float32))
    assert torch.equal(batch["prompt_lengths"], t([2, 1]))


def test_collate_binary_with_mismatched_kl_rows():
    examples = [{"prompt_ids": [1, 2], "completion_ids": [3], "label": True},
                {"prompt_ids": [4], "completion_ids": [5, 6, 7], "label": False}]
    batch = collate_binary(examples, PAD)
    assert torch.equal(batch["input_ids"], t([[1, 2, 3, 0], [4, 5, 6, 7]]))
    assert torch.equal(batch["loss_mask"], t([[0, 0, 1, 0], [0, 1, 1, 1]]))
    assert torch.equal(batch["label"], t([True, False], torch.bool))
    # Prompt i with completion i+1 (mod 2).
    assert torch.equal(batch["kl_input_ids"], t([[1, 2, 5, 6, 7], [4, 3, 0, 0, 0]]))
    assert torch.equal(batch["kl_attention_mask"], t([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]))
    assert torch.equal(batch["kl_loss_mask"], t([[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]))
    cut = collate_binary(examples, PAD, max_length=4)
    assert torch.equal(cut["kl_input_ids"], t([[1, 2, 5, 6], [4, 3, 0, 0]]))


def test_collate_prompts_left_pads():
    batch = collate_prompts([{"prompt_ids": [1, 2, 3]}, {"prompt_ids": [4]}], PAD)
    assert torch.equal(batch["input_ids"], t([[1, 2, 3], [0, 0, 4]]))
    assert torch.equal(batch["attention_mask"], t([[1, 1, 1], [0, 0, 1]]))


def test_collate_responses_scores_sampled_responses():
    from align.data.collate import collate_responses

    batch = collate_responses([[5, 6], [7]], [[8], [9, 10, 11]], PAD)
    assert torch.equal(batch["input_ids"], t([[5, 6, 8, 0], [7, 9, 10, 11]]))
    assert torch.equal(batch["attention_mask"], t([[1, 1, 1, 0], [1, 1, 1, 1]]))
    assert torch.equal(batch["loss_mask"], t([[0, 0, 1, 0], [0, 1, 1, 1]]))


def test_collate_listwise_puts_rank_j_in_block_j():
    from align.data.collate import collate_listwise

    examples = [{"prompt_ids": [5], "responses_ids": [[6], [7, 8], [9]], "index": 4},
                {"prompt_ids": [10, 11], "responses_ids": [[12], [13]], "index": 1}]  # a shorter ranking
    batch = collate_listwise(examples, PAD, k=3)
    assert torch.equal(batch["input_ids"], t([[5, 6, 0], [10, 11, 12],      # best responses
                                              [5, 7, 8], [10, 11, 13],      # second
                                              [5, 9, 0], [10, 11, 0]]))     # third (none for row 1)
    assert torch.equal(batch["loss_mask"], t([[0, 1, 0], [0, 0, 1], [0, 1, 1], [0, 0, 1], [0, 1, 0], [0, 0, 0]]))
    assert torch.equal(batch["mask"], torch.tensor([[True, True, True], [True, True, False]]))
    assert batch["index"].tolist() == [4, 1] and batch["weight"].tolist() == [1.0, 1.0]


def test_collate_indexed_pairs_and_scored_pairs():
    from align.data.collate import collate_indexed_pairs, collate_scored_pairs

    examples = [{"prompt_ids": [5], "chosen_ids": [6], "rejected_ids": [7, 8], "index": 3},
                {"prompt_ids": [9], "chosen_ids": [10], "rejected_ids": [11], "index": 0}]
    dpo, rm = collate_indexed_pairs(examples, PAD), collate_scored_pairs(examples, PAD)
    assert torch.equal(dpo["input_ids"], rm["input_ids"])
    assert dpo["index"].tolist() == [3, 0]
    assert rm["chosen_index"].tolist() == [0, 1] and rm["rejected_index"].tolist() == [2, 3]
    assert rm["pair_example"].tolist() == [0, 1]
