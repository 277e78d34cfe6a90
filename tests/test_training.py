"""Training: Trainer on real text, aux loss against its formula, router gradients, checkpointing, bf16."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from conftest import byte_blocks, tiny_model
from modeling_gqe import GQEForCausalLM, GQERoutingCallback, load_balancing_loss_func, routing_statistics
from modeling_gqe.modeling_gqe import select_experts


def test_trainer_30_steps_on_shakespeare_loss_falls_and_aux_loss_is_logged(shakespeare_text, tmp_path):
    model = tiny_model(vocab_size=256, num_experts_per_tok=1, hidden_size=64, num_hidden_layers=2)
    model.train()
    train = byte_blocks(shakespeare_text, block=64, count=30 * 8)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, seed=0, lr_scheduler_type="constant",
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[GQERoutingCallback()])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6
    assert logs[-1]["loss"] < 0.75 * logs[0]["loss"], [entry["loss"] for entry in logs]
    for entry in logs:
        # k = 1 per group: the per-layer loss is >= 1, so two layers give >= 2.
        assert entry["aux_loss"] >= 2.0 - 1e-4
        assert 0.0 <= entry["router_entropy"] <= 1.0
        assert 1.0 <= entry["expert_load_max"] <= model.config.num_experts_per_group
        assert {"router_entropy/layer_0", "expert_load_max/layer_1"} <= entry.keys()
    # The router left zero: it learned (from the weighted slot and the aux loss).
    assert model.model.layers[0].self_attn.router.weight.abs().sum() > 0


def reference_aux_loss(router_logits, G, k, routing, mask):
    """The paper's load-balancing loss written out with loops: per layer mean_g M * sum_m f[g,m] P[g,m], summed over
    layers, where f is the fraction of tokens whose selection includes expert m and P the mean probability."""
    total = 0.0
    keep = mask.reshape(-1).bool()
    for logits in router_logits:
        logits = logits[keep].double()
        tokens, M = logits.shape[0], logits.shape[1] // G
        layer = 0.0
        for g in range(G):
            probs = logits[:, g * M : (g + 1) * M].softmax(-1)
            chosen = torch.zeros(tokens, M, dtype=torch.float64)
            for t in range(tokens):
                if routing == "ranked":
                    picks = probs[t].argsort(descending=True)[:k]
                else:
                    block = M // k
                    picks = [j * block + probs[t, j * block : (j + 1) * block].argmax() for j in range(k)]
                chosen[t, picks] = 1
            layer += M * (chosen.mean(0) * probs.mean(0)).sum()
        total += layer / G
    return total


@pytest.mark.parametrize("routing,k", [("ranked", 1), ("ranked", 2), ("partitioned", 2)])
def test_aux_loss_matches_reference_formula_and_excludes_padding(routing, k):
    model = tiny_model(expert_routing=routing, num_experts_per_tok=k)
    input_ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0
    out = model(input_ids, attention_mask=mask, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (18, 8)
    expected = reference_aux_loss(out.router_logits, 2, k, routing, mask)
    torch.testing.assert_close(out.aux_loss.double(), expected, atol=1e-6, rtol=1e-6)
    # Padding matters: the unmasked value differs.
    unmasked = load_balancing_loss_func(out.router_logits, 2, k, routing, None)
    assert abs(unmasked.item() - expected.item()) > 1e-6


@pytest.mark.parametrize("routing,k", [("ranked", 1), ("ranked", 3), ("partitioned", 2)])
def test_routing_statistics_match_a_per_token_loop(routing, k):
    """The one routing-statistics function (used by the aux loss, the callback, the benchmarks and notebooks)."""
    G, M = 2, 4
    generator = torch.Generator().manual_seed(1)
    router_logits = tuple(torch.randn(14, G * M, generator=generator) * 2 for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    stats = routing_statistics(router_logits, G, k, routing, mask)
    keep = mask.reshape(-1).bool()
    assert stats["selected_experts"].shape == (3, 14, G, k)
    for layer, logits in enumerate(router_logits):
        chosen = torch.zeros(14, G, M)
        entropy = torch.zeros(14, G)
        for t in range(14):
            for g in range(G):
                probs = logits[t, g * M : (g + 1) * M].softmax(-1)
                if routing == "ranked":
                    picks = sorted(range(M), key=lambda m: -probs[m].item())[:k]
                else:
                    picks = [max(range(j * M // k, (j + 1) * M // k), key=lambda m: probs[m].item()) for j in range(k)]
                assert stats["selected_experts"][layer, t, g].tolist() == picks  # slot order: rank or block order
                chosen[t, g, picks] = 1
                entropy[t, g] = -(probs * probs.log()).sum() / torch.log(torch.tensor(float(M)))
        probs = logits.view(14, G, M).softmax(-1)
        torch.testing.assert_close(stats["selected_fraction"][layer], chosen[keep].mean(0))
        torch.testing.assert_close(stats["selected_fraction"][layer].sum(-1), torch.full((G,), float(k)))
        torch.testing.assert_close(stats["mean_probability"][layer], probs[keep].mean(0))
        torch.testing.assert_close(stats["entropy"][layer], entropy[keep].mean())


def test_aux_loss_is_added_times_coefficient_only_when_training_with_labels():
    model = tiny_model(router_aux_loss_coef=0.5)
    input_ids = torch.randint(3, 97, (2, 8))
    model.eval()
    evaluation = model(input_ids, labels=input_ids)
    assert evaluation.aux_loss is None
    model.train()
    training = model(input_ids, labels=input_ids)
    torch.testing.assert_close(training.loss, evaluation.loss + 0.5 * training.aux_loss)


def test_router_learns_from_the_lm_loss_through_the_weighted_slot():
    for variant, expect_gradient in [("gqe", True), ("weighted_concat", True), ("hard_concat", False)]:
        model = tiny_model(gqe_variant=variant, router_aux_loss_coef=0.0)
        model.train()
        input_ids = torch.randint(3, 97, (2, 8))
        model(input_ids, labels=input_ids).loss.backward()
        grad = model.model.layers[0].self_attn.router.weight.grad
        has_gradient = grad is not None and grad.abs().sum() > 0
        assert has_gradient == expect_gradient, variant


def test_gradient_checkpointing_gives_the_same_gradients():
    input_ids = torch.randint(3, 97, (2, 10))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=5)
        model.train()
        if checkpointing:  # transformers >= 5.20 names it activation_checkpointing_enable
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        model(input_ids, labels=input_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_half_precision_with_padding_has_no_nan(dtype, backend):
    model = tiny_model(attn_implementation=backend).to(dtype)
    input_ids = torch.randint(3, 97, (3, 10))
    mask = torch.ones_like(input_ids)
    mask[0, :6] = 0
    mask[1, :9] = 0
    model.train()
    out = model(input_ids, attention_mask=mask, labels=input_ids.masked_fill(mask == 0, -100))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert out.router_logits[0].dtype == torch.float32  # router in fp32 whatever the model dtype
    model.eval()
    with torch.no_grad():
        generated = model.generate(input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert generated.shape == (3, 14)


def test_tied_embeddings_share_storage_and_survive_reload(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = GQEForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)


def test_select_experts_partitioned_takes_the_best_of_each_block():
    probs = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.05, 0.05, 0.6, 0.3]])
    top_probs, top_index = select_experts(probs, 2, "partitioned")
    assert top_index.tolist() == [[1, 2], [0, 2]]
    torch.testing.assert_close(top_probs, torch.tensor([[0.4, 0.3], [0.05, 0.6]]))
    top_probs, top_index = select_experts(probs, 2, "ranked")
    assert top_index.tolist() == [[1, 2], [2, 3]]


def test_select_experts_ranked_k1_is_the_most_probable_expert():
    # k = 1 takes a max rather than top-k (faster on GPUs): the same probability and expert as torch.topk, including
    # for the all-equal probabilities of a zero-initialised router (the first expert).
    probs = torch.randn(3, 5, 4, 8, generator=torch.Generator().manual_seed(0)).softmax(dim=-1)
    top_probs, top_index = select_experts(probs, 1, "ranked")
    expected_probs, expected_index = torch.topk(probs, 1, dim=-1)
    assert top_index.shape == (3, 5, 4, 1)
    assert torch.equal(top_index, expected_index) and torch.equal(top_probs, expected_probs)
    uniform = torch.full((2, 3, 4), 0.25)
    assert select_experts(uniform, 1, "ranked")[1].eq(0).all()


def test_sequence_classification_head_uses_the_last_real_token():
    from modeling_gqe import GQEForSequenceClassification

    torch.manual_seed(0)
    model = GQEForSequenceClassification(tiny_model().config.__class__(**{**tiny_model().config.to_dict(), "num_labels": 3})).eval()
    input_ids = torch.randint(3, 97, (1, 6))
    padded = torch.cat([input_ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = model(input_ids).logits
        b = model(padded).logits  # pad_token_id = 0: pooled at the last non-pad token
    assert a.shape == (1, 3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
